"""DICOM CT series -> NIfTI in Hounsfield units: the way in for scans from a PACS export.

    python clear.py convert export/series_3 cohort/images/P001_S1.nii.gz

    series = read_series("export/series_3")    # Series: volume (Z, Y, X) HU in canonical RAS+, affine, notes
    save_series(series, "ct.nii.gz")           # atomically, with data.save_nifti

What a series must be, and what is done with it:
- one folder, one series: the files in it (not below it) that are DICOM images must share SeriesInstanceUID
  (else it is refused with a list of the series; `series=UID` picks one), Modality CT, orientation, pixel
  spacing and matrix size. Files that are not DICOM, or DICOM without an image (DICOMDIR), are counted in a note.
- HU = stored value · RescaleSlope + RescaleIntercept, slice by slice (both are required in CT).
- order: by each slice's position along the slice normal n = r × c (r, c: the row and column direction cosines
  of ImageOrientationPatient), s_k = n · ImagePositionPatient_k; never by file name or InstanceNumber, which
  exports number either way.
- gaps s_{k+1} - s_k must equal their median within `gap_tolerance` (relative), else the series is refused
  (a slice missing from the export, or mixed reconstructions), or, with `resample`, interpolated linearly onto
  the median gap (said in a note). Two slices at one position are always refused.
- affine: DICOM's patient frame is LPS (+x to the patient's left, +y posterior, +z superior). Voxel (i column,
  j row, k slice) lies at (PS3.3 C.7.6.2.1.1, extended along the slices)
      P = P_0 + i·Δc·r + j·Δr·c + k·(P_last - P_0)/(Z - 1)      (P: ImagePositionPatient, PixelSpacing = Δr, Δc)
  NIfTI's frame is RAS, so x and y change sign: A_RAS = diag(-1, -1, 1, 1) · A_LPS. A gantry tilt stays in the
  affine as a shear (a note says so); it is not resampled away.

pydicom is an optional dependency, imported here only, when a DICOM is read.
Shapes: Z slices, Y rows, X columns (the canonical volume of data.load_ct).
"""
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from data import to_ras, resample_z, save_nifti, voxel_spacing
from files import ClearError, cause

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Series:
    volume: np.ndarray  # (Z, Y, X) float32 HU, canonical RAS+ (as data.load_ct returns it)
    affine: np.ndarray  # (4, 4) voxel (x, y, z) of the canonical array -> RAS+ mm
    spacing: tuple  # (z, y, x) mm
    uid: str  # SeriesInstanceUID
    description: str  # SeriesDescription
    files: int  # slice files read
    notes: list = field(default_factory=list)  # what was ignored or changed, one line each


def _pydicom(folder):
    try:
        import pydicom
    except ImportError:
        raise ClearError(f"{folder}: reading DICOM needs pydicom, an optional dependency: "
                         "pip install pydicom") from None
    return pydicom


def _headers(folder, pydicom):
    """(headers of the DICOM image files directly in `folder`, notes). Pixel data is not read yet."""
    files = [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.is_file())
    headers, not_dicom, no_image = [], 0, 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            not_dicom += 1
            continue
        except Exception as e:  # DICOM preamble, then a truncated or garbled header
            raise ClearError(f"{path}: unreadable DICOM ({cause(e)})") from None
        if "Rows" not in ds:  # DICOMDIR, structured reports, presentation states: no image
            no_image += 1
            continue
        ds.filename = str(path)
        headers.append(ds)
    if not headers:
        below = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        raise ClearError(f"{folder}: no DICOM images in it" + (f" (only in its {len(below)} subfolders such as "
                         f"{below[0]}/: give the folder of one series)" if below else ""))
    notes = [f"ignored {n} {what}" for n, what in ((not_dicom, "files that are not DICOM"),
                                                   (no_image, "DICOM files without an image (e.g. DICOMDIR)")) if n]
    return headers, notes


def _one_series(folder, headers, uid):
    """The headers of the one series in the folder (or of series `uid`), checked to be CT slices of one grid."""
    by_uid = {}
    for ds in headers:
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if uid is None and len(by_uid) > 1:
        listed = [f"{u or '(no UID)'} ({len(d)} files, {d[0].get('Modality', '?')} "
                  f"{str(d[0].get('SeriesDescription', ''))!r})"
                  for u, d in sorted(by_uid.items(), key=lambda kv: -len(kv[1]))]
        more = f" and {len(listed) - 4} more" if len(listed) > 4 else ""
        raise ClearError(f"{folder}: {len(by_uid)} series in one folder: {', '.join(listed[:4])}{more}; put each "
                         "series in a folder of its own, or pick one with --series UID")
    if uid is not None and uid not in by_uid:
        raise ClearError(f"{folder}: no series {uid} (it holds {', '.join(sorted(by_uid))})")
    series = by_uid[uid] if uid is not None else next(iter(by_uid.values()))
    first = series[0]
    modality = str(first.get("Modality", ""))
    if modality != "CT":
        raise ClearError(f"{first.filename}: modality {modality or 'missing'}, not CT; CLEAR reads CT in "
                         "Hounsfield units")
    for ds in series:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                               "RescaleSlope", "RescaleIntercept") if ds.get(k) is None]
        if missing:
            raise ClearError(f"{ds.filename}: no {missing[0]}; cannot place the slice or map it to HU")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ClearError(f"{ds.filename}: a multi-frame (enhanced) CT of {ds.NumberOfFrames} frames; this "
                             "reads one slice per file (dcm2niix converts enhanced CT)")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise ClearError(f"{ds.filename}: a colour image ({ds.SamplesPerPixel} samples per pixel), not CT data")
        for key, tol in (("ImageOrientationPatient", 1e-4), ("PixelSpacing", 1e-4), ("Rows", 0), ("Columns", 0)):
            a, b = np.atleast_1d(np.asarray(ds.get(key), float)), np.atleast_1d(np.asarray(first.get(key), float))
            if a.shape != b.shape or np.abs(a - b).max() > tol:
                raise ClearError(f"{ds.filename}: {key} {list(a)} differs from {Path(first.filename).name}'s "
                                 f"{list(b)}; a localizer or another reconstruction in the series? Move it out")
    return series


def _positions(series):
    """(series sorted along the slice normal, positions P (Z, 3) LPS mm, s (Z,) mm along the normal n, n)."""
    iop = np.asarray(series[0].ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])  # slice normal, LPS
    P = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in series])  # (Z, 3)
    order = np.argsort(P @ n, kind="stable")
    return [series[i] for i in order], P[order], P[order] @ n, n


def _check_gaps(folder, series, P, s, n, gap_tolerance, resample):
    """Refuse duplicate, off-line or uneven slice positions -> (new positions s' (Z',) if resampled else None,
    notes)."""
    if len(s) == 1:
        return None, []
    gaps = np.diff(s)  # (Z - 1,) mm, >= 0 after sorting
    same = np.flatnonzero(gaps < 1e-3)
    if len(same):
        a, b = series[same[0]].filename, Path(series[same[0] + 1].filename).name
        raise ClearError(f"{a}: at the same position ({s[same[0]]:.2f} mm along the slice normal) as {b}, "
                         f"{len(same)} such pair(s); two acquisitions in one series? Split them into folders")
    med = float(np.median(gaps))
    d = (P[-1] - P[0]) / np.linalg.norm(P[-1] - P[0])  # direction first -> last slice
    off = np.linalg.norm((P - P[0]) - np.outer((P - P[0]) @ d, d), axis=1).max()  # distance from that line
    if off > gap_tolerance * med:
        raise ClearError(f"{folder}: slice positions do not lie on one line (off by up to {off:.2f} mm)")
    notes = []
    tilt = np.degrees(np.arccos(np.clip(abs(d @ n), 0, 1)))
    if tilt > 0.01:
        notes.append(f"gantry tilt {tilt:.2f} deg: kept in the affine as a shear, slices not resampled")
    worst = int(np.abs(gaps - med).argmax())
    if abs(gaps[worst] - med) <= gap_tolerance * med:
        return None, notes
    if not resample:
        raise ClearError(f"{folder}: uneven slice gaps, {gaps.min():.3g} to {gaps.max():.3g} mm (median {med:.3g}; "
                         f"e.g. {gaps[worst]:.3g} mm between {Path(series[worst].filename).name} and "
                         f"{Path(series[worst + 1].filename).name}): slices missing? Add --resample to interpolate "
                         f"onto {med:.3g} mm")
    s_new = s[0] + np.arange(int((s[-1] - s[0]) / med + 1e-6) + 1) * med  # (Z',) from the first slice on
    notes.append(f"resampled: slice gaps {gaps.min():.3g}-{gaps.max():.3g} mm made uniform at {med:.3g} mm by "
                 f"linear interpolation ({len(s)} -> {len(s_new)} slices)")
    return s_new, notes


def _pixels(series, pydicom):
    """(Z, Y, X) float32 HU, slices in the order given, rows and columns as stored."""
    rows, cols = int(series[0].Rows), int(series[0].Columns)
    volume = np.empty((len(series), rows, cols), np.float32)
    for k, ds in enumerate(series):
        try:
            raw = pydicom.dcmread(ds.filename).pixel_array
        except Exception as e:  # truncated pixel data, a compressed syntax without its decoder, ...
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            hint = (f"; {syntax.name} needs pydicom's optional decoders: pip install pylibjpeg pylibjpeg-libjpeg "
                    "pylibjpeg-openjpeg" if syntax is not None and syntax.is_compressed else "")
            raise ClearError(f"{ds.filename}: cannot read the pixel data ({cause(e)}){hint}") from None
        if raw.shape != (rows, cols):
            raise ClearError(f"{ds.filename}: pixel data of shape {raw.shape}, the header says {(rows, cols)}")
        volume[k] = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # HU
    return volume


def read_series(folder, series=None, gap_tolerance=0.01, resample=False):
    """Read the CT series in `folder` (or the one file `folder` names) -> Series, canonical RAS+."""
    folder = Path(folder)
    if not folder.exists():
        raise ClearError(f"{folder}: no such folder")
    pydicom = _pydicom(folder)
    with warnings.catch_warnings():  # pydicom warns about every oddity it reads past; the checks here decide
        warnings.simplefilter("ignore")
        headers, notes = _headers(folder, pydicom)
        slices, P, s, n = _positions(_one_series(folder, headers, series))
        s_new, more = _check_gaps(folder, slices, P, s, n, gap_tolerance, resample)
        volume = _pixels(slices, pydicom)  # (Z, Y, X) in DICOM order: k along n, j down the rows, i along the row
    notes += more
    first = slices[0]
    iop = np.asarray(first.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in first.PixelSpacing)
    if s_new is not None:
        frac = np.interp(s_new, s, np.arange(len(s)))  # fractional slice index of each new position
        volume = resample_z(torch.from_numpy(volume), 1.0, torch.from_numpy(frac)).numpy()
        P = P[0] + np.outer((s_new - s[0]) / (s[-1] - s[0]), P[-1] - P[0])  # (Z', 3)
    if len(P) > 1:
        step = (P[-1] - P[0]) / (len(P) - 1)
    else:  # one slice: its thickness along the normal
        thick = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        if not thick:
            notes.append("one slice without SliceThickness: 1 mm assumed")
        step = n * float(thick or 1.0)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([iop[:3] * dc, iop[3:] * dr, step], 1)
    affine[:3, 3] = P[0]
    affine = LPS_TO_RAS @ affine  # voxel (i, j, k) -> RAS+ mm
    xyz = volume.transpose(2, 1, 0)  # (X, Y, Z): i, j, k
    ornt, affine = to_ras(affine, xyz.shape)
    volume = np.ascontiguousarray(nib.orientations.apply_orientation(xyz, ornt).transpose(2, 1, 0))  # (Z, Y, X)
    sx, sy, sz = voxel_spacing(affine)
    return Series(volume, affine, (sz, sy, sx), str(first.get("SeriesInstanceUID", "")),
                  str(first.get("SeriesDescription", "")), len(slices), notes)


def save_series(series, out):
    """Write a Series to `out` (.nii or .nii.gz), atomically: int16 when every HU value is an integer in its
    range (as scanners store CT, half the disk of float32), else float32."""
    if not str(out).endswith((".nii", ".nii.gz")):
        raise ClearError(f"{out}: expected a .nii.gz (or .nii) file name")
    v = series.volume
    whole = bool(np.all(v == np.round(v))) and v.min() >= -32768 and v.max() <= 32767
    save_nifti(out, v, series.affine, dtype=np.int16 if whole else np.float32)
