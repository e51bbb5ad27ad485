"""Scores of held-out predictions: AUROC, balanced accuracy, quadratic-weighted kappa, patient-bootstrap CIs.

How the CLI uses this: `cv.fit_cv` pools the held-out scores of all folds and calls `summarize`; the rows it
returns are stored in RUN/metrics.json, and `clear.py fit` prints them with `format_table(result.metrics)`.

Every metric takes optional `weights` (B, N): row b counts scan i weights[b, i] times. A bootstrap resample is
such a row of counts (`bootstrap_weights` draws patients with replacement, each scan inherits its patient's
count), so B resamples are scored in one vectorised pass without copying any data.

AUROC is the Mann-Whitney statistic (Hanley & McNeil 1982):
    U = sum over positive i, negative j of [s_i > s_j] + 1/2 [s_i = s_j],   AUROC = U / (n_pos n_neg)
which equals (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg) with R_pos the positives' summed average ranks.
It is computed by sorting once: for each distinct score, the (weighted) negatives strictly below it plus half
of those tied with it.
Balanced accuracy: the mean over classes present in y_true of recall = correct_c / support_c.
Quadratic-weighted kappa (Cohen 1968): 1 - sum(W * O) / sum(W * E), W_ij = (i - j)^2 / (C - 1)^2, O the confusion
matrix, E the outer product of its marginals divided by the total (the agreement expected by chance).

Shapes: N scans, B bootstrap resamples, K score columns, C classes.
"""
import math

import numpy as np


def _weights(weights, n):
    """(B, N) float weights; all ones (B = 1) when None."""
    if weights is None:
        return np.ones((1, n))
    return np.atleast_2d(np.asarray(weights, dtype=np.float64))  # (B, N)


def _scatter(w, index, size):
    """Per-row weighted histogram: out[b, c] = sum of w[b, i] over i with index[i] == c -> (B, size)."""
    b = w.shape[0]
    flat = (np.arange(b)[:, None] * size + index[None, :]).ravel()  # (B * N,)
    return np.bincount(flat, weights=w.ravel(), minlength=b * size).reshape(b, size)  # (B, size)


def _out(values, weights):
    """A float when the caller gave no weights or one row of them, else the (B,) array."""
    return float(values[0]) if weights is None or np.ndim(weights) == 1 else values


def auroc(y, score, weights=None):
    """Area under the ROC curve of `score` (N,) for binary `y` (N,); ties count 1/2. NaN if a class is absent."""
    y = np.asarray(y).astype(bool)
    w = _weights(weights, len(y))  # (B, N)
    values, tie = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True)  # tie: (N,) rank of distinct
    pos = _scatter(w * y, tie.ravel(), len(values))  # (B, V) positives at each distinct score
    neg = _scatter(w * ~y, tie.ravel(), len(values))  # (B, V)
    below = np.cumsum(neg, axis=1) - neg  # (B, V) negatives with a strictly lower score
    u = (pos * (below + 0.5 * neg)).sum(1)  # (B,) Mann-Whitney U
    pairs = pos.sum(1) * neg.sum(1)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _out(np.where(pairs > 0, u / pairs, np.nan), weights)


def balanced_accuracy(y_true, y_pred, n_classes, weights=None):
    """Mean per-class recall over the classes present in `y_true`; labels are class indices 0..n_classes-1."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    w = _weights(weights, len(y_true))  # (B, N)
    support = _scatter(w, y_true, n_classes)  # (B, C)
    hits = _scatter(w * (y_true == y_pred), y_true, n_classes)  # (B, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)  # (B, C)
    present = (support > 0).sum(1)  # (B,)
    return _out(np.where(present > 0, np.nansum(recall, 1) / np.maximum(present, 1), np.nan), weights)


def quadratic_weighted_kappa(y_true, y_pred, n_classes, weights=None):
    """Cohen's kappa with quadratic disagreement weights; NaN when chance agreement is already perfect."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    w = _weights(weights, len(y_true))  # (B, N)
    c = n_classes
    observed = _scatter(w, y_true * c + y_pred, c * c).reshape(-1, c, c)  # (B, C, C) true x predicted
    total = observed.sum((1, 2))  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = observed.sum(2)[:, :, None] * observed.sum(1)[:, None, :] / total[:, None, None]  # (B, C, C)
        i = np.arange(c)
        penalty = (i[:, None] - i[None, :]) ** 2 / max(c - 1, 1) ** 2  # (C, C)
        chance = (penalty * expected).sum((1, 2))  # (B,)
        return _out(np.where(chance > 0, 1 - (penalty * observed).sum((1, 2)) / chance, np.nan), weights)


def bootstrap_weights(patients, n_boot, seed=0):
    """Patient-level bootstrap as counts (B, N): each row draws the P patients with replacement, and every scan
    is counted as often as its patient was drawn (so a patient's scans always stay together)."""
    _, p = np.unique(np.asarray(patients), return_inverse=True)  # p: (N,) patient index
    n_pat = int(p.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_pat, size=(n_boot, n_pat))  # (B, P)
    counts = np.bincount((np.arange(n_boot)[:, None] * n_pat + draws).ravel(),
                         minlength=n_boot * n_pat).reshape(n_boot, n_pat)  # (B, P)
    return counts[:, p.ravel()]  # (B, N)


def percentile_ci(values, level=0.95):
    """Percentile interval of bootstrap values, ignoring resamples where the metric is undefined (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def predicted_class(kind, scores):
    """Hard labels from scores: binary/multilabel (N, K) 0/1 at probability > 0.5; multiclass (N,) argmax;
    ordinal (N,) the median class, i.e. the number of cut-points k with P(y > k) > 0.5."""
    scores = np.asarray(scores, dtype=np.float64)
    if kind in ("binary", "multilabel"):
        return (scores > 0.5).astype(np.int64)  # (N, K)
    if kind == "ordinal":
        return (1 - np.cumsum(scores, 1)[:, :-1] > 0.5).sum(1)  # (N,)
    return scores.argmax(1)  # (N,)


def fold_mean(fn, w, folds):
    """The mean over folds of a metric computed within each fold: fn(weights (M, N)) -> (M,), w (B, N), folds (N,)
    fold index per scan -> (B,). A fold where the metric is undefined (a class absent) is left out of its mean."""
    onehot = (folds[None, :] == np.unique(folds)[:, None]).astype(np.float64)  # (F, N)
    per_fold = fn((w[:, None, :] * onehot[None]).reshape(-1, w.shape[1])).reshape(len(w), len(onehot))  # (B, F)
    defined = ~np.isnan(per_fold)
    return np.where(defined, per_fold, 0).sum(1) / np.where(defined.any(1), defined.sum(1), np.nan)  # (B,)


def summarize(kind, y, scores, labels, patients, n_bootstrap=1000, seed=0, folds=None):
    """All metrics of a task with patient-bootstrap 95 % CIs, as rows {metric, label, value, ci_low, ci_high}.

    kind: binary | multilabel (y (N, K) 0/1, scores (N, K) probabilities) or multiclass | ordinal (y (N,) class
    index, scores (N, C) class probabilities). AUROC is per label (one-vs-rest for classes) plus their macro mean;
    balanced accuracy per label for binary/multilabel, over classes otherwise; QWK for ordinal. Undefined values
    (a class absent) are None.

    With `folds` (N,), the fold of each held-out scan, the headline AUROC (the macro row, or the only label's) is
    also given as "AUROC, fold mean": computed within each fold, then averaged. Pooling the folds' scores mixes
    models with different offsets: when a model has learnt little but its training folds' base rate, each
    fold's offset runs against its test fold's class mix, which pulls the pooled AUROC below 0.5 (a test works
    an example by hand). The fold mean is free of that effect, though not of every small-sample one: a random
    encoder on stage gave 0.42 pooled and 0.41 fold mean on 200 scans. Both are reported."""
    y, scores = np.asarray(y), np.asarray(scores, dtype=np.float64)
    pred = predicted_class(kind, scores)
    stats = []  # (metric, label, function of weights (B, N) -> (B,))
    if kind in ("binary", "multilabel"):
        y = y.reshape(len(y), -1).astype(np.int64)  # (N, K)
        stats += [("AUROC", name, lambda w, k=k: auroc(y[:, k], scores[:, k], w)) for k, name in enumerate(labels)]
        balanced = [("balanced accuracy", name, lambda w, k=k: balanced_accuracy(y[:, k], pred[:, k], 2, w))
                    for k, name in enumerate(labels)]
    else:
        y = y.astype(np.int64)  # (N,)
        stats += [("AUROC", name, lambda w, c=c: auroc(y == c, scores[:, c], w)) for c, name in enumerate(labels)]
        balanced = [("balanced accuracy", "all classes",
                     lambda w: balanced_accuracy(y, pred, scores.shape[1], w))]
    if len(labels) > 1:
        stats.append(("AUROC", "macro", lambda w, per_label=[fn for _, _, fn in stats]:  # bound now, not when run
                      np.mean([fn(w) for fn in per_label], axis=0)))
    if folds is not None:
        _, label, headline = stats[-1]
        stats.append(("AUROC, fold mean", label, lambda w, fn=headline: fold_mean(fn, w, np.asarray(folds))))
    stats += balanced
    if len(balanced) > 1:
        stats.append(("balanced accuracy", "macro", lambda w, per_label=[fn for _, _, fn in balanced]:
                      np.mean([fn(w) for fn in per_label], axis=0)))
    if kind == "ordinal":
        stats.append(("quadratic-weighted kappa", "all classes",
                      lambda w: quadratic_weighted_kappa(y, pred, scores.shape[1], w)))
    boot = bootstrap_weights(patients, n_bootstrap, seed)  # (B, N)
    rows = []
    for metric, label, fn in stats:
        value = float(fn(np.ones((1, len(y))))[0])
        lo, hi = percentile_ci(fn(boot)) if n_bootstrap > 0 else (math.nan, math.nan)
        rows.append({"metric": metric, "label": label, **{k: (None if math.isnan(v) else v) for k, v in
                                                           (("value", value), ("ci_low", lo), ("ci_high", hi))}})
    return rows


def format_table(metrics):
    """The metrics of a run (RUN/metrics.json, or FitResult.metrics) as a plain-text table for the terminal."""
    def num(v):
        return "n/a" if v is None else f"{v:.3f}"

    head = (f"{metrics['task']} task on {', '.join(metrics['targets'])}: {metrics['n_scans']} scans of "
            f"{metrics['n_patients']} patients, {metrics['folds']}-fold cross-validation, 95 % CI from "
            f"{metrics['n_bootstrap']} patient-bootstrap resamples")
    table = [("metric", "label", "value", "95 % CI")]
    table += [(r["metric"], r["label"], num(r["value"]), f"{num(r['ci_low'])} - {num(r['ci_high'])}")
              for r in metrics["rows"]]
    widths = [max(len(row[j]) for row in table) for j in range(4)]
    lines = [head] + ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip() for row in table]
    notes = []
    if metrics.get("n_dropped"):
        notes.append(f"{metrics['n_dropped']} labelled scans without a value for the target were left out")
    if metrics.get("n_unlabelled"):
        notes.append(f"{metrics['n_unlabelled']} bags without a row in the labels were ignored")
    return "\n".join(lines + notes)
