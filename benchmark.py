"""CLEAR benchmarks: every speed and accuracy claim of the README is produced here, never in timed tests.

    python benchmark.py scan        # selective scan: sequential reference vs default path (vs mambapy)
    python benchmark.py encoders    # slices/s and achieved GFLOP/s of the three encoders vs matmul peak
    python benchmark.py speed       # one table: scan, encoders, extraction, MIL fit, peak memory
    python benchmark.py accuracy    # the paper's claim on the synthetic cohort: results/accuracy.md
    python benchmark.py ablate      # LeCL's settings one at a time on its ViT row: results/ablation.md
    python benchmark.py probe --data COHORT --bags BAGS   # does an encoder see the lesions of the masks?
    python benchmark.py twin --checkpoint E.pt  # ... and with anatomy and noise held fixed (synthetic twins)?

These machines are shared and noisy: every figure is the best of several repeats and is printed beside a
reference measured in the same run, so ratios are what to read.
"""
import argparse
import dataclasses
import math
import os
import sys
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


# ---------------------------------------------------------------- scan: selective scan forward + backward


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
        peaks[name] = peak_memory(run)  # also each candidate's warm-up run
    for _ in range(repeat):  # interleaved, so a burst of load on the shared machine hits all alike
        for name, run in runs.items():
            times[name] = min(times[name], best_time(run, repeat=1, warmup=0))
    return {name: (times[name], peaks[name]) for name in runs}


def _device(name):
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return device


def bench_scan(args):
    """Selective scan forward+backward (batch 8, dim 384, N 16): the loop reference, the default path, the
    parallel form and, when installed, mambapy's pscan, on the same inputs. Prints a markdown table."""
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = scan_candidates(device)
    print(f"selective scan fwd+bwd on {device} ({torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start), batch 8, dim 384, N 16; best of {args.repeat}; "
          "peak = extra memory during one call"
          + ("" if "mambapy pscan" in candidates else "; mambapy not installed (pip install mambapy) so no pscan row"))
    print("\n| L | method | fwd+bwd ms | speed-up vs mambapy | speed-up vs reference | peak MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for L in [196] if args.quick else args.lengths:
        figures = scan_figures(candidates, L, device, args.repeat)
        t_ref, t_mpy = figures["reference (loop)"][0], figures.get("mambapy pscan", (None,))[0]
        for name, (t, peak) in figures.items():
            vs_mpy = f"{t_mpy / t:.2f}x" if t_mpy else "n/a"
            mib = f"{peak / 2**20:.0f}" if peak is not None else "n/a"
            print(f"| {L} | {name} | {t * 1e3:.0f} | {vs_mpy} | {t_ref / t:.2f}x | {mib} |")


# ---------------------------------------------------------------- encoders: slices/s and GFLOP/s vs matmul peak


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


def bench_encoders(args):
    """Forward throughput (inference_mode) of every encoder at `--size`, on one batch of `--batch` slices at
    `--img-size`², beside this machine's fp32 matmul peak measured in the same run. Prints a markdown table."""
    device = _device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)  # (B, C, H, W)
    rows = []
    for name in args.names:
        f = encoder_figures(name, args.size, x, args.repeat)
        rows.append(f"| {name}-{args.size} | {f['params'] / 1e6:.2f} | {f['flops'] / args.batch / 1e9:.2f} | "
                    f"{args.batch / f['seconds']:.1f} | {f['gflops']:.0f} | {f['peak']:.0f} | "
                    f"{f['gflops'] / f['peak']:.0%} |")
    print(f"encoders forward, inference_mode, on {device} ({torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the end), batch {args.batch} at {args.img_size}²; best of {args.repeat}; "
          "matmul peak = fp32 2048² torch.mm, best of runs interleaved with the encoder's; FLOPs = "
          "2 x MACs of matmuls, convs and attention by FlopCounterMode, plus 7 per SSM state update")
    print("\n| encoder | params M | GFLOP / slice | slices/s | GFLOP/s | matmul peak GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


# ---------------------------------------------------------------- speed: every speed figure in one table


def _extraction_seconds(encoder, img_size, device, n_slices=48, side=512):
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


def _mil_fold_seconds(n_bags=200, n_slices=100, dim=192, folds=5):
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


def bench_speed(args):
    """One table of the speed figures, each beside its reference measured in the same run."""
    import resource

    from extract import embed_slices
    from models import build_encoder

    device, rows = _device(args.device), []
    candidates = {k: v for k, v in scan_candidates(device).items() if k.startswith(("ref", "default", "mamba"))}
    scan = scan_figures(candidates, 1024, device, args.repeat)
    ref, default = scan.pop("reference (loop)")[0], next(t for k, (t, _) in scan.items() if k.startswith("default"))
    rows.append(("selective scan fwd+bwd, L 1024, batch 8, dim 384, N 16", f"{default * 1e3:.0f} ms",
                 f"sequential loop {ref * 1e3:.0f} ms", f"{ref / default:.1f}x faster"))
    if "mambapy pscan" in scan:
        mpy = scan["mambapy pscan"][0]
        rows.append(("", "", f"mambapy pscan {mpy * 1e3:.0f} ms", f"{mpy / default:.1f}x faster"))
    x = torch.randn(32, 3, 224, 224, device=device)  # (B, C, H, W)
    for name in ("vit", "gcnn", "ssm"):
        f = encoder_figures(name, "tiny", x, args.repeat)
        rows.append((f"{name}-tiny forward, batch 32 at 224²", f"{32 / f['seconds']:.1f} slices/s, "
                     f"{f['gflops']:.0f} GFLOP/s", f"fp32 matmul peak {f['peak']:.0f} GFLOP/s",
                     f"{f['gflops'] / f['peak']:.0%} of peak"))
    vit = build_encoder("vit", "tiny", img_size=224).to(device).eval()
    n = 48
    t_extract = _extraction_seconds(vit, 224, device, n)
    with torch.inference_mode():
        t_encode = best_time(lambda: embed_slices(vit, torch.rand(n, 3, 224, 224), device=device), repeat=2)
    rows.append((f"extract: {n} slices of 512² int16 NIfTI -> vit-tiny at 224²", f"{n / t_extract:.1f} slices/s",
                 f"encoder alone {n / t_encode:.1f} slices/s", f"{t_encode / t_extract:.0%} of the time encoding"))
    rows.append(("fit: attention-MIL, 200 bags of 100 x 192, 40 epochs", f"{_mil_fold_seconds():.1f} s per fold",
                 "", ""))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    rows.append(("peak resident memory of this whole run", f"{rss:.0f} MiB", "", ""))
    print(f"speed on {device} ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the "
          f"end); best of {args.repeat}; timm does not import beside this torch, so its row is absent\n")
    print("| what | figure | reference (same run) | ratio |\n|---|---:|---:|---:|")
    print("\n".join(f"| {' | '.join(r)} |" for r in rows))


def _run_report(run, cfg, args, name):
    """run(cfg, out, work, progress) with tqdm bars, then print `out`/name.md and how long it took. --quick writes
    to results/quick by default, so that its tiny cohort never lands in the work folder of the full run."""
    from tqdm import tqdm

    progress = lambda desc, unit: lambda it, total: tqdm(it, total=total, desc=desc, unit=unit, leave=False)  # noqa: E731
    out = args.out or ("results/quick" if args.quick else "results")
    t0 = time.time()
    report = run(cfg, out, args.work or f"{out}/work", progress)
    print(open(f"{out}/{name}.md").read())
    print(f"{len(report['rows'])} rows in {time.time() - t0:.0f} s on {report['machine']}; "
          f"results in {out}/{name}.md and .json")


def bench_accuracy(args):
    """The paper's table on the synthetic cohort (accuracy.py): results/accuracy.md and .json."""
    import accuracy

    cfg = accuracy.QUICK if args.quick else accuracy.AccuracyConfig()
    cfg = dataclasses.replace(cfg, **{k: tuple(getattr(args, k)) for k in ("encoders", "methods")
                                      if getattr(args, k)})
    _run_report(accuracy.run, cfg, args, "accuracy")


def bench_ablate(args):
    """LeCL's settings one at a time on the accuracy benchmark's ViT row (ablation.py): results/ablation.md, .json."""
    import ablation

    _run_report(ablation.run, ablation.QUICK if args.quick else ablation.AblationConfig(), args, "ablation")


def bench_probe(args):
    """Tumour-slice linear probe of one bag folder against its cohort's lesion masks (probe.slice_probe)."""
    from probe import bags_rank, first_axis, probe_bags
    from cohort import Cohort
    from files import ClearError
    from mil import load_bags

    cohort, bags = Cohort(args.data), load_bags(args.bags)
    missing = [s.scan for s in cohort.scans if s.scan in bags.scans and s.mask is None]
    if not cohort.has_masks or missing:
        raise ClearError(f"{args.data}: the probe needs a lesion mask for every bag's scan (none for "
                         f"{', '.join(missing[:3]) or 'any scan'})")
    unknown = sorted(set(bags.scans) - {s.scan for s in cohort.scans})
    if unknown:
        raise ClearError(f"{args.bags}: bags of scans not in {args.data}: {', '.join(unknown[:3])}")
    auc, flags = probe_bags(cohort, bags, tuple(args.labels) if args.labels else None, args.seed)
    n = sum(len(f) for f in flags)
    score = "undefined (too few lesion slices)" if math.isnan(auc) else f"{auc:.3f}"
    print(f"{args.bags}: {sum(int(f.sum()) for f in flags)} of {n} slices hold a lesion (mask labels "
          f"{args.labels or 'any'}); linear probe AUROC on held-out patients' slices, mean over the 4 patient "
          f"folds that hold both classes: {score}")
    share, corr = first_axis(bags)
    rank = bags_rank(bags)
    print(f"{args.bags}: effective rank (RankMe) of the slice embeddings {rank:.1f} of {bags.dim}; the first "
          f"principal axis holds {share:.0%} of their variance and correlates with the slice's height in the scan "
          f"at |r| = {corr:.2f}")


def bench_twin(args):
    """The twin test (probe.twin_probe) of one encoder on the accuracy benchmark's cohort, one row per finding."""
    from accuracy import TUMOUR_LABELS, AccuracyConfig
    from extract import EncoderSpec, load_encoder
    from phantom import LUNG_EMPHYSEMA, LUNG_GGO
    from probe import twin_probe, twin_slices

    spec = EncoderSpec(checkpoint=args.checkpoint, name=args.encoder, module=args.encoder_module,
                       img_size=args.img_size)
    encoder, identity, slices = load_encoder(spec)
    slices = dataclasses.replace(slices, thickness_mm=None)
    cohort = dataclasses.replace(AccuracyConfig().cohort, seed=args.seed)
    findings = {f"ground glass (mask {LUNG_GGO})": (LUNG_GGO,), f"emphysema ({LUNG_EMPHYSEMA})": (LUNG_EMPHYSEMA,),
                f"tumours ({TUMOUR_LABELS[0]}-{TUMOUR_LABELS[-1]})": TUMOUR_LABELS}
    twins = twin_slices(cohort, range(args.n), findings, slices)
    print(f"twin test of {identity['name']}, {identity['source']}, at {slices.img_size} px, on patients "
          f"0-{args.n - 1} of the synthetic cohort (seed {args.seed}, {cohort.size} px): each slice with a finding "
          f"against the same slice of its twin without it\n")
    print("| finding | patients | slice pairs | twin probe AUROC | consistency |\n|---|---:|---:|---:|---:|")
    for name, pairs in twins.items():
        auc, cons = twin_probe(encoder, pairs, args.seed) if len(pairs) >= 4 else (math.nan, math.nan)
        print(f"| {name} | {len(pairs)} | {sum(len(w) for _, w, _ in pairs)} | {auc:.3f} | {cons:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_scan = sub.add_parser("scan", help="selective scan fwd+bwd: reference vs default path vs mambapy")
    p_scan.add_argument("--lengths", type=int, nargs="+", default=[196, 1024, 4096], help="sequence lengths L")
    p_scan.add_argument("--quick", action="store_true", help="L = 196 only (seconds instead of minutes)")
    p_scan.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is reported")
    p_scan.add_argument("--device", default="cpu", help="cpu or cuda")
    p_scan.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p_scan.set_defaults(func=bench_scan)
    p_enc = sub.add_parser("encoders", help="encoders' forward slices/s and GFLOP/s vs this machine's matmul peak")
    p_enc.add_argument("--batch", type=int, default=32, help="slices per forward")
    p_enc.add_argument("--img-size", type=int, default=224, help="slice side in pixels")
    p_enc.add_argument("--names", nargs="+", default=["vit", "gcnn", "ssm"], choices=["vit", "gcnn", "ssm"],
                       help="encoders to time")
    p_enc.add_argument("--size", default="tiny", choices=["tiny", "small", "base"], help="encoder size")
    p_enc.add_argument("--repeat", type=int, default=5, help="timed runs per figure; the best is reported")
    p_enc.add_argument("--device", default="cpu", help="cpu or cuda")
    p_enc.set_defaults(func=bench_encoders)
    p_speed = sub.add_parser("speed", help="scan, encoders, extraction, MIL fit and memory in one table")
    p_speed.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is reported")
    p_speed.add_argument("--device", default="cpu", help="cpu or cuda")
    p_speed.set_defaults(func=bench_speed)
    p_acc = sub.add_parser("accuracy", help="encoders x pre-training x MIL vs a 3D CNN on the synthetic cohort")
    p_acc.add_argument("--quick", action="store_true", help="a tiny version (a smoke test, about a minute)")
    p_acc.add_argument("--out", help="where accuracy.md and accuracy.json go (default results, or results/quick)")
    p_acc.add_argument("--work", help="cohort, checkpoints and bags (default OUT/work); a re-run reuses them")
    p_acc.add_argument("--encoders", nargs="+", choices=("vit", "gcnn", "ssm"),
                       help="run only these encoders' rows (default all); the HU-histogram and 3D rows always run")
    p_acc.add_argument("--methods", nargs="+", choices=("lecl", "moco", "random"), help="likewise for pre-training")
    p_acc.set_defaults(func=bench_accuracy)
    p_abl = sub.add_parser("ablate", help="why LeCL does not beat MoCo here: its settings one at a time (ViT row)")
    p_abl.add_argument("--quick", action="store_true", help="a tiny version (a smoke test)")
    p_abl.add_argument("--out", help="where ablation.md and ablation.json go (default results, or results/quick)")
    p_abl.add_argument("--work", help="cohort, checkpoints and bags (default OUT/work); benchmark.py accuracy's "
                       "work folder shares its cohort, cache and random-init bags")
    p_abl.set_defaults(func=bench_ablate)
    p_probe = sub.add_parser("probe", help="does an encoder see lesions? slice-level linear probe on its bags, "
                                           "and the embeddings' effective rank")
    p_probe.add_argument("--data", required=True, help="cohort folder with masks/ (the bags' scans)")
    p_probe.add_argument("--bags", required=True, help="bag folder from clear.py extract")
    p_probe.add_argument("--labels", type=int, nargs="+", help="mask labels that count (default: any non-zero; "
                         "the synthetic cohort's tumours are 1-8)")
    p_probe.add_argument("--seed", type=int, default=0, help="which patients are held out")
    p_probe.set_defaults(func=bench_probe)
    p_twin = sub.add_parser("twin", help="does an encoder see a finding with anatomy and noise held fixed? "
                                         "synthetic scans against their twins without the findings")
    src = p_twin.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a clear.py pretrain checkpoint")
    src.add_argument("--encoder", choices=("vit", "gcnn", "ssm"), help="this encoder at random init")
    src.add_argument("--encoder-module", metavar="FILE.py:FACTORY", help="e.g. probe.py:HUHistogram")
    p_twin.add_argument("--img-size", type=int, default=64, help="input size for --encoder/--encoder-module "
                        "(default: the accuracy benchmark's 64)")
    p_twin.add_argument("--n", type=int, default=60, help="patients drawn (those with each finding are used)")
    p_twin.add_argument("--seed", type=int, default=0, help="the cohort's seed (0: the accuracy benchmark's)")
    p_twin.set_defaults(func=bench_twin)
    args = parser.parse_args(argv)
    from files import ClearError

    try:
        args.func(args)
    except ClearError as e:
        print(f"benchmark.py {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
