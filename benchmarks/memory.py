"""Peak resident memory of a first execution, for the CPU memory tables of the benchmarks.

TensorFlow keeps freed CPU memory pooled, so only the first execution of a function in a
fresh process shows its true need. `first_execution_peak_mib` resets the kernel's peak-RSS
counter (/proc/self/clear_refs) right before the call and reports the peak resident memory
during it minus the resident memory just before it (Linux only).
"""

__all__ = ["rss_mib", "first_execution_peak_mib"]


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
