"""Diagnostics of a slice encoder: `python benchmark.py probe` on its bags, `benchmark.py twin` on synthetic twins,
and columns of `benchmark.py accuracy`.

- slice_probe (watch.py, where `clear.py pretrain --probe-every` uses it): does the encoder see lesions? A linear
  probe of per-slice lesion flags (from the masks) on the slice embeddings, in held-out patients. The MIL never
  sees slice labels; the probe is a diagnosis of the encoder, not part of the method.
- first_axis: has it collapsed onto anatomy? The first principal axis's share of the variance and its
  correlation with slice height. models.effective_rank (RankMe) is the other half of that reading.
- twin_probe: does it see a finding with everything else held fixed? Each synthetic scan against its twin, the
  same scan without the finding (phantom.make_phantom(findings=False): same anatomy, acquisition and noise): a
  linear probe of "with or without" on the twin slices' embeddings, in held-out patients. Unlike slice_probe,
  no other property of the slice (its height in the body, above all) can stand in for the finding.
- twin_direction + scan_reading: does that finding's direction find the scans with the finding, among every
  slice of other patients? What a scan-level head needs, and the twin probe alone does not show.

`benchmark.py twin` is twin_command, here; `benchmark.py probe` is bench/commands.py's. The reference encoders
that learn nothing, HU histograms and pixel grids, are models/reference.py.
"""
import dataclasses
import math

import numpy as np
import torch

from cohort import Cohort
from data import canonical_grid, load_mask, named_windows, nearest_slices, prepare_slices, voxel_spacing
from extract import embed_slices
from files import ClearError
from metrics import auroc
from models.common import effective_rank, evenly_spaced
from phantom import make_phantom
from watch import logistic, slice_probe


def masked_cohort(data, bags):
    """The cohort at folder `data` (cohort.Cohort), checked to hold a lesion mask for every scan of `bags`."""
    cohort = Cohort(data)
    missing = [s.scan for s in cohort.scans if s.scan in bags.scans and s.mask is None]
    if not cohort.has_masks or missing:
        raise ClearError(f"{data}: the probe needs a lesion mask for every bag's scan (none for "
                         f"{', '.join(missing[:3]) or 'any scan'})")
    unknown = sorted(set(bags.scans) - {s.scan for s in cohort.scans})
    if unknown:
        raise ClearError(f"{bags.folder}: bags of scans not in {data}: {', '.join(unknown[:3])}")
    return cohort


def lesion_slice_flags(cohort, bags, labels=None):
    """For every bag slice, whether its scan's mask holds a lesion (labels `labels`, default any non-zero) at that
    z: a tuple of (L_i,) bool per scan of `bags`; a bag slice takes the nearest stored mask slice."""
    by_name, out = {s.scan: s for s in cohort.scans}, []
    for name, z_mm in zip(bags.scans, bags.z_mm):
        scan = by_name[name]
        affine, shape = canonical_grid(scan.image)
        hit = torch.from_numpy(load_mask(scan.mask, shape))  # (Z, Y, X); a mask off its image's grid is refused
        hit = hit != 0 if labels is None else torch.isin(hit, torch.tensor(list(labels)))
        out.append(hit.flatten(1).any(1)[nearest_slices(z_mm, voxel_spacing(affine)[2], shape[0])])  # (L,)
    return tuple(out)


def twin_slices(cfg, patients, findings, slices, min_voxels=4):
    """The twin test's slices. findings: {name: phantom mask labels}. For each patient in `patients` of the synthetic
    cohort `cfg` (phantom.SynthConfig), the slices of its first scan that hold a finding on at least `min_voxels`
    voxels, and the same slices of its twin without the findings -> {name: [(patient, with, without)]}, each
    (n, C, S, S) as data.prepare_slices makes them (stored slices, no z resampling); patients without the
    finding are left out of its list."""
    out = {name: [] for name in findings}
    for patient in patients:
        a, b = make_phantom(cfg, patient), None
        for name, labels in findings.items():
            hit = np.isin(a.mask, labels).reshape(len(a.mask), -1).sum(1) >= min_voxels  # (Z,)
            if hit.any():
                b = make_phantom(cfg, patient, findings=False) if b is None else b
                out[name].append((patient, prepare_slices(a.hu[hit], a.spacing, slices)[0],
                                  prepare_slices(b.hu[hit], b.spacing, slices)[0]))
    return out


def twin_probe(encoder, twins, seed=0, batch_size=64, folds=4):
    """(AUROC, consistency) of `encoder` on twin_slices' `twins`. AUROC: slice_probe of "with the finding" against
    the twin slices (`folds` patient folds); 0.5 when the embedding does not change with the finding in a way one
    linear direction reads across patients. Consistency: the mean cosine between the changes (with - without)
    over all pairs of slices, 1 when the finding moves every slice's embedding the same way. (NaN, NaN) when
    fewer patients than folds have the finding."""
    if len(twins) < folds:
        return math.nan, math.nan
    features, flags = [], []
    for _, with_, without in twins:
        features.append(embed_slices(encoder, torch.cat([with_, without]), batch_size))  # (2n, D)
        flags.append(torch.arange(2 * len(with_)) < len(with_))  # (2n,) True: with the finding
    auc = slice_probe(features, flags, [p for p, _, _ in twins], seed, folds)
    change = torch.cat([f[: len(f) // 2] - f[len(f) // 2:] for f in features]).double()  # (T, D)
    change = change / change.norm(dim=1, keepdim=True).clamp(min=1e-12)
    T = len(change)  # the mean off-diagonal cosine, from |sum of unit vectors|^2 = T + sum over i != j
    return auc, float((change.sum(0).pow(2).sum() - T) / max(T * (T - 1), 1))


def twin_direction(encoder, twins, batch_size=64, l2=1e-3):
    """The twin probe fitted on every pair of `twins` (twin_slices' list of one finding) -> score, a function of
    slice embeddings (L, D) -> (L,) logits, high with the finding."""
    x = torch.cat([embed_slices(encoder, torch.cat([w, wo]), batch_size) for _, w, wo in twins]).double()  # (2T, D)
    y = torch.cat([torch.arange(2 * len(w)) < len(w) for _, w, _ in twins]).double()  # (2T,) 1: with the finding
    shift, scale = x.mean(0), x.std(0) + 1e-6  # (D,)
    w, b = logistic((x - shift) / scale, y, l2)
    return lambda f: ((f.double() - shift) / scale) @ w + b


def scan_reading(score, bags, flags, skip=()):
    """Does a slice direction find the scans with the finding? AUROC over the scans of `bags` (but those of
    patients `skip`, e.g. the twins' own) of each scan's highest slice score, scans with a finding slice (flags:
    per scan (L,) bool, lesion_slice_flags') against those without. The twin probe reads a finding among lung
    slices of the same anatomy; a scan-level head must find it among every slice of every patient. NaN when a
    class is empty."""
    keep = [i for i, s in enumerate(bags.scans) if s.split("_")[0] not in skip]
    y = np.array([bool(flags[i].any()) for i in keep])
    top = np.array([float(score(bags.features[i]).max()) for i in keep])
    return auroc(y, top) if 0 < y.sum() < len(y) else math.nan


def first_axis(bags, most=20000):
    """The first principal axis of the bags' slice embeddings (up to `most` slices, evenly spaced): (its share of
    the variance, |Pearson correlation| of the slices' coordinates on it with their height in the scan, 0 at the
    bottom slice to 1 at the top). A collapsed encoder puts nearly all variance there, and often it is the
    slice's position in the body: anatomy, not findings."""
    x = torch.cat(bags.features).double()  # (T, D)
    h = torch.cat([z / z.max().clamp(min=1e-9) for z in bags.z_mm]).double()  # (T,) height in [0, 1]
    pick = evenly_spaced(len(x), most)
    x, h = x[pick] - x[pick].mean(0), h[pick]
    u, sigma, _ = torch.linalg.svd(x, full_matrices=False)  # u: (T', r), sigma: (r,)
    coord = u[:, 0] * sigma[0]  # (T',) each slice on the first axis
    corr = torch.corrcoef(torch.stack([coord, h]))[0, 1].abs()
    return float(sigma[0] ** 2 / (sigma ** 2).sum()), float(corr)


def bags_rank(bags):
    """models.effective_rank (RankMe) of every slice embedding of `bags` (up to 20 000, evenly spaced)."""
    return effective_rank(torch.cat(bags.features))


def probe_bags(cohort, bags, labels=None, seed=0, cache=None):
    """slice_probe of `bags` against the lesion masks of `cohort` -> (AUROC, NaN if undefined; the slice flags).
    `cache`, a dict, keeps the flags of each slice set and labels, so the encoders of one cohort read its masks
    once."""
    key = (bags.scans, labels, *(z.numpy().tobytes() for z in bags.z_mm))
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = lesion_slice_flags(cohort, bags, labels)
    patient = {s.scan: s.patient for s in cohort.scans}
    return slice_probe(bags.features, cache[key], [patient[s] for s in bags.scans], seed), cache[key]


def twin_command(args):
    """The twin test (twin_probe) of one encoder on the accuracy benchmark's cohort, one row per finding;
    with --bags, each finding's twin direction read on those bags' scans (scan_reading)."""
    from bench.config import TUMOUR_LABELS, AccuracyConfig
    from extract import EncoderSpec, load_encoder
    from mil import load_bags
    from phantom import LUNG_EMPHYSEMA, LUNG_GGO

    spec = EncoderSpec(checkpoint=args.checkpoint, name=args.encoder, size=args.size, module=args.encoder_module,
                       img_size=args.img_size, windows=named_windows(args.windows) if args.windows else None)
    encoder, identity, slices = load_encoder(spec)
    bags = load_bags(args.bags) if args.bags else None
    if bags and (bags.encoder != identity or not args.data):
        raise ClearError(f"{args.bags}: bags of encoder {bags.encoder}, not of {identity}" if args.data else
                         "--bags: needs --data, the bags' cohort folder with masks/")
    data = masked_cohort(args.data, bags) if bags else None
    slices = dataclasses.replace(slices, thickness_mm=None)
    cohort = dataclasses.replace(AccuracyConfig().cohort, seed=args.seed)
    findings = {f"ground glass (mask {LUNG_GGO})": (LUNG_GGO,), f"emphysema ({LUNG_EMPHYSEMA})": (LUNG_EMPHYSEMA,),
                f"tumours ({TUMOUR_LABELS[0]}-{TUMOUR_LABELS[-1]})": TUMOUR_LABELS}
    twins = twin_slices(cohort, range(args.n), findings, slices)
    print(f"twin test of {identity['name']}, {identity['source']}, at {slices.img_size} px, on patients "
          f"0-{args.n - 1} of the synthetic cohort (seed {args.seed}, {cohort.size} px): each slice with a finding "
          f"against the same slice of its twin without it" + (f"; its direction read on {args.bags}'s scans of "
                                                              f"other patients (highest slice)" if bags else "") + "\n")
    print("| finding | patients | slice pairs | twin probe AUROC | consistency |" + (" scans |" if bags else "")
          + "\n|---|---:|---:|---:|---:|" + ("---:|" if bags else ""))
    skip = {f"P{p:04d}" for p in range(args.n)}  # synth.py's patient names
    for (name, pairs), labels in zip(twins.items(), findings.values()):
        auc, cons = twin_probe(encoder, pairs, args.seed)
        read = ""
        if bags:
            found = lesion_slice_flags(data, bags, labels)  # (L_i,) per scan
            read = f" {scan_reading(twin_direction(encoder, pairs), bags, found, skip):.3f} |"
        print(f"| {name} | {len(pairs)} | {sum(len(w) for _, w, _ in pairs)} | {auc:.3f} | {cons:.2f} |{read}")
