"""The ideal observer of bench/detectability.py: its matrices are the phantom's blur and the pipeline's resize, its
d' is the Kronecker form of s^T K^-1 s, and a simulated matched filter in the phantom's own noise scores the AUROC
that d' predicts."""
import math

import numpy as np
import torch
import torch.nn.functional as F

import phantom as P
from bench.detectability import NAMES, blur_matrix, dprime, measure, phi, resize_matrix
from metrics import auroc


def test_the_matrices_are_the_blur_and_the_resize_they_stand_for():
    x = np.random.default_rng(0).normal(size=(1, 20, 20)).astype(np.float32)
    b = blur_matrix(20)  # (20, 20)
    assert np.allclose((b @ torch.as_tensor(x[0], dtype=torch.float64) @ b.T).numpy(), P._blur(x, P.BLUR_PX)[0],
                       atol=1e-5)
    r = resize_matrix(20, 8)  # (8, 20)
    seen = F.interpolate(torch.as_tensor(x, dtype=torch.float64)[None], size=(8, 8), mode="bilinear",
                         antialias=True, align_corners=False)[0, 0]  # data.prepare_slices's resize
    assert torch.allclose(r @ torch.as_tensor(x[0], dtype=torch.float64) @ r.T, seen, atol=1e-10)


def full_dprime(s, sigma, m):
    """The definition, with no Kronecker shortcut: sqrt(s^T K^-1 s), K = sigma^2 M M^T, for a flattened signal s
    (P,) and the whole operator M (P, Q) from white noise to the seen image."""
    return math.sqrt(float(s @ torch.linalg.solve(sigma**2 * m @ m.T, s)))


def test_dprime_is_s_K_inverse_s_with_the_full_covariance():
    rng = np.random.default_rng(1)
    for m1 in (resize_matrix(12, 6) @ blur_matrix(12),  # (6, 12)
               blur_matrix(12)):  # square, edges included: the blur alone
        s = torch.as_tensor(rng.normal(size=(len(m1), len(m1))))
        want = full_dprime(s.flatten(), 3.0, torch.kron(m1, m1))  # row-major vec
        assert math.isclose(dprime(s, 3.0, m1), want, rel_tol=1e-9)


def test_a_matched_filter_in_the_phantoms_noise_scores_the_auroc_that_dprime_predicts():
    n, sigma, trials = 16, 30.0, 4000
    yy, xx = np.mgrid[:n, :n]
    disk = ((yy - 7.5) ** 2 + (xx - 8.2) ** 2 <= 4).astype(np.float32) * -12.0  # a faint dark lesion, pre-blur
    signal = P._blur(disk[None], P.BLUR_PX)[0]  # (n, n) as the image shows it
    blur = blur_matrix(n)
    d = dprime(signal, sigma, blur)
    assert 1.0 < d < 3.0  # a figure where the AUROC is far from 0.5 and from 1
    rng = np.random.default_rng(2)
    noise = P._blur(rng.standard_normal((2 * trials, n, n)).astype(np.float32) * sigma, P.BLUR_PX)  # the phantom's
    a_inv = torch.linalg.inv(blur @ blur.T)
    template = (a_inv @ torch.as_tensor(signal, dtype=torch.float64) @ a_inv).numpy()  # K^-1 s, up to sigma^2
    score = (noise.astype(np.float64) * template).sum((1, 2))  # (2T,) the prewhitening matched filter
    score[:trials] += (signal * template).sum()  # the first half holds the lesion
    found = auroc(np.arange(2 * trials) < trials, score)
    assert abs(found - phi(d / math.sqrt(2))) < 0.02


def test_without_noise_the_phantom_is_the_same_scan_and_says_its_noise():
    cfg = P.SynthConfig(n=4, size=48, thickness=(4.0, 5.0), workers=1)
    a, quiet = P.make_phantom(cfg, 1), P.make_phantom(cfg, 1, noise=False)
    assert np.array_equal(a.mask, quiet.mask) and a.labels == quiet.labels and a.noise_hu == quiet.noise_hu
    assert 20.0 <= a.noise_hu <= 50.0
    k = np.exp(-0.5 * (np.arange(-2, 3) / P.BLUR_PX) ** 2)
    gain = (k ** 2).sum() / k.sum() ** 2  # per axis: the blur scales white noise's sd by sqrt(gain)
    inside = (a.hu > -1000) & (a.hu < 3000) & (quiet.hu > -1000) & (quiet.hu < 3000)  # unclipped
    sd = float((a.hu - quiet.hu)[:, 3:-3, 3:-3][inside[:, 3:-3, 3:-3]].std())
    assert abs(sd / (a.noise_hu * gain) - 1) < 0.05


def test_measure_matches_the_full_covariance_built_from_the_phantoms_own_blur_and_the_pipelines_resize():
    cfg = P.SynthConfig(n=4, size=48, thickness=(4.0, 5.0), workers=1)
    found = measure(cfg, [0], 24)  # patient 0: a liver tumour and emphysema
    ph, twin = P.make_phantom(cfg, 0, noise=False), P.make_phantom(cfg, 0, findings=False, noise=False)
    held = {int(v) for v in np.unique(ph.mask) if v and (ph.mask == v).reshape(len(ph.mask), -1).sum(1).max() >= 4}
    assert set(found) == {NAMES[v] for v in held} and len(held) >= 2
    n = cfg.size  # the full operators, one basis image at a time: _blur and F.interpolate themselves, edges included
    basis = np.eye(n * n, dtype=np.float32).reshape(n * n, n, n)
    full = torch.as_tensor(P._blur(basis, P.BLUR_PX), dtype=torch.float64).reshape(n * n, n * n).T  # (n^2, n^2)
    small = F.interpolate(full.T.reshape(n * n, 1, n, n), size=(24, 24), mode="bilinear", antialias=True,
                          align_corners=False).reshape(n * n, 576).T  # (576, n^2): resize o blur
    for name, rows in found.items():
        label = next(v for v in held if NAMES[v] == name)
        patient, z, voxels, _, d_full, d_small = rows[0]
        on = ph.mask[z] == label  # (Y, X)
        near = np.zeros_like(on)
        for dy in range(-2, 3):  # the 5 x 5 reach, by shifts
            for dx in range(-2, 3):
                near |= np.roll(np.roll(np.pad(on, 2), dy, 0), dx, 1)[2:-2, 2:-2]
        s = torch.as_tensor(np.where(near, ph.hu[z].astype(np.float64) - twin.hu[z], 0.0)).flatten()  # (n^2,)
        assert math.isclose(d_full, full_dprime(s, ph.noise_hu, full), rel_tol=1e-6)
        seen = F.interpolate(s.reshape(1, 1, n, n), size=(24, 24), mode="bilinear", antialias=True,
                             align_corners=False).flatten()  # (576,)
        assert math.isclose(d_small, full_dprime(seen, ph.noise_hu, small), rel_tol=1e-6)
        assert voxels == int(on.sum()) and 0 < d_small <= d_full
