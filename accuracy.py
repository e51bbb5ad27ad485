"""The paper's claim, measured on known truth: `python benchmark.py accuracy` runs this.

CLEAR (arXiv 2411.16803) claims that LeCL pre-training plus attention-MIL pooling beats generic encoders on
tumour location, lung disease and staging, at a fraction of the compute and data of end-to-end 3D networks.
On a synthetic cohort (phantom.py) with known findings this module runs, with the project's own pipeline:

    encoder {vit, gcnn, ssm} x pre-training {lecl, moco, random init}:  pretrain -> extract -> fit (5-fold)
    the end-to-end 3D baseline (baseline3d.py) on the same folds
    data efficiency: MIL (on the first row's bags, LeCL ViT by default) and 3D baseline on 10-100 % of the
                     training patients

and writes `results/accuracy.json` and `.md`: AUROC with patient-bootstrap 95 % CIs per task (location: macro
over the 8 sites), wall time, estimated training FLOPs and peak memory of every row. Nothing is tuned to the
outcome: the cohort, the budgets and the settings are the defaults below, whatever the numbers say.
"""
import functools
import hashlib
import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cv
from baseline3d import Net3DConfig, ResNet3D, Volume3DConfig, fit_cv_3d, load_volumes
from data import Cohort, atomic_path, canonical_grid, load_mask, nearest_slices, voxel_spacing
from extract import EncoderSpec, extract_bags, load_encoder
from metrics import auroc
from mil import AttentionMIL, load_bags
from models import effective_rank
from phantom import SITES, SynthConfig, write_cohort
from pretrain import PretrainConfig, pretrain

TUMOUR_LABELS = tuple(range(1, len(SITES) + 1))  # phantom.py's mask labels of tumours (9, 10: lung disease)
TASKS = {"location": (tuple(f"loc_{s}" for s in SITES), None), "lung_disease": (("lung_disease",), None),
         "stage": (("stage",), "ordinal")}


@dataclass(frozen=True)
class AccuracyConfig:
    cohort: SynthConfig = SynthConfig(n=400)  # the 400 scans, default difficulty, seed 0
    thickness: float = 10.0  # mm between the slices that pre-training and extraction see (a 2D pipeline's
    #                          usual 5-10 mm; 1-5 mm stored slices would cost 3x the extraction)
    img_size: int = 64  # encoder input: 2x below the 128-px cohort, so that 2 CPU cores pre-train 9 encoders
    encoders: tuple = ("vit", "gcnn", "ssm")
    methods: tuple = ("lecl", "moco", "random")
    steps: int = 600  # pre-training steps per encoder (batch 64): equal for every encoder and method
    batch_size: int = 64
    lr: float = 3e-3  # AdamW at batch 256 (so 7.5e-4 here): stable for all three encoders at this batch
    mlp_dim: int = 1024  # heads' hidden width (MoCo v3: 4096; 1024 for CPU)
    fit: cv.FitConfig = cv.FitConfig(targets=("x",), n_bootstrap=1000)  # targets are set per task
    volume: Volume3DConfig = Volume3DConfig()
    net: Net3DConfig = Net3DConfig()
    epochs_3d: int = 30  # the 3D network's epochs (early-stopped on validation AUROC like the MIL)
    fractions: tuple = (0.1, 0.25, 0.5, 1.0)


QUICK = AccuracyConfig(cohort=SynthConfig(n=40, size=48, thickness=(8.0, 10.0), workers=1), img_size=32,
                       encoders=("vit",), steps=3, batch_size=8, mlp_dim=64, epochs_3d=2, fractions=(0.5, 1.0),
                       fit=cv.FitConfig(targets=("x",), folds=3, epochs=3, n_bootstrap=50),
                       volume=Volume3DConfig(depth=8, size=16), net=Net3DConfig(widths=(4, 8, 8, 8)))


def flops(module, *inputs):
    """FLOPs (2 x MACs) of one forward pass, counted by torch's FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(*inputs)
    return counter.get_total_flops()


def _task_targets(cohort, name, folds):
    """A task's label columns, without those too rare to stratify into `folds` (dropped, and reported)."""
    targets, kind = TASKS[name]
    keep = [t for t in targets if min(sum(s.labels[t] == v for s in cohort) for v in (0, 1)) >= folds] \
        if kind is None and len(targets) > 1 else list(targets)
    return tuple(keep), kind, [t for t in targets if t not in keep]


def _auroc(rows):
    """The headline AUROC of a metrics summary: the mean over folds of the macro AUROC (metrics.summarize)."""
    return next(r for r in rows if r["metric"] == "AUROC, fold mean")


def lesion_slice_flags(cohort, bags, labels=None):
    """For every bag slice, whether its scan's mask holds a lesion (labels `labels`, default any non-zero) at that
    z: a tuple of (L_i,) bool per scan of `bags`; a bag slice takes the nearest stored mask slice."""
    by_name, out = {s.scan: s for s in cohort.scans}, []
    for name, z_mm in zip(bags.scans, bags.z_mm):
        scan = by_name[name]
        affine, shape = canonical_grid(scan.image)
        hit = torch.from_numpy(load_mask(scan.mask, shape))  # (Z, Y, X); a mask off its image's grid is refused
        hit = hit != 0 if labels is None else torch.isin(hit, torch.tensor(list(labels)))
        out.append(hit.flatten(1).any(1)[nearest_slices(z_mm, voxel_spacing(affine)[2], shape[0])])  # (L,)
    return tuple(out)


def slice_probe(features, flags, patients, seed=0, folds=4, l2=1e-3):
    """Does the encoder see lesions? A linear probe: L2-regularised logistic regression (LBFGS) of the per-slice
    lesion flags on the standardised slice embeddings, in `folds` patient folds stratified by whether a patient
    has a lesion slice; the mean over folds of the held-out AUROC (NaN if no fold has both classes). features,
    flags: per scan (L_i, D), (L_i,); patients: per scan. Slice labels are what the MIL never sees: the probe
    diagnoses the encoder, it is not part of the method."""
    has_lesion = np.array([[bool(f.any())] for f in flags], dtype=np.int64)  # (N, 1)
    fold = cv.patient_folds(np.asarray(patients), has_lesion, folds, seed)  # (N,)
    x = torch.cat([f.double() for f in features])  # (T, D)
    y = torch.cat([torch.as_tensor(f, dtype=torch.float64) for f in flags])  # (T,)
    fold = torch.cat([torch.full((len(f),), int(k)) for f, k in zip(features, fold)])  # (T,)
    aucs = []
    for k in range(folds):
        test = fold == k
        if len(set(y[test].tolist())) < 2 or len(set(y[~test].tolist())) < 2:
            continue
        z = (x - x[~test].mean(0)) / (x[~test].std(0) + 1e-6)  # (T, D), training slices' statistics
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)  # weights and bias
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = z[~test] @ w[:-1] + w[-1]
            loss = F.binary_cross_entropy_with_logits(logits, y[~test]) + l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        aucs.append(auroc(y[test].numpy(), (z[test] @ w[:-1]).detach().numpy()))
    return float(np.mean(aucs)) if aucs else float("nan")


def first_axis(bags, most=20000):
    """The first principal axis of the bags' slice embeddings (up to `most` slices, evenly spaced): (its share of
    the variance, |Pearson correlation| of the slices' coordinates on it with their height in the scan, 0 at the
    bottom slice to 1 at the top). A collapsed encoder puts nearly all variance there, and often it is the
    slice's position in the body: anatomy, not findings."""
    x = torch.cat(bags.features).double()  # (T, D)
    h = torch.cat([z / z.max().clamp(min=1e-9) for z in bags.z_mm]).double()  # (T,) height in [0, 1]
    pick = torch.linspace(0, len(x) - 1, min(most, len(x)), dtype=torch.float64).long()
    x, h = x[pick] - x[pick].mean(0), h[pick]
    u, sigma, _ = torch.linalg.svd(x, full_matrices=False)  # u: (T', r), sigma: (r,)
    coord = u[:, 0] * sigma[0]  # (T',) each slice on the first axis
    corr = torch.corrcoef(torch.stack([coord, h]))[0, 1].abs()
    return float(sigma[0] ** 2 / (sigma ** 2).sum()), float(corr)


def probe_bags(cohort, bags, labels=None, seed=0, cache=None):
    """slice_probe of `bags` against the lesion masks of `cohort` -> (AUROC, NaN if undefined; the slice flags).
    `cache`, a dict, keeps the flags of each slice set and labels, so the encoders of one cohort read its masks
    once."""
    key = (bags.scans, labels, *(z.numpy().tobytes() for z in bags.z_mm))
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = lesion_slice_flags(cohort, bags, labels)
    patient = {s.scan: s.patient for s in cohort.scans}
    return slice_probe(bags.features, cache[key], [patient[s] for s in bags.scans], seed), cache[key]


class Meter:
    """Wall time and peak resident memory of the stages of one row: this process's (Linux VmHWM, reset per stage)
    or, if larger, that of the largest child process so far (the fit's fold workers; getrusage has no reset)."""

    def __init__(self):
        self.seconds, self.peak = {}, 0

    def __call__(self, stage, fn):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        t0 = time.perf_counter()
        out = fn()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        with open("/proc/self/status") as f:
            self.peak = max(self.peak, next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM")),
                            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        return out


def _fit_tasks(bags, labels, cfg, cohort, meter, fraction=1.0):
    out = {}
    for name in TASKS:
        targets, kind, _ = _task_targets(cohort, name, cfg.fit.folds)
        fit = replace(cfg.fit, targets=targets, task=kind, train_fraction=fraction)
        result = meter(f"fit {name}", lambda: cv.fit_cv(bags, labels, fit))
        out[name] = {**_auroc(result.metrics["rows"]), "epochs": result.metrics["best_epochs"]}
    return out


def make_bags(cfg, work, cohort, encoder, method, progress, meter):
    """pretrain (unless random; continues a killed run) -> extract: (bags, encoder, slice settings, slices
    embedded by this call, pre-training steps). Stages are timed by `meter`."""
    tag = f"{encoder}-{method}"
    spec = EncoderSpec(name=encoder, img_size=cfg.img_size)
    steps = 0
    if method != "random":
        ckpt = work / f"{tag}.pt"
        pcfg = PretrainConfig(encoder=encoder, method=method, steps=cfg.steps, batch_size=cfg.batch_size,
                              lr=cfg.lr, mlp_dim=cfg.mlp_dim, img_size=cfg.img_size, thickness=cfg.thickness,
                              checkpoint_every=max(1, cfg.steps // 4), seed=cfg.cohort.seed)
        kept = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
        earlier = kept.get("seconds", 0.0) if kept else 0.0  # training time of the processes before this one
        if kept is None or kept["step"] < cfg.steps:  # resumes a killed run
            r = meter("pretrain", lambda: pretrain(pcfg, cohort.root, ckpt, ckpt if kept else None, work / "cache",
                                                   progress=progress))
            earlier = r.run_seconds - r.seconds
        if earlier > 0:
            meter.seconds["pretrain, earlier processes"] = earlier
        spec, steps = EncoderSpec(checkpoint=str(ckpt)), cfg.steps
    enc, identity, slices = load_encoder(spec)
    slices = replace(slices, thickness_mm=cfg.thickness)
    bags_dir = work / f"bags-{tag}"
    n_slices = meter("extract", lambda: sum(n for status, _, n in extract_bags(cohort, enc, identity, slices, bags_dir)
                                            if status == "done"))
    return load_bags(bags_dir), enc, slices, n_slices, steps


def run_encoder(cfg, work, cohort, encoder, method, progress, flags=None):
    """make_bags -> fit the three tasks, and the tumour-slice probe: one row of the table. flags: probe_bags's
    cache, shared by the rows."""
    meter = Meter()
    bags, enc, slices, n_slices, steps = make_bags(cfg, work, cohort, encoder, method, progress, meter)
    n_slices = n_slices or sum(len(f) for f in bags.features)
    per_slice = flops(enc, torch.zeros(1, len(slices.windows), cfg.img_size, cfg.img_size))
    mil = AttentionMIL(bags.dim, 8, cfg.fit.hidden, att_dim=cfg.fit.att_dim)
    per_bag_slice = flops(mil, torch.zeros(1, 100, bags.dim)) / 100
    fits = _fit_tasks(bags, cohort.root / "labels.csv", cfg, cohort, meter)
    probe, _ = probe_bags(cohort, bags, TUMOUR_LABELS, cfg.cohort.seed, flags)
    mil_flops = 3 * per_bag_slice * sum(len(f) for f in bags.features) * cfg.fit.epochs * cfg.fit.folds * len(TASKS)
    train_flops = steps * cfg.batch_size * 2 * 4 * per_slice + n_slices * per_slice + mil_flops  # 2 views x (3+1)
    return {"encoder": encoder, "method": method, "tasks": fits, "seconds": meter.seconds,
            "train_flops": train_flops, "peak_bytes": meter.peak, "slices": n_slices,
            "probe": probe if np.isfinite(probe) else None,  # None: too few lesion slices to probe
            "effective_rank": effective_rank(torch.cat(bags.features))}


def run_3d(cfg, cohort, volumes, fraction=1.0, keep=lambda task, fn: fn()):
    """The 3D network on the three tasks: one row. `keep(task, fn)` may return a task's result kept by an earlier
    run instead of calling fn (run() keeps each task on its own: the three take an hour or more on a CPU)."""
    def fit_task(name):
        meter = Meter()
        targets, kind, _ = _task_targets(cohort, name, cfg.fit.folds)
        fit = replace(cfg.fit, targets=targets, task=kind, epochs=cfg.epochs_3d, train_fraction=fraction)
        vol = volumes()  # read once for every task (run() caches it), outside the task's timing
        result = meter(f"fit {name}", lambda: fit_cv_3d(vol, cohort, fit, cfg.net))
        return {**_auroc(result["rows"]), "epochs": result["best_epochs"], "seconds": meter.seconds,
                "peak_bytes": meter.peak}

    done = {name: keep(name, functools.partial(fit_task, name)) for name in TASKS}
    tasks = {name: {k: v for k, v in t.items() if k not in ("seconds", "peak_bytes")} for name, t in done.items()}
    v = cfg.volume
    per_volume = flops(ResNet3D(len(v.windows), 1, cfg.net), torch.zeros(1, len(v.windows), v.depth, v.size, v.size))
    train_flops = 3 * per_volume * len(cohort) * (1 - 1 / cfg.fit.folds) * cfg.epochs_3d * cfg.fit.folds * len(TASKS)
    return {"encoder": "3D ResNet", "method": "supervised", "tasks": tasks,
            "seconds": {k: v for t in done.values() for k, v in t["seconds"].items()},
            "train_flops": train_flops, "peak_bytes": max(t["peak_bytes"] for t in done.values())}


def run(cfg, out, work, progress, log=print):
    """The whole experiment. Every finished row is kept in `out`/rows/ (a small JSON file beside the report) and
    the report rewritten after it, so a killed run loses at most the row it was in, and running the same command
    again continues: also on another machine, from a copy of `out` alone (the cohort, checkpoints and bags in
    `work` are made again where they are needed)."""
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (work / "cohort" / "labels.csv").exists():
        write_cohort(cfg.cohort, work / "cohort", progress=lambda it, total: progress("synth", "scan")(it, total))
    cohort = Cohort(work / "cohort")
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"fit workers {cfg.fit.workers or 'one per core'}")
    report = {"config": _plain(asdict(cfg)), "machine": machine, "rows": [], "efficiency": [],
              "dropped_labels": {n: _task_targets(cohort, n, cfg.fit.folds)[2] for n in TASKS}}
    fingerprint = _fingerprint(cfg)

    def row(key, fn):
        return _kept(out / "rows" / f"{key}.json", fingerprint, fn, log)

    flags = {}  # the probe's slice flags, read from the masks once for all rows
    for encoder in cfg.encoders:
        for method in cfg.methods:
            log(f"[accuracy] {encoder} / {method}")
            report["rows"].append(row(f"{encoder}-{method}",
                                      lambda: run_encoder(cfg, work, cohort, encoder, method, progress, flags)))
            write_report(report, out)

    @functools.cache
    def volumes():  # read once, and only if a 3D row is still to run
        return load_volumes(cohort, cfg.volume, progress=lambda it, n: progress("volumes", "scan")(it, n))

    log("[accuracy] 3D baseline")
    full_3d = run_3d(cfg, cohort, volumes, 1.0, lambda task, fn: row(f"3d-{task}", fn))
    report["rows"].append(full_3d)
    write_report(report, out)
    first = report["rows"][0]

    @functools.cache
    def first_bags():  # the first row's bags: a row kept from another machine has none here, so they are made
        return make_bags(cfg, work, cohort, first["encoder"], first["method"], progress, Meter())[0]
    for fraction in cfg.fractions:
        log(f"[accuracy] data efficiency: {fraction:.0%} of the training patients")
        if fraction == 1.0:  # the same fits as the rows above (same folds and seeds): not run twice
            mil, net = first["tasks"], full_3d["tasks"]
        else:
            mil = row(f"mil-{first['encoder']}-{first['method']}-{fraction}", lambda: _fit_tasks(
                first_bags(), cohort.root / "labels.csv", cfg, cohort, Meter(), fraction))
            net = run_3d(cfg, cohort, volumes, fraction,
                         lambda task, fn: row(f"3d-{task}-{fraction}", fn))["tasks"]
        report["efficiency"].append({"fraction": fraction, f"{first['encoder']}-{first['method']} + MIL": mil,
                                     "3D ResNet": net})
        write_report(report, out)
    return report


def _fingerprint(cfg):
    """What a finished row's results depend on: every setting except the lists that only choose which rows run,
    and the numbers of worker processes (the same cohort and fits come out for any; timings do not)."""
    settings = _plain(asdict(replace(cfg, encoders=(), methods=(), fractions=(), fit=replace(cfg.fit, workers=0),
                                     cohort=replace(cfg.cohort, workers=0))))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _kept(path, fingerprint, fn, log):
    """fn()'s row, or the one an earlier run of the same settings left in `path` (JSON, written atomically)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            log(f"[accuracy] {path.stem}: finished by an earlier run, reused")
            return saved["row"]
    result = json.loads(json.dumps(fn()))  # as a re-run will read it back
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "row": result}))
    return result


def _plain(x):
    return {k: _plain(v) for k, v in x.items()} if isinstance(x, dict) else list(x) if isinstance(x, tuple) else x


def _cell(t):
    return f"{t['value']:.3f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}]" if t["value"] is not None else "n/a"


def write_report(report, out):
    """results/accuracy.json (everything) and results/accuracy.md (the tables), atomically."""
    with atomic_path(Path(out) / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    lines = ["AUROC: mean over the 5 held-out folds of the macro AUROC over labels (location) or classes (stage), "
             "[95 % patient-bootstrap CI]. Tumour-slice probe: AUROC of a linear probe that finds the slices holding a "
             "tumour from the slice embeddings (held-out patients): does the encoder see lesions at all? Rank: the "
             "effective rank (RankMe) of the slice embeddings; near 1, the encoder has collapsed.", "",
             "| encoder | pre-training | location | lung disease | stage | tumour-slice probe | rank | wall time (s) "
             "| training FLOPs | peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        t, probe = r["tasks"], f"{r['probe']:.3f}" if r.get("probe") is not None else "n/a"
        rank = f"{r['effective_rank']:.1f}" if r.get("effective_rank") is not None else "n/a"
        lines.append(f"| {r['encoder']} | {r['method']} | {_cell(t['location'])} | {_cell(t['lung_disease'])} | "
                     f"{_cell(t['stage'])} | {probe} | {rank} | {sum(r['seconds'].values()):.0f} | "
                     f"{r['train_flops']:.2g} | {r['peak_bytes'] / 2**30:.1f} GiB |")
    if report["efficiency"]:
        keys = [k for k in report["efficiency"][0] if k != "fraction"]
        lines += ["", "| training patients | " + " | ".join(f"{k}: {n}" for k in keys for n in TASKS) + " |",
                  "|---|" + "---|" * (len(keys) * len(TASKS))]
        for e in report["efficiency"]:
            lines.append(f"| {e['fraction']:.0%} | " + " | ".join(f"{e[k][n]['value']:.3f}" if e[k][n]["value"] is not None
                                                               else "n/a" for k in keys for n in TASKS) + " |")
    with atomic_path(Path(out) / "accuracy.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
