"""Smoke tests of the long commands, at a tiny size: `clear.py demo`, `benchmark.py accuracy` and `ablate`. They
check that each finishes and writes well-formed results (every table cell present and in range), never the accuracy
itself: at this size every AUROC is noise, and the real figures come from the full commands (README)."""
import contextlib
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import ablation, accuracy, config
import clear
import cv
import demo
from bench.baseline3d import Net3DConfig, Volume3DConfig
from bench.report import write_report
from bench.speed import Meter
from checkpoint import load_checkpoint
from files import ClearError
from phantom import SynthConfig


def well_formed(cell):
    """An AUROC summary: a value with its CI, all in [0, 1], low <= value <= high (None only if undefined)."""
    v, lo, hi = cell["value"], cell["ci_low"], cell["ci_high"]
    return v is None or (0 <= lo <= v <= hi <= 1 and not math.isnan(v))


def test_demo_runs_end_to_end_and_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "SIZE", 48)  # a small demo: 48-px scans, the shipped encoder (64 px)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--n", "100"]
    assert clear.main(argv) == 0
    printed = capsys.readouterr().out
    for (task, col), run in demo.RUNS.items():
        metrics = json.loads((out / run / "metrics.json").read_text())
        auc = [r for r in metrics["rows"] if r["metric"] in ("AUROC", "AUROC, fold mean")]
        assert len({r["metric"] for r in auc}) == 2 and all(well_formed(r) for r in auc), run
        cell = demo.auroc(out, run, "AUROC, fold mean")  # the table's cell
        assert cell["value"] is None or f"{cell['value']:.3f}" in printed.split(f"\n{task:<16} ")[1].split("\n")[0]
    assert demo.verdict(out) in printed
    assert not (out / "corpus").exists() and not list(out.glob("*.pt"))  # the shipped encoders
    for bags, dim in (("bags", 128), ("bags-supervised", 128), ("bags-random", 128), ("bags-histogram", 96)):
        files = list((out / bags).glob("*.pt"))
        assert len(files) == 100 and torch.load(files[0], weights_only=True)["features"].shape[1] == dim, bags
    assert (out / "report.html").is_file() and (out / demo.CONTROL / "report.html").is_file()
    # a second run finds every step done and only prints the table again
    assert clear.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("exists, skipping") == 1 + len(demo.RUNS) and demo.table(out) in again
    # the same folder with other options is refused in one line, naming the option, and nothing is touched
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert clear.main(argv + ["--contrast", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{out / 'demo.json'}: this folder's demo had other options (--contrast 1.0 -> 3.0)" in err
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def demo_recipe():
    """The LearningConfig of the demo's pre-training: benchmark.py learning --levels 0.52 0.88 (demo.CHEST)."""
    from dataclasses import replace

    from bench.learning import LearningConfig

    return replace(LearningConfig(), levels=tuple(map(float, demo.CHEST)))


@pytest.mark.parametrize("method", demo.PRETRAINED)
def test_the_shipped_checkpoints_are_checked_and_are_the_recipes_runs(tmp_path, monkeypatch, method):
    """Each shipped checkpoint is slim (no training state) and was made by the demo's --pretrain recipe: the same
    settings, 600 steps on the 600-scan corpus; a changed or missing copy is refused in one line."""
    from checkpoint import run_settings

    shipped = demo.CHECKPOINTS[method]
    ck = torch.load(shipped, weights_only=True)
    assert "state" not in ck and ck["step"] == ck["steps"] == 600 and ck["data"]["scans"] == 600
    assert run_settings(ck["config"]) == run_settings(demo_recipe().pretrain_config(method))
    demo.check_shipped(shipped)
    readme = (demo.HERE / "README.md").read_text()  # the README names each file with the hash it is checked against
    assert re.search(rf"{re.escape(shipped.name)}\s+{demo.CHECKPOINT_SHA256[method]}\b", readme)
    changed = tmp_path / shipped.name
    changed.write_bytes(shipped.read_bytes()[:-1] + b"x")
    monkeypatch.setitem(demo.CHECKPOINTS, method, changed)
    with pytest.raises(ClearError, match="not the shipped checkpoint .*--pretrain"):
        demo.check_shipped(changed)
    changed.unlink()
    with pytest.raises(ClearError, match="missing; run the demo with --pretrain"):
        demo.check_shipped(changed)


def test_a_demo_pretraining_stopped_part_way_is_resumed_not_skipped(tmp_path):
    """demo --pretrain: the checkpoint file exists from the first checkpoint on, so only a whole one (every step,
    slimmed) marks the step done; a partial one is continued with --resume."""
    from checkpoint import FORMAT

    settings = {**SETTINGS, "pretrain": True}
    ckpt = demo.checkpoint(tmp_path, True)

    def pretrain_step():
        return next((c, d) for c, d in demo.steps(tmp_path, settings) if c[0] == "pretrain")

    assert pretrain_step() == (demo.command_lines(tmp_path, **settings)[2], None)  # nothing yet: run it
    torch.save({"format": FORMAT, "step": 100, "steps": 600, "state": {}}, ckpt)
    command, done = pretrain_step()
    assert done is None and command[-2:] == ["--resume", str(ckpt)]
    torch.save({"format": FORMAT, "step": 600, "steps": 600, "state": {}}, ckpt)  # every step, not yet slimmed
    assert pretrain_step()[0][-2:] == ["--resume", str(ckpt)]
    torch.save({"format": FORMAT, "step": 600, "steps": 600}, ckpt)
    assert pretrain_step()[1] == ckpt


def test_the_demo_pretrains_with_the_learning_curves_recipes():
    """The demo's --pretrain commands are the LeCL and supervised runs of benchmark.py learning --levels 0.52 0.88,
    whose curves results/lecl-chest and results/learning.md show, and its corpus is those runs' corpus: the shipped
    checkpoints are their last points."""
    from checkpoint import run_settings
    from commands import pretrain_config

    lines = demo.command_lines("d", **{**SETTINGS, "n": 120, "pretrain": True})
    synth, *pretrains = (clear.build_parser().parse_args(c) for c in lines[1:2 + len(demo.PRETRAINED)])
    want = demo_recipe()
    for method, pretrain in zip(demo.PRETRAINED, pretrains, strict=True):
        assert pretrain.cmd == "pretrain"
        assert run_settings(pretrain_config(pretrain)) == run_settings(want.pretrain_config(method))
    corpus = want.corpus
    assert (synth.n, synth.size, tuple(synth.thickness), synth.seed) == (corpus.n, corpus.size, corpus.thickness,
                                                                         corpus.seed)


SETTINGS = dict(n=10, corpus=600, steps=600, batch_size=128, pretrain=False, contrast=1.0, lesion_scale=1.0)


def test_a_demo_folder_is_refused_to_other_options_once_its_cohort_is_drawn(tmp_path):
    out = tmp_path / "demo"
    demo.open_folder(out, SETTINGS)  # a new folder: made, and the options recorded
    assert json.loads((out / "demo.json").read_text()) == SETTINGS
    demo.open_folder(out, {**SETTINGS, "n": 20})  # nothing drawn yet (e.g. synth refused --n): re-recorded
    assert json.loads((out / "demo.json").read_text())["n"] == 20
    (out / "cohort").mkdir()
    (out / "cohort" / "labels.csv").write_text("patient,scan\n")
    demo.open_folder(out, {**SETTINGS, "n": 20})  # the same options continue
    with pytest.raises(ClearError, match=r"demo.json: this folder's demo had other options \(--n 20 -> 10\)"):
        demo.open_folder(out, SETTINGS)
    (out / "demo.json").unlink()  # a demo folder of another version, or any other folder with files in it
    with pytest.raises(ClearError, match="not empty and holds no demo.json"):
        demo.open_folder(out, SETTINGS)
    for text in ("{", "[1]"):
        (out / "demo.json").write_text(text)
        with pytest.raises(ClearError, match="demo.json: (unreadable|not a demo record)"):
            demo.open_folder(out, SETTINGS)
    (tmp_path / "file").write_text("")
    with pytest.raises(ClearError, match="exists and is not a folder"):
        demo.open_folder(tmp_path / "file", SETTINGS)


def fake_run(out, run, low):
    """A run folder whose metrics.json holds the macro fold-mean AUROC with CI low end `low` (None: undefined)."""
    row = dict(metric="AUROC, fold mean", label="macro", value=None if low is None else low + 0.1, ci_low=low,
               ci_high=None if low is None else min(low + 0.2, 1.0))
    (out / run).mkdir(parents=True)
    (out / run / "metrics.json").write_text(json.dumps({"rows": [row, {**row, "metric": "AUROC"}]}))


@pytest.mark.parametrize("lows, says", [
    ({"lecl": (0.6, 0.7, 0.65, 0.4, 0.55), "random": (0.3, 0.4, 0.45, 0.2, 0.45),
      "supervised": (0.4, 0.8, 0.9, 0.6, 0.3), "histogram": (0.8, 0.9, 0.45)},
     "Above chance (the fold mean's 95 % CI above 0.5) with the LeCL encoder: location, lung_disease, ground_glass, "
     "stage; at random init: none; the supervised reference: lung_disease, ground_glass, emphysema; the "
     "HU-histogram control: lung_disease, ground_glass."),
    ({"lecl": (0.6, 0.5, 0.5, 0.5, None), "random": (0.55, 0.2, 0.3, 0.3, 0.3), "supervised": (0.3,) * 5,
      "histogram": (0.45, 0.4, 0.3)},
     "Above chance (the fold mean's 95 % CI above 0.5) with the LeCL encoder: location; at random init: location; "
     "the supervised reference: none; the HU-histogram control: at chance. With the control at chance"),
])
def test_the_demo_reads_its_table_from_the_metrics(tmp_path, lows, says):
    for col, values in lows.items():
        for task, low in zip([t for t, _, _ in demo.TASKS if (t, col) in demo.RUNS], values):
            fake_run(tmp_path, demo.RUNS[task, col], low)
    assert demo.verdict(tmp_path).startswith(says)
    table = demo.table(tmp_path)
    first = lows["lecl"][0]
    assert ("n/a" in table) == (None in lows["lecl"]) and f"{first + 0.1:.3f} [{first:.3f}," in table
    control = lows["histogram"][0]
    assert table.split("\nlung_disease")[1].split("\n")[0].rstrip().endswith(f"{control + 0.1:.3f} [{control:.3f}, "
                                                                             f"{min(control + 0.2, 1):.3f}]")


def test_the_demo_fits_side_by_side_print_in_order_with_each_bar_at_its_end(capsys):
    """With two workers the fits run in forked processes: each one's output comes back whole, in the commands'
    order, a progress bar's redrawn line at its last state, and its exit code with it; with one they run here,
    printing as they go."""
    def step(command):
        print(f"ran {command[0]}")
        sys.stderr.write("fit: 1/2\rfit: 2/2\n")
        return 2 if command[0] == "bad" else 0

    fits = [["a"], ["bad"], ["c"]]
    assert list(demo.fits_side_by_side(fits, step, 2)) == [(c, 2 if c == ["bad"] else 0, f"ran {c[0]}\nfit: 2/2\n")
                                                           for c in fits]
    assert capsys.readouterr().out == ""  # nothing printed by the workers themselves
    assert list(demo.fits_side_by_side(fits, step, 1)) == [(c, 2 if c == ["bad"] else 0, None) for c in fits]
    assert capsys.readouterr().out == "ran a\nran bad\nran c\n"


def test_the_demo_steps_skip_what_is_done_and_stop_at_a_failed_one(monkeypatch, capsys):
    ran = []

    def step(command):
        ran.append(command[0])
        return 2 if command[-1] == "bad" else 0

    monkeypatch.setattr(demo, "usable_cores", lambda: 1)
    demo.run_steps([(["synth"], None), (["extract"], "bags/x.pt"), (["fit", "a"], None)], step, "t")
    assert ran == ["synth", "fit"]
    assert "[t] bags/x.pt exists, skipping: python clear.py extract" in capsys.readouterr().out
    ran.clear()
    with pytest.raises(ClearError, match="t step 'extract' failed"):
        demo.run_steps([(["extract", "bad"], None), (["fit", "a"], None)], step, "t")
    assert ran == ["extract"]  # no fit after a failed extract


def test_demo_passes_the_cohort_difficulty_to_synth(tmp_path):
    synth = demo.command_lines(tmp_path, **{**SETTINGS, "contrast": 3.0, "lesion_scale": 2.0})[0]
    args = clear.build_parser().parse_args(synth)
    assert (args.cmd, args.n, args.size, args.contrast, args.lesion_scale) == ("synth", 10, 128, 3.0, 2.0)
    for bad in (["--contrast", "nan"], ["--contrast", "-1"], ["--lesion-scale", "0"]):
        assert clear.main(synth + bad) == 2  # refused in one line before anything is drawn
    assert not (tmp_path / "cohort").exists()


TINY = config.AccuracyConfig(
    cohort=SynthConfig(n=30, size=32, thickness=(8.0, 10.0), workers=1), img_size=32, encoders=("vit",),
    corpus=SynthConfig(n=12, seed=7, size=32, thickness=(8.0, 10.0), workers=1),
    methods=("lecl", "random"), steps=2, batch_size=8, mlp_dim=32, epochs_3d=1, fractions=(0.5, 1.0),
    fit=cv.FitConfig(targets=("x",), folds=3, epochs=2, n_bootstrap=20),
    volume=Volume3DConfig(depth=8, size=16), net=Net3DConfig(widths=(4, 4, 4, 4)))


def test_accuracy_benchmark_writes_a_complete_report(tmp_path, monkeypatch):
    cfg = TINY
    logged, reports = [], []

    def write_and_read(report, out):  # each report as a reader finds it while the run goes on
        write_report(report, out)
        reports.append((Path(out) / "accuracy.md").read_text())
    monkeypatch.setattr(accuracy, "write_report", write_and_read)
    report = accuracy.run(cfg, tmp_path / "results", tmp_path / "work", lambda desc, unit: lambda it, total: it,
                          log=logged.append)
    # until the run ends, the report names what is still to come: a stopped run's report is not taken for the whole
    assert len(reports) == 1 + 2 + 1 + 1 + 2  # the start, two slice rows, the histogram, the 3D network, two fractions
    assert ("Still to run: vit / lecl, vit / random, HU histogram, 3D ResNet, data efficiency at 50%, data efficiency "
            "at 100%." in reports[0]) and "| vit |" not in reports[0]
    assert ("Still to run: vit / random, HU histogram, 3D ResNet, data efficiency at 50%, data efficiency at 100%."
            in reports[1])
    assert "Still to run: data efficiency at 100%." in reports[-2] and "Still to run" not in reports[-1]
    monkeypatch.undo()
    saved = json.loads((tmp_path / "results" / "accuracy.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"])) and "pending" not in saved
    rows = saved["rows"]
    assert [(r["encoder"], r["method"]) for r in rows] == [("vit", "lecl"), ("vit", "random"),
                                                           ("HU histogram", "none"), ("3D ResNet", "supervised")]
    for r in rows:
        assert set(r["tasks"]) == set(config.TASKS) and all(well_formed(t) for t in r["tasks"].values())
        assert r["train_flops"] > 0 and r["peak_bytes"] > 0 and sum(r["seconds"].values()) > 0
    assert rows[0]["train_flops"] > rows[1]["train_flops"]  # pre-training costs FLOPs; random init does not
    assert all(r["probe"] is None or 0 <= r["probe"] <= 1 for r in rows[:3]) and "probe" not in rows[3]
    assert all(1 <= r["effective_rank"] <= 192 for r in rows[:2])  # RankMe of ViT-tiny's 192-wide embeddings
    assert 1 <= rows[2]["effective_rank"] <= 3 * 32  # the histogram: 32 bins of 3 windows
    assert [e["fraction"] for e in saved["efficiency"]] == list(cfg.fractions)
    md = (tmp_path / "results" / "accuracy.md").read_text()
    assert md.count("\n| vit |") == 2 and "| HU histogram |" in md and "| 3D ResNet |" in md
    assert "| 50% |" in md and "| 100% |" in md
    # fraction 1.0 of the efficiency curve is the rows' own fits, not run a second time
    assert saved["efficiency"][-1]["vit-lecl + MIL"] == rows[0]["tasks"]
    assert saved["efficiency"][-1]["3D ResNet"] == rows[-1]["tasks"]
    # a re-run of the same settings (any subset of rows) reuses every finished row
    quiet = lambda desc, unit: lambda it, total: it  # noqa: E731
    again = accuracy.run(replace(cfg, methods=("lecl",)), tmp_path / "results", tmp_path / "work", quiet,
                         log=logged.append)
    assert again["rows"][0] == rows[0] and "[accuracy] vit-lecl: finished by an earlier run, reused" in logged
    # a row whose record is lost is recomputed, from the finished checkpoint (nothing is pre-trained twice)
    (tmp_path / "results" / "rows" / "vit-lecl.json").unlink()
    again = accuracy.run(replace(cfg, methods=("lecl",)), tmp_path / "results", tmp_path / "work", quiet)
    assert again["rows"][0]["seconds"].get("pretrain") is None and "extract" in again["rows"][0]["seconds"]
    assert 0 < again["rows"][0]["seconds"]["pretrain, earlier processes"] <= rows[0]["seconds"]["pretrain"]
    # the kept rows travel with the results: another machine (a new work folder) continues from them alone, and
    # makes again only what a row still to run needs (here the first row's bags, for a lost efficiency fit)
    (tmp_path / "results" / "rows" / "mil-vit-lecl-0.5.json").unlink()
    logged.clear()
    moved = accuracy.run(cfg, tmp_path / "results", tmp_path / "work2", quiet, log=logged.append)
    assert moved["rows"] == again["rows"][:1] + rows[1:] and len(list((tmp_path / "work2").glob("bags-vit-lecl-*")))
    assert sum("reused" in line for line in logged) == 3 + 3 + 3  # 3 slice rows and the 3D tasks at 100 and 50 %
    # the efficiency curve follows the first row: with another first encoder its kept fits are not reused
    logged.clear()
    other = accuracy.run(replace(cfg, methods=("random",)), tmp_path / "results", tmp_path / "work", quiet,
                         log=logged.append)
    assert "vit-random + MIL" in other["efficiency"][0]
    assert not any(line.startswith("[accuracy] mil-") for line in logged)
    assert "[accuracy] 3d-stage-0.5: finished by an earlier run, reused" in logged
    # other settings are another experiment for the rows they touch: the 3D network's epochs make new 3D rows,
    # and leave the slice rows reused; the fits' lr touches every row
    logged.clear()
    accuracy.run(replace(cfg, methods=("random",), epochs_3d=2, fractions=(1.0,)), tmp_path / "results",
                 tmp_path / "work", quiet, log=logged.append)
    assert [line.split(":")[0] for line in logged if "reused" in line] == ["[accuracy] vit-random",
                                                                            "[accuracy] hist-none"]
    logged.clear()
    accuracy.run(replace(cfg, methods=("random",), epochs_3d=2, fractions=(1.0,), fit=replace(cfg.fit, lr=0.01)),
                 tmp_path / "results", tmp_path / "work", quiet, log=logged.append)
    assert not any("reused" in line for line in logged)
    # a work folder whose cohort was drawn otherwise is refused, in one line, not silently used
    with pytest.raises(ClearError, match="drawn with other settings"):
        accuracy.run(replace(cfg, cohort=replace(cfg.cohort, seed=1)), tmp_path / "results", tmp_path / "work", quiet)


def test_ctrl_c_in_a_rows_pre_training_keeps_its_steps_and_the_same_call_continues(tmp_path, monkeypatch):
    """The first Ctrl-C in a row's pre-training ends the step and writes a checkpoint, then the row stops; the same
    call continues from that step, to the bags of a run never stopped (an SSM row takes hours on a CPU)."""
    cfg, quiet = replace(TINY, steps=8), lambda desc, unit: lambda it, total: it  # a checkpoint every 2 steps
    whole = accuracy.make_bags(cfg, tmp_path / "a", accuracy.open_cohort(cfg, tmp_path / "a", quiet), "vit", "lecl",
                               quiet, Meter())

    @contextlib.contextmanager
    def pressed_in_the_first_step():  # Ctrl-C once the slice cache is built (a Ctrl-C before stops its build)
        yield lambda: (tmp_path / "b" / "cache" / "cache.json").exists()
    monkeypatch.setattr(accuracy, "first_ctrl_c_asks_to_stop", pressed_in_the_first_step)
    cohort = accuracy.open_cohort(cfg, tmp_path / "b", quiet)
    with pytest.raises(KeyboardInterrupt):
        accuracy.make_bags(cfg, tmp_path / "b", cohort, "vit", "lecl", quiet, Meter())
    [ckpt] = (tmp_path / "b").glob("vit-lecl-*.pt")
    assert load_checkpoint(ckpt)["step"] == 1 and not list((tmp_path / "b").glob("bags-*"))
    monkeypatch.undo()
    resumed = accuracy.make_bags(cfg, tmp_path / "b", cohort, "vit", "lecl", quiet, Meter())
    assert load_checkpoint(ckpt)["step"] == 8
    assert resumed.scans == whole.scans
    assert all(torch.equal(a, b) for a, b in zip(resumed.features, whole.features, strict=True))


def test_ablation_writes_a_complete_report_and_trains_each_variant_as_asked(tmp_path):
    """Three variants of ablation.py (a top-level change, a views change, random init) on TINY's cohort: every row
    well formed, and each variant's checkpoint holds the settings it asked for, so the change reached training."""
    picked = {v[0]: v for v in ablation.VARIANTS if v[0] in ("tau1", "crop03", "random")}
    cfg = ablation.AblationConfig(base=TINY, variants=tuple(picked.values()))
    logged = []
    report = ablation.run(cfg, tmp_path / "results", tmp_path / "work", lambda desc, unit: lambda it, total: it,
                          log=logged.append)
    assert [r["variant"] for r in report["rows"]] == list(picked)
    for r in report["rows"]:
        assert set(r["tasks"]) == set(config.TASKS) and all(well_formed(t) for t in r["tasks"].values())
        assert (r["probe"] is None or 0 <= r["probe"] <= 1) and 1 <= r["effective_rank"] <= 192
    rows = sorted(p.stem for p in (tmp_path / "results" / "rows").glob("*.json"))
    e = cfg.encoder
    assert rows == [f"ablation-{e}-crop03", f"ablation-{e}-tau1", f"{e}-random"]  # random init: the table's own row
    assert not list((tmp_path / "work").glob(f"{e}-random-*.pt"))  # and it never pre-trains
    temps = sorted((c["temperature"], c["views"]["crop_min"]) for c in
                   (torch.load(p, weights_only=True)["config"] for p in (tmp_path / "work").glob(f"{e}-lecl-*.pt")))
    assert temps == [(0.2, 0.3), (1.0, 0.08)]  # the table's τ 0.2 and crop-min 0.08, each changed once
    md = (tmp_path / "results" / "ablation.md").read_text()
    assert all(f"| {key} | {v[1]} | " in md for key, v in picked.items())
    # a second run reuses every row
    logged.clear()
    ablation.run(cfg, tmp_path / "results", tmp_path / "work", lambda desc, unit: lambda it, total: it,
                 log=logged.append)
    assert sum("finished by an earlier run, reused" in line for line in logged) == len(picked)
