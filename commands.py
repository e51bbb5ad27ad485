"""What each `clear.py` command does: clear.py reads the options, these functions do the work through the
library modules and report to the user (they and clear.py are the only code that prints). Each takes the parsed
options; a problem with the user's input is a ClearError, which clear.py prints as one line with exit code 2.
"""
import dataclasses
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cli import (bar, config_from, end_bars, first_ctrl_c_asks_to_stop, prepare_out_dir, progress_bar,
                 removed_on_failure)
from files import ClearError, write_csv


def cmd_synth(args):
    from phantom import ENDPOINTS, SynthConfig
    from synth import write_cohort

    cfg = config_from(SynthConfig, args, thickness=tuple(args.thickness))
    if cfg.n < 1 or cfg.size < 32 or cfg.workers < 1 or not 0 < cfg.thickness[0] <= cfg.thickness[1]:
        raise ClearError(f"--n must be >= 1, --size >= 32, --workers >= 1 and --thickness 0 < MIN <= MAX (got "
                         f"{cfg.n}, {cfg.size}, {cfg.workers}, {cfg.thickness[0]:g} {cfg.thickness[1]:g})")
    if not (0 <= cfg.contrast < math.inf and 0 < cfg.lesion_scale < math.inf):  # NaN fails both
        raise ClearError(f"--contrast must be >= 0 and --lesion-scale > 0, both finite (got {cfg.contrast:g}, "
                         f"{cfg.lesion_scale:g})")
    out = prepare_out_dir(args.out, args.force, owned=("images", "masks", "labels.csv", "synth.json"))
    t0 = time.time()
    rows = write_cohort(cfg, out, progress=bar("synth"))
    print(f"wrote {len(rows)} scans of {len({r['patient'] for r in rows})} patients to {out} "
          f"in {time.time() - t0:.0f} s")
    print("label balance (positives / scans):  " + "  ".join(
        f"{k}={sum((r[k] or 0) > 0 for r in rows)}" for k in ENDPOINTS))  # None: unknown, as blank in labels.csv
    print("stage counts 0-3: " + " ".join(str(sum(r["stage"] == s for r in rows)) for s in range(4)))


def cmd_convert(args):
    from dicom import read_series, save_series

    out = Path(args.out)
    if out.is_dir():
        raise ClearError(f"{out}: is a folder; OUT names the .nii.gz file to write")
    if out.exists() and not args.force:
        raise ClearError(f"{out}: exists (overwrite it with --force)")
    prepare_out_dir(out.parent, force=True)  # made if missing, and writable: found out before the reading
    t0 = time.time()
    s = read_series(args.dicom, args.series, args.gap_tolerance, args.resample)
    save_series(s, out)
    (z, y, x), (dz, dy, dx) = s.volume.shape, s.spacing
    print(f"wrote {out}: {z} slices of {y} x {x}, spacing {dz:.4g} x {dy:.4g} x {dx:.4g} mm (z, y, x), HU "
          f"{s.volume.min():.0f} to {s.volume.max():.0f}, from {s.files} files of series {s.description!r} "
          f"({s.uid}) in {time.time() - t0:.1f} s")
    for note in s.notes:
        print(f"  note: {note}")


def pretrain_config(args):
    """`clear.py pretrain`'s options as a PretrainConfig: window names become their (level, width) in HU."""
    from data import named_windows
    from pretrain import PretrainConfig

    labels = tuple(args.lesion_labels) if args.lesion_labels else None
    windows = named_windows(args.windows) if args.windows else PretrainConfig.windows
    levels = tuple(args.levels) if args.levels else None
    return config_from(PretrainConfig, args, lesion_labels=labels, windows=windows, levels=levels)


def cmd_pretrain(args):
    from pretrain import pretrain
    from watch import rank_trend

    cfg = pretrain_config(args)
    out = Path(args.out)
    if out.is_dir():
        raise ClearError(f"{out}: is a folder; --out names the checkpoint file to write")
    if args.probe_every < 0:
        raise ClearError(f"expected --probe-every >= 0 (got {args.probe_every})")
    if out.exists() and not args.resume and not args.force:
        raise ClearError(f"{out}: exists (continue that run with --resume {out}, or overwrite it with --force)")
    how = f"continue with the same options plus --resume {out}"
    try:  # the first Ctrl-C ends the step, writes a checkpoint and stops; a second one stops at once
        with first_ctrl_c_asks_to_stop() as should_stop:
            r = pretrain(cfg, args.data, out, args.resume, args.cache, progress=bar, should_stop=should_stop,
                         probe_every=args.probe_every, log=tqdm.write)
    except KeyboardInterrupt:
        end_bars()
        print(f"clear.py pretrain: interrupted; "
              f"{f'the last checkpoint is {out}: {how}' if out.exists() else 'run the same command again'}",
              file=sys.stderr)
        raise SystemExit(130) from None
    if r.rank != 0:
        return
    if r.interrupted:
        end_bars()
        print(f"clear.py pretrain: interrupted at step {r.step} of {r.total}, checkpoint written; {how}",
              file=sys.stderr)
        raise SystemExit(130)
    if args.slim:
        from checkpoint import slim
        slim(out)
    c = r.cache
    print(f"slice cache {c['folder']} ({'built' if c['built'] else 'reused'}): {c['slices']} slices of "
          f"{c['scans']} scans, {c['lesion_slices']} with lesions")
    if r.step == r.start:
        print(f"{out}: nothing to do, already at step {r.step} of {r.total}")
        return
    run = r.losses[r.start:]
    k = max(1, min(10, len(run) // 4))
    print(f"wrote {out}: {cfg.encoder}/{cfg.size} {cfg.method}, steps {r.start}-{r.step} of {r.total} in "
          f"{r.seconds:.0f} s{f' ({r.run_seconds:.0f} s for the whole run)' if r.start else ''}, "
          f"{r.slices_per_s:.1f} slices/s; loss (mean of {k} steps) "
          f"{sum(run[:k]) / k:.3f} -> {sum(run[-k:]) / k:.3f}")
    trend = rank_trend(r.ranks)
    if trend:
        step, first, last, collapsed = trend
        print(f"effective rank of the encoder's embeddings (RankMe, one batch): {first:.1f} at step {step}, "
              f"{last:.1f} at step {r.step}{COLLAPSED if collapsed else ''}")


COLLAPSED = ("; the embeddings have collapsed onto a few directions, so they carry a few numbers per slice whatever "
             "their width (docs/results.md says what this does to the scores)")


def cmd_extract(args):
    from cohort import Cohort
    from data import named_windows
    from extract import EncoderSpec, extract_bags, load_encoder, parse_shard, shard_from_env
    from files import pick_device

    spec = EncoderSpec(checkpoint=args.checkpoint, module=args.encoder_module, size=args.size,
                       img_size=args.img_size, seed=args.seed, name=args.encoder if args.random_init else None,
                       windows=named_windows(args.windows) if args.windows else None)
    if args.encoder and not args.random_init:
        raise ClearError("--encoder NAME needs --random-init (or give --checkpoint CKPT)")
    if args.batch_size < 1 or args.thickness is not None and not args.thickness > 0:
        raise ClearError(f"expected --batch-size >= 1 and --thickness > 0 (got {args.batch_size}, {args.thickness})")
    encoder, identity, slices = load_encoder(spec)
    if args.thickness is not None:
        slices = dataclasses.replace(slices, thickness_mm=args.thickness)
    shard = parse_shard(args.shard) if args.shard else shard_from_env()
    cohort = Cohort(args.data)
    device = pick_device(args.device)
    prepare_out_dir(args.out, force=True)  # a folder that exists already is continued
    todo = len(cohort.scans[shard[0]::shard[1]])
    failed, n_slices, t0 = [], 0, time.time()
    with progress_bar(total=todo, desc=f"extract {identity['name']}", unit="scan") as pbar:
        for status, scan, detail in extract_bags(cohort, encoder, identity, slices, args.out,
                                                 args.batch_size, device, shard):
            if status == "failed":
                failed.append(detail)
                tqdm.write(f"clear.py extract: skipped {detail}", file=sys.stderr)
            n_slices += detail if status == "done" else 0
            pbar.set_postfix(slices_per_s=f"{n_slices / (time.time() - t0):.0f}")
            pbar.update()
    print(f"{todo - len(failed)} bags in {args.out} ({n_slices} slices embedded in {time.time() - t0:.0f} s, "
          f"{n_slices / max(time.time() - t0, 1e-9):.0f} slices/s on {device})")
    if failed:
        raise ClearError(f"{len(failed)} scan(s) skipped, no bag written for them: "
                         + "; ".join(failed))


def cmd_fit(args):
    import cv
    import metrics
    import report
    from data import save_overlay
    from mil import load_bags

    cfg = config_from(cv.FitConfig, args, targets=tuple(t for t in args.target.split(",") if t))
    bags = load_bags(args.bags)
    with removed_on_failure(args.out):  # a fit that stopped (bad labels, Ctrl-C) leaves no folder
        out = prepare_out_dir(args.out, args.force, owned=("metrics.json", "predictions.csv", "fold*.pt",
                                                           "attention"))
        result = cv.fit_cv(bags, args.labels, cfg, progress=lambda total, desc: progress_bar(
            total=total, desc=f"fit {args.target}", unit="epoch"))
        cv.save_run(out, result)
    overlays = []
    for top in result.top:
        if top["image"] and Path(top["image"]).is_file():
            path = out / "attention" / f"{top['scan']}.nii.gz"
            save_overlay(top["image"], *result.attention[top["scan"]], path)
            overlays.append(path.name)
    print(metrics.format_table(result.metrics))
    print(f"run saved in {out}: metrics.json, predictions.csv, fold models, attention/ per test scan"
          + (f", NIfTI attention overlays for {len(overlays)} top scans" if overlays else ""))
    print(f"report: {report.write_fit_report(out, bags)} (opens offline in any browser)")


def cmd_predict(args):
    from mil import load_bags, predict

    bags = load_bags(args.bags)
    rows = predict(args.model, bags)
    out = Path(args.out)
    if out.is_dir():
        raise ClearError(f"{out}: is a folder, expected a .csv file name")
    write_csv(out, rows)
    print(f"wrote predictions for {len(rows)} scans to {out}")


def cmd_demo(args):
    import demo
    import report

    t0 = time.time()
    demo.run_steps(demo.steps(args.out, {k: getattr(args, k) for k in demo.SETTINGS}), args.run_step, "demo")
    print(f"\n[demo] done in {time.time() - t0:.0f} s. Outputs in {args.out}: cohort/ (CT + masks + labels.csv), "
          "bags*/ (slice embeddings: LeCL, supervised reference, random init, HU histograms), fit-*/ (metrics, "
          "predictions, attention, report.html)")
    print(demo.table(args.out))
    print(f"report: {report.write_demo_report(args.out)}, the tasks side by side with links to each fit's report")
    print(demo.verdict(args.out))
