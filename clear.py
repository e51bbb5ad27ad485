"""CLEAR command line: the only entry point and the only place that parses arguments; what each command does is
commands.py.

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
import sys

import commands
from cli import add_options, add_windows, run_command
from mil import KINDS, POOLS


def lesion_fraction(text):
    """--lesion-fraction: a share, or "cohort" (None: lesion slices as often as in the cohort)."""
    return None if text == "cohort" else float(text)


def add_synth(sub):
    from phantom import SynthConfig

    p = sub.add_parser("synth", help="generate a synthetic CT cohort with known findings",
                       description="Draw a synthetic neck-to-pelvis CT cohort (NIfTI in HU, lesion masks, "
                                   "labels.csv) posing tumour location, lung disease and staging.")
    p.add_argument("--out", required=True, help="cohort folder to create")
    add_options(p, SynthConfig, ("n", "seed", "size", "thickness", "contrast", "lesion_scale", "workers"),
                thickness={"nargs": 2, "metavar": ("MIN", "MAX")})
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=commands.cmd_synth, resumes=False)  # a re-run draws the whole cohort again (with --force)


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
    p.set_defaults(func=commands.cmd_convert)


def add_pretrain(sub):
    from pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="pre-train a slice encoder with LeCL (or plain MoCo v3, or supervised)",
                       description="Pre-training of a 2D slice encoder on a corpus's slices: LeCL (lesion-centred "
                                   "crops, lesion keys as up-weighted hard negatives), MoCo v3, or a supervised "
                                   "reference on the masks' labels. Runs under torchrun too (one process per GPU, or "
                                   "gloo on CPU).")
    p.add_argument("--data", required=True, help="cohort folder (images/, and masks/ for --method lecl or supervised)")
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. runs/vit-lecl.pt)")
    add_options(p.add_mutually_exclusive_group(), PretrainConfig, ("steps", "epochs"))
    add_options(p, PretrainConfig, ("encoder", "size", "method", "batch_size", "lr", "img_size", "thickness",
                                    "lesion_fraction", "lesion_weight", "lesion_labels", "temperature", "mlp_dim",
                                    "proj_dim", "freeze_stem", "matched_levels", "levels", "cache_size", "seed",
                                    "device", "checkpoint_every"),
                lesion_fraction={"type": lesion_fraction, "help": "share of lesion slices per batch, or 'cohort' "
                                 "to sample slices as they come (default 0.5)"},
                lesion_labels={"type": int}, levels={"type": float, "nargs": 2, "metavar": ("LO", "HI")})
    add_windows(p, "lung soft bone", "; extract reads them from the checkpoint")
    p.add_argument("--cache", help="slice cache folder (default: OUT.cache); runs can share one")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint")
    p.add_argument("--slim", action="store_true", help="at the end, drop the training state from OUT: the encoder "
                   "and the run's record, to share or ship (no --resume)")
    p.add_argument("--probe-every", type=int, default=200, metavar="K",
                   help="every K steps, print a linear probe's AUROC for each mask label on held-out patients' "
                   "slices: does the encoder see the findings yet? (watch.py; 0: never; default 200)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=commands.cmd_pretrain)


def add_extract(sub):
    p = sub.add_parser("extract", help="embed every slice of every scan with a frozen encoder (bags)",
                       description="Embed every axial slice of every scan of a cohort with a frozen encoder; "
                                   "one bag file per scan. Re-running continues where a run stopped.")
    p.add_argument("--data", required=True, help="cohort folder (images/, optional labels.csv)")
    p.add_argument("--out", required=True, help="bag folder")
    src = p.add_argument_group("encoder (one of)")
    src.add_argument("--checkpoint", help="a clear.py pretrain checkpoint")
    src.add_argument("--encoder", help="vit | gcnn | ssm | cnn, with --random-init")
    src.add_argument("--random-init", action="store_true", help="random weights (a baseline)")
    src.add_argument("--encoder-module", metavar="FILE.py:FACTORY",
                     help="your own nn.Module mapping (B, C, H, W) to (B, D)")
    p.add_argument("--size", default="tiny", help="encoder size for --encoder (micro | tiny | small | base)")
    p.add_argument("--img-size", type=int, default=224, help="input size for --encoder/--encoder-module")
    add_windows(p, "lung soft bone", "; for --encoder and --encoder-module: a checkpoint brings its own")
    p.add_argument("--thickness", type=float, help="resample slices to this spacing in mm (default: as stored)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard", metavar="K/N", help="process scans K, K+N, ... (default under torchrun: the rank's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.set_defaults(func=commands.cmd_extract)


def add_fit(sub):
    import cv

    p = sub.add_parser("fit", help="cross-validate the attention-MIL head on bags and labels",
                       description="Fit the attention-MIL head with patient-level stratified k-fold "
                                   "cross-validation; report AUROC with patient-bootstrap 95% CIs.")
    p.add_argument("--bags", required=True, help="bag folder from clear.py extract")
    p.add_argument("--labels", required=True, help="labels.csv: patient,scan,<endpoint>...")
    p.add_argument("--target", required=True, help="label column(s), comma-separated (several 0/1 = multi-label)")
    p.add_argument("--out", required=True, help="run folder to create")
    add_options(p, cv.FitConfig, ("task", "folds", "epochs", "patience", "batch_size", "max_slices", "seed", "lr",
                                  "weight_decay", "dropout", "val_fraction", "train_fraction", "gated", "pool",
                                  "workers"),
                task={"choices": KINDS}, pool={"choices": POOLS})
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=commands.cmd_fit)


def add_predict(sub):
    p = sub.add_parser("predict", help="apply a fitted run's fold ensemble to new bags",
                       description="Score new scans with the mean of a fit run's fold models.")
    p.add_argument("--model", required=True, help="run folder from clear.py fit")
    p.add_argument("--bags", required=True, help="bag folder (same encoder as the run's)")
    p.add_argument("--out", required=True, help="predictions .csv to write")
    p.set_defaults(func=commands.cmd_predict)


def add_demo(sub):
    from phantom import SynthConfig

    p = sub.add_parser("demo", help="synth -> extract -> fit with the shipped LeCL encoder, beside random init and a "
                                    "control (about 2 min on 2 CPU cores); --pretrain makes the encoders too",
                       description="The whole method on a synthetic cohort: draw it, extract bags with the LeCL "
                                   "encoder pre-trained on a corpus of other patients (shipped; --pretrain makes it "
                                   "again), with the same encoder at random init and with HU histograms (nothing "
                                   "learnt), and fit the MIL on the paper's three tasks.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); re-running continues")
    p.add_argument("--n", type=int, default=120, help="scans in the cohort (default 120)")
    p.add_argument("--pretrain", action="store_true", help="pre-train the encoders here instead of using the shipped "
                   "checkpoints: draw the corpus and pre-train LeCL and the supervised reference on it (about 16 min "
                   "more on 2 CPU cores)")
    p.add_argument("--corpus", type=int, default=600, help="scans in the pre-training corpus (default 600)")
    p.add_argument("--steps", type=int, default=600, help="pre-training steps with --pretrain (default 600)")
    p.add_argument("--batch-size", type=int, default=128, help="pre-training batch with --pretrain (default 128)")
    add_options(p, SynthConfig, ("contrast", "lesion_scale"))
    p.set_defaults(func=commands.cmd_demo, run_step=main)  # each of the demo's steps is a clear.py command


def build_parser():
    parser = argparse.ArgumentParser(prog="clear.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (add_synth, add_convert, add_pretrain, add_extract, add_fit, add_predict, add_demo):
        add(sub)
    return parser


def main(argv=None):
    return run_command("clear.py", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
