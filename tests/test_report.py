"""report.py and figures.py: the PNG writer read back by a decoder of the spec's own, the ROC polyline's area
against metrics.auroc, and a fit's and the demo's report.html built from run folders written here by hand (tiny
NIfTI images and masks, known attention peaks), parsed with html.parser."""
import base64
import csv
import json
import re
import struct
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import clear
import cv
import demo
import figures
import metrics
import report
from data import save_nifti
from mil import Bags

# ------------------------------------------------------------------------------------------------- helpers


def read_png(data):
    """Decode an 8-bit grayscale, unfiltered PNG as the spec lays it out: chunks with CRCs, IHDR, deflated rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, interlace) == (8, 0, 0) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()  # filter type none on every row
    return rows[:, 1:]


class Page(HTMLParser):
    """Every start tag with its attributes and the text, checking that each element opened is closed in order."""
    VOID = {"meta", "img", "br"}

    def __init__(self, text):
        super().__init__()
        self.tags, self.text, self.open = [], [], []
        self.feed(text)
        self.close()
        assert self.open == [], f"unclosed: {self.open}"

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing"

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag, cls=None):
        return [a for t, a in self.tags if t == tag and (cls is None or a.get("class") == cls)]


def points(attrs):
    return np.array([[float(v) for v in p.split(",")] for p in attrs["points"].split()]).T  # (2, n)


def slice_level(i):
    """HU of every voxel of slice i of the test images, so a thumbnail tells which slice it shows."""
    return -150.0 + 10 * i


def make_run(root, kind, n=16, n_slices=10, dz=2.5):
    """A cohort (NIfTI images, masks with a finding in slices 2-3), a run folder as cv.save_run writes it, and the
    Bags naming the images. Scan s attends most to slice peak[s]; scores tie often (one decimal)."""
    rng = np.random.default_rng(0)
    for d in ("cohort/images", "cohort/masks", "run/attention"):
        (root / d).mkdir(parents=True)
    scans, patients, peak = [f"s{i}" for i in range(n)], [f"p{i // 2}" for i in range(n)], {}
    affine = np.diag([1.0, 1.0, dz, 1.0])
    for i, s in enumerate(scans):
        volume = np.broadcast_to(slice_level(np.arange(n_slices))[:, None, None], (n_slices, 16, 12)).copy()
        volume[:, 12:, 8:] = 1000.0  # anterior, patient's right (RAS+ array): the thumbnail's top left
        save_nifti(root / "cohort/images" / f"{s}.nii.gz", volume, affine, dtype=np.int16)
        mask = np.zeros((n_slices, 16, 12), np.int16)
        mask[2:4, 5:8, 5:8] = 1
        save_nifti(root / "cohort/masks" / f"{s}.nii.gz", mask, affine, dtype=np.int16)
        peak[s] = (3 * i + 1) % n_slices
        att = rng.uniform(0.5, 1.0, n_slices)
        att[peak[s]] = 4.0
        cv.write_csv(root / "run/attention" / f"{s}.csv", [{"z_mm": f"{k * dz:.6g}", "attention": f"{a:.6g}"}
                                                           for k, a in enumerate(att / att.sum())])
    fold = np.arange(n) // 2 % 4
    if kind == "multiclass":
        targets, classes, labels = ["stage"], [0.0, 1.0, 2.0], ["stage=0", "stage=1", "stage=2"]
        y = np.arange(n) % 3
        scores = np.round(np.eye(3)[y] * 0.5 + rng.uniform(0, 0.6, (n, 3)), 1)
        scores /= scores.sum(1, keepdims=True)
        true = {"true_stage": [f"{v:g}" for v in y]}
    else:
        targets = ["y"] if kind == "binary" else ["a", "b"]
        classes, labels = ([0.0, 1.0] if kind == "binary" else []), targets
        y = (rng.uniform(size=(n, len(targets))) < 0.5).astype(int)
        y[:2], y[2:4] = 1, 0
        scores = np.round(np.clip(0.4 * y + rng.uniform(0, 0.6, y.shape), 0, 1), 1)
        true = {f"true_{t}": [f"{v:g}" for v in y[:, j]] for j, t in enumerate(targets)}
    scores = np.array([[float(f"{v:.6g}") for v in r] for r in scores])  # as predictions.csv holds them
    rows = metrics.summarize(kind, y, scores, labels, np.array(patients), n_bootstrap=20, folds=fold)
    summary = dict(task=kind, targets=targets, labels=labels, classes=classes, n_scans=n, n_patients=n // 2,
                   folds=4, n_bootstrap=20, best_epochs=[3, 4, 5, 6], config={"epochs": 10}, rows=rows)
    (root / "run/metrics.json").write_text(json.dumps(summary))
    cv.write_csv(root / "run/predictions.csv", [
        dict(patient=p, scan=s, fold=int(f), **{k: v[i] for k, v in true.items()},
             **{f"score_{label}": f"{scores[i, j]:.6g}" for j, label in enumerate(labels)})
        for i, (p, s, f) in enumerate(zip(patients, scans, fold))])
    images = tuple(str(root / "cohort/images" / f"{s}.nii.gz") for s in scans)
    bags = Bags(root / "bags", {"name": "test"}, 4, tuple(scans), (torch.zeros(n_slices, 4),) * n,
                (torch.arange(n_slices) * dz,) * n, images)
    return root / "run", bags, summary, peak

# --------------------------------------------------------------------------------------------------- tests


def test_png_reads_back_as_written():
    gray = np.random.default_rng(1).integers(0, 256, (7, 13), dtype=np.uint8)
    assert np.array_equal(read_png(figures.png(gray)), gray)
    uri = figures.data_uri(figures.png(gray[:1, :1]))
    assert read_png(base64.b64decode(uri.split(",", 1)[1]))[0, 0] == gray[0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_the_area_under_the_roc_polyline_is_the_auroc(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=40) < 0.4
    score = np.round(0.3 * y + rng.uniform(size=40), 1)  # ties within and across the classes
    fpr, tpr = figures.roc_curve(y, score)
    assert figures.polyline_area(fpr, tpr) == pytest.approx(metrics.auroc(y, score), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and (np.diff(fpr) >= 0).all()
    assert figures.roc_curve(np.ones(5), np.arange(5)) is None


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_a_fit_report_holds_every_label_its_cases_and_no_url(tmp_path, kind):
    run, bags, summary, peak = make_run(tmp_path, kind)
    text = report.write_fit_report(run, bags).read_text()
    page = Page(text)
    assert not re.search(r"\w+://|<script|<link|@import|url\(", text)  # nothing to fetch, nothing to run
    assert all(a["src"].startswith("data:image/png;base64,") for a in page.find("img"))
    rocs = page.find("svg", "roc")
    assert len(rocs) == len(summary["labels"])
    pooled = [a for a in page.find("polyline", "pooled")]
    for label, curve in zip(summary["labels"], pooled):  # drawn in the labels' order
        auroc = next(r["value"] for r in summary["rows"] if r["metric"] == "AUROC" and r["label"] == label)
        assert figures.polyline_area(*points(curve)) == pytest.approx(auroc, abs=1e-4)
    cases = page.find("svg", "along")
    assert 4 <= len(cases) <= 4 * report.PER_KIND
    assert len(page.find("img")) == len(cases) * report.N_THUMBS * len(report.WINDOWS)
    assert len(page.find("rect", "lesion")) == 2 * len(cases)  # slices 2 and 3 hold the finding
    for scan in re.findall(r"Attention overlay: <code>attention/(\w+)\.nii\.gz</code>", text):
        assert (run / "attention" / f"{scan}.nii.gz").is_file()


def test_the_known_attention_peak_is_the_first_thumbnail(tmp_path):
    run, bags, _, peak = make_run(tmp_path, "binary")
    page = Page(report.write_fit_report(run, bags).read_text())
    headings = re.findall(r"(?:positive|negative): (s\d+),", "".join(page.text))
    imgs = page.find("img")
    assert headings and len(imgs) == len(headings) * report.N_THUMBS * 2
    soft = dict(report.WINDOWS)["soft tissue"]
    for n, scan in enumerate(headings):
        first = imgs[n * report.N_THUMBS * 2 + 1]  # the scan's first thumbnail, soft-tissue window
        assert "soft tissue" in first["title"]
        gray = read_png(base64.b64decode(first["src"].split(",", 1)[1]))
        expected = round(255 * (slice_level(peak[scan]) - soft[0] + soft[1] / 2) / soft[1])
        assert abs(int(gray[-1, -1]) - expected) <= 1, scan  # the slice at the peak, not another
        h, w = gray.shape
        assert gray[: h // 8, : w // 8].min() == 255 and gray[-h // 4:, -w // 4:].max() < 255  # anterior-right


def test_an_unreadable_image_costs_its_thumbnails_only(tmp_path):
    run, bags, _, _ = make_run(tmp_path, "binary")
    for p in (tmp_path / "cohort/images").iterdir():
        p.unlink()
    text = report.write_fit_report(run, bags).read_text()
    page = Page(text)
    assert page.find("img") == [] and len(page.find("svg", "along")) >= 4
    assert text.count("is not readable") == len(page.find("svg", "along"))


def test_the_demo_report_sets_the_tasks_side_by_side_and_links_each_fit(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"steps": 100, "n": 120}))
    runs = list(demo.RUNS.values())
    for i, name in enumerate(runs):
        run, bags, _, _ = make_run(tmp_path / f"r{i}", "multilabel" if name.endswith("location") else "binary")
        run.rename(out / name)
        report.write_fit_report(out / name, bags)
    text = report.write_demo_report(out).read_text()
    page = Page(text)
    assert not re.search(r"\w+://|<script|<link", text)
    in_rows = ["fit-location", "fit-random-location", "fit-supervised-location"]  # task by task, then its columns
    for task in ("lung_disease", "ground_glass", "emphysema"):  # the lung tasks have the control's column too
        in_rows += [f"fit-{task}", f"fit-random-{task}", f"fit-supervised-{task}", f"fit-histogram-{task}"]
    in_rows += ["fit-stage", "fit-random-stage", "fit-supervised-stage"]
    assert demo.CONTROL == "fit-histogram-lung_disease"
    assert [a["href"] for a in page.find("a")] == [f"{r}/report.html" for r in in_rows]
    assert all((out / a["href"]).is_file() for a in page.find("a"))
    assert len(page.find("svg", "roc")) == len(runs)
    assert len(page.find("polyline", "pooled")) == len(runs) + 3  # each multi-label location run draws both labels
    assert text.count("not run by the demo") == 2  # the control on location and stage


def test_clear_fit_writes_the_report(tmp_path, capsys):
    root = make_run(tmp_path, "binary")[0].parent
    rng = np.random.default_rng(0)
    (root / "bags").mkdir()
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("patient", "scan", "y")] + [(f"p{i}", f"s{i}", i % 2) for i in range(12)])
    for i in range(12):
        x = torch.from_numpy(rng.normal(size=(10, 4)).astype(np.float32))
        torch.save({"features": x, "z_mm": torch.arange(10, dtype=torch.float64) * 2.5, "encoder": {"name": "t"},
                    "image": str(root / "cohort/images" / f"s{i}.nii.gz")}, root / "bags" / f"s{i}.pt")
    assert clear.main(["fit", "--bags", str(root / "bags"), "--labels", str(root / "labels.csv"), "--target", "y",
                       "--out", str(root / "fit"), "--folds", "2", "--epochs", "2", "--workers", "1"]) == 0
    assert f"report: {root / 'fit' / 'report.html'}" in capsys.readouterr().out
    page = Page((root / "fit" / "report.html").read_text())
    assert len(page.find("svg", "roc")) == 1 and page.find("img")
