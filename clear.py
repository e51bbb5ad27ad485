"""CLEAR command line: the only entry point, the only place that parses arguments or prints for the user.

    python clear.py demo                                          # all of the below on a small cohort
    python clear.py synth    --out data/synth                     # a synthetic CT cohort with known findings
    python clear.py convert  dicom/series_3 data/ct/images/P001_S1.nii.gz   # a DICOM CT series -> NIfTI in HU
    python clear.py pretrain --data data/synth --out runs/vit-lecl.pt --encoder vit --method lecl
    python clear.py extract  --data data/synth --out runs/bags --checkpoint runs/vit-lecl.pt
    python clear.py fit      --bags runs/bags --labels data/synth/labels.csv --target stage --out runs/stage
    python clear.py predict  --model runs/stage --bags new_bags --out predictions.csv

Every subcommand reads the same way: inputs (--data, --bags, ...), --out, then options that map one to one
onto the fields of a config dataclass of the module doing the work. A problem with the input is reported
as one line naming the file, with exit code 2; long work shows a progress bar and continues when re-run.
"""
import argparse
import dataclasses
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from files import ClearError


def config_from(cls, args, **overrides):
    """Fill the dataclass `cls` from the parsed arguments that share its field names."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def prepare_out_dir(out, force, owned=()):
    """Refuse an --out that exists and is not empty unless --force; with --force remove only the `owned` glob
    patterns (what this subcommand itself writes there), never anything else of the user's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClearError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ClearError(f"{out}: exists and is not empty (use --force to overwrite)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # writable? Found out now, not after the work; as root, only
    except OSError as e:                         # this finds a read-only mount or an immutable folder
        raise ClearError(f"{out}: cannot create folder or write in it ({e.strerror})") from None
    for pattern in owned if force else ():
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


BARS = []  # the progress bars this process drew; end_bars() closes those left open


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on stderr, remembered for end_bars()."""
    BARS.append(tqdm(iterable, dynamic_ncols=True, **kwargs))
    return BARS[-1]


def end_bars():
    """Close the bars still open (an error or Ctrl-C stopped their loop): each ends its line, so the message
    printed next stands on a line of its own instead of being glued to the end of a bar."""
    while BARS:
        BARS.pop().close()


def bar(desc, unit="scan"):
    """A tqdm progress bar factory for library functions that take `progress(iterable, total)`."""
    return lambda it, total: progress_bar(it, total=total, desc=desc, unit=unit)


# --------------------------------------------------------------------------------------------- synth


def cmd_synth(args):
    from phantom import SynthConfig, write_cohort, ENDPOINTS

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
        f"{k}={sum(r[k] > 0 for r in rows)}" for k in ENDPOINTS))
    print("stage counts 0-3: " + " ".join(str(sum(r["stage"] == s for r in rows)) for s in range(4)))


def add_synth(sub):
    from phantom import SynthConfig

    d = SynthConfig()
    p = sub.add_parser("synth", help="generate a synthetic CT cohort with known findings",
                       description="Draw a synthetic neck-to-pelvis CT cohort (NIfTI in HU, lesion masks, "
                                   "labels.csv) posing tumour location, lung disease and staging.")
    p.add_argument("--out", required=True, help="cohort folder to create")
    p.add_argument("--n", type=int, default=d.n, help=f"number of scans (default {d.n})")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed, same files")
    p.add_argument("--size", type=int, default=d.size, help=f"in-plane grid (default {d.size})")
    p.add_argument("--thickness", type=float, nargs=2, default=d.thickness, metavar=("MIN", "MAX"),
                   help="slice thickness range in mm (default 1 5)")
    p.add_argument("--contrast", type=float, default=d.contrast,
                   help="difficulty: scales lesion contrast to host tissue (default 1)")
    p.add_argument("--lesion-scale", type=float, default=d.lesion_scale,
                   help="difficulty: scales lesion diameters (default 1: 5-30 mm)")
    p.add_argument("--workers", type=int, default=d.workers, help="parallel processes")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=cmd_synth, resumes=False)  # a re-run draws the whole cohort again (with --force)


# ------------------------------------------------------------------------------------------- convert


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


def add_convert(sub):
    p = sub.add_parser("convert", help="a DICOM CT series (one folder of slices) -> NIfTI in HU",
                       description="Convert one CT series from a DICOM export (one folder of slice files) into a "
                                   "NIfTI volume in Hounsfield units, slices ordered along the slice normal and "
                                   "the affine from the DICOM geometry. Needs pydicom (pip install pydicom).")
    p.add_argument("dicom", metavar="DICOM_DIR", help="folder of one series' slice files (or one slice file)")
    p.add_argument("out", metavar="OUT", help="NIfTI file to write, e.g. cohort/images/P001_S1.nii.gz")
    p.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to take from a folder holding several")
    p.add_argument("--resample", action="store_true",
                   help="interpolate uneven slice gaps onto the median gap instead of refusing the series")
    p.add_argument("--gap-tolerance", type=float, default=0.01,
                   help="largest deviation of a slice gap from the median, as a fraction of it (default 0.01)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.set_defaults(func=cmd_convert)


# ------------------------------------------------------------------------------------------ pretrain


def cmd_pretrain(args):
    import signal

    from pretrain import PretrainConfig, pretrain, rank_trend

    labels = tuple(args.lesion_labels) if args.lesion_labels else None
    cfg = config_from(PretrainConfig, args, lesion_labels=labels)
    out = Path(args.out)
    if out.is_dir():
        raise ClearError(f"{out}: is a folder; --out names the checkpoint file to write")
    if out.exists() and not args.resume and not args.force:
        raise ClearError(f"{out}: exists (continue that run with --resume {out}, or overwrite it with --force)")
    how = f"continue with the same options plus --resume {out}"
    asked = []

    def on_sigint(signum, frame):  # the first Ctrl-C ends the step, writes a checkpoint and stops
        asked.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one stops at once

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        r = pretrain(cfg, args.data, out, args.resume, args.cache, progress=bar, should_stop=lambda: bool(asked))
    except KeyboardInterrupt:
        end_bars()
        print(f"clear.py pretrain: interrupted; "
              f"{f'the last checkpoint is {out}: {how}' if out.exists() else 'run the same command again'}",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if r.rank != 0:
        return
    if r.interrupted:
        end_bars()
        print(f"clear.py pretrain: interrupted at step {r.step} of {r.total}, checkpoint written; {how}",
              file=sys.stderr)
        raise SystemExit(130)
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
             "their width (README.md, 'Results', says what this does to the scores)")


def lesion_fraction(text):
    return None if text == "cohort" else float(text)


def add_pretrain(sub):
    from pretrain import PretrainConfig

    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="pre-train a slice encoder with LeCL (or plain MoCo v3)",
                       description="Self-supervised pre-training of a 2D slice encoder on a cohort's slices: "
                                   "LeCL (lesion-centred crops, lesion keys as up-weighted hard negatives) or "
                                   "MoCo v3. Runs under torchrun too (one process per GPU, or gloo on CPU).")
    p.add_argument("--data", required=True, help="cohort folder (images/, and masks/ for --method lecl)")
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. runs/vit-lecl.pt)")
    p.add_argument("--encoder", default=d.encoder, help="vit | gcnn | ssm (default vit)")
    p.add_argument("--size", default=d.size, help="tiny | small | base (default tiny)")
    p.add_argument("--method", default=d.method, help="lecl | moco: the ablation without lesion crops or term")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    n.add_argument("--epochs", type=float, help="instead of --steps: passes over the cohort's slices")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global, over all processes")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW lr at batch 256, scaled by batch/256 "
                                                          f"(default {d.lr})")
    p.add_argument("--img-size", type=int, default=d.img_size, help="encoder input size S (default 224)")
    p.add_argument("--thickness", type=float, help="resample slices to this spacing in mm (default: as stored)")
    p.add_argument("--lesion-fraction", type=lesion_fraction, default=d.lesion_fraction,
                   help="share of lesion slices per batch, or 'cohort' to sample slices as they come "
                        f"(default {d.lesion_fraction})")
    p.add_argument("--lesion-weight", type=float, default=d.lesion_weight,
                   help=f"w, the weight of lesion keys as hard negatives (default {d.lesion_weight})")
    p.add_argument("--lesion-labels", type=int, nargs="+", help="mask labels that are lesions (default: all)")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"default {d.temperature}")
    p.add_argument("--mlp-dim", type=int, default=d.mlp_dim, help="hidden width of the heads (default 4096)")
    p.add_argument("--proj-dim", type=int, default=d.proj_dim, help="projection width d (default 256)")
    p.add_argument("--freeze-stem", action="store_true", help="keep the encoder's first layer (patch projection; "
                   "gcnn: stem) at its random init, as MoCo v3 does for ViTs")
    p.add_argument("--cache", help="slice cache folder (default: OUT.cache); runs can share one")
    p.add_argument("--cache-size", type=int, help="slice size in the cache (default: --img-size)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, data order and views follow from it")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_pretrain)


# ------------------------------------------------------------------------------------------- extract


def cmd_extract(args):
    from cohort import Cohort
    from extract import EncoderSpec, extract_bags, load_encoder, pick_device, shard_from_env

    spec = EncoderSpec(checkpoint=args.checkpoint, module=args.encoder_module, size=args.size,
                       img_size=args.img_size, seed=args.seed,
                       name=args.encoder if args.random_init else None)
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


def parse_shard(text):
    try:
        k, n = (int(v) for v in text.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise ClearError(f"--shard {text}: expected K/N with 0 <= K < N") from None
    return k, n


def add_extract(sub):
    p = sub.add_parser("extract", help="embed every slice of every scan with a frozen encoder (bags)",
                       description="Embed every axial slice of every scan of a cohort with a frozen encoder; "
                                   "one bag file per scan. Re-running continues where a run stopped.")
    p.add_argument("--data", required=True, help="cohort folder (images/, optional labels.csv)")
    p.add_argument("--out", required=True, help="bag folder")
    src = p.add_argument_group("encoder (one of)")
    src.add_argument("--checkpoint", help="a clear.py pretrain checkpoint")
    src.add_argument("--encoder", help="vit | gcnn | ssm, with --random-init")
    src.add_argument("--random-init", action="store_true", help="random weights (a baseline)")
    src.add_argument("--encoder-module", metavar="FILE.py:FACTORY",
                     help="your own nn.Module mapping (B, C, H, W) to (B, D)")
    p.add_argument("--size", default="tiny", help="encoder size for --encoder (tiny | small | base)")
    p.add_argument("--img-size", type=int, default=224, help="input size for --encoder/--encoder-module")
    p.add_argument("--thickness", type=float, help="resample slices to this spacing in mm (default: as stored)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard", metavar="K/N", help="process scans K, K+N, ... (default under torchrun: the rank's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.set_defaults(func=cmd_extract)


# ----------------------------------------------------------------------------------------- fit, predict


def cmd_fit(args):
    import cv
    import metrics
    from data import save_overlay
    from mil import load_bags

    cfg = config_from(cv.FitConfig, args, targets=tuple(t for t in args.target.split(",") if t))
    bags = load_bags(args.bags)
    created = Path(args.out).absolute()  # the topmost folder this fit makes, removed again if the fit fails
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    out = prepare_out_dir(args.out, args.force, owned=("metrics.json", "predictions.csv", "fold*.pt", "attention"))
    try:
        result = cv.fit_cv(bags, args.labels, cfg, progress=lambda total, desc: progress_bar(
            total=total, desc=f"fit {args.target}", unit="epoch"))
        cv.save_run(out, result)
    except BaseException:  # a run is whole or absent: a fit that stopped (bad labels, Ctrl-C) leaves no folder
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    overlays = []
    for top in result.top:
        if top["image"] and Path(top["image"]).is_file():
            path = out / "attention" / f"{top['scan']}.nii.gz"
            save_overlay(top["image"], *result.attention[top["scan"]], path)
            overlays.append(path.name)
    print(metrics.format_table(result.metrics))
    print(f"run saved in {out}: metrics.json, predictions.csv, fold models, attention/ per test scan"
          + (f", NIfTI attention overlays for {len(overlays)} top scans" if overlays else ""))
    import report
    print(f"report: {report.write_fit_report(out, bags)} (opens offline in any browser)")


def add_fit(sub):
    import cv

    d = cv.FitConfig(targets=("x",))
    p = sub.add_parser("fit", help="cross-validate the attention-MIL head on bags and labels",
                       description="Fit the attention-MIL head with patient-level stratified k-fold "
                                   "cross-validation; report AUROC with patient-bootstrap 95% CIs.")
    p.add_argument("--bags", required=True, help="bag folder from clear.py extract")
    p.add_argument("--labels", required=True, help="labels.csv: patient,scan,<endpoint>...")
    p.add_argument("--target", required=True, help="label column(s), comma-separated (several 0/1 = multi-label)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--task", choices=("binary", "multilabel", "multiclass", "ordinal"),
                   help="default: inferred from the target columns")
    for kind, names in ((int, ("folds", "epochs", "patience", "batch_size", "max_slices", "seed")),
                        (float, ("lr", "weight_decay", "dropout", "val_fraction", "train_fraction"))):
        for name in names:
            p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name),
                           help=f"default {getattr(d, name)}")
    p.add_argument("--gated", action="store_true", help="gated attention (Ilse et al. Eq. 9)")
    p.add_argument("--workers", type=int, default=d.workers, help="folds trained side by side, one process and "
                   "thread each (default 0: one per CPU core; 1: one at a time, in this process)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=cmd_fit)


def cmd_predict(args):
    import cv
    from mil import load_bags, predict

    bags = load_bags(args.bags)
    rows = predict(args.model, bags)
    out = Path(args.out)
    if out.is_dir():
        raise ClearError(f"{out}: is a folder, expected a .csv file name")
    cv.write_csv(out, rows)
    print(f"wrote predictions for {len(rows)} scans to {out}")


def add_predict(sub):
    p = sub.add_parser("predict", help="apply a fitted run's fold ensemble to new bags",
                       description="Score new scans with the mean of a fit run's fold models.")
    p.add_argument("--model", required=True, help="run folder from clear.py fit")
    p.add_argument("--bags", required=True, help="bag folder (same encoder as the run's)")
    p.add_argument("--out", required=True, help="predictions .csv to write")
    p.set_defaults(func=cmd_predict)


# ---------------------------------------------------------------------------------------------- demo


def cmd_demo(args):
    import demo

    out = Path(args.out)
    settings = {k: getattr(args, k) for k in demo.SETTINGS}
    demo.open_folder(out, settings)
    t0 = time.time()
    for command in demo.command_lines(out, **settings):
        name, done = command[0], demo.finished(command)
        if done is not None and done.exists():  # a re-run continues where the last one stopped
            print(f"\n[demo] {done} exists, skipping: python clear.py {shlex.join(command)}")
            continue
        print(f"\n[demo] python clear.py {shlex.join(command)}", flush=True)
        if main(command) != 0:
            raise ClearError(f"demo step '{name}' failed (see above); fix it and run the demo again to continue")
    print(f"\n[demo] done in {time.time() - t0:.0f} s. Outputs in {out}: cohort/ (CT + masks + labels.csv), "
          "vit-lecl.pt (LeCL checkpoint), bags/ (slice embeddings), fit-*/ (metrics, predictions, attention), "
          f"bags-histogram/ and {demo.CONTROL}/ (the control)")
    print(demo.table(out))
    import report
    print(f"report: {report.write_demo_report(out)}, the tasks side by side with links to each fit's report")
    from pretrain import load_checkpoint, rank_trend

    _, first, last, collapsed = rank_trend(load_checkpoint(out / "vit-lecl.pt").get("ranks", [])) or (
        0, math.nan, math.nan, False)
    print(f"Pre-training took the effective rank of the slice embeddings from {first:.1f} to {last:.1f} "
          f"(RankMe of a batch){': they collapsed onto a few directions' if collapsed else ''}.")
    print(demo.verdict(out, args.steps, args.img_size))


def add_demo(sub):
    from phantom import SynthConfig

    d = SynthConfig()
    p = sub.add_parser("demo", help="synth -> pretrain -> extract -> fit on a small cohort (about 5 min on CPU)",
                       description="The whole method on a small synthetic cohort: generate it, pre-train a "
                                   "ViT-tiny with LeCL, extract bags and fit the MIL on the three tasks; then a "
                                   "control, the MIL on HU-histogram bags (nothing learnt) for lung disease.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); re-running continues")
    p.add_argument("--n", type=int, default=120, help="scans in the cohort")
    p.add_argument("--img-size", type=int, default=64, help="encoder input size")
    p.add_argument("--steps", type=int, default=100,
                   help="pre-training steps (default 100: the whole demo fits in 5 minutes on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=64, help="pre-training batch")
    p.add_argument("--contrast", type=float, default=d.contrast,
                   help=f"the cohort's lesion contrast to host tissue, x (default {d.contrast:g}, the benchmark's)")
    p.add_argument("--lesion-scale", type=float, default=d.lesion_scale,
                   help=f"the cohort's lesion diameters, x (default {d.lesion_scale:g}: 5-30 mm)")
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(prog="clear.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (add_synth, add_convert, add_pretrain, add_extract, add_fit, add_predict, add_demo):
        add(sub)
    return parser


def run_command(prog, args):
    """args.func(args) as a command-line tool: a ClearError becomes one line and exit code 2, Ctrl-C one line and
    130 (saying how to continue, unless the subcommand set resumes=False: it writes nothing to continue from);
    either way the progress bars still open are closed first. clear.py's and benchmark.py's main."""
    try:
        args.func(args)
    except ClearError as e:
        end_bars()
        one_line = " / ".join(line.strip() for line in str(e).splitlines() if line.strip())  # should one slip in
        print(f"{prog} {args.cmd}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_bars()
        how = "; finished files are kept, run the same command again to continue" if getattr(args, "resumes", True) \
            else ""
        print(f"{prog} {args.cmd}: interrupted{how}", file=sys.stderr)
        return 130
    return 0


def main(argv=None):
    return run_command("clear.py", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
