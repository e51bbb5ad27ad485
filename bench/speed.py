"""Speed figures of CLEAR, each measured beside a reference in the same run (`python benchmark.py scan`,
`encoders` and `speed` print them): best-of-n wall time, peak memory, this machine's matmul peak, the selective
scan's candidates (triton_scan's sequential loop, its default path and its other one, mambapy's pscan when
installed), the encoders' forward throughput, the extraction of a real-sized scan and one MIL fold.
"""
import resource
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


def rss_kib(field):
    """A memory field of this process in KiB, e.g. "VmRSS:" (resident now) or "VmHWM:" (its peak), on Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss():
    """Reset this process's peak resident set (VmHWM) to what it holds now: Linux's /proc/self/clear_refs. OSError
    where that cannot be written (another OS, or a locked-down container)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Meter:
    """Wall time and peak resident memory of the stages of one row: this process's (Linux VmHWM, reset per stage)
    or, if larger, that of the largest child process so far (the fit's fold workers; getrusage has no reset)."""

    def __init__(self):
        self.seconds, self.peak = {}, 0

    def __call__(self, stage, fn):
        try:
            reset_peak_rss()
        except OSError:  # then the peak is the process's whole life's
            pass
        t0 = time.perf_counter()
        out = fn()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.peak = max(self.peak, rss_kib("VmHWM:") * 1024,
                        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        return out


def peak_memory(fn, device="cpu"):
    """Extra peak memory of `fn()` in bytes for work on `device`: CUDA's allocator peak for a GPU, else the rise of
    the process's peak resident set (Linux: /proc/self/clear_refs resets VmHWM). None where neither can be read."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        reset_peak_rss()
        before = rss_kib("VmRSS:")
        fn()
        return (rss_kib("VmHWM:") - before) * 1024
    except OSError:
        return None


def saved_bytes(fn):
    """Bytes that autograd keeps for the backward of `fn()`'s result, counted by saved-tensor hooks (each storage
    once, parameters included), on any device: what a training step holds between forward and backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def matmul_peak_gflops(n=2048, repeat=5):
    """This machine's fp32 matmul throughput (GFLOP/s) on an n x n torch.mm: the roofline we compare to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), repeat=repeat) / 1e9


# ---------------------------------------------------------------- the selective scan's candidates


def _release_freed_memory():
    """Hand memory that glibc keeps after free() back to the OS, so peak_memory's rise in resident set sees
    every page a candidate touches, not only those beyond what an earlier candidate left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mambapy_scan(pscan):
    """The same computation as selective_scan(u, delta, A, B, C), built around mambapy's pscan the way
    mambapy's own Mamba block does (deltaA and BX materialised as (B, L, D, N), then y = hs @ C)."""

    def run(u, delta, A, B, C):
        delta_t, u_t = delta.transpose(1, 2), u.transpose(1, 2)  # (B, L, D)
        deltaA = torch.exp(delta_t.unsqueeze(-1) * A)  # (B, L, D, N)
        BX = delta_t.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u_t.unsqueeze(-1)  # (B, L, D, N)
        hs = pscan(deltaA, BX)  # (B, L, D, N)
        return (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3).transpose(1, 2)  # (B, D, L)

    return run


def _fwd_bwd(scan, inputs, dy):
    torch.autograd.grad(scan(*inputs), inputs, dy)


def scan_candidates(device):
    """name -> scan function (u, delta, A, B, C) -> y: the loop reference, the default path, the other path and,
    when installed, mambapy's pscan."""
    from functools import partial

    from triton_scan import default_method, selective_scan, selective_scan_ref

    default = default_method(device)
    candidates = {"reference (loop)": selective_scan_ref,
                  f"default ({default})": partial(selective_scan, method=default)}
    for method in ("chunked", "parallel"):
        if method != default:
            candidates[method] = partial(selective_scan, method=method)
    try:
        from mambapy.pscan import pscan
    except ImportError:
        pass
    else:
        candidates["mambapy pscan"] = _mambapy_scan(pscan)
    return candidates


def scan_figures(candidates, L, device, repeat, batch=8, dim=384, N=16):
    """{name: (fwd+bwd seconds, extra peak bytes or None)} on the same inputs for every candidate."""
    from functools import partial

    gen = torch.Generator().manual_seed(L)
    u, delta, dy = (torch.randn(batch, dim, L, generator=gen) for _ in range(3))  # (B, D, L)
    delta = torch.nn.functional.softplus(delta - 2)  # (B, D, L), step sizes around 0.1 as in Mamba
    A = -torch.exp(torch.randn(dim, N, generator=gen))  # (D, N), negative real
    B, C = (torch.randn(batch, N, L, generator=gen) for _ in range(2))  # (B, N, L)
    inputs = [t.to(device).requires_grad_() for t in (u, delta, A, B, C)]
    dy = dy.to(device)
    runs = {name: partial(_fwd_bwd, scan, inputs, dy) for name, scan in candidates.items()}
    peaks, times = {}, {name: float("inf") for name in runs}
    for name, run in runs.items():
        _release_freed_memory()
        peaks[name] = peak_memory(run, device)  # also each candidate's warm-up run
    for _ in range(repeat):  # interleaved, so a burst of load on the shared machine hits all alike
        for name, run in runs.items():
            times[name] = min(times[name], best_time(run, repeat=1, warmup=0))
    return {name: (times[name], peaks[name]) for name in runs}


# ---------------------------------------------------------------- encoders, extraction, MIL fit


def encoder_figures(name, size, x, repeat):
    """One encoder's forward on batch x: {params, flops (per batch), seconds, gflops (achieved), peak (matmul
    GFLOP/s measured interleaved with it, best of each)}."""
    from models import build_encoder, count_flops, count_parameters

    encoder = build_encoder(name, size, img_size=x.shape[-1]).to(x.device).eval()
    flops = count_flops(encoder, x)
    t, peak = float("inf"), 0.0
    with torch.inference_mode(), x.device:  # the peak's operands on the encoder's device too
        best_time(lambda: encoder(x), repeat=1, warmup=1)  # two warm-ups: the allocator settles
        for _ in range(repeat):  # peak and encoder interleaved, the best of each kept
            peak = max(peak, matmul_peak_gflops(repeat=2))
            t = min(t, best_time(lambda: encoder(x), repeat=1, warmup=0))
    return dict(params=count_parameters(encoder), flops=flops, seconds=t, gflops=flops / t / 1e9, peak=peak)


def extraction_seconds(encoder, img_size, device, n_slices=48, side=512):
    """Seconds of the whole extract path for one real-sized scan (n_slices of side², int16 NIfTI on disk):
    read and reorient, resize and window, encode."""
    import tempfile

    import numpy as np

    from data import SliceConfig, load_ct, prepare_slices, save_nifti
    from extract import embed_slices

    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, (n_slices, side, side)).clip(-1024, 3000).astype(np.float32)  # (Z, Y, X)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ct.nii.gz"
        save_nifti(path, hu, np.diag([0.7, 0.7, 2.5, 1.0]), dtype=np.int16)

        def run():
            volume, spacing = load_ct(path)
            embed_slices(encoder, prepare_slices(volume, spacing, SliceConfig(img_size=img_size))[0], device=device)

        return best_time(run, repeat=2)


def mil_fold_seconds(n_bags=200, n_slices=100, dim=192, folds=5):
    """Seconds per fold of `clear.py fit`'s cross-validation (every epoch run, no early stop) on random bags."""
    import tempfile
    from pathlib import Path

    from cv import FitConfig, fit_cv
    from mil import Bags

    g = torch.Generator().manual_seed(0)
    scans = tuple(f"s{i}" for i in range(n_bags))
    bags = Bags(Path("random"), {}, dim, scans, tuple(torch.randn(n_slices, dim, generator=g) for _ in scans),
                tuple(torch.arange(n_slices, dtype=torch.float64) for _ in scans), ("",) * n_bags)
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        labels.write_text("patient,scan,y\n" + "".join(f"p{i},{s},{i % 2}\n" for i, s in enumerate(scans)))
        cfg = FitConfig(targets=("y",), folds=folds, patience=FitConfig.epochs, n_bootstrap=10)
        t0 = time.perf_counter()
        fit_cv(bags, labels, cfg)
    return (time.perf_counter() - t0) / folds
