"""A cohort on disk: the folder layout every CLEAR command reads, and its labels.csv.

    <cohort>/images/<scan>.nii.gz   CT in HU, any orientation (data.load_ct reads it)
    <cohort>/masks/<scan>.nii.gz    optional: integer lesion labels on the same grid (LeCL's lesion crops)
    <cohort>/labels.csv             optional: patient,scan,<endpoint>... one row per scan (fit's targets)

Cohort(root) lists the scans (name, patient, image, mask, labels) and checks that the folder is one; the
images themselves are read only when a command needs them. Patients group a patient's scans, so that the
cross-validation (cv.py) never puts one patient's scans on both sides of a split.
"""
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from files import ClearError, cause

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def read_labels(path):
    """Read labels.csv: header `patient,scan,<endpoint>...`, one row per scan, numeric endpoint values
    (an empty cell is a missing label, NaN). Returns (endpoint names, {scan: {"patient": str, name: float}})."""
    path = Path(path)
    if not path.is_file():
        raise ClearError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:  # UTF-16 "Unicode text" from a spreadsheet, a binary file
        raise ClearError(f"{path}: not a UTF-8 CSV table ({cause(e)})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ClearError(f"{path}: empty, expected a header line 'patient,scan,<endpoint>...'")
    header = [c.strip() for c in rows[0]]
    missing = [c for c in ("patient", "scan") if c not in header]
    if missing:
        raise ClearError(f"{path}: missing column {missing[0]!r} (header is {','.join(header)})")
    if len(set(header)) != len(header):
        raise ClearError(f"{path}: duplicate column names in header {','.join(header)}")
    endpoints = [c for c in header if c not in ("patient", "scan")]
    table = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ClearError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        rec = dict(zip(header, (c.strip() for c in row)))
        if not rec["scan"] or not rec["patient"]:
            raise ClearError(f"{path}:{line}: empty patient or scan")
        if rec["scan"] in table:
            raise ClearError(f"{path}:{line}: scan {rec['scan']!r} listed twice")
        for name in endpoints:
            try:
                rec[name] = float(rec[name]) if rec[name] else math.nan
            except ValueError:
                raise ClearError(f"{path}:{line}: {name}={rec[name]!r} is not a number") from None
        table[rec.pop("scan")] = rec
    return endpoints, table


@dataclass(frozen=True)
class Scan:
    scan: str
    patient: str
    image: Path
    mask: Path | None = None
    labels: dict = field(default_factory=dict)  # endpoint -> float (NaN = missing)


def _find_nifti(folder, name):
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


class Cohort:
    """A cohort folder: `images/<scan>.nii[.gz]`, optional `masks/<scan>.nii[.gz]` (same grid, integer
    lesion labels) and optional `labels.csv` (patient,scan,<endpoint>...). With labels.csv its rows are the
    scans (each must have an image); without it every image is a scan of its own patient."""

    def __init__(self, root):
        self.root = Path(root)
        images = self.root / "images"
        if not images.is_dir():
            raise ClearError(f"{self.root}: not a cohort folder (no images/ inside)")
        labels_csv = self.root / "labels.csv"
        if labels_csv.exists():
            self.endpoints, table = read_labels(labels_csv)
        else:
            names = sorted(p.name[: -len(s)] for p in images.iterdir() for s in NIFTI_SUFFIXES
                           if p.name.endswith(s) and not p.name.startswith("."))
            self.endpoints, table = [], {n: {"patient": n} for n in names}
        self.scans = []
        for name, rec in table.items():
            image = _find_nifti(images, name)
            if image is None:
                raise ClearError(f"{labels_csv}: scan {name!r} has no image {images}/{name}.nii.gz")
            labels = {k: v for k, v in rec.items() if k != "patient"}
            self.scans.append(Scan(name, rec["patient"], image, _find_nifti(self.root / "masks", name), labels))
        if not self.scans:
            raise ClearError(f"{images}: no .nii or .nii.gz images")

    def __len__(self):
        return len(self.scans)

    def __iter__(self):
        return iter(self.scans)

    @property
    def has_masks(self):
        return any(s.mask is not None for s in self.scans)
