"""bench/holdout.py: the held-out table's commands are the demo's steps on another cohort (each fit reads bags that
an extract writes; the histogram fits the lung tasks alone; --pool mean on the learnt bags' lung tasks), a re-run
skips every finished step, each cell of holdout.md is the figure of its own run's metrics.json, and a checkpoint of a
pre-training still running is refused."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark  # noqa: E402
import demo  # noqa: E402
from bench import holdout  # noqa: E402
import metrics  # noqa: E402
from checkpoint import FORMAT  # noqa: E402
from files import ClearError  # noqa: E402


def option(command, flag):
    return command[command.index(flag) + 1]


def cohort(n=60, seed=0):
    """(y, score, patient, fold) of n held-out scans, two scans for some patients; the score finds y partly."""
    rng = np.random.default_rng(seed)
    patient = [f"P{i // 2 if i < 20 else i:03d}" for i in range(n)]
    fold = np.array([int(p[1:]) % 5 for p in patient])  # a patient's scans share a fold
    y = (np.arange(n) % 3 == 0).astype(int)
    score = y * rng.uniform(0, 1, n) + rng.uniform(0, 1, n)  # (N,)
    return y, score, patient, fold


def write_predictions(run, target, y, score, patient, fold):
    """A clear.py fit run's predictions.csv, as cv.fit_cv writes it for a binary target."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "scan", "fold", f"true_{target}", f"score_{target}"])
        w.writerows([p, f"{p}_S{i}", k, t, s] for i, (p, k, t, s) in enumerate(zip(patient, fold, y, score)))


def test_paired_difference_is_the_difference_of_the_two_runs_fold_means(tmp_path):
    y, score, patient, fold = cohort()
    other = np.random.default_rng(1).uniform(0, 1, len(y))  # another run: no signal
    write_predictions(tmp_path / "a", "t", y, score, patient, fold)
    write_predictions(tmp_path / "b", "t", y, other, patient, fold)
    mean = {}
    for name, s in (("a", score), ("b", other)):  # each run alone, as clear.py fit summarises it
        rows = metrics.summarize("binary", y[:, None], s[:, None], ["t"], patient, 0, folds=fold)
        mean[name] = next(r["value"] for r in rows if r["metric"] == "AUROC, fold mean")
    d, lo, hi = holdout.paired_difference(tmp_path / "a", tmp_path / "b", "t")
    assert d == pytest.approx(mean["a"] - mean["b"], abs=1e-12) and mean["a"] - mean["b"] > 0.2
    assert lo < d < hi and lo > 0  # the planted signal: a is better in (nearly) every resample
    assert holdout.paired_difference(tmp_path / "a", tmp_path / "a", "t") == (0.0, 0.0, 0.0)
    write_predictions(tmp_path / "c", "t", y, other, patient, (fold + 1) % 5)  # other folds: not a pair
    with pytest.raises(ClearError, match="not the same scans in the same folds"):
        holdout.paired_difference(tmp_path / "a", tmp_path / "c", "t")


def test_commands_are_the_demos_steps_on_a_cohort_of_its_own(tmp_path):
    lines = holdout.command_lines(tmp_path, 300, holdout.SEED, {m: f"{m}.pt" for m in ("lecl", "moco", "supervised")})
    synth, = [c for c in lines if c[0] == "synth"]
    assert int(option(synth, "--seed")) not in (0, 11, demo.CORPUS_SEED)  # the demo's, the dev cohort, the corpus
    extracts = {option(c, "--out"): c for c in lines if c[0] == "extract"}
    fits = [c for c in lines if c[0] == "fit"]
    assert all(option(c, "--bags") in extracts for c in fits)  # every fit reads bags an earlier extract writes
    assert len({option(c, "--out") for c in fits}) == len(fits)  # no two runs share a folder
    by_bags = {b: [c for c in fits if option(c, "--bags") == b] for b in extracts}
    histogram = next(b for b, c in extracts.items() if "--encoder-module" in c)
    assert sorted(option(c, "--target") for c in by_bags[histogram]) == sorted(demo.LUNG)
    assert not any("--pool" in c for c in by_bags[histogram])
    moco = next(b for b, c in extracts.items() if c[-2:] == ["--checkpoint", "moco.pt"])
    mean = [c for c in by_bags[moco] if "--pool" in c]
    assert sorted(option(c, "--target") for c in mean) == sorted(demo.LUNG)
    assert all(option(c, "--pool") == "mean" and option(c, "--lr") == "0.01" for c in mean)
    stage = next(c for c in by_bags[moco] if option(c, "--target") == "stage")
    assert option(stage, "--task") == "ordinal"  # the demo's fit options come along


def test_the_random_init_column_is_the_lecl_checkpoints_encoder():
    """The shipped LeCL checkpoint gives the demo's own random-init options; another family's gives its own."""
    shipped = torch.load(demo.CHECKPOINTS["lecl"], weights_only=True)["config"]
    assert holdout.random_init(shipped, "l.pt") == holdout.RANDOM_INIT
    gcnn = {**shipped, "encoder": "gcnn", "windows": shipped["windows"][:2]}
    assert holdout.random_init(gcnn, "g.pt") == ("--encoder", "gcnn", "--size", "micro", "--random-init",
                                                 "--img-size", 64, "--windows", "lung", "soft")
    with pytest.raises(ClearError, match="g.pt: input windows .* are not all named in data.WINDOWS"):
        holdout.random_init({**gcnn, "windows": [[-700.0, 1000.0]]}, "g.pt")


def test_a_rerun_skips_finished_steps_and_the_table_reads_each_run(tmp_path, monkeypatch, capsys):
    import clear

    ran = []

    def fake_main(command):  # what each clear.py command leaves: labels.csv; metrics.json (a figure per run) and
        #                        report.html, a fit's last file
        ran.append(command)
        out = Path(option(command, "--out"))
        if command[0] == "synth":
            out.mkdir(parents=True)
            (out / "labels.csv").write_text("scan\n")
        if command[0] == "fit":
            out.mkdir(parents=True)
            value = (len(ran) % 97) / 100  # a different figure for every run
            rows = [{"metric": "AUROC, fold mean", "label": "x", "value": value, "ci_low": value - 0.1,
                     "ci_high": value + 0.1}]
            (out / "metrics.json").write_text(json.dumps({"rows": rows}))
            (out / "report.html").write_text("")
            write_predictions(out, option(command, "--target"), *cohort(seed=len(ran)))
        return 0

    monkeypatch.setattr(clear, "main", fake_main)
    monkeypatch.setattr(demo, "usable_cores", lambda: 1)  # the fits here, in order, not in forked workers
    config = torch.load(demo.CHECKPOINTS["lecl"], weights_only=True)["config"]  # the encoder of the random column
    for m in ("lecl", "moco", "supervised"):  # whole runs: every step taken
        torch.save({"format": FORMAT, "step": 600, "steps": 600, "config": config}, tmp_path / f"{m}.pt")
    argv = ["holdout", "--moco", str(tmp_path / "moco.pt"), "--lecl", str(tmp_path / "lecl.pt"),
            "--supervised", str(tmp_path / "supervised.pt"), "--n", "40", "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work")]  # the steps' files elsewhere: --out is made for holdout.md alone
    assert benchmark.main(argv) == 0
    first = list(ran)
    assert [c[0] for c in first].count("fit") == sum(len(holdout.runs(col)) for col, _ in holdout.COLUMNS)
    text = (tmp_path / "out" / "holdout.md").read_text()
    assert f"--n 40 --out {tmp_path / 'out'}" in text.replace("'", "")  # the command that made it
    main, paired = text.split("LeCL minus MoCo v3")  # the table, then the paired differences
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in main.splitlines()
            if line.startswith("| ")}
    for c in (c for c in first if c[0] == "fit"):
        col_dir = Path(option(c, "--out")).parent.name  # work/<column>/<run>
        col = [k for k, _ in holdout.COLUMNS].index(col_dir)
        name = next(n for n, run, _ in holdout.runs(col_dir) if run == Path(option(c, "--out")).name)
        value = (first.index(c) + 1) % 97 / 100
        assert rows[name.replace("_", " ")][col].strip(" |") == f"{value:.3f} [{value - 0.1:.3f}, {value + 0.1:.3f}]"
    ran.clear()
    assert benchmark.main(argv) == 0  # again: only the extracts run (they skip finished scans by themselves)
    assert [c[0] for c in ran] == ["extract"] * len(holdout.COLUMNS)
    pairs = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |") for line in paired.splitlines()
             if line.startswith("| ")}
    for name in demo.LUNG:  # LeCL - MoCo v3 of each lung task, read from the two runs' predictions
        d, lo, hi = holdout.paired_difference(tmp_path / "work" / "lecl" / f"fit-{name}",
                                              tmp_path / "work" / "moco" / f"fit-{name}", name)
        assert pairs[name.replace("_", " ")] == f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    assert capsys.readouterr().out.count("exists, skipping") == len(first) - len(holdout.COLUMNS)


def test_a_pretraining_still_running_is_refused_in_one_line(tmp_path, capsys):
    """benchmark.py learning writes its checkpoint every few hundred steps: taken mid-run, it is not the run's."""
    torch.save({"format": FORMAT, "step": 200, "steps": 600}, tmp_path / "moco.pt")
    assert benchmark.main(["holdout", "--moco", str(tmp_path / "moco.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'moco.pt'}: a pre-training stopped at step 200 of 600; finish it first" in err
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
