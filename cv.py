"""Fitting the attention-MIL of mil.py with patient-level cross-validation: the patients are dealt into k folds
stratified by class, each fold gets a fresh model trained on its training patients (or early-stopped on an inner
split of them), and the held-out scores of all folds are pooled and scored with patient-bootstrap CIs (metrics.py).

    bags = mil.load_bags("runs/bags")                               # every BAGS/<scan>.pt, one encoder
    cfg = cv.FitConfig(targets=("stage",), task="ordinal")          # fields = the fit options
    result = cv.fit_cv(bags, "labels.csv", cfg, progress=tqdm.tqdm) # one bar tick per epoch of each fold
    cv.save_run("runs/stage", result)   # metrics.json, predictions.csv, fold{k}.pt, attention/<scan>.csv

commands.cmd_fit adds the table (metrics.format_table) and the NIfTI attention overlays of result.top.

Departures from the CLEAR code, on purpose: a fresh model and optimizer per fold (the code carries one model
across folds); the best epoch's weights are copied (the code kept a live reference to the state dict, so it saved
the last epoch); patient-level stratified folds; multi-label BCE uses pos_weight = n_neg / n_pos (the code passed
n_pos / n_neg as `weight`); AUROC on scores, not on thresholded labels.

Shapes: N labelled scans, T target columns, S strata columns (one per target), P patients, L slices of a scan, K score
columns, C classes.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import metrics
from cohort import read_labels
from files import ClearError, atomic_path, map_folds, write_csv
from mil import KINDS, MIL_FORMAT, POOLS, AttentionMIL, Task, infer, pad_bags, torch_threads

# ----------------------------------------------------------------------------------------- task, folds


def make_task(targets, values, kind, where):
    """Infer (kind None) or check the task from label values (N, T) -> (Task, y, strata (N, S) int codes).
    y: (N, K) float 0/1 for binary/multilabel, (N,) class index for multiclass/ordinal."""
    for j, t in enumerate(targets):
        levels = np.unique(values[:, j])
        if len(levels) < 2:
            raise ClearError(f"{where}: target {t!r} has the single value {levels[0]:g} in all {len(values)} "
                             "labelled scans; nothing to learn")
        if (levels != np.round(levels)).any():
            raise ClearError(f"{where}: target {t!r} has non-integer values such as "
                             f"{levels[levels != np.round(levels)][0]:g}; expected class numbers")
    kind = kind or ("multilabel" if len(targets) > 1 else "binary" if len(np.unique(values)) == 2 else "multiclass")
    if kind == "multilabel":
        bad = [t for j, t in enumerate(targets) if not set(np.unique(values[:, j])) <= {0.0, 1.0}]
        if bad:
            raise ClearError(f"{where}: multi-label target {bad[0]!r} has values other than 0 and 1")
        return Task(kind, tuple(targets), ()), torch.tensor(values, dtype=torch.float32), values.astype(np.int64)
    if len(targets) > 1:
        raise ClearError(f"{where}: several targets ({','.join(targets)}) need --task multilabel, not {kind}")
    classes = np.unique(values[:, 0])
    if kind == "binary" and len(classes) != 2:
        raise ClearError(f"{where}: target {targets[0]!r} has {len(classes)} classes, --task binary needs 2")
    index = np.searchsorted(classes, values[:, 0])  # (N,) class index
    y = torch.tensor(index, dtype=torch.float32)[:, None] if kind == "binary" else torch.tensor(index)
    return Task(kind, tuple(targets), tuple(float(c) for c in classes)), y, index[:, None]


def patient_folds(patients, strata, k, seed):
    """Patient-level stratified k-fold -> fold index per scan (N,). A patient's stratum is the largest of its
    scans' (positive if any scan is). Patients are shuffled, stably sorted by stratum and dealt to the folds
    in turn, so every stratum spreads over the folds within one patient and fold sizes differ by <= 1."""
    _, p = np.unique(np.asarray(patients), return_inverse=True)  # (N,) patient index
    _, code = np.unique(np.asarray(strata).reshape(len(p), -1), axis=0, return_inverse=True)  # (N,)
    stratum = np.zeros(p.max() + 1, dtype=np.int64)
    np.maximum.at(stratum, p, code.ravel())  # (P,)
    order = np.random.default_rng(seed).permutation(len(stratum))
    order = order[np.argsort(stratum[order], kind="stable")]
    fold = np.empty(len(stratum), dtype=np.int64)
    fold[order] = np.arange(len(stratum)) % k
    return fold[p]


def fold_split(fold, k, patients, strata, cfg):
    """Fold k's scans -> (train, val, test) indices. val: an inner stratified share `val_fraction` of the
    training patients, for early stopping; with `train_fraction` < 1 only a stratified share of the remaining
    training patients is kept (data efficiency: the test folds stay the same). Shares are 1 / round(1 / f)."""
    train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
    val = np.zeros(len(train), dtype=bool)
    if cfg.val_fraction > 0:
        val = patient_folds(patients[train], strata[train], round(1 / cfg.val_fraction), cfg.seed + 1 + k) == 0
    train, val = train[~val], train[val]
    if cfg.train_fraction < 1:
        keep = patient_folds(patients[train], strata[train], round(1 / cfg.train_fraction), cfg.seed + 101 + k) == 0
        train = train[keep]
    return train, val, test

# ----------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class FitConfig:
    targets: tuple  # label columns; several 0/1 columns make a multi-label task
    task: str | None = None  # None: binary (2 classes), multiclass (more), multilabel (several columns)
    folds: int = 5  # the paper's 5-fold cross-validation
    epochs: int = 40  # ~400 AdamW steps on 200 scans; the CLEAR code ran 32 epochs of ~3 steps
    patience: int = 10  # with --val-fraction: epochs without a higher validation AUROC (the code: 8 of 32)
    lr: float = 1e-3  # the code's 1e-4 is too slow for 20 epochs; 1e-3 is the usual AdamW rate for a small head
    weight_decay: float = 1e-2  # AdamW's default
    batch_size: int = 16  # ~10 steps per epoch on 200 scans; smaller batches cost more time, no accuracy
    hidden: int = 256  # the CLEAR code's width
    att_dim: int = 128  # Ilse et al.'s attention width (the code's 256 costs a third more per slice)
    gated: bool = False  # the CLEAR code uses plain attention; gated is Ilse et al.'s Eq. 9
    pool: str = "attention"  # attention: the MIL; mean: a linear model of the mean slice (with --lr 0.01, docs)
    dropout: float = 0.5  # the CLEAR code's nn.Dropout() default
    max_slices: int | None = 128  # random slices per bag in training (caps thin-slice scans); eval uses all
    val_fraction: float = 0.0  # patients held out to early-stop on; 0: all epochs (stopping lost up to 0.14, docs)
    train_fraction: float = 1.0  # share of the (other) training patients used: data-efficiency curves
    seed: int = 1337  # the CLEAR code's seed; same seed, same results
    n_bootstrap: int = 1000  # patient-bootstrap resamples for the 95 % CIs
    n_top: int = 3  # scans per label returned for attention overlays
    threads: int | None = 1  # torch threads during the fit, restored after: more are slower for a head this small
    workers: int = 0  # folds trained side by side in forked processes, one thread each; 0: one per CPU core

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        sizes = dict(epochs=self.epochs, patience=self.patience, batch_size=self.batch_size, hidden=self.hidden,
                     att_dim=self.att_dim, max_slices=self.max_slices or 1, threads=self.threads or 1)
        for ok, why in [(self.targets, "--target: needs at least one column"),
                        (self.task in (None, *KINDS), "--task: must be binary, multilabel, multiclass or ordinal"),
                        (0 <= self.val_fraction <= 0.5, "--val-fraction: must be in [0, 0.5]"),
                        (0 < self.train_fraction <= 1, "--train-fraction: must be in (0, 1]"),
                        (self.folds >= 2, "--folds: must be at least 2"), (self.lr > 0, "--lr: must be positive"),
                        (self.pool in POOLS, "--pool: must be attention or mean"),
                        (self.workers >= 0, "--workers: must be 0 (one per CPU core) or more"),
                        (0 <= self.dropout < 1, "--dropout: must be in [0, 1)"),
                        *[(v >= 1, f"--{k.replace('_', '-')}: must be at least 1") for k, v in sizes.items()]]:
            if not ok:
                raise ClearError(why)


@dataclass
class FitResult:
    config: FitConfig
    task: Task
    metrics: dict  # what metrics.json holds; metrics.format_table prints it
    predictions: list  # one row per held-out scan: patient, scan, fold, true_*, score_*, predicted_*
    attention: dict  # scan -> (z_mm (L,), attention (L,)) numpy arrays, every held-out scan
    top: list  # [{label, scan, score, image}]: the highest-scoring true members of each label
    models: list  # per fold, the dict that fold{k}.pt holds


def _train_fold(task, bags, y, train, val, cfg, seed, tick):
    """A fresh model and AdamW on bag indices `train`, early-stopped on the macro AUROC of `val` -> (model, best
    epoch). Not on the validation loss: with ~20 validation scans it is lowest after an epoch or two, while the
    ranking keeps improving."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AttentionMIL(bags.dim, task.n_out, cfg.hidden, cfg.gated, cfg.dropout, cfg.att_dim, task.kind == "ordinal",
                         cfg.pool)
    model.standardize([bags.features[i] for i in train])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos_weight = None
    if task.kind == "multilabel":
        pos = y[train].sum(0)  # (K,) positives per label in this training split
        pos_weight = (len(train) - pos) / pos.clamp(min=1)
    best_score, best_state, best_epoch = -math.inf, None, cfg.epochs - 1
    for epoch in range(cfg.epochs):
        model.train()
        for batch in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            idx = train[batch.numpy()]
            feats = [f if not cfg.max_slices or len(f) <= cfg.max_slices
                     else f[torch.randperm(len(f), generator=gen)[:cfg.max_slices]]
                     for f in (bags.features[i] for i in idx)]
            loss = task.loss(model(*pad_bags(feats))[0], y[idx], pos_weight)
            if not torch.isfinite(loss):
                raise ClearError(f"--lr {cfg.lr:g}: training diverged (loss {loss.item()}); lower the learning rate")
            opt.zero_grad()
            loss.backward()
            opt.step()
        tick(1)
        if len(val):  # early stopping on the validation AUROC; a tie goes to the later, longer-trained epoch
            score = macro_auroc(task, infer(model, [bags.features[i] for i in val])[0], y[val])
            if score >= best_score:
                best_score, best_epoch = score, epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= cfg.patience:
                tick(cfg.epochs - epoch - 1)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_epoch


def macro_auroc(task, logits, y):
    """Macro AUROC of logits against y (NaN-safe: labels absent from the split are skipped); early stopping
    uses it on the validation scans."""
    rows = metrics.summarize(task.kind, y.numpy(), task.scores(logits).numpy(), task.labels,
                             np.arange(len(y)), n_bootstrap=0)
    values = [r["value"] for r in rows if r["metric"] == "AUROC" and r["label"] != "macro" and r["value"] is not None]
    return float(np.mean(values)) if values else 0.5


def _labelled(bags, labels, cfg):
    """Rows with a value for every target, matched to bags -> (scans, patients, values (N, T), n_dropped: labelled
    rows without such a value, n_unlabelled: bags without a row)."""
    endpoints, table = read_labels(labels)
    for t in cfg.targets:
        if t not in endpoints:
            raise ClearError(f"{labels}: no column {t!r} (columns: {', '.join(endpoints) or 'none'})")
    rows = [(s, r) for s, r in table.items() if not any(math.isnan(r[t]) for t in cfg.targets)]
    have = set(bags.scans)
    missing = [s for s, _ in rows if s not in have]
    if missing:
        raise ClearError(f"{labels}: {len(missing)} labelled scans have no bag in {bags.folder}, e.g. "
                         f"{missing[0]!r} (expected {bags.folder / (missing[0] + '.pt')})")
    values = np.array([[r[t] for t in cfg.targets] for _, r in rows], dtype=np.float64).reshape(-1, len(cfg.targets))
    return ([s for s, _ in rows], np.array([r["patient"] for _, r in rows]), values, len(table) - len(rows),
            len(have - set(table)))


def _check_folds(where, task, patients, strata, k):
    """Stratifying into k folds needs k patients in every class of every target."""
    n = len(set(patients))
    if n < k:
        raise ClearError(f"{where}: {n} patients with a value for {','.join(task.targets)}, fewer than the {k} folds")
    for j, t in enumerate(task.targets):
        for c in np.unique(strata[:, j]):
            n = len(set(patients[strata[:, j] == c]))
            if n < k:
                raise ClearError(f"{where}: class {t}={c if task.kind == 'multilabel' else task.classes[c]:g} "
                                 f"has {n} patients, too few to stratify into {k} folds")


def fit_cv(bags, labels, cfg, progress=None):
    """Patient-level stratified k-fold cross-validation on `bags`, targets from the labels.csv `labels` -> FitResult."""
    with torch_threads(cfg.threads):
        return _fit_cv(bags, labels, cfg, progress)


def _fit_cv(bags, labels, cfg, progress):
    scans, patients, values, n_dropped, n_unlabelled = _labelled(bags, labels, cfg)
    task, y, strata = make_task(cfg.targets, values, cfg.task, labels)
    _check_folds(labels, task, patients, strata, cfg.folds)
    row = {s: i for i, s in enumerate(bags.scans)}
    index = np.array([row[s] for s in scans])  # (N,) bag of each labelled scan
    y_bag = torch.zeros((len(bags.scans), *y.shape[1:]), dtype=y.dtype).index_copy(0, torch.from_numpy(index), y)
    fold = patient_folds(patients, strata, cfg.folds, cfg.seed)
    bar = progress(total=cfg.folds * cfg.epochs, desc="fit") if progress else None
    splits = [fold_split(fold, k, patients, strata, cfg) for k in range(cfg.folds)]  # (train, val, test) each
    for k, (train, val, _) in enumerate(splits):
        if not len(train):
            raise ClearError(f"{labels}: fold {k} keeps no training scan once {len(set(patients[val]))} validation "
                             "patient(s) are held out; lower --folds or --val-fraction, or label more patients")

    def run_fold(k, tick):  # NumPy out: from a worker, every tensor would travel as a file descriptor of its own
        train, val, test = splits[k]
        model, best_epoch = _train_fold(task, bags, y_bag, index[train], index[val], cfg, cfg.seed + k, tick)
        logits, att = infer(model, [bags.features[i] for i in index[test]])
        return (model.config, {n: v.numpy() for n, v in model.state_dict().items()}, best_epoch, logits.numpy(),
                [a.numpy() for a in att])

    scores, attention, models = np.zeros((len(scans), len(task.labels))), {}, []
    for k, (config, state, best_epoch, logits, att) in enumerate(map_folds(run_fold, cfg.folds, cfg.workers,
                                                                           cfg.epochs, bar)):
        test = splits[k][2]
        scores[test] = task.scores(torch.from_numpy(logits)).numpy()
        attention.update({scans[i]: (bags.z_mm[index[i]].numpy(), a) for i, a in zip(test, att)})
        models.append(dict(format=MIL_FORMAT, fold=k, best_epoch=best_epoch, model=config,
                           state_dict={n: torch.from_numpy(v) for n, v in state.items()}, task=asdict(task),
                           encoder=bags.encoder, test_scans=[scans[i] for i in test]))
    if bar:
        bar.close()
    y_np = y.numpy()  # (N, K) 0/1 for binary/multilabel, (N,) class index otherwise
    summary = dict(task=task.kind, targets=list(cfg.targets), labels=task.labels, classes=list(task.classes),
                   n_scans=len(scans), n_patients=len(set(patients)), folds=cfg.folds, n_bootstrap=cfg.n_bootstrap,
                   n_dropped=n_dropped, n_unlabelled=n_unlabelled,
                   best_epochs=[m["best_epoch"] for m in models], config=asdict(cfg),
                   rows=metrics.summarize(task.kind, y_np, scores, task.labels, patients, cfg.n_bootstrap, cfg.seed,
                                          folds=fold))
    preds = [dict(patient=patients[i], scan=s, fold=int(fold[i]),
                  **{f"true_{t}": f"{v:g}" for t, v in zip(cfg.targets, values[i])}, **r)
             for i, (s, r) in enumerate(zip(scans, task.fields(scores)))]
    member = y_np if task.kind in ("binary", "multilabel") else np.eye(len(task.classes))[y_np]  # (N, K) 0/1
    top = []
    for j, label in enumerate(task.labels):
        idx = np.flatnonzero(member[:, j] == 1)
        top += [dict(label=label, scan=scans[i], score=float(scores[i, j]), image=bags.images[index[i]])
                for i in idx[np.argsort(-scores[idx, j], kind="stable")][:cfg.n_top]]
    return FitResult(cfg, task, summary, preds, attention, top, models)


def save_run(out_dir, result):
    """RUN/metrics.json, RUN/predictions.csv, RUN/fold{k}.pt (weights + config), RUN/attention/<scan>.csv."""
    out = Path(out_dir)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    for m in result.models:
        with atomic_path(out / f"fold{m['fold']}.pt") as tmp:
            torch.save(m, tmp)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result.metrics, indent=2) + "\n")
    write_csv(out / "predictions.csv", result.predictions)
    for scan, (z_mm, att) in result.attention.items():
        write_csv(out / "attention" / f"{scan}.csv",
                  [{"z_mm": f"{z:.6g}", "attention": f"{a:.6g}"} for z, a in zip(z_mm, att)])
