"""The paper's claim, measured on known truth: `python benchmark.py accuracy` runs this.

CLEAR (arXiv 2411.16803) claims that LeCL pre-training plus attention-MIL pooling beats generic encoders on
tumour location, lung disease and staging, at a fraction of the compute and data of end-to-end 3D networks.
On a synthetic cohort (phantom.py) with known findings this module runs, with the project's own pipeline:

    encoder {cnn, vit, gcnn, ssm} x pre-training {lecl, moco, random init, supervised}:
        pretrain on the corpus (other patients, as DeepLesion in the paper) -> extract the cohort -> fit (5-fold)
        supervised: the ceiling, the encoder trained on the corpus's mask labels per slice
    the reference: HU-histogram bags (models.reference.HUHistogram), nothing learnt -> fit: what intensities alone give
    the end-to-end 3D baseline (bench/baseline3d.py) on the same folds
    data efficiency: MIL (on the first row's bags, LeCL cnn by default) and 3D baseline on 10-100 % of the
                     training patients

and writes `results/accuracy.json` and `.md`: AUROC with patient-bootstrap 95 % CIs per task (location: macro
over the 8 sites), wall time, estimated training FLOPs and peak memory of every row. Nothing is tuned to the
outcome: the cohort, the budgets and the settings are the defaults below, whatever the numbers say.
"""
import functools
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import cv
from bench.baseline3d import ResNet3D, fit_cv_3d, load_volumes
from bench.config import (TASKS, TUMOUR_LABELS, encoder_making, encoder_settings, extraction_device,
                          fingerprint, fit_3d, histogram, pretrain_config, settings_3d, task_targets,
                          training_flops)
from bench.probe import bags_rank, probe_bags
from bench.report import kept, machine, write_report
from bench.speed import Meter
from checkpoint import load_checkpoint, plain
from cli import first_ctrl_c_asks_to_stop
from data import SliceConfig, named_windows
from extract import EncoderSpec, extract_bags, load_encoder, weights_sha256
from files import ClearError
from mil import load_bags
from models import count_flops
from pretrain import pretrain
from synth import drawn


def _auroc(rows):
    """The headline AUROC of a metrics summary: the mean over folds of the macro AUROC (metrics.summarize)."""
    return next(r for r in rows if r["metric"] == "AUROC, fold mean")


def _fit_tasks(bags, labels, cfg, cohort, meter, fraction=1.0):
    out = {}
    for name in TASKS:
        targets, kind, _ = task_targets(cohort, name, cfg.fit.folds)
        fit = replace(cfg.fit, targets=targets, task=kind, train_fraction=fraction)
        result = meter(f"fit {name}", lambda: cv.fit_cv(bags, labels, fit))
        out[name] = {**_auroc(result.metrics["rows"]), "epochs": result.metrics["best_epochs"]}
    return out


def make_bags(cfg, work, cohort, encoder, method, progress, meter):
    """pretrain (unless random init or the histogram; continues a stopped run) -> extract -> the bags (mil.Bags).
    Stages are timed by `meter`. The work files carry the fingerprint of encoder_making, so a checkpoint or bags
    made otherwise are never picked up, and a change of the fits alone re-uses them."""
    tag = f"{encoder}-{method}-{fingerprint(encoder_making(cfg, encoder, method))[:8]}"
    ckpt = work / f"{tag}.pt"
    if method == "none":
        enc = histogram(cfg)
        identity = {"name": "hu-histogram", "bins": cfg.histogram_bins, "source": "accuracy.py",
                    "sha256": weights_sha256(enc)}
        slices = SliceConfig(named_windows(cfg.windows), img_size=cfg.img_size)
    else:
        if method != "random":
            pcfg = pretrain_config(cfg, encoder, method)
            kept = load_checkpoint(ckpt) if ckpt.exists() else None  # on the CPU, wherever it was written
            earlier = kept.get("seconds", 0.0) if kept else 0.0  # training time of the processes before this one
            if kept is None or kept["step"] < cfg.steps:  # resumes a killed run
                cache = work / ("cache" if pcfg.cache_size is None else f"cache-{pcfg.cache_size}")  # one per size
                corpus = open_cohort(cfg, work, progress, "corpus").root
                # the first Ctrl-C ends the step and writes a checkpoint (the SSM's rows run for hours on a CPU)
                with first_ctrl_c_asks_to_stop() as should_stop:
                    r = meter("pretrain", lambda: pretrain(pcfg, corpus, ckpt, ckpt if kept else None, cache,
                                                           progress=progress, should_stop=should_stop))
                if r.interrupted or should_stop():  # also a Ctrl-C after the last step's check: the checkpoint is
                    raise KeyboardInterrupt  # written, and the same command continues from it
                earlier = r.run_seconds - r.seconds
            if earlier > 0:
                meter.seconds["pretrain, earlier processes"] = earlier
        spec = (EncoderSpec(name=encoder, size=cfg.size, img_size=cfg.img_size, windows=named_windows(cfg.windows))
                if method == "random" else EncoderSpec(checkpoint=str(ckpt)))
        enc, identity, slices = load_encoder(spec)
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
        targets, kind, _ = task_targets(cohort, name, cfg.fit.folds)
        fit = replace(fit_3d(cfg), targets=targets, task=kind, epochs=cfg.epochs_3d, train_fraction=fraction)
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


def open_cohort(cfg, work, progress, which="cohort"):
    """The run's cohort (or its pre-training corpus) in `work`/cohort (`work`/corpus), drawn on first use; one drawn
    with other settings is refused."""
    work.mkdir(parents=True, exist_ok=True)
    return drawn(getattr(cfg, which), work / which, lambda it, total: progress("synth", "scan")(it, total))


def run(cfg, out, work, progress, log=print):
    """The whole experiment. Every finished row is kept in `out`/rows/ (a small JSON file beside the report) and
    the report rewritten after it, so a killed run loses at most the row it was in, and running the same command
    again continues: also on another machine, from a copy of `out` alone (the cohort, checkpoints and bags in
    `work` are made again where they are needed). Until the run ends the report names the parts still to come."""
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    cohort = open_cohort(cfg, work, progress)
    report = {"config": plain(asdict(cfg)), "machine": machine(cfg), "rows": [], "efficiency": [],
              "dropped_labels": {n: task_targets(cohort, n, cfg.fit.folds)[2] for n in TASKS}}

    def row(key, settings, fn):
        return kept(out / "rows" / f"{key}.json", fingerprint(settings), fn, log)

    flags = {}  # the probe's slice flags, read from the masks once for all rows
    made = [(e, m) for e in cfg.encoders for m in cfg.methods] + ([("hist", "none")] if cfg.histogram else [])
    report["pending"] = [*("HU histogram" if e == "hist" else f"{e} / {m}" for e, m in made), "3D ResNet",
                         *(f"data efficiency at {f:.0%}" for f in (cfg.fractions if made else ()))]

    def done():  # the next part of the run is finished: off the list of those to come, and the report rewritten
        report["pending"].pop(0)
        if not report["pending"]:  # the run's last part: a finished report has no such list
            del report["pending"]
        write_report(report, out)
    write_report(report, out)  # from the start the report is this run's (an empty table, all to come)
    for encoder, method in made:
        log(f"[accuracy] {encoder} / {method}")
        r = row(f"{encoder}-{method}", encoder_settings(cfg, encoder, method),
                lambda: run_encoder(cfg, work, cohort, encoder, method, progress, flags))
        report["rows"].append({**r, "train_flops": training_flops(cfg, encoder, method, r["slices"])})
        done()

    @functools.cache
    def volumes():  # read once, and only if a 3D row is still to run
        return load_volumes(cohort, cfg.volume, progress=lambda it, n: progress("volumes", "scan")(it, n))

    log("[accuracy] 3D baseline")
    full_3d = run_3d(cfg, cohort, volumes, 1.0, lambda task, fn: row(f"3d-{task}", settings_3d(cfg), fn))
    report["rows"].append(full_3d)
    done()
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
        done()
    return report
