"""DEHB (the `dehb` package, 0.1.1) as benchmarks.long_horizon runs it: its fidelity levels, and
a driver loop for Dask workers that waits instead of polling. No flags, no app imports."""

from dehb import DEHB

__all__ = ["lowest_fidelity", "WaitingDEHB"]


def lowest_fidelity(horizon, units):
    """DEHB's min_fidelity for runs of T / units ... T steps. dehb 0.1.1 counts its fidelity
    levels as int(log(max / min) / log(eta)) + 1, and log(9) / log(3) = 1.9999999999999996
    in floating point drops the T / 9 level; a minimum smaller by 1e-9 keeps it (the run
    lengths are rounded to whole steps)."""
    return horizon / units * (1.0 - 1e-9)


class WaitingDEHB(DEHB):
    """`dehb.DEHB` on a Dask client whose driver loop waits while every worker is busy.

    dehb 0.1.1's run loop polls without pause: each pass asks the scheduler for its worker
    count and checks every future, which keeps a core busy; on a small machine that core is
    one the workers need. Here the worker count is the client's at the start (a fixed
    cluster) and, with all workers busy, the loop blocks until the first trial finishes."""

    def _get_worker_count(self):
        return self.n_workers

    def _fetch_results_from_workers(self):
        if self.client is not None and len(self.futures) >= self.n_workers:
            from distributed import wait
            try:
                wait(self.futures, timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:  # none finished within the second: look again
                pass
        super()._fetch_results_from_workers()
