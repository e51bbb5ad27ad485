"""The demo, `python clear.py demo`: the README's first command, the whole method on a synthetic cohort.

It is nothing but the plain clear.py commands, in order (command_lines lists them, so a reader can copy any step):

    synth the cohort (120 scans, seed 0)
    [--pretrain: synth the corpus (600 scans of other patients, seed 7), pretrain cnn-micro on it twice (RECIPE):
        with LeCL, and supervised on its mask labels (the reference)]
    extract the cohort's bags four times: the LeCL encoder and the supervised reference (the shipped CHECKPOINTS,
        or the ones just made), the same encoder at random init (the floor), and HU histograms
        (models/reference.py: nothing learnt)
    fit the MIL on the paper's three tasks (arXiv 2411.16803: tumour location, lung disease, staging) and on lung
        disease's two findings (ground glass, emphysema) with the LeCL, the reference and the random-init bags,
        and on the three lung tasks with the histogram bags (the control); one fit per CPU core, side by side

Pre-training on the corpus, not on the cohort it is then evaluated on, is the paper's split (DeepLesion, then
other cohorts) and the way to use the tool on real data: pre-train on a large lesion-annotated set, fit on your
cohort. Pre-training that learns takes longer than the demo's five minutes on 2 CPU cores, so the demo uses the
checkpoints that `--pretrain` makes (CHECKPOINTS, their SHA-256 checked); `--pretrain` makes them again. This module
builds the commands, guards the output folder, runs them (run_steps, which benchmark.py holdout shares) and reads
the runs' metrics.json back into the demo's table and verdict, which commands.cmd_demo prints.
"""
import contextlib
import hashlib
import io
import json
import shlex
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from files import ClearError, atomic_path, forked_map, usable_cores
from phantom import SITES
from pretrain import contrastive
from report import ci_text

HERE = Path(__file__).resolve().parent
TASKS = (  # (run name, --target, extra fit options): the paper's three endpoints, and lung disease's two findings
    ("location", ",".join(f"loc_{s}" for s in SITES), ()),
    ("lung_disease", "lung_disease", ()),
    ("ground_glass", "ground_glass", ()),  # against scans without lung disease (labels.csv: blank with emphysema)
    ("emphysema", "emphysema", ()),
    ("stage", "stage", ("--task", "ordinal")),
)
LUNG = ("lung_disease", "ground_glass", "emphysema")  # the tasks of the control: intensities alone find them
SIZE, IMG_SIZE = 128, 64  # the scans' in-plane grid, and the encoder's input: 64 px pre-trains on 2 cores
ENCODER = ("--encoder", "cnn", "--size", "micro")  # the family and size that learn on a CPU budget (models/cnn.py)
WINDOWS = ("lung", "soft", "bone", "parenchyma")  # data.WINDOWS, one input channel each: the narrow parenchyma
#                                                 window is the one in which LeCL finds ground glass
RECIPE = ("--lr", "0.002", "--mlp-dim", "1024", "--windows", *WINDOWS, "--checkpoint-every", "100")  # with
#         --method, --steps and --batch-size: bench/learning.py's runs, whose curves results/learning.md shows
CHEST = ("0.52", "0.88")  # the heights of these neck-to-pelvis scans that hold the lungs (and 99.9 % of the corpus's
#                          lung-finding slices): LeCL finds ground glass better there than on the whole body
CONTRASTIVE = ("--matched-levels", "--levels", *CHEST)  # LeCL's batches from one height of the chest, so negatives
#             share their anatomy (views.batch_ids); for contrastive methods alone (pretrain.contrastive)
PRETRAINED = ("lecl", "supervised")  # the demo's pre-trained encoders: the method, and the reference that shows
#                                      what the encoder and the MIL can reach on these slices
CORPUS_SEED = 7  # the corpus: as the cohort (seed 0), other patients
CHECKPOINTS = {m: HERE / "checkpoints" / f"cnn-micro-{m}.pt" for m in PRETRAINED}  # what --pretrain makes
CHECKPOINT_SHA256 = {"lecl": "3d19d953af0ea7ff1c1527f69ca54661595f7c8db36ed7135c119e1005a68441",  # as shipped
                     "supervised": "70cbaf5570fdf6fa44c0ba17ea04011b7cd04edc4b15c0970c97e3758855269f"}
COLUMNS = (("lecl", "LeCL, cnn-micro"), ("random", "random init, same encoder"),
           ("supervised", "reference: supervised"), ("histogram", "control: HU histograms"))  # the control
#          learns nothing; the reference is trained on the corpus's mask labels, what the method could reach
RUNS = {(task, col): f"fit-{task}" if col == "lecl" else f"fit-{col}-{task}"  # (task, column) -> its run folder
        for task, _, _ in TASKS for col, _ in COLUMNS if col != "histogram" or task in LUNG}
CONTROL = RUNS["lung_disease", "histogram"]
SETTINGS = ("n", "corpus", "steps", "batch_size", "pretrain", "contrast", "lesion_scale")  # command_lines' options
DONE = {"synth": "labels.csv", "pretrain": "", "fit": "report.html"}  # step -> what under its --out marks it
#       finished, the last file it writes ("": the --out file itself); extract has none, it continues by itself


def checkpoint(out, pretrain, method="lecl"):
    """The checkpoint of `method` (PRETRAINED) the demo extracts with: its own (--pretrain) or the shipped one."""
    return Path(out) / CHECKPOINTS[method].name if pretrain else CHECKPOINTS[method]


def check_shipped(path):
    """The shipped checkpoint must be the file the README's command made, byte for byte (not a stub or a copy that
    something changed)."""
    method = next((m for m, p in CHECKPOINTS.items() if p == path), None)
    if method is None:
        return
    if not path.is_file():
        raise ClearError(f"{path}: missing; run the demo with --pretrain")
    if hashlib.sha256(path.read_bytes()).hexdigest() != CHECKPOINT_SHA256[method]:
        raise ClearError(f"{path}: not the shipped checkpoint (its SHA-256 differs); run the demo with --pretrain")


def command_lines(out, n, corpus, steps, batch_size, pretrain, contrast, lesion_scale):
    """The demo as the plain clear.py commands it runs, so a reader can copy any step."""
    out = Path(out)
    cohort, ckpt = out / "cohort", {m: checkpoint(out, pretrain, m) for m in PRETRAINED}
    grid = ("--size", SIZE, "--thickness", 4, 5)
    commands = [["synth", "--out", cohort, "--n", n, *grid, "--contrast", contrast, "--lesion-scale", lesion_scale]]
    if pretrain:
        commands += [["synth", "--out", out / "corpus", "--n", corpus, *grid, "--seed", CORPUS_SEED]]
        commands += [["pretrain", "--data", out / "corpus", "--out", ckpt[m], *ENCODER, "--img-size", IMG_SIZE,
                      "--method", m, *RECIPE, *(CONTRASTIVE if contrastive(m) else ()), "--steps", steps,
                      "--batch-size", batch_size, "--slim"]
                     for m in PRETRAINED]
    bags = {"lecl": out / "bags", "supervised": out / "bags-supervised", "random": out / "bags-random",
            "histogram": out / "bags-histogram"}
    commands += [["extract", "--data", cohort, "--out", bags[m], "--checkpoint", ckpt[m]] for m in PRETRAINED]
    commands += [["extract", "--data", cohort, "--out", bags["random"], *ENCODER, "--random-init",
                  "--img-size", IMG_SIZE, "--windows", *WINDOWS],  # the same encoder, the same input
                 ["extract", "--data", cohort, "--out", bags["histogram"], "--img-size", IMG_SIZE,
                  "--encoder-module", f"{HERE / 'models' / 'reference.py'}:HUHistogram"]]
    commands += [["fit", "--bags", bags[col], "--labels", cohort / "labels.csv", "--target", target, "--out", out / run,
                  *extra, "--workers", 1]  # one core each: run_steps runs one per core
                 for col, _ in COLUMNS for task, target, extra in TASKS if (run := RUNS.get((task, col)))]
    return [[str(a) for a in c] for c in commands]


def run_steps(steps, run_step, tag):
    """Run (command, done) pairs (steps' own, or a bench's) with `run_step` (clear.main), each printed first as
    `[tag] python clear.py ...`: a done one is skipped, and the fits, the last steps and independent of one another,
    run side by side. A failed step is one ClearError."""
    def announced(command):
        print(f"\n[{tag}] python clear.py {shlex.join(command)}", flush=True)
        return run_step(command)

    def check(command, code):
        if code != 0:
            raise ClearError(f"{tag} step '{command[0]}' failed (see above); fix it and run the same command again "
                             "to continue")
    fits = []
    for command, done in steps:
        if done:
            print(f"\n[{tag}] {done} exists, skipping: python clear.py {shlex.join(command)}")
        elif command[0] == "fit":
            fits.append(command)
        else:
            check(command, announced(command))
    workers = min(len(fits), usable_cores())
    if workers > 1:
        print(f"\n[{tag}] {len(fits)} fits, {workers} at a time on one core each; each prints when it ends")
    for command, code, printed in fits_side_by_side(fits, announced, workers):
        if printed is not None:  # from a worker, which announced its command as well
            print(printed, end="", flush=True)
        check(command, code)


def fits_side_by_side(fits, run_step, workers):
    """Run the fit commands (which read bags and write their own folder, nothing else) in `workers` forked processes,
    each a whole fit on one core: a fit's own fold workers would leave a core idle for its last of 5 folds on 2 cores.
    Yields (command, exit code, what it printed with each progress bar at its end; None: printed as it ran), in
    order; with one worker they run here."""
    global _RUN_STEP
    if workers <= 1:
        yield from ((c, run_step(c), None) for c in fits)  # printed as it runs
        return
    _RUN_STEP = run_step
    try:
        yield from forked_map(_captured, fits, workers, "fit")
    finally:
        _RUN_STEP = None


_RUN_STEP = None  # what a forked worker runs (clear.main): set just before the fork, which copies it


def _captured(command):
    torch.set_num_threads(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = _RUN_STEP(command)
    return command, code, "\n".join(line.rsplit("\r", 1)[-1] for line in out.getvalue().split("\n"))


def finished(command):
    """The file whose existence means that `command`, one of command_lines, ran to the end (DONE); None for extract."""
    if command[0] not in DONE:
        return None
    return Path(command[command.index("--out") + 1]) / DONE[command[0]]


def pretrained(path):
    """Whether the pre-training checkpoint at `path` is whole: every step run and slimmed (its last act); until then
    it is a checkpoint to resume."""
    ck = load_checkpoint(path)
    return ck["step"] == ck["steps"] and "state" not in ck


def steps(out, settings):
    """open_folder, then each command of command_lines with the file that marks it finished if that exists (a re-run
    skips it), else None; a pre-training stopped part-way is resumed."""
    open_folder(out, settings)
    for method in PRETRAINED:
        check_shipped(checkpoint(out, settings["pretrain"], method))
    for command in command_lines(out, **settings):
        done = finished(command)
        if command[0] == "pretrain" and done.exists() and not pretrained(done):
            command, done = command + ["--resume", str(done)], None
        yield command, done if done is not None and done.exists() else None


def open_folder(out, settings):
    """Check `out` for a demo with these settings (a dict of SETTINGS) and record them in out/demo.json.
    A folder whose cohort another demo drew, or that holds something else, is refused: a re-run would mix them."""
    out, record = Path(out), Path(out) / "demo.json"
    if out.exists() and not out.is_dir():
        raise ClearError(f"{out}: exists and is not a folder")
    drawn = finished(command_lines(out, **settings)[0]).exists()  # synth's; until then nothing kept depends on them
    if record.exists():
        try:
            made = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise ClearError(f"{record}: unreadable ({e}); use another --out") from None
        if not isinstance(made, dict):
            raise ClearError(f"{record}: not a demo record (a JSON object of its options); use another --out")
        if made != settings and drawn:
            changed = ", ".join(f"--{k.replace('_', '-')} {made.get(k, 'unset')} -> {settings.get(k, 'unset')}"
                                for k in sorted(made.keys() | settings.keys()) if made.get(k) != settings.get(k))
            raise ClearError(f"{record}: this folder's demo had other options ({changed}); use another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise ClearError(f"{out}: not empty and holds no demo.json (another folder, or a demo of another version); "
                         "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(settings))


def above_chance(row):
    """Whether an AUROC summary row's 95 % CI lies above 0.5 (its low end None: undefined, e.g. one class)."""
    return row["ci_low"] is not None and row["ci_low"] > 0.5


def verdict(out):
    """The demo's reading of its own table: which tasks the LeCL encoder, random init, the reference and the
    control find."""
    found = {col: [t for t, _, _ in TASKS if (t, col) in RUNS
                   and above_chance(auroc(out, RUNS[t, col], "AUROC, fold mean"))] for col, _ in COLUMNS}
    lecl = ", ".join(found["lecl"]) or "none"
    text = (f"Above chance (the fold mean's 95 % CI above 0.5) with the LeCL encoder: {lecl}; at random init: "
            f"{', '.join(found['random']) or 'none'}; the supervised reference: "
            f"{', '.join(found['supervised']) or 'none'}; the HU-histogram control: "
            f"{', '.join(found['histogram']) or 'at chance'}.")
    if not found["histogram"]:
        text += " With the control at chance, the cohort's findings are too faint for the table to say anything."
    return text + " docs/results.md reads the full table and results/learning.md what pre-training learns."


def auroc(out, run, metric):
    """The macro summary row of `metric` ("AUROC, fold mean" or "AUROC", pooled) in a demo run's metrics.json."""
    found = [r for r in json.loads((Path(out) / run / "metrics.json").read_text())["rows"] if r["metric"] == metric]
    return next((r for r in found if r["label"] == "macro"), found[0])


def table(out):
    """task x column -> the fold-mean AUROC with its 95 % CI (the macro mean over the task's labels or classes;
    metrics.summarize explains it), from each run's metrics.json."""
    width = 26
    lines = [f"{'fold-mean AUROC':<16} " + " ".join(f"{name[:width]:<{width}}" for _, name in COLUMNS)]
    for task, _, _ in TASKS:
        cells = []
        for col, _ in COLUMNS:
            r = auroc(out, RUNS[task, col], "AUROC, fold mean") if (task, col) in RUNS else None
            cells.append("" if r is None else ci_text(r))
        lines.append(f"{task:<16} " + " ".join(f"{c:<{width}}" for c in cells))
    return "\n".join(lines)
