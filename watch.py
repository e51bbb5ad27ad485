"""What `clear.py pretrain` shows of learning as it runs, beside the loss: the effective rank's trend (rank_trend),
and whether the encoder sees what the masks mark (LabelProbe). Every K steps (`--probe-every`), a linear probe of
each mask label on the embeddings of a fixed sample of the slices pre-training draws from, on held-out patients.

    once:     ids = n slices of the pre-training pool, drawn with a seed of their own                    (n,)
    step t:   E = encoder(the cache's slices ids), in eval mode, without gradients              (n, D)
              for each mask label v:  slice_probe(E, "the slice holds v", patients)

slice_probe: the mean, over 4 patient folds, of the held-out AUROC of an L2-regularised logistic regression on the
standardised embeddings (bench/probe.py builds the tumour-slice probe and the twin test on it too). The probe reads
the run and changes nothing in it: no gradients, no draws from torch's global generator, BatchNorm's running
statistics untouched (eval mode), so a run with the probe ends with the weights of one without
(tests/test_watch.py). It diagnoses the encoder with slice labels that the method never trains on. A linear
probe also reads what comes with a finding (emphysema lies in the upper lungs, so a slice's height gives it away
in part), even from a random encoder: the first line, at step 0, is random init's figure, and learning is the
rise above it. (bench/probe.py's twin test holds everything but the finding fixed, for synthetic data.)
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import cv
from extract import embed_slices
from metrics import auroc
from views import level_pool


def logistic(x, y, l2, iters=200):
    """argmin_w,b  mean_i BCE(x_i . w + b, y_i) + l2 |w|^2  by L-BFGS: x (N, F), y (N,) 0/1 -> (w (F,), b). The
    objective is strictly convex, so L-BFGS reaches its one minimum (tests/test_readout.py checks the gradient)."""
    x, y = x.double(), y.double()
    wb = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)  # (F + 1,): w, then b
    opt = torch.optim.LBFGS([wb], max_iter=iters, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ wb[:-1] + wb[-1], y) + l2 * wb[:-1].pow(2).sum()
        loss.backward()
        return loss
    opt.step(objective)
    return wb[:-1].detach(), wb[-1].detach()


def slice_probe(features, flags, patients, seed=0, folds=4, l2=1e-3):
    """Does the encoder see lesions? A linear probe: L2-regularised logistic regression (LBFGS) of the per-slice
    lesion flags on the standardised slice embeddings, in `folds` patient folds stratified by whether a patient
    has a lesion slice; the mean over folds of the held-out AUROC (NaN if no fold has both classes). features,
    flags: per scan (L_i, D), (L_i,); patients: per scan. Slice labels are what the MIL never sees: the probe
    diagnoses the encoder, it is not part of the method."""
    has_lesion = np.array([[bool(f.any())] for f in flags], dtype=np.int64)  # (N, 1)
    fold = cv.patient_folds(np.asarray(patients), has_lesion, folds, seed)  # (N,)
    x = torch.cat([f.double() for f in features])  # (T, D)
    y = torch.cat([torch.as_tensor(f, dtype=torch.float64) for f in flags])  # (T,)
    fold = torch.cat([torch.full((len(f),), int(k)) for f, k in zip(features, fold)])  # (T,)
    aucs = []
    for k in range(folds):
        test = fold == k
        if len(set(y[test].tolist())) < 2 or len(set(y[~test].tolist())) < 2:
            continue
        z = (x - x[~test].mean(0)) / (x[~test].std(0) + 1e-6)  # (T, D), training slices' statistics
        w, _ = logistic(z[~test], y[~test], l2)
        aucs.append(auroc(y[test].numpy(), (z[test] @ w).numpy()))
    return float(np.mean(aucs)) if aucs else float("nan")


def rank_trend(ranks):
    """(step of the first known rank, 1-based; that rank; the last one; collapsed: the last under a quarter of the
    first) from a run's per-step ranks (NaN where unknown), or None if none is known."""
    known = [(i + 1, v) for i, v in enumerate(ranks) if math.isfinite(v)]
    if not known:
        return None
    (step, first), last = known[0], known[-1][1]
    return step, first, last, last < first / 4


class LabelProbe:
    """slice_probe of each of the slice cache's mask labels, every `every` steps, on the encoder's embeddings of
    a fixed sample of the run's slices; `log` gets one line each time."""

    def __init__(self, cache, pool, patients, img_size, every, log=print, n=1024, seed=0, least=20):
        # n: a label on 5 % of the slices gives ~50 positives; cnn-micro embeds 1024 slices in ~2 s on 2 cores.
        # least: a label on fewer of the sampled slices, or missing from fewer, is not scored (NaN): each held-out
        # fold would hold a handful of them, and their AUROC would be noise (0.08 for one such label of the corpus)
        g = torch.Generator().manual_seed(seed)
        self.ids = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values  # (n,) cache ids, in scan order
        self.cache, self.size = cache, img_size  # the slices are read from the cache at each probe, not kept
        scans, self.counts = torch.unique_consecutive(cache.scan[self.ids], return_counts=True)  # (m,) scans, slices
        self.patients = [patients[int(s)] for s in scans]  # (m,)
        self.labels, self.values = cache.labels[self.ids], list(cache.label_values)  # (n, L) bool, (L,)
        self.every, self.log, self.least = every, log, least

    @classmethod
    def for_run(cls, cache, cohort, cfg, total, every, log=print):
        """The probe of a pre-training run of `total` steps on `cohort` with PretrainConfig `cfg`: its slices are
        those the run draws from (cfg.levels); None for a run shorter than `every` steps (a smoke test) or masks
        that mark nothing."""
        if not every or every > total or not cache.label_values:
            return None
        return cls(cache, level_pool(cache, cfg.levels), [s.patient for s in cohort.scans], cfg.img_size, every, log)

    def __call__(self, step, encoder, device="cpu"):
        """After step `step` (0-based; -1: before the first): {mask label: AUROC, NaN for a label on fewer than
        `least` sampled slices or where no fold holds both classes}, or None between probes."""
        if (step + 1) % self.every:
            return None
        was = encoder.training
        encoder.eval()  # BatchNorm reads its running statistics, and leaves them
        try:
            e = torch.cat([embed_slices(encoder, self.slices(chunk, device), 256, device)
                           for chunk in self.ids.split(256)])  # (n, D)
        finally:
            encoder.train(was)
        split = self.counts.tolist()
        aucs = {v: slice_probe(e.split(split), y.split(split), self.patients)
                if min(y.sum(), (~y).sum()) >= self.least else math.nan for v, y in zip(self.values, self.labels.T)}
        few = [str(v) for v, a in aucs.items() if math.isnan(a)]
        self.log(f"step {step + 1}: slice probe AUROC by mask label, held-out patients: "
                 + "  ".join(f"{v}={a:.3f}" for v, a in aucs.items() if not math.isnan(a))
                 + (f"  (not scored, too few slices with or without them: {', '.join(few)})" if few else ""))
        return aucs

    def slices(self, ids, device="cpu"):
        """The cache's slices `ids` (b,) as the encoder takes them: (b, C, S, S) float in [0, 1] on `device`."""
        x = self.cache.read(ids, torch.device(device))  # (b, C, Sc, Sc)
        return x if x.shape[-1] == self.size else F.interpolate(x, size=(self.size, self.size), mode="area")
