"""The synthetic CT cohort: neck-to-pelvis phantoms with known findings (synth.py writes them as a cohort folder).

CLEAR cannot download CT here, and a user should be able to try the tool before pointing it at their own
scans, so `python clear.py synth` draws a cohort that looks like CT to the code: integer NIfTI in Hounsfield
units with proper affines, varying spacing, slice count and stored orientation, plausible anatomy, scanner
noise, and findings in a lesion mask. It poses the paper's three tasks with known ground truth:

- tumour location: lesions in the 8 DeepLesion sites (bone, abdomen, mediastinum, liver, lung, kidney, soft
  tissue, pelvis), small (5-30 mm) and of low contrast to their host tissue (tens of HU, except the
  inherently dense lung nodules and mediastinal nodes), covering a few slices of a scan: a model that
  does not look at lesions cannot solve it;
- lung disease: ground-glass/consolidation patches or emphysema-like low-attenuation areas;
- stage 0-3, derived from the findings by `stage_of` (a simplified TNM):
    0 no tumour; 1 one organ site, every lesion < 20 mm; 2 one organ site with a lesion >= 20 mm, or any
    nodal station (mediastinum, abdomen) involved; 3 distant metastasis: two or more organ sites.

Geometry is built in mm on the canonical RAS+ grid (Z, Y, X): z inferior -> superior, y posterior ->
anterior, x patient-left -> patient-right; body regions by height fraction h of the scanned length:
pelvis h < 0.22, abdomen 0.22-0.52, chest 0.52-0.86, neck above. Everything is a function of
(seed, patient, scan), so a cohort is reproducible file for file.
"""
from dataclasses import dataclass

import numpy as np


SITES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis")
ORGAN_SITES = ("bone", "liver", "lung", "kidney", "soft_tissue", "pelvis")  # a second one = metastasis
NODAL_SITES = ("mediastinum", "abdomen")
LUNG_GGO, LUNG_EMPHYSEMA = 9, 10  # mask labels of lung disease; tumours of site i have label i + 1
ENDPOINTS = ("lung_disease", "ground_glass", "emphysema", "stage") + tuple(f"loc_{s}" for s in SITES)  # labels.csv's
#           columns; ground_glass and emphysema split lung disease: 1 with that finding, 0 without lung disease,
#           blank (unknown, so left out of a fit) with the other one

# Tissue ids of the organ map (returned, not written): where each site's lesions may lie.
AIR, FAT, MUSCLE, LUNG, HEART, MEDIASTINUM, LIVER, SPLEEN, KIDNEY, BOWEL, BLADDER, BONE, PELVIS, AORTA, \
    NECK = range(15)
SITE_TISSUE = {"bone": BONE, "abdomen": BOWEL, "mediastinum": MEDIASTINUM, "liver": LIVER, "lung": LUNG,
               "kidney": KIDNEY, "soft_tissue": MUSCLE, "pelvis": PELVIS}
# Lesion density: (HU of the lesion relative to its host tissue, or absolute HU for lesions in air/fat).
LESION_HU = {"bone": ("rel", -150.0), "abdomen": ("rel", 35.0), "mediastinum": ("abs", 30.0),
             "liver": ("rel", -35.0), "lung": ("abs", 20.0), "kidney": ("rel", -30.0),
             "soft_tissue": ("rel", 30.0), "pelvis": ("rel", 35.0)}


@dataclass(frozen=True)
class SynthConfig:
    n: int = 200  # scans; enough for every label to have both classes
    seed: int = 0
    workers: int = 2  # processes drawing scans in parallel (one per core here)
    size: int = 128  # in-plane grid; real CT is 512, so pixel spacing is 0.6-0.9 mm x 512 / size
    thickness: tuple = (1.0, 5.0)  # slice thickness range in mm, drawn per scan
    contrast: float = 1.0  # difficulty knob: scales every lesion's HU difference to its host
    lesion_scale: float = 1.0  # difficulty knob: scales lesion diameters (5-30 mm at 1.0)
    follow_up: float = 0.2  # share of patients with a second scan (a patient's scans share findings)


@dataclass
class Phantom:
    hu: np.ndarray  # (Z, Y, X) float32, canonical RAS+
    mask: np.ndarray  # (Z, Y, X) uint8: 0 background, 1-8 tumour by site, 9 ground glass, 10 emphysema
    tissue: np.ndarray  # (Z, Y, X) uint8 tissue ids (the organ map), for tests and inspection
    spacing: tuple  # (z, y, x) mm
    affine: np.ndarray  # (4, 4) voxel (x, y, z) -> RAS+ mm
    labels: dict  # endpoint -> int
    lesions: list  # (site, diameter_mm) per tumour lesion
    noise_hu: float  # sigma of the white scanner noise before the blur (HU); drawn per scan


def stage_of(lesions):
    """Stage 0-3 from the tumour lesions [(site, diameter_mm), ...] (see the module docstring)."""
    organs = {s for s, _ in lesions if s in ORGAN_SITES}
    if not lesions:
        return 0
    if len(organs) >= 2:
        return 3
    if any(s in NODAL_SITES for s, _ in lesions) or max(d for _, d in lesions) >= 20:
        return 2
    return 1


def draw_findings(rng, cfg):
    """Tumour lesions [(site, diameter_mm)] for a drawn target stage, and the lung disease (0/None, 9, 10)."""
    size = lambda lo, hi: float(rng.uniform(lo, hi)) * cfg.lesion_scale  # noqa: E731
    stage = rng.choice(4, p=[0.3, 0.25, 0.25, 0.2])
    organs = list(rng.choice(ORGAN_SITES, size=1 + (stage == 3) * rng.integers(1, 3), replace=False))
    lesions = []
    if stage >= 1:
        big = stage == 2 and rng.random() < 0.5
        lesions.append((organs[0], size(20, 30) if big else size(5, 18)))
        if stage == 2 and not big:
            lesions.append((str(rng.choice(NODAL_SITES)), size(10, 25)))
        for site in organs[1:]:
            lesions += [(site, size(5, 25)) for _ in range(rng.integers(1, 3))]
        if stage == 3 and rng.random() < 0.4:
            lesions.append((str(rng.choice(NODAL_SITES)), size(10, 25)))
    disease = [0, LUNG_GGO, LUNG_EMPHYSEMA][rng.choice(3, p=[0.6, 0.2, 0.2])]
    return [(str(s), d) for s, d in lesions], disease


class Canvas:
    """A (Z, Y, X) volume in mm coordinates with ellipsoid painting: HU, tissue ids and the lesion mask."""

    def __init__(self, shape, spacing, origin):
        self.hu = np.full(shape, -1000.0, np.float32)
        self.tissue = np.zeros(shape, np.uint8)
        self.mask = np.zeros(shape, np.uint8)
        self.axes = [o + np.arange(n) * s for n, s, o in zip(shape, spacing, origin)]  # mm along z, y, x

    def ellipsoid(self, center, radii, value=None, tissue=None, inside=None):
        """The voxels of an axis-aligned ellipsoid (restricted to the tissues `inside`, if given) as
        (bounding-box slices, boolean (z, y, x) mask within the box); paints `value`/`tissue` if given."""
        box, d = [], 0.0
        for axis, (c, r) in enumerate(zip(center, radii)):
            lo, hi = np.searchsorted(self.axes[axis], [c - r, c + r])
            box.append(slice(lo, hi))
            shape = [1, 1, 1]
            shape[axis] = hi - lo
            d = d + ((self.axes[axis][lo:hi] - c) / r).reshape(shape) ** 2
        box = tuple(box)
        hit = np.broadcast_to(d <= 1.0, self.hu[box].shape).copy()  # (z, y, x) of the box
        if inside is not None:
            hit &= np.isin(self.tissue[box], inside)
        if value is not None:
            self.hu[box][hit] = value
        if tissue is not None:
            self.tissue[box][hit] = tissue
        return box, hit


def _interp(h, knots):
    """Piecewise-linear profile over height fraction h: knots = [(h, value), ...]."""
    return np.interp(h, [k for k, _ in knots], [v for _, v in knots])


def _body(cv, rng, height, girth):
    """Subcutaneous fat, muscle wall and body cavity, slice by slice; returns the cavity half-axes (Z,)."""
    h = (cv.axes[0] - cv.axes[0][0]) / height  # (Z,) height fraction
    ax = girth * _interp(h, [(0, 170), (0.22, 165), (0.5, 160), (0.55, 170), (0.84, 165), (0.9, 65), (1, 60)])
    ay = girth * _interp(h, [(0, 115), (0.22, 115), (0.5, 120), (0.55, 112), (0.84, 110), (0.9, 58), (1, 55)])
    fat = rng.uniform(8, 30) * girth * np.clip((0.9 - h) * 10, 0.3, 1)  # (Z,), thin in the neck
    wall = fat + rng.uniform(10, 18)
    Y2, X2 = (cv.axes[1][:, None] ** 2).astype(np.float32), (cv.axes[2][None, :] ** 2).astype(np.float32)
    cavity = np.select([h < 0.22, h < 0.52, h < 0.86], [PELVIS, BOWEL, MEDIASTINUM], NECK)[:, None, None]
    cavity_hu = np.select([h < 0.22, h < 0.52, h < 0.86], [35.0, 30.0, -80.0], 40.0)[:, None, None]
    layers = []  # (Z, Y, X) masks: inside the skin, the muscle wall, the cavity
    for inset in (0, fat, wall):
        rx2, ry2 = ((ax - inset) ** 2)[:, None, None], ((ay - inset) ** 2)[:, None, None]  # (Z, 1, 1)
        layers.append(X2 / rx2 + Y2 / ry2 <= 1)
    cv.tissue[:] = np.select(layers[::-1], [cavity, MUSCLE, FAT], AIR)
    cv.hu[:] = np.select(layers[::-1], [cavity_hu, 45.0, -100.0], -1000.0)
    return ax - wall, ay - wall


def _anatomy(cv, rng, height, girth):
    """Organs, bones and vessels at their heights, with per-patient sizes and positions."""
    cx, cy = _body(cv, rng, height, girth)
    z0, z1 = cv.axes[0][0], cv.axes[0][-1]
    H = lambda f: z0 + f * height  # noqa: E731  (height fraction -> z in mm)
    j = lambda s=8.0: rng.normal(0, s)  # noqa: E731  (positional jitter, mm)
    s = lambda: rng.uniform(0.85, 1.15)  # noqa: E731  (size variation)
    w, d = float(cx.max()), float(cy.max())  # half-width and half-depth of the trunk cavity
    spine = lambda z: 25 - np.interp(z, cv.axes[0], cy)  # noqa: E731  (vertebral body's y at height z)
    for zc in np.arange(z0, z1, 30.0):  # vertebrae: cancellous bone (cortex comes from the blur), discs
        cv.ellipsoid((zc + 12, spine(zc), 0), (12, 16, 16), 400.0, BONE)
        cv.ellipsoid((zc + 12, spine(zc) - 22, 0), (12, 6, 6), 15.0, MUSCLE)  # spinal canal
        cv.ellipsoid((zc + 27, spine(zc), 0), (3, 16, 16), 80.0, MUSCLE)  # disc
    cavity = (PELVIS, BOWEL, MEDIASTINUM, NECK)
    for side in (-1, 1):
        cv.ellipsoid((H(0.69) + j(), 5 + j(4), side * (0.48 * w + j(4))),
                     (0.15 * height * s(), 0.8 * d * s(), 0.4 * w * s()), -850.0, LUNG, inside=cavity)
        cv.ellipsoid((H(0.15), -0.2 * d + j(4), side * 0.62 * w), (0.09 * height, 50 * s(), 12), 450.0, BONE)
        cv.ellipsoid((H(0.04), j(3), side * 0.45 * w), (24, 24, 24), 450.0, BONE)  # femoral heads
        kidney = (H(0.36) + j(), spine(H(0.36)) + 12, side * (0.33 * w + j(3)))
        cv.ellipsoid(kidney, (65, 38, 38), -90.0, FAT, inside=(BOWEL,))  # perirenal fat
        cv.ellipsoid(kidney, (55 * s(), 28 * s(), 28 * s()), 35.0, KIDNEY, inside=(FAT,))
    for zc in np.arange(H(0.55), H(0.86), 22.0):  # ribs: small ovals in the chest wall, none in front
        rx, ry = np.interp(zc, cv.axes[0], cx) + 6, np.interp(zc, cv.axes[0], cy) + 6
        for t in np.linspace(0.12, 0.75, 6) * np.pi:  # angle from the back; ribs slope down to the front
            for side in (-1, 1):
                c = (zc - 12 * t / np.pi, -ry * np.cos(t), side * rx * np.sin(t))
                cv.ellipsoid(c, (6, 6, 7), 700.0, BONE, inside=(MUSCLE,))
    cv.ellipsoid((H(0.6) + j(), 0.3 * d + j(4), -0.15 * w + j(4)), (45 * s(), 50 * s(), 55 * s()), 40.0, HEART,
                 inside=(MEDIASTINUM, LUNG))
    cv.ellipsoid((H(0.47) + j(), 0.05 * d + j(4), 0.4 * w + j(4)), (70 * s(), 0.75 * d * s(), 0.5 * w * s()),
                 60.0, LIVER, inside=(BOWEL, MEDIASTINUM))
    cv.ellipsoid((H(0.47) + j(), -0.3 * d + j(4), -0.6 * w + j(4)), (45 * s(), 40 * s(), 25 * s()),
                 50.0, SPLEEN, inside=(BOWEL,))
    cv.ellipsoid((H(0.1) + j(), 0.35 * d + j(4), j(4)), (35 * s(), 40 * s(), 45 * s()), 10.0, BLADDER,
                 inside=(PELVIS,))
    for zc in np.arange(H(0.25), H(0.72), 5.0):  # aorta: a tube of stacked discs
        cv.ellipsoid((zc, spine(zc) + 28, -12), (4, 12, 12), 45.0, AORTA, inside=(BOWEL, MEDIASTINUM))
    for zc in np.arange(H(0.72), z1, 5.0):  # trachea
        cv.ellipsoid((zc, spine(zc) + 40, 0), (4, 9, 9), -1000.0, NECK, inside=cavity)
    for _ in range(rng.integers(40, 80)):  # mesenteric fat and bowel gas
        c = (rng.uniform(H(0.05), H(0.5)), rng.uniform(-0.5, 0.8) * d, rng.uniform(-0.8, 0.8) * w)
        cv.ellipsoid(c, rng.uniform(6, 20, 3), rng.choice([-90.0, -90.0, -1000.0]), None, inside=(BOWEL, PELVIS))
    for _ in range(rng.integers(40, 70)):  # pulmonary vessels: thin and elongated (nodules are round)
        c = (rng.uniform(H(0.55), H(0.84)), rng.uniform(-0.6, 0.8) * d, rng.uniform(-0.9, 0.9) * w)
        r = rng.permutation([rng.uniform(1.5, 3), rng.uniform(1.5, 3), rng.uniform(8, 25)])
        cv.ellipsoid(c, r, 40.0, None, inside=(LUNG,))
    return H


def _lung_disease(cv, rng, kind, contrast, H):
    """Diffuse lung disease, inside the lungs only: ground glass (+250 HU, some patches consolidated, +850)
    over several lobes, or emphysema: many low-attenuation holes (-130 HU, so below -950) in the upper lungs,
    together a few to 15 % of the lung, as in disease that a radiologist would call."""
    n, radius, top = ((rng.integers(3, 8), (20, 45), H(0.55)) if kind == LUNG_GGO else
                      (rng.integers(100, 250), (3, 8), H(0.62)))
    for _ in range(n):
        c = (rng.uniform(top, H(0.84)), rng.uniform(-80, 80), rng.choice([-1, 1]) * rng.uniform(30, 120))
        box, hit = cv.ellipsoid(c, rng.uniform(*radius, 3), inside=(LUNG,))
        hit &= cv.mask[box] != kind  # overlapping patches do not add up
        delta = {LUNG_EMPHYSEMA: -130.0, LUNG_GGO: rng.choice([250.0, 250.0, 850.0])}[kind]
        cv.hu[box][hit] += contrast * delta
        cv.mask[box][hit] = kind


def _lesion(cv, rng, site, diameter, contrast):
    """A tumour in `site`'s host tissue, centred on a random host voxel; False if none could be placed."""
    tissue = SITE_TISSUE[site]
    where = np.flatnonzero(cv.tissue == tissue)
    for _ in range(20):  # retry until most of the lesion lies in its host tissue
        center = np.unravel_index(rng.choice(where), cv.hu.shape)
        center = [ax[i] for ax, i in zip(cv.axes, center)]
        radii = diameter / 2 * rng.uniform(0.8, 1.2, 3)
        box, hit = cv.ellipsoid(center, radii)
        inside = hit & (cv.tissue[box] == tissue)
        if inside.sum() >= max(1, 0.6 * hit.sum()):
            kind, hu = LESION_HU[site]
            cv.hu[box][inside] = (cv.hu[box][inside] + contrast * hu if kind == "rel" else
                                  HOST_HU[tissue] + contrast * (hu - HOST_HU[tissue]))
            cv.mask[box][inside] = SITES.index(site) + 1
            return True
    return False


BLUR_PX = 0.7  # in-plane Gaussian blur sigma (pixels) after the noise: partial volume, correlated noise
HOST_HU = {LUNG: -850.0, MEDIASTINUM: -80.0}  # hosts of the lesions given in absolute HU


def _blur(hu, sigma_px):
    """Separable in-plane Gaussian blur (5 taps) of a (Z, Y, X) volume: partial volume, correlated noise."""
    k = np.exp(-0.5 * (np.arange(-2, 3) / sigma_px) ** 2).astype(np.float32)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (2, 2)
        p, n = np.pad(hu, pad, mode="edge"), hu.shape[axis]
        hu = sum(w * p.take(np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return hu


def make_phantom(cfg, patient, scan=0, findings=True, noise=True):
    """One scan of one patient: anatomy and findings from (seed, patient), acquisition from the scan.
    findings=False: its twin, the same scan with the findings drawn but not painted (same anatomy, placement and
    noise, labels all 0): probe.twin_slices compares the two. noise=False: the same scan without its noise field
    (noise_hu still says how much it would have), for the ideal observer of bench/detectability.py."""
    rng_f, rng_a, rng_s = (np.random.default_rng([cfg.seed, patient, k, scan * (k == 2)]) for k in range(3))
    lesions, disease = draw_findings(rng_f, cfg)
    height, girth = rng_a.uniform(480, 560), rng_a.uniform(0.85, 1.1)
    pixel = rng_s.uniform(max(0.6, (2 * 170 * girth + 30) / 512), 0.9) * 512 / cfg.size  # mm, body fits
    dz = round(rng_s.uniform(*cfg.thickness) * 4) / 4
    nz = int(height // dz) + 1
    shift = rng_s.normal(0, 8, 2)  # where the table put the patient
    origin = (-rng_s.uniform(900, 1100), -cfg.size / 2 * pixel + shift[0], -cfg.size / 2 * pixel + shift[1])
    cv = Canvas((nz, cfg.size, cfg.size), (dz, pixel, pixel), origin)
    H = _anatomy(cv, rng_a, height, girth)
    healthy = None if findings else (cv.hu.copy(), cv.mask.copy())
    if disease:
        _lung_disease(cv, rng_f, disease, cfg.contrast, H)
    placed = [(s, d) for s, d in lesions if _lesion(cv, rng_s, s, d, cfg.contrast)]
    if healthy is not None:  # every random draw made as above, so the noise below is the same
        (cv.hu, cv.mask), disease, placed = healthy, 0, []
    sigma = rng_s.uniform(8, 20) * 2.5  # HU before the blur, which lowers it about 2.5x
    hu = cv.hu + rng_s.standard_normal(cv.hu.shape, dtype=np.float32) * (sigma if noise else 0.0)
    hu = np.clip(np.rint(_blur(hu, BLUR_PX)), -1024, 3071).astype(np.float32)
    labels = {"lung_disease": int(disease > 0), "stage": stage_of(placed)}
    labels.update({name: int(disease == kind) if disease in (0, kind) else None  # None: the other finding
                   for name, kind in (("ground_glass", LUNG_GGO), ("emphysema", LUNG_EMPHYSEMA))})
    labels.update({f"loc_{s}": int(any(p == s for p, _ in placed)) for s in SITES})
    affine = np.diag([pixel, pixel, dz, 1.0])
    affine[:3, 3] = origin[::-1]  # (x, y, z) of voxel 0
    return Phantom(hu, cv.mask, cv.tissue, (dz, pixel, pixel), affine, labels, placed, float(sigma))
