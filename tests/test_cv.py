"""cv.py: patient-level folds, a planted-signal fit, seeding and progress, early stopping, task inference, one
ClearError per bad label file, and a save_run -> mil.predict round trip."""
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cv  # noqa: E402
import metrics  # noqa: E402
import mil  # noqa: E402
from files import write_csv  # noqa: E402
from files import ClearError  # noqa: E402
from test_mil import ENCODER, error, write_bags  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny

FAST = dict(epochs=4, patience=2, hidden=16, att_dim=8, batch_size=8, n_bootstrap=50, folds=3)


def write_labels(path, columns, rows):
    """rows: (patient, scan, value...) with None for an empty cell."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "scan", *columns])
        w.writerows([[p, s, *("" if v is None else v for v in vals)] for p, s, *vals in rows])
    return path


def cohort(tmp, n=30, columns=("tumor",), values=None, dim=16, **kw):
    """A labelled toy cohort: bags + labels.csv, patients owning 1 or 2 scans. values: (n, T) or default i % 2."""
    values = [[i % 2] for i in range(n)] if values is None else values
    bags = tmp / "bags"
    special = write_bags(bags, n, dim, labels=[v[0] for v in values], **kw)
    rows = [(f"p{i // 2 if i < n // 2 else i}", f"s{i:03d}", *v) for i, v in enumerate(values)]
    return bags, write_labels(tmp / "labels.csv", columns, rows), special

# -------------------------------------------------------------------------------------------- folds


def test_patient_folds_are_disjoint_complete_and_stratified():
    rng = np.random.default_rng(0)
    n_pat = 103
    pat_class = rng.choice(3, n_pat, p=[0.6, 0.3, 0.1])
    scans_per = rng.integers(1, 4, n_pat)
    patients = np.repeat([f"p{i}" for i in range(n_pat)], scans_per)
    strata = np.repeat(pat_class, scans_per)[:, None]
    fold = cv.patient_folds(patients, strata, 5, seed=1)
    pat_fold = {}
    for p, f in zip(patients, fold):
        assert pat_fold.setdefault(p, f) == f  # all of a patient's scans in one fold: tested exactly once
    assert len(pat_fold) == n_pat and set(pat_fold.values()) == set(range(5))
    sizes = np.bincount(list(pat_fold.values()))
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount([pat_fold[f"p{i}"] for i in range(n_pat) if pat_class[i] == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1  # each class spread evenly
    assert (cv.patient_folds(patients, strata, 5, seed=1) == fold).all()
    assert (cv.patient_folds(patients, strata, 5, seed=2) != fold).any()

# ------------------------------------------------------------------------------------------ fitting


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """80 noise bags; positives carry one special slice. Fit, save and return everything."""
    tmp = tmp_path_factory.mktemp("planted")
    bags_dir, labels, special = cohort(tmp, n=80, dim=32, signal=1.5, seed=5)
    bags = mil.load_bags(bags_dir)
    cfg = cv.FitConfig(targets=["tumor"], folds=4, epochs=15, patience=15, hidden=32, att_dim=16, batch_size=8,
                        n_bootstrap=200, seed=0)
    result = cv.fit_cv(bags, labels, cfg)
    cv.save_run(tmp / "run", result)
    return tmp, bags, result, special


def test_planted_signal_is_found_and_attended(planted):
    _, _, result, special = planted
    auroc = next(r for r in result.metrics["rows"] if r["metric"] == "AUROC")
    assert auroc["value"] > 0.95
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    positives = [(f"s{i:03d}", k) for i, k in enumerate(special) if k >= 0]
    hits = [int(np.argmax(result.attention[s][1]) == k) for s, k in positives]
    assert np.mean(hits) >= 0.9
    assert [t["scan"] for t in result.top] and all(special[int(t["scan"][1:])] >= 0 for t in result.top)


def test_run_files_and_predict_round_trip(planted):
    tmp, bags, result, _ = planted
    run = tmp / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["rows"] == result.metrics["rows"] and saved["task"] == "binary"
    with open(run / "predictions.csv") as f:
        preds = {r["scan"]: r for r in csv.DictReader(f)}
    assert set(preds) == set(bags.scans)
    for scan, (z_mm, att) in result.attention.items():  # one attention file per held-out scan
        with open(run / "attention" / f"{scan}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(bags.features[bags.scans.index(scan)])
        assert float(rows[1]["z_mm"]) == pytest.approx(z_mm[1])
        assert sum(float(r["attention"]) for r in rows) == pytest.approx(1.0, abs=1e-4)
    task, encoder, models = mil.load_run(run)  # weights_only=True inside
    assert encoder == ENCODER and len(models) == 4
    per_fold = torch.stack([task.scores(mil.infer(m, bags.features)[0])[:, 0] for m in models])  # (folds, N)
    for k in range(4):  # the saved weights are the ones that made the held-out predictions
        for i, scan in enumerate(bags.scans):
            if preds[scan]["fold"] == str(k):
                assert float(preds[scan]["score_tumor"]) == pytest.approx(per_fold[k, i].item(), rel=1e-4, abs=1e-6)
    rows = mil.predict(run, bags)
    assert [r["scan"] for r in rows] == list(bags.scans)
    ensemble = per_fold.mean(0)
    assert [float(r["score_tumor"]) for r in rows] == pytest.approx(ensemble.tolist(), rel=1e-4, abs=1e-6)
    write_csv(tmp / "preds.csv", rows)
    assert (tmp / "preds.csv").read_text().startswith("scan,score_tumor,predicted_tumor")


class Bar:
    """Stands in for tqdm: progress(total=, desc=) -> object with update(n) and close()."""
    made = []

    def __init__(self, total, desc):
        self.total, self.n, self.closed = total, 0, False
        Bar.made.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_same_seed_same_results_and_a_full_progress_bar(tmp_path):
    bags_dir, labels, _ = cohort(tmp_path, n=24)
    bags = mil.load_bags(bags_dir)
    a = cv.fit_cv(bags, labels, cv.FitConfig(targets=("tumor",), **FAST), progress=Bar)
    b = cv.fit_cv(bags, labels, cv.FitConfig(targets=("tumor",), **FAST))
    assert a.predictions == b.predictions and a.metrics == b.metrics
    c = cv.fit_cv(bags, labels, cv.FitConfig(targets=("tumor",), **{**FAST, "seed": 7}))
    assert c.predictions != a.predictions
    bar, = Bar.made
    assert bar.total == 3 * FAST["epochs"] and bar.n == bar.total and bar.closed  # early stops tick the rest


def test_folds_in_worker_processes_give_the_same_run(tmp_path):
    bags_dir, labels, _ = cohort(tmp_path, n=30, signal=1.0)
    bags = mil.load_bags(bags_dir)
    one = cv.fit_cv(bags, labels, cv.FitConfig(targets=("tumor",), **FAST, workers=1))
    Bar.made.clear()
    two = cv.fit_cv(bags, labels, cv.FitConfig(targets=("tumor",), **FAST, workers=2), progress=Bar)
    assert one.predictions == two.predictions and one.metrics["rows"] == two.metrics["rows"]
    for a, b in zip(one.models, two.models):
        assert a["best_epoch"] == b["best_epoch"] and a["test_scans"] == b["test_scans"]
        assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())
    assert ({s: z.tolist() for s, (z, _) in one.attention.items()}
            == {s: z.tolist() for s, (z, _) in two.attention.items()})
    assert all(np.array_equal(one.attention[s][1], a) for s, (_, a) in two.attention.items())
    bar, = Bar.made
    assert bar.n == bar.total == 3 * FAST["epochs"] and bar.closed


def test_an_error_in_a_fold_worker_is_raised_as_itself(tmp_path):
    bags_dir, labels, _ = cohort(tmp_path, n=24)
    with pytest.raises(ClearError, match="training diverged"):
        cv.fit_cv(mil.load_bags(bags_dir), labels, cv.FitConfig(targets=("tumor",), **{**FAST, "lr": 1e30}, workers=2))


def test_early_stopping_returns_the_best_epochs_weights(tmp_path):
    bags_dir, _, _ = cohort(tmp_path, n=40)  # pure noise: the validation AUROC peaks by chance (seed 3: epoch 3)
    bags = mil.load_bags(bags_dir)
    task, y = mil.Task("binary", ("tumor",), (0.0, 1.0)), torch.tensor([[i % 2] for i in range(40)]).float()
    cfg = cv.FitConfig(targets=("tumor",), **{**FAST, "epochs": 10, "patience": 10, "lr": 1e-2})
    model, best = cv._train_fold(task, bags, y, np.arange(30), np.arange(30, 40), cfg, 3, lambda n: None)
    assert best < 9  # it trained on past its best epoch
    again = dataclasses.replace(cfg, epochs=best + 1)  # the same run, stopped right after that epoch
    short, _ = cv._train_fold(task, bags, y, np.arange(30), np.arange(30, 40), again, 3, lambda n: None)
    for name, weights in short.state_dict().items():
        assert torch.equal(model.state_dict()[name], weights), name


def test_tasks_are_inferred_and_scored(tmp_path):
    n = 36
    rng = np.random.default_rng(0)
    stage = [1 + i % 3 for i in range(n)]
    values = [[stage[i], i % 2, int(rng.integers(0, 2)) if i > 1 else i, None if i == 5 else 0.0 + (i % 4 == 0)]
              for i in range(n)]
    bags_dir, labels, _ = cohort(tmp_path, n=n, columns=("stage", "a", "b", "c"), values=values)
    write_bags(tmp_path / "bags_extra", 1, seed=9)
    (tmp_path / "bags_extra" / "s000.pt").rename(bags_dir / "unlabelled.pt")
    bags = mil.load_bags(bags_dir)

    def fit(targets, task=None):
        return cv.fit_cv(bags, labels, cv.FitConfig(targets=targets, task=task, **FAST))

    multiclass, ordinal = fit(["stage"]), fit(["stage"], "ordinal")
    assert multiclass.task.kind == "multiclass" and multiclass.metrics["labels"] == ["stage=1", "stage=2", "stage=3"]
    assert ordinal.task.kind == "ordinal"
    kinds = {(r["metric"], r["label"]) for r in ordinal.metrics["rows"]}
    assert {("AUROC", "macro"), ("quadratic-weighted kappa", "all classes"), ("AUROC", "stage=3")} <= kinds
    assert ("quadratic-weighted kappa", "all classes") not in {(r["metric"], r["label"]) for r in
                                                                multiclass.metrics["rows"]}
    assert ordinal.metrics["n_unlabelled"] == 1 and ordinal.metrics["n_dropped"] == 0
    assert {p["predicted_stage"] for p in ordinal.predictions} <= {"1", "2", "3"}
    multilabel = fit(["a", "c"])  # scan 5 has no value for c: dropped
    assert multilabel.task.kind == "multilabel" and multilabel.metrics["n_dropped"] == 1
    assert multilabel.metrics["n_scans"] == n - 1 and "s005" not in multilabel.attention
    assert {("AUROC", "a"), ("AUROC", "c"), ("AUROC", "macro"), ("balanced accuracy", "macro")} <= \
        {(r["metric"], r["label"]) for r in multilabel.metrics["rows"]}
    assert fit(["b"]).task.kind == "binary"
    table = metrics.format_table(multilabel.metrics)
    assert "multilabel task on a, c" in table and "1 labelled scans" in table

# ------------------------------------------------------------------------------------------- errors


def test_bad_labels(tmp_path):
    bags_dir, labels, _ = cohort(tmp_path, n=12)
    bags = mil.load_bags(bags_dir)

    def fit_error(path, targets=("tumor",), **kw):
        msg = error(cv.fit_cv, bags, path, cv.FitConfig(targets=targets, **{**FAST, **kw}))
        assert msg.startswith(f"{path}: ")
        return msg

    assert "no column 'grade'" in fit_error(labels, ("grade",))
    rows = [(f"p{i}", f"s{i:03d}", i % 2) for i in range(12)] + [("p99", "ghost", 1)]
    assert "'ghost'" in fit_error(write_labels(tmp_path / "ghost.csv", ["tumor"], rows))
    one = write_labels(tmp_path / "one.csv", ["tumor"], [(f"p{i}", f"s{i:03d}", 1) for i in range(12)])
    assert "single value 1" in fit_error(one)
    few = write_labels(tmp_path / "few.csv", ["tumor"], [(f"p{i % 2}", f"s{i:03d}", i % 2) for i in range(12)])
    assert "fewer than the 3 folds" in fit_error(few)
    rare = write_labels(tmp_path / "rare.csv", ["tumor"], [(f"p{i}", f"s{i:03d}", int(i < 2)) for i in range(12)])
    assert "too few to stratify" in fit_error(rare)
    frac = write_labels(tmp_path / "frac.csv", ["tumor"], [(f"p{i}", f"s{i:03d}", i / 3) for i in range(12)])
    assert "non-integer" in fit_error(frac)
    multi = write_labels(tmp_path / "multi.csv", ["a", "b"], [(f"p{i}", f"s{i:03d}", i % 3, i % 2) for i in range(12)])
    assert "values other than 0 and 1" in fit_error(multi, ("a", "b"))
    assert "--task binary needs 2" in fit_error(multi, ("a",), task="binary")
    assert error(cv.FitConfig, targets=("tumor",), task="regression").startswith("--task")


def test_predict_checks_the_run_and_the_encoder(tmp_path):
    bags_dir, labels, _ = cohort(tmp_path, n=12)
    run = tmp_path / "run"
    cv.save_run(run, cv.fit_cv(mil.load_bags(bags_dir), labels, cv.FitConfig(targets=("tumor",), **FAST)))
    write_bags(tmp_path / "other", 2, encoder={"name": "another"})
    assert error(mil.predict, run, mil.load_bags(tmp_path / "other")).startswith(str(tmp_path / "other"))
    write_bags(tmp_path / "wide", 2, dim=8)
    assert "take 16" in error(mil.predict, run, mil.load_bags(tmp_path / "wide"))
    assert error(mil.predict, tmp_path, mil.load_bags(bags_dir)).startswith(f"{tmp_path}: no fold")
    (run / "fold0.pt").write_bytes(b"garbage")
    assert error(mil.load_run, run).startswith(f"{run / 'fold0.pt'}: not a CLEAR MIL model")


def test_fold_split_keeps_a_stratified_share_of_training_patients():
    patients = np.repeat(np.arange(100), 2)  # 100 patients, 2 scans each
    strata = (patients % 4 == 0).astype(np.int64)[:, None]  # a quarter positive
    fold = cv.patient_folds(patients, strata, 5, 0)
    cfg = cv.FitConfig(targets=("y",), val_fraction=0.2, train_fraction=0.25)
    train, val, test = cv.fold_split(fold, 2, patients, strata, cfg)
    full, _, _ = cv.fold_split(fold, 2, patients, strata, dataclasses.replace(cfg, train_fraction=1.0))
    assert set(train) <= set(full) and not set(full) & (set(val) | set(test)) and not set(val) & set(test)
    assert np.array_equal(test, np.flatnonzero(fold == 2))
    assert len(set(patients[val])) == 16 and len(set(patients[full])) == 64  # 80 training patients: 1/5 for val
    assert len(set(patients[train])) == 16 and strata[train].mean() == 0.25  # a quarter of 64, stratified
    for part in (train, val, test):  # a patient's two scans stay together
        assert len(part) == 2 * len(set(patients[part]))
