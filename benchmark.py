"""CLEAR benchmarks: every speed and accuracy figure of docs/results.md is made here, never in timed tests.

    python benchmark.py scan        # selective scan: sequential reference vs default path (vs mambapy)
    python benchmark.py memory      # what autograd keeps for backward: the scan's forms, the encoders at 224 px
    python benchmark.py encoders    # slices/s and achieved GFLOP/s of the three encoders vs matmul peak
    python benchmark.py speed       # one table: scan, encoders, extraction, MIL fit, peak memory
    python benchmark.py accuracy    # the paper's claim on the synthetic cohort: results/accuracy.md
    python benchmark.py ablate      # LeCL's settings one at a time on its cnn row: results/ablation.md
    python benchmark.py probe --data COHORT --bags BAGS   # does an encoder see the lesions of the masks?
    python benchmark.py twin --checkpoint E.pt  # ... and with anatomy and noise held fixed (synthetic twins)?
    python benchmark.py detectability  # ... and could an ideal observer, told where to look? (d' per finding)
    python benchmark.py learning    # twin test against pre-training steps: LeCL, MoCo, supervised ceiling
    python benchmark.py readout --bags BAGS --labels L.csv --target T  # the MIL beside a pooled linear readout
    python benchmark.py holdout --moco M.pt  # the demo's table, with MoCo v3, on 300 scans that chose nothing

The experiments are bench/ (bench/README.md: what each command measures and where its results go); this file
only reads the options and hands them to bench/commands.py, or to an experiment's own command (learning, probe's
twin, readout, holdout, detectability).
"""
import argparse
import sys

from bench import commands, detectability, holdout, learning, probe, readout
from bench.config import AccuracyConfig
from cli import add_windows, run_command
from models import SIZES
from pretrain import METHODS

ENCODERS, ENCODER_SIZES = tuple(SIZES), tuple(SIZES["vit"])  # the families, and the sizes each has


def add_scale(parser, steps):
    """The scale options (SCALE) of a subcommand whose table has `steps` pre-training steps by default."""
    d = AccuracyConfig()
    scale = parser.add_argument_group("scale (default: the table's, or --quick's smaller one; another scale writes "
                                      "to results/custom-<its options> unless --out; pre-training and extraction run "
                                      "on the GPU when there is one)")
    scale.add_argument("--scans", type=int, help=f"scans in the synthetic cohort (default {d.cohort.n})")
    scale.add_argument("--size", type=int, help=f"the cohort's in-plane grid in pixels (default {d.cohort.size})")
    scale.add_argument("--img-size", type=int, help=f"encoder input size (default {d.img_size}; the paper's 224)")
    scale.add_argument("--steps", type=int, help=f"pre-training steps of every encoder (default {steps})")
    scale.add_argument("--batch-size", type=int, help=f"pre-training batch (default {d.batch_size})")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_scan = sub.add_parser("scan", help="selective scan fwd+bwd: reference vs default path vs mambapy")
    p_scan.add_argument("--lengths", type=int, nargs="+", default=[196, 1024, 4096], help="sequence lengths L")
    p_scan.add_argument("--quick", action="store_true", help="L = 196 only (seconds instead of minutes)")
    p_scan.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is reported")
    p_scan.add_argument("--device", default="cpu", help="cpu or cuda")
    p_scan.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p_scan.set_defaults(func=commands.bench_scan, resumes=False)
    p_mem = sub.add_parser("memory", help="what autograd keeps for backward: the scan's forms, the encoders")
    p_mem.add_argument("--img-size", type=int, default=224, help="slice side in pixels")
    p_mem.add_argument("--batch", type=int, default=256, help="pre-training batch the figures are scaled to")
    p_mem.add_argument("--names", nargs="+", default=list(ENCODERS), choices=ENCODERS,
                       help="encoders to count")
    p_mem.add_argument("--device", default="cpu", help="cpu or cuda")
    p_mem.set_defaults(func=commands.bench_memory, resumes=False)
    p_enc = sub.add_parser("encoders", help="encoders' forward slices/s and GFLOP/s vs this machine's matmul peak")
    p_enc.add_argument("--batch", type=int, default=32, help="slices per forward")
    p_enc.add_argument("--img-size", type=int, default=224, help="slice side in pixels")
    p_enc.add_argument("--names", nargs="+", default=list(ENCODERS), choices=ENCODERS,
                       help="encoders to time")
    p_enc.add_argument("--size", default="tiny", choices=ENCODER_SIZES, help="encoder size")
    p_enc.add_argument("--repeat", type=int, default=5, help="timed runs per figure; the best is reported")
    p_enc.add_argument("--device", default="cpu", help="cpu or cuda")
    p_enc.set_defaults(func=commands.bench_encoders, resumes=False)
    p_speed = sub.add_parser("speed", help="scan, encoders, extraction, MIL fit and memory in one table")
    p_speed.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is reported")
    p_speed.add_argument("--device", default="cpu", help="cpu or cuda")
    p_speed.set_defaults(func=commands.bench_speed, resumes=False)
    p_acc = sub.add_parser("accuracy", help="encoders x pre-training x MIL vs a 3D CNN on the synthetic cohort")
    p_acc.add_argument("--quick", action="store_true", help="a tiny version (a smoke test, about a minute)")
    p_acc.add_argument("--out", help="where accuracy.md and accuracy.json go (default results; results/quick for "
                       "--quick; results/custom-<scale> at another scale)")
    p_acc.add_argument("--work", help="cohort, checkpoints and bags (default OUT/work); a re-run reuses them")
    p_acc.add_argument("--encoders", nargs="+", choices=ENCODERS,
                       help="run only these encoders' rows (default all); the HU-histogram and 3D rows always run")
    p_acc.add_argument("--methods", nargs="+", choices=(*METHODS, "random"),
                       help="likewise for pre-training")
    add_scale(p_acc, 600)
    p_acc.set_defaults(func=commands.bench_accuracy)
    p_abl = sub.add_parser("ablate", help="what each of LeCL's settings does: one at a time on the table's cnn row")
    p_abl.add_argument("--quick", action="store_true", help="a tiny version (a smoke test)")
    p_abl.add_argument("--out", help="where ablation.md and ablation.json go (default as for accuracy)")
    p_abl.add_argument("--work", help="cohort, checkpoints and bags (default OUT/work); benchmark.py accuracy's "
                       "work folder shares its cohort, cache and the rows that change nothing")
    add_scale(p_abl, 600)
    p_abl.set_defaults(func=commands.bench_ablate)
    p_probe = sub.add_parser("probe", help="does an encoder see lesions? slice-level linear probe on its bags, "
                                           "and the embeddings' effective rank")
    p_probe.add_argument("--data", required=True, help="cohort folder with masks/ (the bags' scans)")
    p_probe.add_argument("--bags", required=True, help="bag folder from clear.py extract")
    p_probe.add_argument("--labels", type=int, nargs="+", help="mask labels that count (default: any non-zero; "
                         "the synthetic cohort's tumours are 1-8)")
    p_probe.add_argument("--seed", type=int, default=0, help="which patients are held out")
    p_probe.set_defaults(func=commands.bench_probe, resumes=False)
    p_twin = sub.add_parser("twin", help="does an encoder see a finding with anatomy and noise held fixed? "
                                         "synthetic scans against their twins without the findings")
    src = p_twin.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a clear.py pretrain checkpoint")
    src.add_argument("--encoder", choices=ENCODERS, help="this encoder at random init")
    src.add_argument("--encoder-module", metavar="FILE.py:FACTORY", help="e.g. models/reference.py:HUHistogram")
    p_twin.add_argument("--size", choices=ENCODER_SIZES, default="tiny", help="--encoder's size (default tiny)")
    p_twin.add_argument("--img-size", type=int, default=64, help="input size for --encoder/--encoder-module "
                        "(default: the accuracy benchmark's 64)")
    add_windows(p_twin, "lung soft bone", "; for --encoder and --encoder-module: a checkpoint brings its own")
    p_twin.add_argument("--n", type=int, default=60, help="patients drawn (those with each finding are used)")
    p_twin.add_argument("--seed", type=int, default=0, help="the cohort's seed (0: the accuracy benchmark's)")
    p_twin.add_argument("--bags", help="also read each finding's twin direction on these bags (same encoder) of "
                        "another cohort's scans: does it find the scans with the finding? needs --data")
    p_twin.add_argument("--data", help="the bags' cohort folder, with masks/")
    p_twin.set_defaults(func=probe.twin_command, resumes=False)
    p_learn = sub.add_parser("learning", help="learning curves: the twin test against pre-training steps, for LeCL, "
                                              "MoCo v3 and the supervised ceiling, on a corpus apart from the cohort")
    p_learn.add_argument("--out", help="where learning.md/.json/.svg/.png go (default results)")
    p_learn.add_argument("--work", help="corpus, slice cache and checkpoints (default OUT/work-learning); reused")
    p_learn.add_argument("--encoder", choices=ENCODERS, help="default cnn")
    p_learn.add_argument("--size", choices=ENCODER_SIZES, help="default micro")
    p_learn.add_argument("--img-size", type=int, help="encoder input and twin slices in pixels (default 64)")
    p_learn.add_argument("--steps", type=int, help="pre-training steps per method (default 600)")
    p_learn.add_argument("--every", type=int, help="steps between twin tests (default 100)")
    p_learn.add_argument("--batch-size", type=int, help="pre-training batch (default 128)")
    p_learn.add_argument("--lesion-weight", type=float, help="LeCL's w (default that of clear.py pretrain, 1)")
    p_learn.add_argument("--temperature", type=float, help="τ of the contrastive loss (default that of clear.py "
                         "pretrain, 0.2)")
    p_learn.add_argument("--lesion-labels", type=int, nargs="+", help="mask labels that are lesions for LeCL "
                         "(clear.py pretrain --lesion-labels; default any non-zero label)")
    p_learn.add_argument("--matched-levels", action=argparse.BooleanOptionalAction, help="draw each pre-training "
                         "batch from one height of the scans, so negatives share their anatomy (clear.py pretrain "
                         "--matched-levels; default on; --no-matched-levels: uniform batches, as the paper)")
    p_learn.add_argument("--levels", type=float, nargs=2, metavar=("LO", "HI"), help="pre-train on the slices at "
                         "these heights of the scans alone (clear.py pretrain --levels; default all)")
    add_windows(p_learn, "lung soft bone parenchyma, the demo's")
    p_learn.add_argument("--seed", type=int, help="initial weights, data order and views (default 0)")
    p_learn.add_argument("--methods", nargs="+", choices=METHODS, help="default all three")
    p_learn.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p_learn.set_defaults(func=learning.command)
    p_read = sub.add_parser("readout", help="does the MIL keep what a linear readout of mean/max-pooled bags finds? "
                                            "both on the folds of clear.py fit")
    p_read.add_argument("--bags", required=True, help="bag folder from clear.py extract")
    p_read.add_argument("--labels", required=True, help="labels.csv of the bags' scans")
    p_read.add_argument("--target", required=True, help="a binary label column, e.g. lung_disease")
    p_read.set_defaults(func=readout.command, resumes=False)
    p_det = sub.add_parser("detectability", help="the ideal observer's d' for each finding on its slices, at the "
                                                 "cohort's 128 px and the encoders' 64 px: could anything see it?")
    p_det.add_argument("--patients", type=int, default=60, help="the demo cohort's first patients (default 60)")
    p_det.add_argument("--out", default="results/detectability", help="where detectability.md goes")
    p_det.set_defaults(func=detectability.command, resumes=False)
    p_hold = sub.add_parser("holdout", help="the demo's table, with MoCo v3 beside LeCL, on a cohort that no choice "
                                            "has seen")
    p_hold.add_argument("--moco", required=True, help="MoCo v3 checkpoint of the demo's recipe (benchmark.py "
                        "learning --levels 0.52 0.88 --methods moco leaves it in its work folder as moco.pt)")
    p_hold.add_argument("--lecl", default=holdout.SHIPPED["lecl"], help="LeCL checkpoint (default the demo's)")
    p_hold.add_argument("--supervised", default=holdout.SHIPPED["supervised"],
                        help="supervised reference (default the demo's)")
    p_hold.add_argument("--n", type=int, default=holdout.N, help=f"scans in the cohort (default {holdout.N})")
    p_hold.add_argument("--seed", type=int, default=holdout.SEED, help=f"the cohort's seed (default {holdout.SEED}: "
                        "no patient of the corpus, the demo's or the dev cohort)")
    p_hold.add_argument("--out", default="results/holdout", help="where holdout.md goes (default results/holdout)")
    p_hold.add_argument("--work", help="cohort, bags and fits (default OUT/work); a re-run skips what is finished")
    p_hold.set_defaults(func=holdout.command)
    return parser


def main(argv=None):
    return run_command("benchmark.py", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
