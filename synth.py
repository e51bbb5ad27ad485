"""The synthetic cohort as a cohort folder (`python clear.py synth`): phantom.make_phantom for each (patient, scan)
of the plan, stored as images/ and masks/ NIfTI in varied orientations and dtypes, as real exports are, and
labels.csv with the findings; synth.json records the settings. Each scan is a function of (seed, patient, scan),
so a cohort is reproducible file for file, for any number of worker processes.
"""
import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from data import save_nifti
from cohort import Cohort
from files import ClearError, atomic_path, forked_map
from phantom import ENDPOINTS, make_phantom


def cohort_plan(cfg):
    """(patient, scan) pairs of the cohort: patients in order, a share of them scanned twice."""
    plan, patient = [], 0
    while len(plan) < cfg.n:
        repeat = np.random.default_rng([cfg.seed, patient, 9]).random() < cfg.follow_up
        plan += [(patient, k) for k in range(1 + repeat)][: cfg.n - len(plan)]
        patient += 1
    return plan


STORAGE = (("RAS", np.int16), ("LPS", np.int16), ("LAS", np.int16), ("PRS", np.int16), ("RAS", np.uint16))
STORAGE_P = (0.4, 0.3, 0.1, 0.1, 0.1)  # how often each (orientation, dtype) is drawn
SYNTH_FORMAT = 2  # in synth.json: what a cohort's files are; cohorts of another format are drawn again


def save_scan(ph, out, name, storage):
    """Write phantom `ph` as images/<name>.nii.gz (HU) and masks/<name>.nii.gz, stored as `storage`, one of
    STORAGE: DICOM-like LPS, a permuted axis order, or uint16 with intercept -1024, as in real exports."""
    axcodes, dtype = storage
    inter = -1024.0 if dtype == np.uint16 else 0.0  # uint16 holds HU + 1024, as many scanners store it
    save_nifti(Path(out) / "images" / f"{name}.nii.gz", ph.hu, ph.affine, dtype, inter=inter, axcodes=axcodes)
    save_nifti(Path(out) / "masks" / f"{name}.nii.gz", ph.mask, ph.affine, np.uint8, axcodes=axcodes)


def write_scan(cfg, out, patient, scan):
    """Draw one scan, store it in a drawn STORAGE variant (the loader must undo every one); returns its
    labels row."""
    ph = make_phantom(cfg, patient, scan)
    name = f"P{patient:04d}_S{scan + 1}"
    rng = np.random.default_rng([cfg.seed, patient, 8, scan])
    save_scan(ph, out, name, STORAGE[rng.choice(len(STORAGE), p=STORAGE_P)])
    return {"patient": f"P{patient:04d}", "scan": name, **ph.labels}


def write_cohort(cfg, out, progress=lambda it, total: it):
    """Write the whole cohort into `out` (images/, masks/, labels.csv, synth.json); returns the label rows.
    `progress` wraps the iterator of finished scans (the CLI passes a tqdm bar)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    plan = cohort_plan(cfg)
    jobs = [(cfg, out, p, k) for p, k in plan]
    if cfg.workers > 1:
        rows = list(progress(forked_map(_write_job, jobs, cfg.workers, f"synth {out}"), len(jobs)))
    else:
        rows = list(progress(map(_write_job, jobs), len(jobs)))
    with atomic_path(out / "labels.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, ["patient", "scan", *ENDPOINTS])
            writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out / "synth.json") as tmp:
        tmp.write_text(json.dumps({"format": SYNTH_FORMAT, **asdict(cfg)}, indent=1))
    return rows


def drawn(cfg, folder, progress=lambda it, total: it):
    """The cohort `cfg` in `folder` (a cohort.Cohort): drawn by write_cohort on first use, reused after; a folder
    drawn otherwise (other settings, another SYNTH_FORMAT) is refused in one line."""
    if not (Path(folder) / "labels.csv").exists():
        write_cohort(cfg, folder, progress)
    if not drawn_as(folder, cfg):
        raise ClearError(f"{folder}: drawn with other settings or by another version (its synth.json) than this "
                         "run's; use another work folder")
    return Cohort(folder)


def drawn_as(folder, cfg):
    """Whether `folder` holds a whole cohort that write_cohort drew with `cfg` (worker processes aside: the same
    scans come out for any number) in this SYNTH_FORMAT, so that a run may reuse it instead of drawing again."""
    record = Path(folder) / "synth.json"
    if not (Path(folder) / "labels.csv").is_file() or not record.is_file():
        return False
    try:
        drawn = json.loads(record.read_text())
    except ValueError:
        return False
    return isinstance(drawn, dict) and {**drawn, "workers": 0} == json.loads(json.dumps(
        {"format": SYNTH_FORMAT, **asdict(replace(cfg, workers=0))}))


def _write_job(job):
    return write_scan(*job)
