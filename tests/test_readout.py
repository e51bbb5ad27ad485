"""bench/readout.py: the logistic regression (watch.py's) reaches its minimum (the gradient worked by hand
vanishes there), and the pooled readout scores on the folds of clear.py fit and reads a planted focal signal through
max pooling."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cv  # noqa: E402
import mil  # noqa: E402
from watch import logistic  # noqa: E402
from bench.readout import linear_readout  # noqa: E402
from test_cv import FAST, cohort  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny


def test_logistic_gradient_vanishes_at_its_result():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(60, generator=g, dtype=torch.float64) > 0).double()  # not separable
    for l2 in (1e-3, 1e-1):
        w, b = logistic(x, y, l2)
        r = torch.sigmoid(x @ w + b) - y  # (N,) d(BCE)/d(logit)
        grad_w = x.T @ r / len(y) + 2 * l2 * w  # d/dw of mean BCE + l2 |w|^2, by hand
        assert grad_w.abs().max() < 1e-5 and abs(float(r.mean())) < 1e-5  # ~0.3 at the start
        assert w[0] > 0.5  # the informative feature carries the weight


def test_readout_uses_the_fits_folds_and_max_pooling_finds_one_planted_slice(tmp_path):
    bags_dir, labels, _ = cohort(tmp_path, n=40, signal=2.0)  # positives: one slice of 6-30 moved along a direction
    bags = mil.load_bags(bags_dir)
    cfg = cv.FitConfig(targets=("tumor",), task="binary", **FAST)
    rows, fold = linear_readout(bags, labels, cfg, "max", 1e-2)
    fit = cv.fit_cv(bags, labels, dataclasses.replace(cfg, epochs=1))
    assert [p["fold"] for p in fit.predictions] == fold.tolist()  # the same patients held out in each fold
    auc = {r["metric"]: r["value"] for r in rows if r["label"] == "tumor"}
    assert auc["AUROC, fold mean"] > 0.9
    mean_rows, _ = linear_readout(bags, labels, cfg, "mean", 1e-2)  # the planted slice diluted over 6-30 slices
    assert next(r["value"] for r in mean_rows if r["metric"] == "AUROC, fold mean") < 0.75  # 0.64 here
    assert np.isfinite(auc["AUROC"])


def test_labels_split_lung_disease_into_its_two_findings_as_the_masks_hold_them(tmp_path):
    """clear.py synth's labels.csv: ground_glass 1 where a scan's mask (read here with nibabel directly) holds label
    9, 0 for a scan without lung disease, blank for one with the other finding; emphysema (10) alike."""
    import csv

    import nibabel as nib

    import clear

    assert clear.main(["synth", "--out", str(tmp_path / "c"), "--n", "16", "--size", "32", "--workers", "1"]) == 0
    seen, rows = set(), list(csv.DictReader(open(tmp_path / "c" / "labels.csv")))
    for row in rows:
        mask = np.asarray(nib.load(tmp_path / "c" / "masks" / f"{row['scan']}.nii.gz").dataobj)
        ggo, emph = bool((mask == 9).any()), bool((mask == 10).any())
        assert row["lung_disease"] == str(int(ggo or emph))
        assert (row["ground_glass"], row["emphysema"]) == {(0, 0): ("0", "0"), (1, 0): ("1", ""), (0, 1): ("", "1")}[
            (int(ggo), int(emph))]
        seen.add((ggo, emph))
    assert len(seen) == 3 and len(rows) == 16  # scans of each kind took part
