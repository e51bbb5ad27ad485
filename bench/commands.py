"""The commands of `python benchmark.py` (benchmark.py parses their options and calls these): each runs one
experiment of bench/ and prints its table. Speed figures are printed beside a reference measured in the same
run, so ratios are what to read on a shared, noisy machine.
"""
import dataclasses
import functools
import math
import os
import time

import torch

from bench.speed import (best_time, encoder_figures, extraction_seconds, mil_fold_seconds, saved_bytes, scan_candidates,
                         scan_figures)
from cli import progress_bar
from files import ClearError, pick_device


# ---------------------------------------------------------------- scan: selective scan forward + backward


def bench_scan(args):
    """Selective scan forward+backward (batch 8, dim 384, N 16): the loop reference, the default path, the
    parallel form and, when installed, mambapy's pscan, on the same inputs. Prints a markdown table."""
    device = pick_device(args.device)
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


def bench_memory(args):
    """What autograd keeps for backward, per slice: one SSM-tiny scan direction by each form (D 384, N 16, L = the
    patches), and each encoder's forward in float32 and under bf16 autocast. Saved-tensor hooks count it on this
    device at batch 1 and 2 (the difference is one slice's, the weights cancel); scaled to --batch x 2 (MoCo encodes
    both views with gradients). Prints a markdown table."""
    from models import build_encoder
    from triton_scan import selective_scan

    device, S, L = pick_device(args.device), args.img_size, (args.img_size // 16) ** 2
    gen = torch.Generator().manual_seed(0)

    def per_slice(make_fn):
        return saved_bytes(make_fn(2)) - saved_bytes(make_fn(1))

    def scan(method):
        def make(b):
            u, delta, z = (torch.randn(b, 384, L, generator=gen).to(device).requires_grad_() for _ in range(3))
            B, C = (torch.randn(b, 16, L, generator=gen).to(device).requires_grad_() for _ in range(2))
            A = -torch.rand(384, 16, generator=gen).to(device).requires_grad_()  # (D, N)
            return lambda: selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, method=method)
        return make

    print(f"kept for backward on {device}, {S} px (L = {L}), per slice and for a pre-training batch of {args.batch} "
          f"(x 2 views)\n\n| what | per slice MiB | batch GiB |\n|---|---:|---:|")
    def forward(encoder, amp, b):
        x = torch.randn(b, 3, S, S, device=device)  # (B, C, H, W)

        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                return encoder(x)
        return run

    rows = [(f"one scan direction, {m}", scan(m)) for m in ("chunked", "parallel")]
    for name in args.names:
        encoder = build_encoder(name, "tiny", img_size=S).to(device)
        rows += [(f"{name}-tiny forward, {'bf16 autocast' if amp else 'float32'}",
                  functools.partial(forward, encoder, amp)) for amp in (False, True)]
    for what, make in rows:
        b = per_slice(make)
        print(f"| {what} | {b / 2**20:.1f} | {b * 2 * args.batch / 2**30:.1f} |")


# ---------------------------------------------------------------- encoders: slices/s and GFLOP/s vs matmul peak


def bench_encoders(args):
    """Forward throughput (inference_mode) of every encoder at `--size`, on one batch of `--batch` slices at
    `--img-size`², beside this machine's fp32 matmul peak measured in the same run. Prints a markdown table."""
    device = pick_device(args.device)
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


def bench_speed(args):
    """One table of the speed figures, each beside its reference measured in the same run."""
    import resource

    from extract import embed_slices
    from models import build_encoder

    device, rows = pick_device(args.device), []
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
    t_extract = extraction_seconds(vit, 224, device, n)
    with torch.inference_mode():
        t_encode = best_time(lambda: embed_slices(vit, torch.rand(n, 3, 224, 224), device=device), repeat=2)
    rows.append((f"extract: {n} slices of 512² int16 NIfTI -> vit-tiny at 224²", f"{n / t_extract:.1f} slices/s",
                 f"encoder alone {n / t_encode:.1f} slices/s", f"{t_encode / t_extract:.0%} of the time encoding"))
    rows.append(("fit: attention-MIL, 200 bags of 100 x 192, 40 epochs", f"{mil_fold_seconds():.1f} s per fold",
                 "", ""))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    rows.append(("peak resident memory of this whole run", f"{rss:.0f} MiB", "", ""))
    print(f"speed on {device} ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the "
          f"end); best of {args.repeat}; timm does not import beside this torch, so its row is absent\n")
    print("| what | figure | reference (same run) | ratio |\n|---|---:|---:|---:|")
    print("\n".join(f"| {' | '.join(r)} |" for r in rows))


# ---------------------------------------------------------------- accuracy, ablation and the encoder's probes


def default_out(args, scale=""):
    """--out, or by default results; results/quick for --quick, so that its tiny cohort never lands in the work
    folder of the full run; and results/custom-<scale> at another scale (rescaled's name for it), so that the
    table's kept rows are never replaced and two scales never share a folder."""
    if args.out:
        return args.out
    return f"results/custom-{'quick-' * args.quick}{scale}" if scale else "results/quick" if args.quick else "results"


def _run_report(run, cfg, args, name, scale=""):
    """run(cfg, out, work, progress) with tqdm bars into default_out, then print `out`/name.md and how long it
    took."""
    def progress(desc, unit):
        return lambda it, total: progress_bar(it, total=total, desc=desc, unit=unit, leave=False)

    out = default_out(args, scale)
    t0 = time.time()
    report = run(cfg, out, args.work or f"{out}/work", progress)
    print(open(f"{out}/{name}.md").read())
    print(f"{len(report['rows'])} rows in {time.time() - t0:.0f} s on {report['machine']}; "
          f"results in {out}/{name}.md and .json")


SCALE = {"scans": "cohort.n", "size": "cohort.size", "img_size": "img_size", "steps": "steps",
         "batch_size": "batch_size"}  # the scale options of benchmark.py accuracy and ablate -> AccuracyConfig fields


def rescaled(cfg, args):
    """The AccuracyConfig `cfg` with the scale options given on the command line (SCALE), and a name for the
    scale: the options that change it and their values ("img-size224-steps5000"), "" if none does. Values that
    would fail only after hours of work are refused now, in one line."""
    from bench import config

    parts = []
    for opt in SCALE:
        value = getattr(args, opt)
        if value is not None and (new := config.changed(cfg, SCALE[opt], value)) != cfg:
            cfg, parts = new, parts + [f"{opt.replace('_', '-')}{value}"]
    name = "-".join(parts)
    least = 10 * cfg.fit.folds  # scans: enough patients of every stratum for each patient fold
    if cfg.cohort.n < least or cfg.cohort.size < 32 or cfg.img_size < 32 or cfg.img_size % 16 or cfg.steps < 1 \
            or cfg.batch_size < 2:
        raise ClearError(f"expected --scans >= {least} (10 per fold), --size >= 32, --img-size a multiple of 16 from "
                         f"32, --steps >= 1 and --batch-size >= 2 (got {cfg.cohort.n}, {cfg.cohort.size}, "
                         f"{cfg.img_size}, {cfg.steps}, {cfg.batch_size})")
    return cfg, name


def accuracy_config(args):
    """The AccuracyConfig of `benchmark.py accuracy` (or its --quick one) with the options given on the command
    line, and the name of its scale (rescaled)."""
    from bench import config

    cfg = config.QUICK if args.quick else config.AccuracyConfig()
    cfg = dataclasses.replace(cfg, **{k: tuple(getattr(args, k)) for k in ("encoders", "methods")
                                      if getattr(args, k)})
    return rescaled(cfg, args)


def bench_accuracy(args):
    """The paper's table on the synthetic cohort (bench/accuracy.py): results/accuracy.md and .json (_run_report says
    where another scale goes)."""
    from bench import accuracy

    cfg, scale = accuracy_config(args)
    _run_report(accuracy.run, cfg, args, "accuracy", scale)


def ablation_config(args):
    """The AblationConfig of `benchmark.py ablate` (or its --quick one), its base rescaled as the options say."""
    from bench import ablation

    cfg = ablation.QUICK if args.quick else ablation.AblationConfig()
    base, scale = rescaled(cfg.base, args)
    return dataclasses.replace(cfg, base=base), scale


def bench_ablate(args):
    """LeCL's settings one at a time on the accuracy benchmark's cnn row (bench/ablation.py): results/ablation.md, .json
    (another scale as for accuracy)."""
    from bench import ablation

    cfg, scale = ablation_config(args)
    _run_report(ablation.run, cfg, args, "ablation", scale)


def bench_probe(args):
    """Tumour-slice linear probe of one bag folder against its cohort's lesion masks (watch.slice_probe)."""
    from bench.probe import bags_rank, first_axis, masked_cohort, probe_bags
    from mil import load_bags

    bags = load_bags(args.bags)
    cohort = masked_cohort(args.data, bags)
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
