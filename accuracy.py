"""The paper's claim, measured on known truth: `python benchmark.py accuracy` runs this.

CLEAR (arXiv 2411.16803) claims that LeCL pre-training plus attention-MIL pooling beats generic encoders on
tumour location, lung disease and staging, at a fraction of the compute and data of end-to-end 3D networks.
On a synthetic cohort (phantom.py) with known findings this module runs, with the project's own pipeline:

    encoder {vit, gcnn, ssm} x pre-training {lecl, moco, random init}:  pretrain -> extract -> fit (5-fold)
    the reference: HU-histogram bags (probe.HUHistogram), nothing learnt -> fit: what intensities alone give
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import cv
from baseline3d import Net3DConfig, ResNet3D, Volume3DConfig, fit_cv_3d, load_volumes
from cohort import Cohort
from data import SliceConfig
from extract import EncoderSpec, extract_bags, load_encoder, pick_device, weights_sha256
from files import ClearError, atomic_path
from mil import AttentionMIL, load_bags
from models import build_encoder, count_flops
from phantom import SITES, SynthConfig, write_cohort
from pretrain import PretrainConfig, plain, pretrain, run_settings
from probe import HUHistogram, bags_rank, probe_bags
from speed import reset_peak_rss, rss_kib

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
    histogram: bool = True  # the reference row: HU-histogram bags (probe.HUHistogram), nothing learnt
    histogram_bins: int = 32  # per window channel (probe.HUHistogram says why 32)
    pretrain_changes: tuple = ()  # to every pre-trained row's PretrainConfig: ("field", value) or ("views.field",
    #                               value) pairs (`changed`); ablation.py's variants; none in the table


QUICK = AccuracyConfig(cohort=SynthConfig(n=40, size=48, thickness=(8.0, 10.0), workers=1), img_size=32,
                       encoders=("vit",), steps=3, batch_size=8, mlp_dim=64, epochs_3d=2, fractions=(0.5, 1.0),
                       fit=cv.FitConfig(targets=("x",), folds=3, epochs=3, n_bootstrap=50),
                       volume=Volume3DConfig(depth=8, size=16), net=Net3DConfig(widths=(4, 8, 8, 8)))


def _task_targets(cohort, name, folds):
    """A task's label columns, without those too rare to stratify into `folds` (dropped, and reported)."""
    targets, kind = TASKS[name]
    keep = [t for t in targets if min(sum(s.labels[t] == v for s in cohort) for v in (0, 1)) >= folds] \
        if kind is None and len(targets) > 1 else list(targets)
    return tuple(keep), kind, [t for t in targets if t not in keep]


def _auroc(rows):
    """The headline AUROC of a metrics summary: the mean over folds of the macro AUROC (metrics.summarize)."""
    return next(r for r in rows if r["metric"] == "AUROC, fold mean")


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


def _fit_tasks(bags, labels, cfg, cohort, meter, fraction=1.0):
    out = {}
    for name in TASKS:
        targets, kind, _ = _task_targets(cohort, name, cfg.fit.folds)
        fit = replace(cfg.fit, targets=targets, task=kind, train_fraction=fraction)
        result = meter(f"fit {name}", lambda: cv.fit_cv(bags, labels, fit))
        out[name] = {**_auroc(result.metrics["rows"]), "epochs": result.metrics["best_epochs"]}
    return out


def changed(cfg, key, value):
    """The dataclass `cfg` with field `key` set to `value`; "outer.inner" sets a field of the nested `cfg.outer`."""
    outer, _, inner = key.partition(".")
    return replace(cfg, **{outer: replace(getattr(cfg, outer), **{inner: value}) if inner else value})


def pretrain_config(cfg, encoder, method):
    """The pre-training of one row: the same budget for every encoder and method, then cfg.pretrain_changes."""
    pcfg = PretrainConfig(encoder=encoder, method=method, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                          mlp_dim=cfg.mlp_dim, img_size=cfg.img_size, thickness=cfg.thickness,
                          checkpoint_every=max(1, cfg.steps // 4), seed=cfg.cohort.seed)
    for key, value in cfg.pretrain_changes:
        pcfg = changed(pcfg, key, value)
    return pcfg


def histogram(cfg):
    """The reference row's encoder: the HU histogram of each default window, nothing learnt."""
    return HUHistogram(len(SliceConfig.windows), cfg.histogram_bins)


def training_flops(cfg, encoder, method, n_slices):
    """A row's estimated training FLOPs, from its settings (pretrain_config's, cfg.pretrain_changes included) and
    its bags' slices alone, so that a row kept from an earlier run is counted by today's counter (models.count_flops):
    pre-training steps x batch x 2 views x (3 for the encoder's forward and backward + 1 for the momentum encoder's
    forward) x one slice's forward, plus the extraction of every bag slice, plus the MIL fits (3 x forward per bag
    slice x the training folds' share x epochs x folds x tasks, as run_3d counts the 3D network's). The heads
    (projector, predictor: about 2 % at mlp-dim 1024) are left out."""
    steps, batch, img_size = 0, 0, cfg.img_size
    if method == "none":
        enc = histogram(cfg)
    elif method == "random":
        enc = build_encoder(encoder, img_size=img_size)
    else:
        p = pretrain_config(cfg, encoder, method)
        steps, batch, img_size = p.steps, p.batch_size, p.img_size
        enc = build_encoder(encoder, p.size, img_size=img_size)
    per_slice = count_flops(enc, torch.zeros(1, len(SliceConfig.windows), img_size, img_size))  # (1, C, S, S)
    mil = AttentionMIL(enc.embed_dim, 8, cfg.fit.hidden, att_dim=cfg.fit.att_dim)
    per_bag_slice = count_flops(mil, torch.zeros(1, 100, enc.embed_dim)) / 100  # a bag of (1, 100, D)
    k = cfg.fit.folds
    mil_flops = 3 * per_bag_slice * n_slices * (1 - 1 / k) * cfg.fit.epochs * k * len(TASKS)
    return steps * batch * 2 * 4 * per_slice + n_slices * per_slice + mil_flops


FIT_3D = ("folds", "lr", "weight_decay", "batch_size", "patience", "val_fraction", "seed", "n_bootstrap")  # of
#          cv.FitConfig, what the 3D baseline reads (epochs are its own, epochs_3d; the rest is the MIL's)


def encoder_making(cfg, encoder, method):
    """What a row's checkpoint and bags depend on: the cohort, the slices, and how its encoder is made (the whole
    pre-training config, crops and augmentations included; a random init; or the histogram's bins)."""
    if method == "random":
        made = {"random": encoder, "seed": EncoderSpec.seed, "img_size": cfg.img_size}
    elif method == "none":
        made = {"histogram": cfg.histogram_bins, "img_size": cfg.img_size}
    else:
        made = run_settings(pretrain_config(cfg, encoder, method))
    making = {"cohort": _cohort_settings(cfg), "thickness": cfg.thickness, "encoder": made}
    if extraction_device() == "cuda":  # other numbers than the CPU's; CPU rows keep the fingerprints they had
        making["extraction"] = "cuda, bf16 autocast"
    return making


def extraction_device():
    """Where the benchmark extracts bags: extract.pick_device("auto"), the GPU when there is one (embed_slices:
    bf16 autocast) as for pre-training's "auto" device, else the CPU (fp32)."""
    return pick_device("auto")


def encoder_settings(cfg, encoder, method):
    """What a row of the slice pipeline depends on: its encoder's making and the MIL fits (worker processes aside:
    the same fits come out for any number; torch threads stay in, as they may change the order of float sums)."""
    return {**encoder_making(cfg, encoder, method), "fit": asdict(replace(cfg.fit, workers=0))}


def settings_3d(cfg):
    """What a task of the 3D baseline depends on: the cohort, the fit settings it reads (FIT_3D) and its own."""
    fit = {k: getattr(cfg.fit, k) for k in FIT_3D}
    return {"cohort": _cohort_settings(cfg), "fit": fit, "volume": asdict(cfg.volume), "net": asdict(cfg.net),
            "epochs": cfg.epochs_3d}


def _cohort_settings(cfg):
    """The cohort's settings without its worker processes (the same cohort comes out for any number)."""
    return asdict(replace(cfg.cohort, workers=0))


def fingerprint(settings):
    """A finished row is reused only by a run whose settings for it hash the same."""
    return hashlib.sha256(json.dumps(plain(settings), sort_keys=True).encode()).hexdigest()[:16]


def make_bags(cfg, work, cohort, encoder, method, progress, meter):
    """pretrain (unless random init or the histogram; continues a killed run) -> extract -> the bags (mil.Bags).
    Stages are timed by `meter`. The work files carry the fingerprint of encoder_making, so a checkpoint or bags
    made otherwise are never picked up, and a change of the fits alone re-uses them."""
    tag = f"{encoder}-{method}-{fingerprint(encoder_making(cfg, encoder, method))[:8]}"
    ckpt = work / f"{tag}.pt"
    if method == "none":
        enc = histogram(cfg)
        identity = {"name": "hu-histogram", "bins": cfg.histogram_bins, "source": "accuracy.py",
                    "sha256": weights_sha256(enc)}
        slices = SliceConfig(img_size=cfg.img_size)
    else:
        if method != "random":
            pcfg = pretrain_config(cfg, encoder, method)
            kept = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
            earlier = kept.get("seconds", 0.0) if kept else 0.0  # training time of the processes before this one
            if kept is None or kept["step"] < cfg.steps:  # resumes a killed run
                cache = work / ("cache" if pcfg.cache_size is None else f"cache-{pcfg.cache_size}")  # one per size
                r = meter("pretrain", lambda: pretrain(pcfg, cohort.root, ckpt, ckpt if kept else None, cache,
                                                       progress=progress))
                earlier = r.run_seconds - r.seconds
            if earlier > 0:
                meter.seconds["pretrain, earlier processes"] = earlier
        enc, identity, slices = load_encoder(EncoderSpec(name=encoder, img_size=cfg.img_size) if method == "random"
                                             else EncoderSpec(checkpoint=str(ckpt)))
    slices = replace(slices, thickness_mm=cfg.thickness)
    bags_dir = work / f"bags-{tag}"
    failed = meter("extract", lambda: [why for status, _, why in extract_bags(cohort, enc, identity, slices, bags_dir,
                                                                               device=extraction_device())
                                       if status == "failed"])
    if failed:  # the cohort is this benchmark's own: a scan it cannot read is a bug, not a row with fewer scans
        raise ClearError(f"{bags_dir}: {len(failed)} scan(s) failed to extract: {'; '.join(failed)}")
    return load_bags(bags_dir)


def run_encoder(cfg, work, cohort, encoder, method, progress, flags=None):
    """make_bags -> fit the three tasks, and the tumour-slice probe: one row of the table (its "slices": the bags'
    slices, all of them; its FLOPs are training_flops', counted when the report is written). flags: probe_bags's
    cache, shared by the rows."""
    meter = Meter()
    bags = make_bags(cfg, work, cohort, encoder, method, progress, meter)
    fits = _fit_tasks(bags, cohort.root / "labels.csv", cfg, cohort, meter)
    probe, _ = probe_bags(cohort, bags, TUMOUR_LABELS, cfg.cohort.seed, flags)
    return {"encoder": "HU histogram" if method == "none" else encoder, "method": method, "tasks": fits,
            "seconds": meter.seconds, "peak_bytes": meter.peak, "slices": sum(len(f) for f in bags.features),
            "probe": probe if np.isfinite(probe) else None,  # None: too few lesion slices to probe
            "effective_rank": bags_rank(bags)}


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
    volume = torch.zeros(1, len(v.windows), v.depth, v.size, v.size)  # (1, C, Z, S, S)
    per_volume = count_flops(ResNet3D(len(v.windows), 1, cfg.net), volume)
    train_flops = 3 * per_volume * len(cohort) * (1 - 1 / cfg.fit.folds) * cfg.epochs_3d * cfg.fit.folds * len(TASKS)
    return {"encoder": "3D ResNet", "method": "supervised", "tasks": tasks,
            "seconds": {k: v for t in done.values() for k, v in t["seconds"].items()},
            "train_flops": train_flops, "peak_bytes": max(t["peak_bytes"] for t in done.values())}


def open_cohort(cfg, work, progress):
    """The run's cohort in `work`/cohort, drawn on first use; a cohort drawn with other settings is refused."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "cohort" / "labels.csv").exists():
        write_cohort(cfg.cohort, work / "cohort", progress=lambda it, total: progress("synth", "scan")(it, total))
    drawn = json.loads((work / "cohort" / "synth.json").read_text())
    if {**drawn, "workers": 0} != plain(_cohort_settings(cfg)):
        raise ClearError(f"{work / 'cohort'}: drawn with other settings ({drawn}) than this run's; use another work "
                         "folder")
    return Cohort(work / "cohort")


def machine(cfg):
    """This machine and the run's threads, for the report."""
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"fit workers {cfg.fit.workers or 'one per core'}")


def run(cfg, out, work, progress, log=print):
    """The whole experiment. Every finished row is kept in `out`/rows/ (a small JSON file beside the report) and
    the report rewritten after it, so a killed run loses at most the row it was in, and running the same command
    again continues: also on another machine, from a copy of `out` alone (the cohort, checkpoints and bags in
    `work` are made again where they are needed)."""
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    cohort = open_cohort(cfg, work, progress)
    report = {"config": plain(asdict(cfg)), "machine": machine(cfg), "rows": [], "efficiency": [],
              "dropped_labels": {n: _task_targets(cohort, n, cfg.fit.folds)[2] for n in TASKS}}

    def row(key, settings, fn):
        return kept(out / "rows" / f"{key}.json", fingerprint(settings), fn, log)

    flags = {}  # the probe's slice flags, read from the masks once for all rows
    made = [(e, m) for e in cfg.encoders for m in cfg.methods] + ([("hist", "none")] if cfg.histogram else [])
    for encoder, method in made:
        log(f"[accuracy] {encoder} / {method}")
        r = row(f"{encoder}-{method}", encoder_settings(cfg, encoder, method),
                lambda: run_encoder(cfg, work, cohort, encoder, method, progress, flags))
        report["rows"].append({**r, "train_flops": training_flops(cfg, encoder, method, r["slices"])})
        write_report(report, out)

    @functools.cache
    def volumes():  # read once, and only if a 3D row is still to run
        return load_volumes(cohort, cfg.volume, progress=lambda it, n: progress("volumes", "scan")(it, n))

    log("[accuracy] 3D baseline")
    full_3d = run_3d(cfg, cohort, volumes, 1.0, lambda task, fn: row(f"3d-{task}", settings_3d(cfg), fn))
    report["rows"].append(full_3d)
    write_report(report, out)
    if not made:  # no slice-pipeline row to draw the curve of
        return report
    (first_encoder, first_method), first = made[0], report["rows"][0]
    first_tag, first_settings = f"{first_encoder}-{first_method}", encoder_settings(cfg, first_encoder, first_method)

    @functools.cache
    def first_bags():  # the first row's bags: a row kept from another machine has none here, so they are made
        return make_bags(cfg, work, cohort, first_encoder, first_method, progress, Meter())
    for fraction in cfg.fractions:
        log(f"[accuracy] data efficiency: {fraction:.0%} of the training patients")
        if fraction == 1.0:  # the same fits as the rows above (same folds and seeds): not run twice
            mil, net = first["tasks"], full_3d["tasks"]
        else:
            mil = row(f"mil-{first_tag}-{fraction}", first_settings, lambda: _fit_tasks(
                first_bags(), cohort.root / "labels.csv", cfg, cohort, Meter(), fraction))
            net = run_3d(cfg, cohort, volumes, fraction,
                         lambda task, fn: row(f"3d-{task}-{fraction}", settings_3d(cfg), fn))["tasks"]
        report["efficiency"].append({"fraction": fraction, f"{first_tag} + MIL": mil, "3D ResNet": net})
        write_report(report, out)
    return report


def kept(path, fingerprint, fn, log, tag="accuracy"):
    """fn()'s row, or the one an earlier run of the same settings left in `path` (JSON, written atomically)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            log(f"[{tag}] {path.stem}: finished by an earlier run, reused")
            return saved["row"]
    result = json.loads(json.dumps(fn()))  # as a re-run will read it back
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "row": result}))
    return result


def _cell(t):
    return f"{t['value']:.3f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}]" if t["value"] is not None else "n/a"


def md_row(cells):
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def row_cells(r):
    """A slice-pipeline row's table cells: the three tasks' AUROCs, the tumour-slice probe and the rank."""
    probe = f"{r['probe']:.3f}" if r.get("probe") is not None else "n/a"
    rank = f"{r['effective_rank']:.1f}" if r.get("effective_rank") is not None else "n/a"
    return [_cell(r["tasks"][name]) for name in TASKS] + [probe, rank]


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
        cells = [r["encoder"], r["method"], *row_cells(r), f"{sum(r['seconds'].values()):.0f}",
                 f"{r['train_flops']:.2g}", f"{r['peak_bytes'] / 2**30:.1f} GiB"]
        lines.append(md_row(cells))
    if report["efficiency"]:
        keys = [k for k in report["efficiency"][0] if k != "fraction"]
        lines += ["", "| training patients | " + " | ".join(f"{k}: {n}" for k in keys for n in TASKS) + " |",
                  "|---|" + "---|" * (len(keys) * len(TASKS))]
        for e in report["efficiency"]:
            values = [e[k][n]["value"] for k in keys for n in TASKS]
            lines.append(md_row([f"{e['fraction']:.0%}", *("n/a" if v is None else f"{v:.3f}" for v in values)]))
    with atomic_path(Path(out) / "accuracy.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
