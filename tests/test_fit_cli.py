"""clear.py fit / predict end to end on planted-signal bags: outputs, overlays, the ensemble, and bad input."""
import csv
import json

import nibabel as nib
import numpy as np
import torch

import clear
import metrics


def _cohort(tmp_path, n=24):
    """Bags whose positives carry a bright feature on one slice, plus tiny images for the overlays."""
    rng = np.random.default_rng(0)
    (tmp_path / "bags").mkdir()
    (tmp_path / "img").mkdir()
    rows = [("patient", "scan", "y")]
    encoder = {"name": "test", "sha256": "0"}
    for i in range(n):
        L = int(rng.integers(5, 12))
        x = torch.from_numpy(rng.normal(size=(L, 8)).astype(np.float32))
        y = i % 2
        if y:
            x[int(rng.integers(L)), 0] += 6.0
        image = tmp_path / "img" / f"s{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((4, 4, L), np.int16), np.diag([1, 1, 2.0, 1])), image)
        torch.save({"features": x, "z_mm": torch.arange(L, dtype=torch.float64) * 2, "encoder": encoder,
                    "image": str(image)}, tmp_path / "bags" / f"s{i}.pt")
        rows.append((f"p{i // 2}", f"s{i}", str(y)))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return tmp_path


def test_fit_then_predict(tmp_path, capsys):
    root = _cohort(tmp_path)
    args = ["fit", "--bags", str(root / "bags"), "--labels", str(root / "labels.csv"), "--target", "y",
            "--out", str(root / "run"), "--folds", "3", "--epochs", "30", "--patience", "30"]
    assert clear.main(args) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "binary task on y" in out
    m = json.loads((root / "run/metrics.json").read_text())
    auroc = next(r for r in m["rows"] if r["metric"] == "AUROC")
    assert auroc["value"] > 0.9 and auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert sorted(p.name for p in root.glob("run/fold*.pt")) == ["fold0.pt", "fold1.pt", "fold2.pt"]
    assert len(list(root.glob("run/attention/*.csv"))) == 24
    overlay = next(root.glob("run/attention/*.nii.gz"))
    att = nib.load(overlay).get_fdata()
    assert att.shape[:2] == (4, 4) and abs(att[0, 0].sum() - 1.0) < 1e-4  # one value per slice, sums to 1
    assert clear.main(args) == 2 and "not empty" in capsys.readouterr().err
    assert clear.main(["predict", "--model", str(root / "run"), "--bags", str(root / "bags"),
                       "--out", str(root / "p.csv")]) == 0
    rows = list(csv.DictReader(open(root / "p.csv")))
    y = [int(r["scan"][1:]) % 2 for r in rows]
    assert len(rows) == 24 and metrics.auroc(np.array(y), np.array([float(r["score_y"]) for r in rows])) > 0.9


def test_fit_bad_target_is_one_line(tmp_path, capsys):
    root = _cohort(tmp_path, n=8)
    assert clear.main(["fit", "--bags", str(root / "bags"), "--labels", str(root / "labels.csv"),
                       "--target", "stage", "--out", str(root / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage" in err and "labels.csv" in err and "\n" not in err


def test_a_failed_fit_leaves_none_of_the_folders_it_made(tmp_path, capsys):
    root = _cohort(tmp_path)
    (root / "kept").mkdir()
    for out in (root / "new" / "deeper" / "run", root / "kept" / "run"):
        args = ["fit", "--bags", str(root / "bags"), "--labels", str(root / "labels.csv"), "--target", "nope",
                "--out", str(out)]
        assert clear.main(args) == 2 and "nope" in capsys.readouterr().err
    assert not (root / "new").exists() and (root / "kept").is_dir() and not (root / "kept" / "run").exists()


def test_fit_pool_mean_learns_a_diffuse_signal_and_predict_reads_it_back(tmp_path, capsys):
    """--pool mean: a linear model of each scan's mean slice finds a shift of every slice of the positive scans
    (what a diffuse finding does), its folds are saved as such, and predict rebuilds them."""
    root = _cohort(tmp_path)
    for i in range(1, 24, 2):  # the positives: every slice shifted a little, on top of the one bright slice
        bag = torch.load(root / "bags" / f"s{i}.pt", weights_only=True)
        bag["features"][:, 1] += 2.0
        torch.save(bag, root / "bags" / f"s{i}.pt")
    args = ["fit", "--bags", str(root / "bags"), "--labels", str(root / "labels.csv"), "--target", "y",
            "--out", str(root / "run"), "--folds", "3", "--pool", "mean", "--lr", "0.01"]
    assert clear.main(args) == 0
    m = json.loads((root / "run/metrics.json").read_text())
    assert m["config"]["pool"] == "mean" and next(r for r in m["rows"] if r["metric"] == "AUROC")["value"] > 0.9
    assert torch.load(root / "run/fold0.pt", weights_only=True)["model"]["pool"] == "mean"
    assert clear.main(["predict", "--model", str(root / "run"), "--bags", str(root / "bags"),
                       "--out", str(root / "p.csv")]) == 0
    rows = list(csv.DictReader(open(root / "p.csv")))
    y = [int(r["scan"][1:]) % 2 for r in rows]
    assert metrics.auroc(np.array(y), np.array([float(r["score_y"]) for r in rows])) > 0.9
