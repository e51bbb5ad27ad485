"""The attention-MIL head and reading bags: one prediction per CT scan from the bag of its slice embeddings
(CLEAR, arXiv 2411.16803: a frozen 2D encoder embeds every axial slice, an attention-MIL head reads the bag).
Fitting it with patient-level cross-validation is cv.py's; this module holds what a fitted run needs again.

How the CLI uses this (commands.py reports; this module returns values or raises ClearError):

    bags = mil.load_bags(args.bags)              # every BAGS/<scan>.pt, one encoder; cv.fit_cv trains on these
    rows = mil.predict(args.model, bags)         # fold ensemble of a run that cv.save_run wrote
    files.write_csv(args.out, rows)              # scan, score_<label>..., predicted_<target>...

The model, Ilse et al. 2018 ("Attention-based Deep Multiple Instance Learning", Eq. 8, gated Eq. 9), with
the classification head of the CLEAR code:
    h_k = ReLU(W x_k)                                        every slice k = 1..L of the bag
    a_k = softmax_k(w^T tanh(V h_k))                         over the bag's real slices only
          gated: softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))
    z   = sum_k a_k h_k
    logits = Linear(SiLU(Dropout(Linear(LayerNorm(z)))))
Ordinal targets get a cumulative-link (CORAL-style) output: one score g and ordered cut-points
theta_0 < ... < theta_{C-2}, logit P(y > k) = g - theta_k, so class probabilities are never negative.

Departures from the CLEAR code, on purpose: input features are standardised with the training slices'
statistics (AttentionMIL.standardize); bags are padded to the longest of their batch and the padding is
masked out of the softmax (the code pads every scan to 512 slices and lets the zero rows take attention);
attention width 128 (Ilse et al.) instead of the code's 256. The departures in training are listed in cv.py.

Shapes: B bags in a batch, L slices (padded), T real slices of a batch, D feature width, H hidden width, A attention
width, N scans, K score columns, C classes.
"""
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
from files import ClearError, cause, load_untrusted

MIL_FORMAT = "clear-mil-1"  # the `format` of a fold model that cv.save_run writes
KINDS = ("binary", "multilabel", "multiclass", "ordinal")  # Task.kind: what is predicted (cv.make_task infers it)
POOLS = ("attention", "mean")  # AttentionMIL's pool: Eq. 8/9, or a linear model of the bag's mean slice

# --------------------------------------------------------------------------------------------- model


class CumulativeLink(nn.Module):
    """The ordinal output: one score g (B, 1) -> C-1 cumulative logits g - theta_k (B, C-1), logit P(y > k),
    with theta = cut0 + cumsum(softplus(gaps)) increasing, so class probabilities are never negative."""

    def __init__(self, n_cuts):
        super().__init__()
        self.cut0 = nn.Parameter(torch.tensor([-(n_cuts - 1) / 2]))  # cut-points start one logit apart around 0
        self.gaps = nn.Parameter(torch.full((n_cuts - 1,), math.log(math.e - 1)))  # softplus(gap) = 1

    def thresholds(self):  # the cut-points (C-1,), increasing
        return torch.cat([self.cut0, self.cut0 + torch.cumsum(F.softplus(self.gaps), 0)])

    def forward(self, g):
        return g - self.thresholds()  # (B, 1) - (C-1,) -> (B, C-1)


class AttentionMIL(nn.Module):
    """forward(x (B, L, D), mask (B, L) bool, True = real slice) -> (logits (B, n_out), attention (B, L)).
    ordinal=True: n_out = C - 1 cumulative logits, logit P(y > k); pool="mean": a linear model of the mean slice."""

    def __init__(self, in_dim, n_out, hidden=256, gated=False, dropout=0.5, att_dim=128, ordinal=False,
                 pool="attention"):
        super().__init__()
        self.config = dict(in_dim=in_dim, n_out=n_out, hidden=hidden, gated=gated, dropout=dropout,
                           att_dim=att_dim, ordinal=ordinal, pool=pool)
        self.register_buffer("shift", torch.zeros(in_dim))  # x -> (x - shift) / scale, see standardize()
        self.register_buffer("scale", torch.ones(in_dim))
        self.link = CumulativeLink(n_out) if ordinal else nn.Identity()
        if pool == "mean":  # logits = W mean_k x_k + b: the linear readout of a bag's mean slice, nothing else
            self.head = nn.Linear(in_dim, 1 if ordinal else n_out)
            return
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())  # h = ReLU(W x)
        self.V = nn.Linear(hidden, att_dim)
        self.U = nn.Linear(hidden, att_dim) if gated else None
        self.w = nn.Linear(att_dim, 1, bias=False)  # a bias would cancel in the softmax
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.SiLU(),
                                  nn.Linear(hidden, 1 if ordinal else n_out))

    @torch.no_grad()
    def standardize(self, features):
        """Set the input standardisation from training bags [(L_i, D)]: each feature dimension to zero mean and
        unit variance over their slices. Frozen encoders give features of very different scales; without this
        a few large dimensions drown the rest, and on ~100 training scans the head memorises them instead of
        finding the informative ones (docs/results.md, 'Implementation choices', has the figure). Stored as
        buffers, so a saved fold applies its own statistics."""
        x = torch.cat(list(features)).double()  # (sum L_i, D)
        self.shift.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(self.scale))
        return self

    def pool(self, h, mask):
        """Eq. 8/9 on real slices only: h (T, H) packed embeddings, mask (B, L) places them in the padded batch
        -> (z (B, H), a (B, L)). Padding costs no matmul, no (B, L, H) copy, and gets zero attention (score -inf)."""
        s = torch.tanh(self.V(h))  # (T, A)
        if self.U is not None:
            s = s * torch.sigmoid(self.U(h))  # (T, A), gated
        scores = torch.full(mask.shape, -math.inf, dtype=h.dtype).masked_scatter(mask, self.w(s))  # (B, L)
        a = torch.softmax(scores, dim=1)  # (B, L)
        bag = mask.nonzero()[:, 0]  # (T,) the bag of each packed row, in the order of x[mask]
        return h.new_zeros(len(mask), h.shape[1]).index_add(0, bag, a[mask][:, None] * h), a  # (B, H), (B, L)

    def forward(self, x, mask=None):
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
        if self.config["pool"] == "mean":
            a = mask / mask.sum(1, keepdim=True)  # (B, L): 1/L_i on a bag's real slices, 0 on padding
            return self.link(self.head(torch.einsum("bl,bld->bd", a, (x - self.shift) / self.scale))), a
        x = x.flatten(0, 1).index_select(0, mask.flatten().nonzero()[:, 0])  # (T, D): x[mask], gathered faster
        z, a = self.pool(self.embed((x - self.shift) / self.scale), mask)  # (B, H), (B, L)
        return self.link(self.head(z)), a  # (B, n_out), ordinal: (B, 1) -> (B, C-1)


def pad_bags(features):
    """List of (L_i, D) bags -> (x (B, L, D) zero-padded, mask (B, L) True on real slices)."""
    x = nn.utils.rnn.pad_sequence(list(features), batch_first=True)  # (B, L, D)
    return x, torch.arange(x.shape[1]) < torch.tensor([len(f) for f in features])[:, None]


@torch.no_grad()
def infer(model, features, batch_size=32):
    """Every slice of every bag, eval mode -> (logits (N, n_out), [attention (L_i,)]), batched by length."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]))
    logits, attention = torch.empty(len(features), model.config["n_out"]), [None] * len(features)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        logits[chunk], a = model(*pad_bags([features[i] for i in chunk]))  # (b, n_out), (b, L)
        for j, i in enumerate(chunk):
            attention[i] = a[j, :len(features[i])]
    return logits, attention

# ---------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Task:
    """What is predicted, and how the head's logits are read. classes: the sorted values of a single target
    column; () for multilabel. cv.make_task infers it from the labels."""
    kind: str  # one of KINDS
    targets: tuple
    classes: tuple

    @property
    def labels(self):
        """Names of the score columns: one per target (binary, multilabel) or one per class."""
        if self.kind in ("binary", "multilabel"):
            return list(self.targets)
        return [f"{self.targets[0]}={c:g}" for c in self.classes]

    @property
    def n_out(self):
        return {"binary": 1, "multilabel": len(self.targets), "multiclass": len(self.classes),
                "ordinal": len(self.classes) - 1}[self.kind]

    def loss(self, logits, y, pos_weight=None):
        if self.kind == "multiclass":
            return F.cross_entropy(logits, y)
        if self.kind == "ordinal":  # BCE on each cumulative event y > k
            return F.binary_cross_entropy_with_logits(logits, (y[:, None] > torch.arange(logits.shape[1])).float())
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    def scores(self, logits):
        """Logits -> probabilities (N, K), per label or per class."""
        if self.kind == "multiclass":
            return torch.softmax(logits, 1)
        if self.kind == "ordinal":
            above = F.pad(torch.sigmoid(logits), (1, 0), value=1.0)  # (N, C) P(y > k - 1), non-increasing
            return above - F.pad(above[:, 1:], (0, 1))  # (N, C) P(y = k)
        return torch.sigmoid(logits)

    def fields(self, scores):
        """Scores (N, K) -> per scan {score_<label>: probability, predicted_<target>: class value (0/1 multilabel)}."""
        hard = metrics.predicted_class(self.kind, scores)  # (N, K) 0/1 or (N,) class index
        rows = []
        for s, h in zip(scores, hard):
            row = {f"score_{label}": f"{v:.6g}" for label, v in zip(self.labels, s)}
            if self.kind == "multilabel":
                row.update({f"predicted_{t}": int(v) for t, v in zip(self.targets, h)})
            else:
                row[f"predicted_{self.targets[0]}"] = f"{self.classes[int(np.ravel(h)[0])]:g}"
            rows.append(row)
        return rows

# ---------------------------------------------------------------------------------------------- bags


@dataclass(frozen=True)
class Bags:
    """The bags of one folder, all from one encoder; entry i of each tuple belongs to scans[i]."""
    folder: Path
    encoder: dict
    dim: int
    scans: tuple
    features: tuple  # (L_i, D) float32
    z_mm: tuple  # (L_i,) float64
    images: tuple  # source image paths


def _read_bag(path):
    bag = load_untrusted(path, "cannot read bag")  # bags are untrusted input: tensors and plain types only
    if not isinstance(bag, dict) or not {"features", "z_mm", "encoder", "image"} <= bag.keys():
        got = sorted(map(str, bag)) if isinstance(bag, dict) else type(bag).__name__
        raise ClearError(f"{path}: expected a dict with features, z_mm, encoder and image, got {got}")
    x, z = bag["features"], bag["z_mm"]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ClearError(f"{path}: features is {getattr(x, 'dtype', type(x).__name__)}, expected a float tensor")
    if x.dim() != 2 or len(x) == 0:
        raise ClearError(f"{path}: features has shape {tuple(x.shape)}, expected 2 dims (n_slices >= 1, D)")
    if not torch.isfinite(x).all():
        raise ClearError(f"{path}: features has {int((~torch.isfinite(x)).sum())} NaN or infinite values")
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != (len(x),):
        raise ClearError(f"{path}: z_mm has shape {tuple(getattr(z, 'shape', ()))}, expected ({len(x)},)")
    if not isinstance(bag["encoder"], dict) or not isinstance(bag["image"], str):
        raise ClearError(f"{path}: encoder must be a dict and image a str")
    return x.float().contiguous(), z.double(), bag["encoder"], bag["image"]


def load_bags(folder, scans=None):
    """Read BAGS/<scan>.pt for `scans` (default: every bag of the folder) -> Bags."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClearError(f"{folder}: no such bag folder")
    if scans is None:
        scans = sorted(p.name[:-3] for p in folder.glob("*.pt") if not p.name.startswith("."))
    if not scans:
        raise ClearError(f"{folder}: no bags (<scan>.pt files); run `clear.py extract` first")
    read = []
    for scan in scans:
        path = folder / f"{scan}.pt"
        if not path.is_file():
            raise ClearError(f"{path}: no such bag")
        read.append(_read_bag(path))
        (x0, _, enc0, _), (x, _, enc, _) = read[0], read[-1]
        if enc != enc0:
            raise ClearError(f"{path}: encoder {enc} differs from {scans[0]}.pt's {enc0}; "
                             "bags from different encoders cannot be mixed")
        if x.shape[1] != x0.shape[1]:
            raise ClearError(f"{path}: features have width {x.shape[1]}, {scans[0]}.pt's {x0.shape[1]}")
    x, z, enc, img = zip(*read)
    return Bags(folder, enc[0], x[0].shape[1], tuple(scans), x, z, img)

# ----------------------------------------------------------------------------------------------- run


@contextlib.contextmanager
def torch_threads(n):
    """Run a block with n torch CPU threads (None: unchanged), then restore them (why: cv.FitConfig.threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_run(run_dir):
    """The fold models of a run written by cv.save_run (read with weights_only=True)
    -> (Task, encoder dict, [AttentionMIL, eval mode]). A fold{k}.pt is a dict: model (AttentionMIL's config),
    state_dict, task (the Task as a dict), encoder, and for the record format, fold, best_epoch, test_scans."""
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob("fold*.pt"))
    if not paths:
        raise ClearError(f"{run_dir}: no fold*.pt models; not a run folder written by `clear.py fit`")
    runs = []
    for path in paths:
        saved = load_untrusted(path, "not a CLEAR MIL model")
        if not isinstance(saved, dict) or saved.get("format") != MIL_FORMAT:
            raise ClearError(f"{path}: not a CLEAR MIL model (format {MIL_FORMAT})")
        try:
            model = AttentionMIL(**saved["model"])
            model.load_state_dict(saved["state_dict"])
            task = Task(saved["task"]["kind"], *(tuple(saved["task"][k]) for k in ("targets", "classes")))
        except Exception as e:
            raise ClearError(f"{path}: not a CLEAR MIL model ({cause(e)})") from None
        if runs and (task, saved["encoder"]) != runs[0][:2]:
            raise ClearError(f"{path}: task or encoder differ from {paths[0].name}'s; two runs in one folder")
        runs.append((task, saved["encoder"], model.eval()))
    return runs[0][0], runs[0][1], [m for _, _, m in runs]


def predict(run_dir, bags, threads=1):
    """A run's fold ensemble (mean of the folds' scores) on every bag -> rows {scan, score_*, predicted_*}.
    threads: torch CPU threads meanwhile, as cv.FitConfig.threads."""
    task, encoder, models = load_run(run_dir)
    if bags.encoder != encoder:
        raise ClearError(f"{bags.folder}: bags come from encoder {bags.encoder}, the models in {run_dir} from "
                         f"{encoder}; extract the bags with the same encoder")
    if bags.dim != models[0].config["in_dim"]:
        raise ClearError(f"{bags.folder}: features have width {bags.dim}, the models in {run_dir} take "
                         f"{models[0].config['in_dim']}")
    with torch_threads(threads):
        scores = torch.stack([task.scores(infer(m, bags.features)[0]) for m in models]).mean(0).numpy()  # (N, K)
    return [dict(scan=s, **r) for s, r in zip(bags.scans, task.fields(scores))]
