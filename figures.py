"""Pictures for the HTML report (report.py) from the standard library and numpy alone: PNG images written with
zlib and struct, and plots as SVG text (an ROC curve, attention along a scan). Nothing here reads files.

Each plot draws its data inside a group whose transform maps data units to pixels, so a polyline's points are the
data themselves (false/true positive rates, mm and attention) and a reader of the SVG can take them back exactly;
`vector-effect="non-scaling-stroke"` keeps the lines one width however the group is scaled.

Shapes: N scans, V distinct scores, L slices of a scan, H, W pixel rows and columns.
"""
import base64
import html
import struct
import zlib

import numpy as np

# ------------------------------------------------------------------------------------------------- PNG


def png(gray):
    """A (H, W) uint8 image -> the bytes of an 8-bit grayscale PNG (ISO/IEC 15948: signature, IHDR, IDAT,
    IEND; each row prefixed with filter type 0, none; the rows deflated together by zlib)."""
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    h, w = gray.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), gray], 1).tobytes()  # (H, 1 + W): filter byte, row

    def chunk(kind, data):  # length, type, data, CRC-32 of type and data
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # width, height, bit depth 8, colour type 0 (gray)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def data_uri(png_bytes):
    """PNG bytes -> a data: URI that an <img src> shows without any file beside the page."""
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")

# ------------------------------------------------------------------------------------------------- ROC


def roc_curve(y, score):
    """ROC of `score` (N,) for 0/1 `y` (N,) -> (fpr, tpr), each (V + 1,) from (0, 0) to (1, 1): one point per
    distinct score, highest first; None when a class is absent. Joined by straight lines, scores tied across
    the classes make a diagonal step, so the area under the polyline (trapezoids) is the Mann-Whitney AUROC with
    ties counted 1/2, metrics.auroc."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return None
    _, rank = np.unique(-np.asarray(score, dtype=np.float64), return_inverse=True)  # rank 0: the highest score
    rank = rank.ravel()
    tp = np.cumsum(np.bincount(rank, weights=y))  # (V,) positives at or above each distinct score
    fp = np.cumsum(np.bincount(rank, weights=~y))  # (V,)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def polyline_area(x, y):
    """Area under a polyline by trapezoids: the AUROC of an ROC curve's points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())


def _points(x, y):
    return " ".join(f"{a:.5g},{b:.5g}" for a, b in zip(x, y))


STROKE = 'fill="none" vector-effect="non-scaling-stroke"'
COLOURS = ("#c0392b", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")  # labels' curves


def roc_svg(pooled, folds=(), title="", size=220, labels=None):
    """An ROC plot: `pooled` (fpr, tpr) as a thick line (class "pooled"; None: no curve), each of `folds` as a
    thin one (class "fold"), and the chance diagonal. With `labels`, `pooled` is a list of curves, one per label,
    in turn in COLOURS and named in their tooltips (the demo's many-label tasks)."""
    left, top, side = 34, 22, size - 44  # px: room for the tick labels on the left and the title on top
    lines = [f'<line x1="0" y1="0" x2="1" y2="1" stroke="#999" stroke-dasharray="4 3" {STROKE}/>']
    lines += [f'<polyline class="fold" points="{_points(*c)}" stroke="#6a9fd4" stroke-width="1" {STROKE}/>'
              for c in folds if c is not None]
    curves = list(zip(labels, pooled)) if labels is not None else [(None, pooled)]
    for n, (name, c) in enumerate(curves):
        if c is not None:
            tip = f"<title>{html.escape(name)}</title>" if name else ""
            lines.append(f'<polyline class="pooled" points="{_points(*c)}" stroke="{COLOURS[n % len(COLOURS)]}" '
                         f'stroke-width="2.2" {STROKE}>{tip}</polyline>')
    ticks = "".join(f'<text x="{left - 4}" y="{top + (1 - v) * side + 4:.1f}" text-anchor="end">{v:g}</text>'
                    f'<text x="{left + v * side:.1f}" y="{top + side + 14}" text-anchor="middle">{v:g}</text>'
                    for v in (0, 0.5, 1))
    return (f'<svg class="roc" width="{size}" height="{size + 10}" viewBox="0 0 {size} {size + 10}" '
            f'font-size="10" font-family="sans-serif"><text x="{left}" y="12" font-weight="bold">'
            f'{html.escape(title)}</text>{ticks}'
            f'<text x="{left + side / 2:.0f}" y="{top + side + 26}" text-anchor="middle">false positive rate</text>'
            f'<text transform="translate(10 {top + side / 2:.0f}) rotate(-90)" text-anchor="middle">true positive '
            f'rate</text><rect class="frame" x="{left}" y="{top}" width="{side}" height="{side}" fill="none" '
            f'stroke="#333"/><g transform="translate({left} {top + side}) scale({side} {-side})">'
            + "".join(lines) + "</g></svg>")

# ------------------------------------------------------------------------------------ attention along z


def attention_svg(z_mm, attention, marked=(), lesion_z=(), spacing=None, width=560, height=130):
    """Attention (L,) against z (L,) in mm, inferior on the left, superior on the right (class "attention");
    the uniform level 1/L dashed; `marked` (index, text) pairs, the thumbnails' slices, as numbered dots;
    `lesion_z` (mm) as red bands one slice wide (`spacing`, default the median gap), the slices with a finding."""
    z, a = np.asarray(z_mm, dtype=np.float64), np.asarray(attention, dtype=np.float64)
    left, top, w, h = 40, 8, width - 50, height - 40
    z0, z1 = float(z.min()), float(max(z.max(), z.min() + 1e-6))
    peak = float(max(a.max(), 1.0 / len(a))) * 1.05
    dz = spacing or (float(np.median(np.diff(z))) if len(z) > 1 else 1.0)

    def x(v):  # mm -> px, for what is drawn outside the scaled group
        return left + (v - z0) / (z1 - z0) * w

    def y(v):  # attention -> px
        return top + (1 - v / peak) * h

    bands = "".join(f'<rect class="lesion" x="{max(x(v - dz / 2), left):.1f}" y="{top}" '
                    f'width="{max(min(x(v + dz / 2), left + w) - max(x(v - dz / 2), left), 1):.1f}" '
                    f'height="{h}" fill="#f4b6b0"><title>finding at {v:.0f} mm</title></rect>' for v in lesion_z)
    dots = "".join(f'<circle cx="{x(z[i]):.1f}" cy="{y(a[i]):.1f}" r="7" fill="#fff" stroke="#333"/>'
                   f'<text x="{x(z[i]):.1f}" y="{y(a[i]) + 3.5:.1f}" text-anchor="middle">{html.escape(t)}</text>'
                   for i, t in marked)
    group = (f'<g transform="translate({left} {top + h}) scale({w / (z1 - z0):.6g} {-h / peak:.6g}) '
             f'translate({-z0:.6g} 0)"><line x1="{z0:.6g}" y1="{1 / len(a):.6g}" x2="{z1:.6g}" y2="{1 / len(a):.6g}" '
             f'stroke="#999" stroke-dasharray="4 3" {STROKE}/><polyline class="attention" points="{_points(z, a)}" '
             f'stroke="#1f5f99" stroke-width="1.6" {STROKE}/></g>')
    return (f'<svg class="along" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-size="10" '
            f'font-family="sans-serif">{bands}<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" '
            f'stroke="#333"/>{group}{dots}<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak:.2g}</text>'
            f'<text x="{left - 4}" y="{top + h}" text-anchor="end">0</text>'
            f'<text x="{left}" y="{top + h + 14}">{z0:.0f} mm, inferior</text>'
            f'<text x="{left + w}" y="{top + h + 14}" text-anchor="end">superior, {z1:.0f} mm</text>'
            f'<text x="{left + w / 2}" y="{top + h + 28}" text-anchor="middle">z along the scan; '
            'dashed: uniform attention 1/L; red: slices with a finding in the mask</text></svg>')
