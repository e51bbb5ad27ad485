"""CLEAR benchmarks: every speed and accuracy claim of the README is produced here, never in timed tests.

    python benchmark.py scan        # selective scan: sequential reference vs default path (vs mambapy)
    python benchmark.py encoders    # slices/s and achieved GFLOP/s of the three encoders vs matmul peak

These machines are shared and noisy: every figure is the best of several repeats and is printed beside a
reference measured in the same run, so ratios are what to read.
"""
import argparse
import os
import time

import torch


def best_time(fn, repeat=5, warmup=1):
    """Best wall time of `fn()` in seconds over `repeat` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn):
    """Extra peak memory of `fn()` in bytes: CUDA's allocator peak on GPU, else the rise of the process's
    peak resident set (Linux: /proc/self/clear_refs resets VmHWM). None where neither can be read."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS:")
        fn()
        return (_rss_kib("VmHWM:") - before) * 1024
    except OSError:
        return None


def matmul_peak_gflops(n=2048, repeat=5):
    """This machine's fp32 matmul throughput (GFLOP/s) on an n x n torch.mm: the roofline we compare to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), repeat=repeat) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
