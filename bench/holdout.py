"""The shipped recipe on patients that chose nothing: `python benchmark.py holdout`.

The demo (demo.py) judges its encoders on 120 scans, and its recipe (chest batches, the parenchyma window, the MIL
trained every epoch) was chosen on a cohort of its own (docs/results.md, "Choices made on a cohort of their own").
This runs the demo's steps again on a third cohort that no choice has seen, larger so that the CIs are tighter,
with MoCo v3 pre-trained by the same recipe beside LeCL (the paper's comparison):

    synth the held-out cohort (--n scans, --seed; no patient of the corpus, the demo's or the dev cohort)
    extract it with each checkpoint (LeCL, MoCo v3, the supervised reference), with LeCL's encoder at random init,
        and as HU histograms
    fit the demo's five tasks (demo.TASKS) on every set of bags (the histogram's: the three lung tasks), with the
    attention-MIL and, on the lung tasks of the learnt bags, with `--pool mean --lr 0.01` (the linear head that
    kept lung disease better on the dev cohort)

and writes OUT/holdout.md: fold-mean AUROC [95 % patient-bootstrap CI] per task and encoder, and LeCL minus MoCo v3
on the lung tasks with the CI of the paired difference (the cohort, bags and fits go to --work). Each step is a plain
clear.py command, printed before it runs; a re-run skips the finished ones (demo.finished), so an interrupted run
continues. Nothing is tuned here: every fit has the demo's settings.
"""
import csv
import shlex
from pathlib import Path

import numpy as np

import demo
import metrics
from checkpoint import load_checkpoint
from data import WINDOWS
from files import ClearError, atomic_path
from report import ci_text

N = 300  # scans: 2.5 times the demo's cohort, for tighter CIs (251 patients at seed 13)
SEED = 13  # the held-out cohort: not the corpus (7), the demo's cohort (0), the dev cohort (11) nor their patients
COLUMNS = (("lecl", "LeCL"), ("moco", "MoCo v3"), ("random", "random init"), ("supervised", "supervised reference"),
           ("histogram", "HU histograms"))  # the bags, in the table's order
LEARNT = ("lecl", "moco", "random", "supervised")  # whose lung tasks are fitted with --pool mean too
SHIPPED = {m: str(demo.CHECKPOINTS[m]) for m in ("lecl", "supervised")}  # the demo's, the default checkpoints
MEAN = ("--pool", "mean", "--lr", "0.01")  # cv.FitConfig.pool; the lr at which the linear head trains in 40 epochs


def runs(column):
    """(row name, run folder, fit options after --target) of one column's fits: demo.TASKS with the MIL, then the
    lung tasks with MEAN (learnt bags only); the histogram's are the lung tasks alone, as in the demo."""
    tasks = [t for t in demo.TASKS if column != "histogram" or t[0] in demo.LUNG]
    out = [(name, f"fit-{name}", (target, *extra)) for name, target, extra in tasks]
    if column in LEARNT:
        out += [(f"{name}, mean", f"mean-{name}", (name, *MEAN)) for name in demo.LUNG]
    return out


RANDOM_INIT = (*demo.ENCODER, "--random-init", "--img-size", demo.IMG_SIZE, "--windows", *demo.WINDOWS)  # the demo's


def random_init(cfg, checkpoint):
    """extract's options for the encoder of a checkpoint's run settings `cfg` (family, size, input windows) at random
    init: the floor beside it, whichever encoder the checkpoints are of. `checkpoint` names the file in an error."""
    names = {tuple(v): k for k, v in WINDOWS.items()}
    if any(tuple(w) not in names for w in cfg["windows"]):
        raise ClearError(f"{checkpoint}: input windows {cfg['windows']} are not all named in data.WINDOWS")
    return ("--encoder", cfg["encoder"], "--size", cfg["size"], "--random-init", "--img-size", cfg["img_size"],
            "--windows", *(names[tuple(w)] for w in cfg["windows"]))


def command_lines(work, n, seed, checkpoints, random=RANDOM_INIT):
    """The held-out run as clear.py commands, into `work`; `checkpoints` maps lecl, moco and supervised to their
    files, `random` is extract's options for the random-init column."""
    work = Path(work)
    cohort = work / "cohort"
    commands = [["synth", "--out", cohort, "--n", n, "--size", demo.SIZE, "--thickness", 4, 5, "--seed", seed]]
    make = {m: ("--checkpoint", checkpoints[m]) for m in ("lecl", "moco", "supervised")}
    make["random"] = random
    make["histogram"] = ("--img-size", demo.IMG_SIZE,
                         "--encoder-module", f"{demo.HERE / 'models' / 'reference.py'}:HUHistogram")
    for col, _ in COLUMNS:
        bags = work / col / "bags"
        commands.append(["extract", "--data", cohort, "--out", bags, *make[col]])
        commands += [["fit", "--bags", bags, "--labels", cohort / "labels.csv", "--out", work / col / run,
                      "--target", *options, "--workers", 1] for _, run, options in runs(col)]  # side by side
    return [[str(a) for a in c] for c in commands]


def table(work):
    """Markdown: one row per task (and head), one column per set of bags; each cell '0.727 [0.614, 0.829]', the
    fold-mean AUROC of a finished fit's metrics.json (demo.auroc: the macro row where there is one)."""
    def cell(column, run):
        return ci_text(demo.auroc(Path(work) / column, run, "AUROC, fold mean"))

    names = list(dict.fromkeys(name for col, _ in COLUMNS for name, _, _ in runs(col)))
    lines = ["| task | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in names:
        cells = [next((cell(col, run) for n, run, _ in runs(col) if n == name), "") for col, _ in COLUMNS]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(run_a, run_b, target, n_bootstrap=1000, seed=1337):
    """Fold-mean AUROC of run_a minus run_b on the same held-out scans and folds (two `clear.py fit` runs of one
    binary target), with the 95 % CI of the difference over patient-bootstrap resamples drawn once for both: the
    scans are the same, so the pairing removes what the two share (which patients are easy) from the interval.
    -> (difference, low, high). The seed is cv.FitConfig's, as each run's own CI."""
    rows = []
    for run in (run_a, run_b):
        with open(Path(run) / "predictions.csv", newline="") as f:
            rows.append(list(csv.DictReader(f)))
    if [(r["scan"], r["fold"]) for r in rows[0]] != [(r["scan"], r["fold"]) for r in rows[1]]:
        raise ClearError(f"{run_a}, {run_b}: not the same scans in the same folds; no paired difference")
    y = np.array([float(r[f"true_{target}"]) for r in rows[0]])  # (N,)
    score = [np.array([float(r[f"score_{target}"]) for r in run]) for run in rows]  # (N,) each
    folds = np.array([int(r["fold"]) for r in rows[0]])  # (N,)

    def diff(w):  # (B, N) -> (B,)
        a, b = (metrics.fold_mean(lambda v, s=s: metrics.auroc(y, s, v), w, folds) for s in score)
        return a - b
    lo, hi = metrics.percentile_ci(diff(metrics.bootstrap_weights([r["patient"] for r in rows[0]], n_bootstrap,
                                                                   seed)))
    return float(diff(np.ones((1, len(y))))[0]), lo, hi


def command(args):
    """Run (or continue) the held-out table and write OUT/holdout.md."""
    import clear

    checkpoints = {"lecl": args.lecl, "moco": args.moco, "supervised": args.supervised}
    configs = {}
    for method, path in checkpoints.items():
        demo.check_shipped(Path(path))  # a default must be the shipped file, byte for byte
        ck = load_checkpoint(path)
        if ck["step"] != ck["steps"]:  # e.g. benchmark.py learning's, taken while it still runs
            raise ClearError(f"{path}: a pre-training stopped at step {ck['step']} of {ck['steps']}; finish it first")
        configs[method] = ck["config"]
    out = Path(args.out)
    work = Path(args.work or out / "work")
    steps = ((c, done if (done := demo.finished(c)) and done.exists() else None)
             for c in command_lines(work, args.n, args.seed, checkpoints, random_init(configs["lecl"], args.lecl)))
    demo.run_steps(steps, clear.main, "holdout")
    made = ["python", "benchmark.py", "holdout", "--moco", args.moco]
    made += [a for k, default in (("lecl", SHIPPED["lecl"]), ("supervised", SHIPPED["supervised"]), ("n", N),
                                  ("seed", SEED)) if str(getattr(args, k)) != str(default)
             for a in (f"--{k}", str(getattr(args, k)))]  # the options given, not --work: where files go
    made = shlex.join(made + ["--out", str(out)])
    pairs = "\n".join(f"| {name.replace('_', ' ')} | " + "{:+.3f} [{:+.3f}, {:+.3f}]".format(
        *paired_difference(work / "lecl" / run, work / "moco" / run, name)) + " |"
        for name, run, _ in runs("lecl") if name in demo.LUNG)
    text = (f"Fold-mean AUROC [95 % patient-bootstrap CI] on a held-out cohort ({args.n} scans, seed {args.seed}), "
            f"the demo's fits (`clear.py fit` defaults; \"mean\": `{' '.join(MEAN)}`). Made by:\n\n    {made}\n\n"
            + table(work) + "\n\nLeCL minus MoCo v3 on the same scans and folds (attention-MIL), with the 95 % CI of "
            "the difference over patient-bootstrap resamples shared by both:\n\n| task | LeCL - MoCo v3 |\n|---|---|\n"
            + pairs + "\n")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "holdout.md") as tmp:
        tmp.write_text(text)
    print(text)
