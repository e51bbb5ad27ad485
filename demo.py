"""The demo, `python clear.py demo`: the README's first command, the whole method on a small synthetic cohort.

It is nothing but the plain clear.py commands, in order (command_lines lists them, so a reader can copy any
step): synth -> pretrain (a ViT-tiny with LeCL, lecl.py) -> extract -> fit on each of the paper's three tasks
(arXiv 2411.16803: tumour location, lung disease, staging); then a control, the same MIL on HU-histogram
bags (models/reference.py), nothing learnt, which tells a failing encoder from a failing pipeline. This module
builds those commands, guards the output folder, and reads the runs' metrics.json back into the demo's table
and verdict; commands.cmd_demo runs the commands and prints.
"""
import json
import math
from pathlib import Path

from checkpoint import load_checkpoint
from files import ClearError, atomic_path
from phantom import SITES
from pretrain import rank_trend

TASKS = (  # (run name, --target, extra fit options): the paper's three endpoints
    ("location", ",".join(f"loc_{s}" for s in SITES), ()),
    ("lung_disease", "lung_disease", ()),
    ("stage", "stage", ("--task", "ordinal")),
)


CONTROL = "fit-histogram-lung_disease"  # the demo's control run: HU-histogram bags on lung disease
SETTINGS = ("n", "img_size", "steps", "batch_size", "contrast", "lesion_scale")  # command_lines' options
DONE = {"synth": "labels.csv", "pretrain": "", "fit": "metrics.json"}  # step -> what under its --out marks it
#       finished ("": the --out file itself); extract has none, it continues by itself where it stopped


def command_lines(out, n, img_size, steps, batch_size, contrast, lesion_scale):
    """The demo as the plain clear.py commands it runs, so a reader can copy any step."""
    out = Path(out)
    cohort, ckpt, bags = out / "cohort", out / "vit-lecl.pt", out / "bags"
    commands = [["synth", "--out", cohort, "--n", n, "--size", 2 * img_size, "--thickness", 4, 5,
                 "--contrast", contrast, "--lesion-scale", lesion_scale],
                ["pretrain", "--data", cohort, "--out", ckpt, "--encoder", "vit", "--method", "lecl",
                 "--img-size", img_size, "--steps", steps, "--batch-size", batch_size, "--lr", 0.003,
                 "--mlp-dim", 1024, "--checkpoint-every", 50],
                ["extract", "--data", cohort, "--out", bags, "--checkpoint", ckpt]]
    commands += [["fit", "--bags", bags, "--labels", cohort / "labels.csv", "--target", target,
                  "--out", out / f"fit-{name}", *extra] for name, target, extra in TASKS]
    # the control: bags of HU histograms (models/reference.py), nothing learnt, on the task intensities alone solve
    commands += [["extract", "--data", cohort, "--out", out / "bags-histogram", "--img-size", img_size,
                  "--encoder-module", f"{Path(__file__).resolve().parent / 'models' / 'reference.py'}:HUHistogram"],
                 ["fit", "--bags", out / "bags-histogram", "--labels", cohort / "labels.csv", "--target",
                  "lung_disease", "--out", out / CONTROL]]
    return [[str(a) for a in c] for c in commands]


def finished(command):
    """The file whose existence means that `command`, one of command_lines, ran to the end (DONE); None for extract."""
    if command[0] not in DONE:
        return None
    return Path(command[command.index("--out") + 1]) / DONE[command[0]]


def steps(out, settings):
    """open_folder, then each command of command_lines with the file that marks it finished if that exists (a re-run
    skips it), else None."""
    open_folder(out, settings)
    for command in command_lines(out, **settings):
        done = finished(command)
        yield command, done if done is not None and done.exists() else None


def rank_change(out):
    """(first, last, collapsed): the effective rank of the demo's pre-training at its start and end (rank_trend)."""
    _, first, last, collapsed = rank_trend(load_checkpoint(Path(out) / "vit-lecl.pt")["ranks"]) or (
        0, math.nan, math.nan, False)
    return first, last, collapsed


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


def verdict(out, steps, img_size):
    """The demo's reading of its own table: which tasks, and whether the control, came out above chance."""
    found = {name: above_chance(auroc(out, f"fit-{name}", "AUROC, fold mean")) for name, _, _ in TASKS}
    control = above_chance(auroc(out, CONTROL, "AUROC, fold mean"))
    text = (f"Above chance (the fold mean's 95 % CI above 0.5): {', '.join(n for n in found if found[n]) or 'none'}."
            f" At chance: {', '.join(n for n in found if not found[n]) or 'none'}.")
    if all(found.values()):
        return text
    if not control:
        return (text + " The control, the MIL on HU histograms, is at chance too: with findings this faint or "
                "scans this few, the table says nothing about the encoder.")
    return (text + f" At the demo's budget ({steps} LeCL steps at {img_size} px) the encoder has not learnt to see "
            "those findings; the control, above chance, shows that the pipeline after the encoder works (from HU "
            "histograms alone the MIL finds the lung disease). docs/results.md says why and what is open.")


def auroc(out, run, metric):
    """The macro summary row of `metric` ("AUROC, fold mean" or "AUROC", pooled) in a demo run's metrics.json."""
    found = [r for r in json.loads((Path(out) / run / "metrics.json").read_text())["rows"] if r["metric"] == metric]
    return next((r for r in found if r["label"] == "macro"), found[0])


def table(out):
    """task -> AUROC (mean over the held-out folds, and pooled over them) with 95 % CIs, from each run's
    metrics.json. Both are macro means over the task's labels or classes (metrics.summarize explains why two)."""
    lines = [f"{'task':<14} {'AUROC, fold mean':<24} {'AUROC, pooled folds':<24}"]
    for name, run in [(n, f"fit-{n}") for n, _, _ in TASKS] + [("lung_disease", CONTROL)]:
        if run == CONTROL:
            lines.append("control: the same MIL on HU-histogram bags (models/reference.py), nothing learnt")
        cells = [auroc(out, run, metric) for metric in ("AUROC, fold mean", "AUROC")]
        cells = ["n/a" if r["value"] is None else f"{r['value']:.3f}" + (
            "" if r["ci_low"] is None else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]") for r in cells]
        lines.append(f"{name:<14} {cells[0]:<24} {cells[1]:<24}")
    return "\n".join(lines)
