"""Does the attention-MIL keep what a plain linear readout of the same bags finds? `python benchmark.py readout`.

On the bags and the patient folds of `clear.py fit` (cv.patient_folds, same seed), it fits the MIL (cv.fit_cv,
the fit's defaults) and, fold by fold, an L2-regularised logistic regression on each scan's pooled slice
embeddings, and prints their fold-mean AUROCs [95 % patient-bootstrap CI] side by side:

    mean      x = mean_k x_k          what the scan holds on average (a diffuse finding shifts it)
    max       x = max_k x_k           per dimension, the most extreme slice (a focal finding in a few slices)
    mean+max  both, concatenated      (2D,)

A synthetic cohort's labels.csv splits lung disease into its two findings (ground_glass, emphysema), so that
`clear.py fit` and the readout can score each on its own.

The readout is the classic baseline of multiple-instance learning; with ~100 training scans it has far fewer
parameters than the MIL (D + 1 against ~100 000), so when the MIL scores below it, the MIL loses a signal the
bags hold. The regression's features are standardised on the training fold; the L2 strengths are a fixed grid,
each reported (none is picked on the test folds).

Shapes: N labelled scans, L slices of a scan, D feature width, F pooled width (D or 2D).
"""
import numpy as np
import torch

import cv
import metrics
from watch import logistic
from files import ClearError

POOLS = {"mean": lambda x: x.mean(0), "max": lambda x: x.amax(0),
         "mean+max": lambda x: torch.cat([x.mean(0), x.amax(0)])}  # (L, D) -> (F,)
L2 = (1e-3, 1e-2, 1e-1)  # penalty l2 * |w|^2 beside the mean log-loss: weak, moderate, strong for ~100 scans


def linear_readout(bags, labels, cfg, pool, l2):
    """Held-out scores of the pooled logistic regression on cv.fit_cv's folds -> (metrics rows, fold (N,)).
    Binary targets only: one column, two classes."""
    scans, patients, values, _, _ = cv._labelled(bags, labels, cfg)
    task, y, strata = cv.make_task(cfg.targets, values, cfg.task, labels)
    if task.kind != "binary":
        raise ClearError(f"{labels}: the linear readout takes one binary target, not a {task.kind} task")
    row = {s: i for i, s in enumerate(bags.scans)}
    x = torch.stack([POOLS[pool](bags.features[row[s]]) for s in scans]).double()  # (N, F)
    fold = cv.patient_folds(patients, strata, cfg.folds, cfg.seed)  # (N,) as cv.fit_cv deals them
    scores = np.zeros((len(scans), 1))
    for k in range(cfg.folds):
        test = torch.from_numpy(fold == k)
        shift, scale = x[~test].mean(0), x[~test].std(0).clamp(min=1e-6)  # (F,) from the training fold only
        z = (x - shift) / scale  # (N, F)
        w, b = logistic(z[~test], y[~test, 0], l2)
        scores[test.numpy(), 0] = torch.sigmoid(z[test] @ w + b).numpy()
    return metrics.summarize("binary", y.numpy(), scores, task.labels, patients, cfg.n_bootstrap, cfg.seed,
                             folds=fold), fold


def headline(rows):
    """'0.608 [0.484, 0.718]': the fold-mean AUROC row of metrics.summarize."""
    r = next(r for r in rows if r["metric"] == "AUROC, fold mean")
    return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def command(args):
    from mil import load_bags

    cfg = cv.FitConfig(targets=(args.target,), task="binary")
    bags = load_bags(args.bags)
    print(f"{args.bags}, target {args.target}: fold-mean AUROC [95 % CI] on the {cfg.folds} patient folds of "
          f"`clear.py fit` (seed {cfg.seed})\n")
    print("| readout | AUROC |\n|---|---|")
    print(f"| attention-MIL (clear.py fit) | {headline(cv.fit_cv(bags, args.labels, cfg).metrics['rows'])} |")
    for pool in POOLS:
        for l2 in L2:
            rows, _ = linear_readout(bags, args.labels, cfg, pool, l2)
            print(f"| linear, {pool}-pooled, L2 {l2:g} | {headline(rows)} |")
