"""Timing shared by the benchmark scripts."""
import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def times_in_turns(fns: dict, repeats: int, warmup: int, device, clock=time.perf_counter) -> dict:
    """Times (s) of each function, `repeats` rounds; every round runs each once, and every other round in reverse
    order, so that neither background load nor going first (caches, the allocator) favours one of them."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = clock()
            fns[k]()
            sync(device)
            times[k].append(clock() - t0)
    return times


def median_times_in_turns(fns: dict, repeats: int, warmup: int, device, clock=time.perf_counter) -> dict:
    """Median time (s) of each function, run in alternating turns (`times_in_turns`)."""
    return {k: statistics.median(v) for k, v in times_in_turns(fns, repeats, warmup, device, clock).items()}
