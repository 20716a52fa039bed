"""Peak resident memory of a first execution, for the CPU memory tables of the benchmarks.

TensorFlow keeps freed CPU memory pooled, so only the first execution of a function in a
fresh process shows its true need. `first_execution_peak_mib` resets the kernel's peak-RSS
counter (/proc/self/clear_refs) right before the call and reports the peak resident memory
during it minus the resident memory just before it (Linux only).

`peak_requested_mib` reads the allocations and deallocations of one call from TensorFlow's
profiler (memory events of the BFC allocator, so TF_CPU_ALLOCATOR_USE_BFC=true on CPU) and
reports the largest sum of bytes requested by the tensors the call allocated and held at once:
what the computation itself holds, without the allocator's rounding and the free space it
cannot split (which depend on the order of earlier allocations).
"""

import os

__all__ = ["rss_mib", "first_execution_peak_mib", "peak_requested_mib"]


def rss_mib():
    """{"VmRSS": current, "VmHWM": peak since the last reset} in MiB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def first_execution_peak_mib(call):
    """(peak MiB above the resident memory before, resident MiB before, call's result)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current size
    before = rss_mib()["VmRSS"]
    result = call()
    return rss_mib()["VmHWM"] - before, before, result


def peak_requested_mib(call):
    """(peak MiB requested by the call's live tensors, number of allocations seen, result)."""
    import glob
    import shutil
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="peak_requested_")
    tf.profiler.experimental.start(logdir, options=tf.profiler.experimental.ProfilerOptions(
        host_tracer_level=2))
    try:
        result = call()
    finally:
        tf.profiler.experimental.stop()
    paths = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[0], "rb") as f:
        space.ParseFromString(f.read())
    shutil.rmtree(logdir, ignore_errors=True)
    events = []
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        wanted = {k for k, v in stat_names.items() if v in ("addr", "requested_bytes")}
        for line in plane.lines:
            for event in line.events:
                kind = names.get(event.metadata_id)
                if kind not in ("MemoryAllocation", "MemoryDeallocation"):
                    continue
                stats = {stat_names[s.metadata_id]: getattr(s, s.WhichOneof("value"))
                         for s in event.stats if s.metadata_id in wanted}
                events.append((line.timestamp_ns * 1000 + event.offset_ps,
                               kind == "MemoryAllocation", stats.get("addr"),
                               int(stats.get("requested_bytes", 0))))
    events.sort(key=lambda e: e[0])  # stable: the profiler's order within a timestamp
    held, current, peak, allocations, unpaired = {}, 0, 0, 0, 0
    for _, allocation, address, requested in events:
        if address is None:  # cannot be paired with its release
            unpaired += 1
            continue
        if allocation:
            # an address handed out again before its release was seen (both at one
            # timestamp, the release listed after): the earlier tensor is gone
            current -= held.pop(address, 0)
            held[address] = requested
            current += requested
            peak = max(peak, current)
            allocations += 1
        elif address in held:  # tensors made before the call are not counted
            current -= held.pop(address)
    if not allocations:
        raise RuntimeError("the profiler saw no allocation: is TF_CPU_ALLOCATOR_USE_BFC=true?")
    if unpaired:
        import warnings
        warnings.warn(f"peak_requested_mib: {unpaired} memory events without an address "
                      "were left out (the peak may be low)")
    return peak / 2 ** 20, allocations, result
