"""The end-to-end 3D baseline that CLEAR argues against (arXiv 2411.16803, Sec. 1 and 4): a small 3D ResNet
trained supervised on whole CT volumes, on the same patient-level folds, targets and metrics as the MIL.

    volumes = load_volumes(cohort, Volume3DConfig())              # (N, C, Dz, S, S) uint8, windowed HU
    result = fit_cv_3d(volumes, cohort, cv.FitConfig(targets=("stage",), task="ordinal"), Net3DConfig())

A 3D network has to see a whole scan at once, so on a CPU budget the volume is resampled to a coarse fixed
grid (default 32 x 64 x 64 voxels, ~16 mm x 5.5 mm on the synthetic cohort): that is the cost the paper
points at, in compute per scan and in the small lesions lost to the downsampling. ResNet-10 layout (He et al.
2016; 3D as in Hara et al. 2018, MedicalNet): a strided stem, four stages of one basic block each, global
average pooling, a linear head. Widths are a quarter of ResNet-10's (16-128, not 64-512) to train on 2 CPU
cores; the departure is in the widths only.

Shapes: N scans, B batch, C window channels, Dz depth (slices), S in-plane size, K outputs.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
from cv import fold_split, macro_auroc, make_task, patient_folds
from data import SliceConfig, load_ct, window
from files import ClearError
from mil import CumulativeLink


@dataclass(frozen=True)
class Volume3DConfig:
    depth: int = 32  # slices after resampling the whole scan: neck to pelvis in ~16 mm steps
    size: int = 64  # in-plane grid: 2x coarser than the 128-px synthetic scans
    windows: tuple = SliceConfig().windows  # three HU windows: the 2D rows' four less the parenchyma window


@dataclass(frozen=True)
class Net3DConfig:
    widths: tuple = (16, 32, 64, 128)  # a quarter of ResNet-10's 64-512, for CPU training


def load_volumes(cohort, cfg=Volume3DConfig(), progress=lambda it, total: it):
    """Every scan -> (N, C, Dz, S, S) uint8: trilinear resampling of the HU volume to the fixed grid, then the
    HU windows, quantised to 1/255 (4x smaller in memory than float32)."""
    out = torch.empty(len(cohort.scans), len(cfg.windows), cfg.depth, cfg.size, cfg.size, dtype=torch.uint8)
    for i, scan in enumerate(progress(cohort.scans, len(cohort.scans))):
        hu, _ = load_ct(scan.image)  # (Z, Y, X)
        grid = F.interpolate(torch.from_numpy(hu)[None, None], size=(cfg.depth, cfg.size, cfg.size),
                             mode="trilinear", align_corners=True)[0, 0]  # (Dz, S, S)
        out[i] = (window(grid, cfg.windows) * 255).round().byte().transpose(0, 1)  # (C, Dz, S, S)
    return out


class Block3D(nn.Module):
    """Basic residual block: conv3-BN-ReLU-conv3-BN, plus a strided 1x1x1 projection when the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.skip = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class ResNet3D(nn.Module):
    """(B, C, Dz, S, S) -> (B, K) logits."""

    def __init__(self, in_chans, n_out, cfg=Net3DConfig(), ordinal=False):
        super().__init__()
        w = cfg.widths
        self.stem = nn.Sequential(nn.Conv3d(in_chans, w[0], (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
                                  nn.BatchNorm3d(w[0]), nn.ReLU(), nn.MaxPool3d(3, 2, 1))
        self.stages = nn.Sequential(*[Block3D(w[max(i - 1, 0)], w[i], 1 if i == 0 else 2) for i in range(len(w))])
        self.head = nn.Linear(w[-1], 1 if ordinal else n_out)
        self.link = CumulativeLink(n_out) if ordinal else nn.Identity()  # ordinal outputs, as the MIL's

    def forward(self, x):
        return self.link(self.head(self.stages(self.stem(x)).mean((2, 3, 4))))  # GAP: (B, w[-1]) -> (B, K)


def _as_input(volumes):
    return volumes.float() / 255  # uint8 -> [0, 1], (B, C, Dz, S, S)


def _scores(model, task, volumes, batch_size):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(_as_input(v)) for v in volumes.split(batch_size)])  # (N, K) logits


def _train_fold(task, volumes, y, train, val, cfg, net, seed):
    """A fresh ResNet3D and AdamW on `train`, early-stopped on the macro AUROC of `val` (as cv.py does)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ResNet3D(volumes.shape[1], task.n_out, net, ordinal=task.kind == "ordinal")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_score, best_state, best_epoch = -np.inf, None, cfg.epochs - 1
    for epoch in range(cfg.epochs):
        model.train()
        for batch in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm needs two volumes
                continue
            idx = train[batch.numpy()]
            x = _as_input(volumes[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5  # left-right mirror, as the 2D views do
            x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
            loss = task.loss(model(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if len(val):
            score = macro_auroc(task, _scores(model, task, volumes[val], cfg.batch_size), y[val])
            if score >= best_score:
                best_score, best_epoch = score, epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_epoch


def fit_cv_3d(volumes, cohort, cfg, net=Net3DConfig(), progress=lambda it, total: it):
    """Patient-level stratified k-fold of the 3D baseline, on the folds cv.fit_cv uses for the same labels and
    seed -> metrics dict (as metrics.json: rows of AUROC etc. with patient-bootstrap CIs)."""
    rows = [(i, s) for i, s in enumerate(cohort.scans)
            if all(np.isfinite(s.labels.get(t, np.nan)) for t in cfg.targets)]
    if not rows:
        raise ClearError(f"{cohort.root}: no scan has a value for {','.join(cfg.targets)}")
    index = np.array([i for i, _ in rows])
    patients = np.array([s.patient for _, s in rows])
    values = np.array([[s.labels[t] for t in cfg.targets] for _, s in rows], dtype=np.float64)
    task, y, strata = make_task(cfg.targets, values, cfg.task, cohort.root / "labels.csv")
    fold = patient_folds(patients, strata, cfg.folds, cfg.seed)
    scores, best = np.zeros((len(rows), len(task.labels))), []
    for k in progress(range(cfg.folds), cfg.folds):
        train, val, test = fold_split(fold, k, patients, strata, cfg)
        model, epoch = _train_fold(task, volumes[index], y, train, val, cfg, net, cfg.seed + k)
        scores[test] = task.scores(_scores(model, task, volumes[index[test]], cfg.batch_size)).numpy()
        best.append(epoch)
    return dict(task=task.kind, targets=list(cfg.targets), n_scans=len(rows), folds=cfg.folds, best_epochs=best,
                config=asdict(cfg), net=asdict(net),
                rows=metrics.summarize(task.kind, y.numpy(), scores, task.labels, patients, cfg.n_bootstrap, cfg.seed,
                                          folds=fold))
