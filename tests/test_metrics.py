"""metrics.py against independent references: hand-worked numbers and brute-force pair counting."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402


def mann_whitney_pairs(y, s):
    """U / (n_pos n_neg) by counting every (positive, negative) pair: 1 if ranked right, 1/2 if tied."""
    pos, neg = [v for v, t in zip(s, y) if t], [v for v, t in zip(s, y) if not t]
    u = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return u / (len(pos) * len(neg))


def test_auroc_hand_worked():
    # pairs (pos, neg): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, 0.1) right, (0.8, 0.4) right -> 3/4
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # a tie between a positive and a negative counts 1/2: (0.5 vs 0.5) 1/2, (0.5 vs 0.2) 1, (0.9 vs both) 2 -> 3.5/4
    assert metrics.auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert metrics.auroc([1, 1, 0, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5  # all tied
    assert metrics.auroc([0, 0, 1], [1.0, 2.0, 3.0]) == 1.0
    assert metrics.auroc([1, 1, 0], [1.0, 2.0, 3.0]) == 0.0
    assert math.isnan(metrics.auroc([1, 1, 1], [0.1, 0.2, 0.3]))  # one class: undefined


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_brute_force_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties, inside and across classes
    assert metrics.auroc(y, s) == pytest.approx(mann_whitney_pairs(y, s), abs=1e-12)


def test_weighted_auroc_equals_auroc_of_repeated_scans():
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 30), rng.integers(0, 8, 30).astype(float)
    w = rng.integers(0, 4, size=(6, 30))  # (B, N) counts, as a bootstrap draws them
    batched = metrics.auroc(y, s, w)
    for b in range(6):
        assert batched[b] == pytest.approx(mann_whitney_pairs(np.repeat(y, w[b]), np.repeat(s, w[b])), abs=1e-12)


def test_balanced_accuracy_hand_worked():
    # recall of class 0: 3/4, of class 1: 1/2 -> 0.625
    assert metrics.balanced_accuracy([0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0], 2) == pytest.approx(0.625)
    # three classes: recalls 1/2, 1/1, 2/3 -> 13/18; class 3 never occurs in y_true and is not averaged
    y_true, y_pred = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 3]
    assert metrics.balanced_accuracy(y_true, y_pred, 4) == pytest.approx(13 / 18)


def test_quadratic_weighted_kappa_hand_worked():
    # O: (0,0), (1,2), (2,2), (2,1); W = (i-j)^2/4 -> sum W*O = 1/2. Marginals r = c = (1, 1, 2), E = r c^T / 4,
    # sum W*E = (2 * 1/4 + 2 * 1 * 2 + 2 * 1/4 * 2) / 4 = 11/8 -> kappa = 1 - (1/2) / (11/8) = 7/11
    assert metrics.quadratic_weighted_kappa([0, 1, 2, 2], [0, 2, 2, 1], 3) == pytest.approx(7 / 11)
    assert metrics.quadratic_weighted_kappa([0, 1, 2, 1], [0, 1, 2, 1], 3) == pytest.approx(1.0)
    # predicting the reverse order is worse than chance
    assert metrics.quadratic_weighted_kappa([0, 1, 2], [2, 1, 0], 3) == pytest.approx(-1.0)


def test_bootstrap_resamples_patients_not_scans():
    patients = np.array(["a", "a", "a", "b", "c", "c", "d"])
    w = metrics.bootstrap_weights(patients, 500, seed=3)  # (B, N)
    assert w.shape == (500, 7)
    for scans in ([0, 1, 2], [4, 5]):  # a patient's scans are drawn together, the same number of times
        assert (w[:, scans] == w[:, scans[:1]]).all()
    first = w[:, [0, 3, 4, 6]]  # one column per patient
    assert (first.sum(1) == 4).all()  # each resample draws 4 patients
    assert 0.9 < first.mean() < 1.1  # each patient drawn once on average


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    def interval(n, seed):
        rng = np.random.default_rng(seed)
        y = np.arange(n) % 2
        s = y + rng.normal(0, 1.2, n)  # a fixed, imperfect separation
        point = metrics.auroc(y, s)
        lo, hi = metrics.percentile_ci(metrics.auroc(y, s, metrics.bootstrap_weights(np.arange(n), 1000, seed)))
        return point, lo, hi

    for n in (40, 400):
        point, lo, hi = interval(n, 0)
        assert lo < point < hi
    small, large = interval(40, 1), interval(1000, 1)
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])  # width ~ 1/sqrt(n)


def test_summarize_rows_and_table():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    y[:3] = [0, 1, 2]
    scores = rng.dirichlet(np.ones(3), 60)
    scores[np.arange(60), y] += 1  # informative
    scores /= scores.sum(1, keepdims=True)
    rows = metrics.summarize("ordinal", y, scores, ["stage=1", "stage=2", "stage=3"], np.arange(60) // 2, 200)
    names = [(r["metric"], r["label"]) for r in rows]
    assert ("AUROC", "macro") in names and ("quadratic-weighted kappa", "all classes") in names
    aucs = [r["value"] for r in rows if r["metric"] == "AUROC" and r["label"] != "macro"]
    assert aucs[0] == pytest.approx(metrics.auroc(y == 0, scores[:, 0]))
    assert rows[names.index(("AUROC", "macro"))]["value"] == pytest.approx(np.mean(aucs))
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    table = metrics.format_table(dict(task="ordinal", targets=["stage"], n_scans=60, n_patients=30, folds=5,
                                      n_bootstrap=200, n_dropped=2, n_unlabelled=0, rows=rows))
    assert "quadratic-weighted kappa" in table and "stage=2" in table and "2 labelled scans" in table


def test_predicted_class_ordinal_is_the_median_class():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    assert metrics.predicted_class("ordinal", p).tolist() == [0, 2, 1]
    assert metrics.predicted_class("multiclass", p).tolist() == [0, 2, 1]
    assert metrics.predicted_class("binary", [[0.7], [0.2]]).tolist() == [[1], [0]]


def test_against_scikit_learn_when_installed():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    y, s = rng.integers(0, 2, 200), rng.integers(0, 20, 200).astype(float)
    assert metrics.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    t, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    assert metrics.balanced_accuracy(t, p, 4) == pytest.approx(skm.balanced_accuracy_score(t, p))
    assert metrics.quadratic_weighted_kappa(t, p, 4) == pytest.approx(skm.cohen_kappa_score(t, p, weights="quadratic"))


def test_fold_mean_auroc_hand_worked_where_pooling_is_biased():
    # Each fold ranks its own scans perfectly, but fold 1's model outputs lower scores overall while fold 1 holds
    # more positives: pooled, the positives 0.2, 0.1, 0.1 fall below three negatives at 0.3.
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    s = np.array([0.4, 0.3, 0.3, 0.3, 0.2, 0.1, 0.1, 0.05])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    rows = metrics.summarize("binary", y[:, None], s[:, None], ["tumor"], np.arange(8), 100, folds=folds)
    value = {(r["metric"], r["label"]): r["value"] for r in rows}
    assert value[("AUROC", "tumor")] == pytest.approx(7 / 16) == pytest.approx(mann_whitney_pairs(y, s))
    assert value[("AUROC, fold mean", "tumor")] == 1.0


def test_fold_mean_equals_the_mean_of_per_fold_pair_counts():
    rng = np.random.default_rng(3)
    y, folds = rng.integers(0, 2, (90, 3)), rng.integers(0, 4, 90)
    s = rng.random((90, 3)) + 0.3 * y
    rows = metrics.summarize("multilabel", y, s, ["a", "b", "c"], np.arange(90) // 3, 50, folds=folds)
    row = next(r for r in rows if r["metric"] == "AUROC, fold mean")
    want = np.mean([np.mean([mann_whitney_pairs(y[folds == f, k], s[folds == f, k]) for f in range(4)])
                    for k in range(3)])  # macro over labels of the mean over folds: both are means, so they commute
    assert row["label"] == "macro" and row["value"] == pytest.approx(want)
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    # a fold without positives is left out of the mean rather than making it undefined
    y1 = np.array([1, 0, 1, 0, 0, 0])
    w = metrics.fold_mean(lambda w: metrics.auroc(y1, np.array([.9, .1, .2, .3, .4, .5]), w), np.ones((1, 6)),
                          np.array([0, 0, 0, 0, 1, 1]))
    assert w[0] == pytest.approx(mann_whitney_pairs(y1[:4], [.9, .1, .2, .3]))


def test_macro_rows_are_the_means_of_their_own_metric():
    # multilabel: each macro row must average its own metric's per-label values, not another metric's
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (80, 3))
    s = rng.random((80, 3)) + 0.4 * y
    rows = metrics.summarize("multilabel", y, s, ["a", "b", "c"], np.arange(80), 20)
    for metric in ("AUROC", "balanced accuracy"):
        per = [r["value"] for r in rows if r["metric"] == metric and r["label"] != "macro"]
        macro = next(r for r in rows if r["metric"] == metric and r["label"] == "macro")
        assert macro["value"] == pytest.approx(np.mean(per))
    aucs = [r["value"] for r in rows if r["metric"] == "AUROC" and r["label"] != "macro"]
    assert aucs == pytest.approx([mann_whitney_pairs(y[:, k], s[:, k]) for k in range(3)])
