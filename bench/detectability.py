"""Could anything see each finding on its slice? `python benchmark.py detectability`: the ideal observer.

A learnt encoder is judged against the floor and the ceiling of docs/results.md; this puts a bound above both. For
each finding of each slice of the demo's cohort it asks how well the best possible observer tells the slice with
the finding from the same slice without it, when it is told where to look and what the finding looks like
(the signal-known-exactly ideal observer; Barrett & Myers, "Foundations of Image Science", ch. 13):

    s  = g(with) - g(without)           the finding's signal in the image, both drawn without noise (HU)
    K  = sigma^2 M M^T                   the noise's covariance: white noise of sigma (phantom.noise_hu) through
                                         M, the phantom's blur and the pipeline's resize (linear, both)
    d'^2 = s^T K^-1 s                    detectability; AUROC = Phi(d' / sqrt 2)

Both M are separable, M = M1 (x) M1 along y and x, so with S the (H, W) signal and A = M1 M1^T (H, H):

    d'^2 = tr(S^T A^-1 S A^-1) / sigma^2       (vec S)^T (A (x) A)^-1 vec S, without the (HW, HW) matrix

at the cohort's 128 px (M1 = the blur) and at the encoders' 64 px (M1 = resize o blur, data.prepare_slices's).
An observer that must also search the slice for the finding needs more: Rose's criterion, d' of about 5, is the
usual figure for a signal at an unknown place (Burgess, "The Rose model, revisited", JOSA A 1999). A finding
below it is hard to find for any observer; one far above it that no encoder finds is a learning problem. The
bound ignores anatomy that looks like the finding (a vessel seen end-on is as round and as dense as a lung
nodule), so it is a bound, not a forecast.
"""
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.learning import LearningConfig
from files import atomic_path
from phantom import BLUR_PX, LUNG_EMPHYSEMA, LUNG_GGO, SITES, _blur, make_phantom

NAMES = {**{i + 1: s for i, s in enumerate(SITES)}, LUNG_GGO: "ground glass", LUNG_EMPHYSEMA: "emphysema"}
ROSE = 5.0  # d' that a search for a signal at an unknown place needs (Rose's criterion)
MIN_VOXELS = 4  # a slice counts for a finding from this many voxels of it, as in the twin test (bench/probe.py)


def blur_matrix(n):
    """(n, n) matrix of phantom._blur along one axis: blur(x) = B1 x, edge padding included."""
    eye = np.eye(n, dtype=np.float32)[:, :, None]  # (n, n, 1): _blur's axis 1 holds the basis vectors
    return torch.as_tensor(_blur(eye, BLUR_PX)[:, :, 0].T, dtype=torch.float64)  # (n, n)


def resize_matrix(n, m):
    """(m, n) matrix of data.prepare_slices's antialiased bilinear resize from n to m pixels along one axis."""
    eye = torch.eye(n, dtype=torch.float64)[:, None, None, :]  # (n, 1, 1, n): one basis row each
    out = F.interpolate(eye, size=(1, m), mode="bilinear", antialias=True, align_corners=False)  # (n, 1, 1, m)
    return out[:, 0, 0, :].T  # (m, n)


def dprime(signal, sigma, m1):
    """Ideal-observer d' of `signal` (H, W) in white noise of `sigma` seen through m1 (x) m1, m1 (H, H0): the
    signal is in the seen frame already (it went through the same blur and resize)."""
    a_inv = torch.linalg.inv(m1 @ m1.T)  # (H, H)
    s = torch.as_tensor(signal, dtype=torch.float64)  # (H, W)
    return math.sqrt(max(float(torch.trace(s.T @ a_inv @ s @ a_inv)), 0.0)) / sigma


def measure(cfg, patients, img_size):
    """{finding: [(patient, slice, voxels, mean |contrast| HU, d' at the cohort's size, d' at img_size)]}."""
    blur, resize = blur_matrix(cfg.size), resize_matrix(cfg.size, img_size)  # (n, n), (S, n)
    out = {}
    for patient in patients:
        a = make_phantom(cfg, patient, noise=False)
        b = make_phantom(cfg, patient, findings=False, noise=False)
        diff = torch.as_tensor(a.hu, dtype=torch.float64) - torch.as_tensor(b.hu)  # (Z, Y, X): every finding
        for label in np.unique(a.mask[a.mask > 0]).tolist():
            on = torch.as_tensor(a.mask == label)  # (Z, Y, X)
            for z in torch.nonzero(on.flatten(1).sum(1) >= MIN_VOXELS)[:, 0].tolist():
                near = F.max_pool2d(on[z][None].float(), 5, 1, 2)[0] > 0  # (Y, X): the blur's 5-tap reach
                s = torch.where(near, diff[z], 0.0)  # (Y, X): this finding's signal alone
                out.setdefault(NAMES[label], []).append(
                    (patient, z, int(on[z].sum()), float(diff[z][on[z]].abs().mean()),
                     dprime(s, a.noise_hu, blur), dprime(resize @ s @ resize.T, a.noise_hu, resize @ blur)))
    return out


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def table(found, size, img_size):
    """Markdown, one row per finding: medians over its slices, and the share of slices at Rose's criterion."""
    lines = [f"| finding | slices | patients | voxels on the slice (median) | contrast, HU | d' at {size} px | "
             f"d' at {img_size} px | ideal AUROC at {img_size} px | slices at d' >= {ROSE:g}, {img_size} px |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = [NAMES[k] for k in sorted(NAMES)]
    for name in sorted(found, key=order.index):
        v = np.array(found[name])  # (n, 6)
        lines.append(f"| {name} | {len(v)} | {len(set(v[:, 0]))} | {np.median(v[:, 2]):.0f} | "
                     f"{np.median(v[:, 3]):.0f} | {np.median(v[:, 4]):.1f} | {np.median(v[:, 5]):.1f} | "
                     f"{phi(np.median(v[:, 5]) / math.sqrt(2)):.3f} | {np.mean(v[:, 5] >= ROSE):.0%} |")
    return "\n".join(lines)


def command(args):
    """Write OUT/detectability.md and .json for the first --patients of the demo's cohort."""
    cfg, out = LearningConfig(), Path(args.out)
    found = measure(cfg.cohort, range(args.patients), cfg.img_size)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "detectability.json") as tmp:
        tmp.write_text(json.dumps({"patients": args.patients, "cohort": asdict(cfg.cohort), "img_size": cfg.img_size,
                                   "columns": ["patient", "slice", "voxels", "contrast", "d_full", "d_small"],
                                   "slices": found}))
    md = (f"# Ideal-observer detectability\n\n`python benchmark.py detectability --patients {args.patients} --out "
          f"{args.out}` (bench/detectability.py): the first {args.patients} patients of the demo's cohort, every "
          f"slice with {MIN_VOXELS} or more voxels of a finding, medians over those slices.\n\n"
          + table(found, cfg.cohort.size, cfg.img_size) + "\n")
    with atomic_path(out / "detectability.md") as tmp:
        tmp.write_text(md)
    print(md)
