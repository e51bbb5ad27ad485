"""A run's results as one HTML page that opens offline in any browser: RUN/report.html beside metrics.json.

    report.write_fit_report(run_dir, bags)   # after cv.save_run: RUN/report.html, from the run folder and its bags
    report.write_demo_report(demo_dir)       # DEMO/report.html: the demo's tasks side by side, links to each fit's

The page holds everything itself: plots are inline SVG and thumbnails base64 PNG (figures.py), the style sits in
the page; there is no script and no URL. A fit's report reads the run back from its files (metrics.json,
predictions.csv, attention/<scan>.csv), so what it shows is what the run saved:
- the metrics table and the run's settings;
- the ROC curve of each label, pooled over the held-out folds, and each fold's as a thin line;
- for the cases that matter most, the most confident true and false positives and negatives over all labels (at
  a score of 0.5): attention along the scan, the slices with a finding where the cohort has a mask, and the most
  attended slices as thumbnails in the lung and soft-tissue windows, read from the scan's image (a bag names it);
- the relative path of each case's NIfTI attention overlay, to open over the image in ITK-SNAP or 3D Slicer.

Shapes: N scans of the run, L slices of a scan, Y, X the image's rows and columns, H, W a thumbnail's.
"""
import csv
import html
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import figures
from cohort import NIFTI_SUFFIXES
from data import WINDOWS as HU_WINDOWS, load_ct, load_mask, nearest_slices, save_overlay, window
from files import ClearError, atomic_path

WINDOWS = (("lung", HU_WINDOWS["lung"]), ("soft tissue", HU_WINDOWS["soft"]))  # (name, (level, width) in HU)
THUMB = 128  # px, a thumbnail's longer side: four of them in two windows fit beside each other on a laptop screen
N_THUMBS = 4  # most-attended slices shown per case (3-5 say where the model looked without filling the page)
PER_KIND = 2  # cases of each kind (true/false positive/negative): up to 8 scans, a page that loads at once
KINDS = (  # name, (a member of the label, scored above 0.5), most confident = highest score (else lowest)
    ("true positive", (True, True), True), ("false positive", (False, True), True),
    ("false negative", (True, False), False), ("true negative", (False, False), False))

STYLE = """body{font-family:sans-serif;margin:24px;max-width:1180px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:13px;vertical-align:top}th{background:#f2f2f2}.num{text-align:right;font-variant-numeric:tabular-nums}
.rocs{display:flex;flex-wrap:wrap;gap:8px}.case{border-top:1px solid #ccc;margin-top:14px;padding-top:6px}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0}figure img{display:block;width:128px}
figcaption{font-size:12px}.pair{display:flex;gap:2px}.note{color:#555;font-size:13px}code{font-size:12px}
h3{font-size:15px;margin:6px 0}"""

# ------------------------------------------------------------------------------------------- the run


def read_run(run_dir):
    """RUN/metrics.json and RUN/predictions.csv -> (metrics dict, prediction rows)."""
    run = Path(run_dir)
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        with open(run / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        raise ClearError(f"{run}: not a fit run folder ({e})") from None
    return metrics, rows


def truths(metrics, rows):
    """Each label of the run -> (y (N,) 0/1 member of the label, score (N,), fold (N,)): one-vs-rest for the
    classes of a multiclass or ordinal task, as metrics.summarize scores them."""
    kind, targets, classes = metrics["task"], metrics["targets"], metrics["classes"]
    fold = np.array([int(r["fold"]) for r in rows])
    out = {}
    for j, label in enumerate(metrics["labels"]):
        target = label if kind in ("binary", "multilabel") else targets[0]
        positive = classes[-1] if kind == "binary" else 1.0 if kind == "multilabel" else classes[j]
        y = np.array([float(r[f"true_{target}"]) == positive for r in rows])
        out[label] = (y, np.array([float(r[f"score_{label}"]) for r in rows]), fold)
    return out


def pick_cases(scans, truth, per_kind=PER_KIND):
    """The most confident cases of each kind over all labels -> [{kind, scan, label, score, member}], a scan at
    most once: true positives with the highest scores, false negatives with the lowest, and so on."""
    cases, seen = [], set()
    for name, (member, above), descending in KINDS:
        pairs = [(s[i], label, i) for label, (y, s, _) in truth.items() for i in range(len(y))
                 if bool(y[i]) == member and (s[i] > 0.5) == above]
        pairs.sort(key=lambda p: -p[0] if descending else p[0])
        chosen = [p for p in pairs if scans[p[2]] not in seen][:per_kind]
        seen.update(scans[i] for _, _, i in chosen)
        cases += [dict(kind=name, scan=scans[i], label=label, score=float(s), member=member)
                  for s, label, i in chosen]
    return cases


def read_attention(run_dir, scan):
    """RUN/attention/<scan>.csv -> (z_mm (L,), attention (L,))."""
    with open(Path(run_dir) / "attention" / f"{scan}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([float(r["z_mm"]) for r in rows]), np.array([float(r["attention"]) for r in rows])

# ---------------------------------------------------------------------------------------- thumbnails


def mask_of(image):
    """The lesion mask that cohort.py pairs with an image: <cohort>/masks/<scan>.nii[.gz] beside
    <cohort>/images/<scan>.nii[.gz]; None if there is none."""
    image = Path(image)
    scan = next((image.name[:-len(s)] for s in NIFTI_SUFFIXES if image.name.endswith(s)), image.name)
    return next((p for s in NIFTI_SUFFIXES if (p := image.parent.parent / "masks" / f"{scan}{s}").is_file()), None)


def thumbnail(hu, spacing_yx):
    """An axial slice (Y, X) in HU -> {window name: PNG data URI}, THUMB px along its longer side (in mm), in the
    radiological convention: anterior at the top, the patient's right on the viewer's left."""
    hu = torch.as_tensor(np.ascontiguousarray(hu[::-1, ::-1]), dtype=torch.float32)  # (Y, X), flipped both ways
    extent = (hu.shape[0] * spacing_yx[0], hu.shape[1] * spacing_yx[1])  # mm
    size = tuple(max(1, round(THUMB * e / max(extent))) for e in extent)  # (H, W)
    hu = F.interpolate(hu[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    levels = window(hu, [w for _, w in WINDOWS])  # (2, H, W) in [0, 1]
    return {name: figures.data_uri(figures.png((c * 255).round().byte().numpy()))
            for (name, _), c in zip(WINDOWS, levels)}


def scan_views(image, z_mm, attention, k=N_THUMBS):
    """The image behind a bag, read -> (thumbnails [{index, z, attention, finding, uris}] of the k most attended
    slices, most attended first; z (mm) of the bag's slices with a finding, None without a mask). Raises
    ClearError when the image cannot be read."""
    volume, spacing = load_ct(image)  # (Z, Y, X) HU
    stored = nearest_slices(z_mm, spacing[0], len(volume)).numpy()  # (L,) image slice of each bag slice
    mask = mask_of(image)
    finding = None
    if mask is not None:
        finding = load_mask(mask, volume.shape).reshape(len(volume), -1).any(1)[stored]  # (L,) bool
    top = np.argsort(-attention, kind="stable")[:k]
    thumbs = [dict(index=int(i), z=float(z_mm[i]), attention=float(attention[i]),
                   finding=None if finding is None else bool(finding[i]),
                   uris=thumbnail(volume[stored[i]], spacing[1:])) for i in top]
    return thumbs, None if finding is None else z_mm[finding]

# ----------------------------------------------------------------------------------------------- HTML


def esc(v):
    return html.escape(str(v))


def num(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def page(title, body):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def table(header, rows, numeric=()):
    """An HTML table; columns whose index is in `numeric` align right. Cells are escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if j in numeric else ""}>{esc(c)}</td>'
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metrics_html(metrics):
    rows = [(r["metric"], r["label"], num(r["value"]), f"{num(r['ci_low'])} - {num(r['ci_high'])}")
            for r in metrics["rows"]]
    return (f"<p>{esc(metrics['task'])} task on {esc(', '.join(metrics['targets']))}: {metrics['n_scans']} scans "
            f"of {metrics['n_patients']} patients, {metrics['folds']}-fold patient-level cross-validation; 95 % CI "
            f"from {metrics['n_bootstrap']} patient-bootstrap resamples. Pooled: the held-out scores of all folds "
            "scored together; fold mean: scored within each fold, then averaged.</p>"
            + table(("metric", "label", "value", "95 % CI"), rows, numeric=(2, 3)))


def auroc_row(metrics, metric, label):
    found = [r for r in metrics["rows"] if r["metric"] == metric]
    return next((r for r in found if r["label"] == label), found[0] if found else None)


def ci_text(row):
    if row is None or row["value"] is None:
        return "n/a"
    return f"{row['value']:.3f}" + ("" if row["ci_low"] is None else f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")


def rocs_html(metrics, truth):
    """One ROC plot per label: pooled (thick), each fold (thin), chance (dashed)."""
    plots = []
    for label, (y, s, fold) in truth.items():
        folds = [figures.roc_curve(y[fold == k], s[fold == k]) for k in np.unique(fold)]
        row = auroc_row(metrics, "AUROC", label)
        plots.append(figures.roc_svg(figures.roc_curve(y, s), folds,
                                     f"{label}: AUROC {num(row and row['value'])} pooled"))
    return ('<p class="note">Thick: the held-out scores of all folds pooled; thin: each fold; dashed: chance.</p>'
            f'<div class="rocs">{"".join(plots)}</div>')


def case_html(run_dir, case, image):
    """One case: what it is, attention along the scan, the thumbnails, its overlay's path."""
    run, scan = Path(run_dir), case["scan"]
    z, att = read_attention(run, scan)
    head = (f'<h3>{esc(case["kind"])}: {esc(scan)}, {esc(case["label"])} scored {case["score"]:.3f} '
            f'({"a member" if case["member"] else "not a member"} of the label)</h3>')
    overlay = run / "attention" / f"{scan}.nii.gz"
    try:
        if image is None:
            raise ClearError("its bag names no image")
        thumbs, lesion_z = scan_views(image, z, att)
        if not overlay.exists():
            save_overlay(image, z, att, overlay)
    except (ClearError, OSError) as e:
        return (f'<section class="case">{head}{figures.attention_svg(z, att)}<p class="note">No thumbnails and no '
                f"overlay for this scan: the image {esc(image)} is not readable ({esc(e)}).</p></section>")
    marks = [(t["index"], str(n + 1)) for n, t in enumerate(thumbs)]
    figs = "".join('<figure><div class="pair">' + "".join(
        f'<img src="{uri}" alt="{esc(scan)} z {t["z"]:.0f} mm, {esc(name)} window" title="{esc(name)} window">'
        for name, uri in t["uris"].items()) + f'</div><figcaption>{n + 1}: z {t["z"]:.0f} mm, attention '
        f'{t["attention"]:.3f}{", finding in the mask" if t["finding"] else ""}</figcaption></figure>'
        for n, t in enumerate(thumbs))
    masked = "" if lesion_z is not None else " The cohort has no mask for this scan: findings are not marked."
    return (f'<section class="case">{head}{figures.attention_svg(z, att, marks, () if lesion_z is None else lesion_z)}'
            f'<p class="note">The {len(thumbs)} most attended slices, lung and soft-tissue windows side by side, '
            f"anterior up, the patient's right on the left.{masked}</p><div class=\"thumbs\">{figs}</div>"
            f'<p class="note">Attention overlay: <code>{esc(overlay.relative_to(run).as_posix())}</code>, to open '
            f"over <code>{esc(image)}</code> in ITK-SNAP or 3D Slicer.</p></section>")


def write_fit_report(run_dir, bags):
    """RUN/report.html for a run that cv.save_run wrote from `bags` (mil.Bags: each scan's image) -> its path."""
    run = Path(run_dir)
    metrics, rows = read_run(run)
    truth = truths(metrics, rows)
    scans = [r["scan"] for r in rows]
    images = dict(zip(bags.scans, bags.images))
    settings = [("task", metrics["task"]), ("targets", ", ".join(metrics["targets"])),
                ("bags", bags.folder), ("encoder", ", ".join(f"{k}={v}" for k, v in bags.encoder.items())),
                ("best epoch of each fold", ", ".join(map(str, metrics.get("best_epochs", [])))),
                *[(k, v) for k, v in metrics.get("config", {}).items() if k not in ("task", "targets")]]
    cases = pick_cases(scans, truth)
    body = (f"<h2>Metrics</h2>{metrics_html(metrics)}<h2>ROC curves</h2>{rocs_html(metrics, truth)}"
            f"<h2>Cases</h2><p class=\"note\">The most confident true and false positives and negatives over all "
            f"labels, at a score of 0.5, up to {PER_KIND} of each kind; the numbered dots on each curve are the "
            "slices shown below it, most attended first.</p>"
            + "".join(case_html(run, c, images.get(c["scan"])) for c in cases)
            + f"<h2>Settings</h2>{table(('setting', 'value'), settings)}")
    path = run / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page(f"CLEAR fit: {', '.join(metrics['targets'])[:80]}", body), encoding="utf-8")
    return path

# ----------------------------------------------------------------------------------------------- demo


def write_demo_report(demo_dir):
    """DEMO/report.html: each demo task in a row, a column per encoder the demo fits it with (demo.COLUMNS: the LeCL
    encoder, random init, the supervised reference, the HU-histogram control), each cell the run's AUROCs, the ROC
    of each label pooled, and a link to its report."""
    import demo

    out = Path(demo_dir)
    settings = json.loads((out / "demo.json").read_text()) if (out / "demo.json").is_file() else {}
    columns = [name for _, name in demo.COLUMNS]
    runs = {(task, i): run for i, (col, _) in enumerate(demo.COLUMNS) for task, _, _ in demo.TASKS
            if (run := demo.RUNS.get((task, col)))}
    rows = []
    for name, _, _ in demo.TASKS:
        cells = []
        for col in range(len(columns)):
            run = runs.get((name, col))
            if run is None or not (out / run / "metrics.json").is_file():
                cells.append("<td>not run by the demo</td>")
                continue
            metrics, preds = read_run(out / run)
            truth = truths(metrics, preds)
            label = "macro" if len(truth) > 1 else next(iter(truth))
            plot = figures.roc_svg([figures.roc_curve(y, s) for y, s, _ in truth.values()], labels=list(truth),
                                   title=f"{name}: {len(truth)} label{'s' * (len(truth) > 1)}, pooled")
            link = (f'<a href="{esc(run)}/report.html">{esc(run)}/report.html</a>'
                    if (out / run / "report.html").is_file() else f"{esc(run)}/ (no report.html)")
            cells.append(f"<td>{plot}<br>AUROC, fold mean: {ci_text(auroc_row(metrics, 'AUROC, fold mean', label))}"
                         f"<br>AUROC, pooled: {ci_text(auroc_row(metrics, 'AUROC', label))}<br>{link}</td>")
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    body = ("<p>The demo's tasks side by side: AUROC with 95 % CI (macro over a task's labels or classes), the ROC "
            "of each label with the held-out scores of all folds pooled (dashed: chance), and each fit's own report. "
            "The control is fitted on lung disease alone, the task intensities can solve.</p>"
            f"<table><tr><th>task</th>{''.join(f'<th>{esc(c)}</th>' for c in columns)}</tr>{''.join(rows)}</table>"
            + (f"<h2>Settings</h2>{table(('setting', 'value'), settings.items())}" if settings else ""))
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page("CLEAR demo", body), encoding="utf-8")
    return path
