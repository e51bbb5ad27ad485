"""The settings of the accuracy benchmark (bench/accuracy.py) and what each row of its table depends on.

AccuracyConfig holds the table's settings; pretrain_config makes one row's PretrainConfig from them. A finished
row is kept with the fingerprint of the settings it depends on (encoder_settings for a row of the slice pipeline,
settings_3d for the 3D network), so that a re-run reuses exactly the rows whose settings did not change.
training_flops estimates a row's training compute from its settings alone.
"""
import hashlib
import json
from dataclasses import asdict, dataclass, replace

import torch

import cv
from bench.baseline3d import Net3DConfig, Volume3DConfig
from bench.learning import LearningConfig
from checkpoint import plain, run_settings
from data import named_windows
from extract import EncoderSpec
from files import amp_dtype, pick_device
from mil import AttentionMIL
from models import build_encoder, count_flops
from models.reference import HUHistogram
from phantom import SITES, SynthConfig
from pretrain import PretrainConfig, contrastive
from synth import SYNTH_FORMAT

TUMOUR_LABELS = tuple(range(1, len(SITES) + 1))  # phantom.py's mask labels of tumours (9, 10: lung disease)
RECIPE = LearningConfig()  # the demo's pre-training recipe (its checkpoints are bench/learning.py's runs): the
#                           table's rows pre-train the same way, each family at its CPU size
TASKS = {"location": (tuple(f"loc_{s}" for s in SITES), None), "lung_disease": (("lung_disease",), None),
         "stage": (("stage",), "ordinal")}


@dataclass(frozen=True)
class AccuracyConfig:
    cohort: SynthConfig = SynthConfig(n=400)  # 400 scans, default difficulty, seed 0: the MIL's folds
    corpus: SynthConfig = SynthConfig(n=600, seed=7)  # what the encoders pre-train on, as DeepLesion in the paper:
    #                     other patients than the cohort's (another seed), and more of them
    thickness: float = 10.0  # mm between the slices that pre-training and extraction see (a 2D pipeline's
    #                          usual 5-10 mm; 1-5 mm stored slices would cost 3x the extraction)
    img_size: int = 64  # encoder input: 2x below the 128-px cohort, so that 2 CPU cores pre-train 12 encoders
    encoders: tuple = ("cnn", "vit", "gcnn", "ssm")  # cnn first: the demo's family, whose supervised ceiling is above
    #                     chance at this budget (docs/results.md), so the data-efficiency curves are of a row that
    #                     can learn; then the paper's three
    size: str = RECIPE.size  # micro for every family: the demo's cnn-micro on the table's cohort finds lung disease
    #                          at 0.70 where cnn-tiny at batch 64 pre-trains to chance (docs/results.md)
    methods: tuple = ("lecl", "moco", "random", "supervised")  # supervised: the ceiling, on the corpus's masks
    steps: int = RECIPE.steps  # pre-training steps per encoder: equal for every encoder and method
    batch_size: int = RECIPE.batch_size
    lr: float = RECIPE.lr  # AdamW at batch 256 (pretrain.lr_at scales it)
    mlp_dim: int = RECIPE.mlp_dim  # heads' hidden width (MoCo v3: 4096; 1024 for CPU)
    windows: tuple = RECIPE.windows  # data.WINDOWS by name, one input channel each, for every 2D row: the narrow
    #                  parenchyma window keeps a pixel's HU level through the LayerNorm of vit, gcnn and ssm
    #                  (models/cnn.py)
    matched_levels: bool = RECIPE.matched_levels  # LeCL's and MoCo v3's batches from one height of the scans
    #                                               (views.batch_ids), so negatives share their anatomy
    levels: tuple | None = (0.52, 0.88)  # contrastive rows pre-train on the chest's slices alone (clear.py pretrain
    #                                      --levels), as the demo's LeCL; the supervised ceiling on every slice
    fit: cv.FitConfig = cv.FitConfig(targets=("x",), n_bootstrap=1000)  # targets set per task; the MIL trains
    #                     every epoch, as clear.py fit does (early stopping on ~64 scans chooses by noise)
    val_fraction_3d: float = 0.2  # the 3D network early-stops on a fifth of the training patients: its recipe
    volume: Volume3DConfig = Volume3DConfig()
    net: Net3DConfig = Net3DConfig()
    epochs_3d: int = 30  # the 3D network's epochs (early-stopped on validation AUROC like the MIL)
    fractions: tuple = (0.1, 0.25, 0.5, 1.0)
    histogram: bool = True  # the reference row: HU-histogram bags (models.reference.HUHistogram), nothing learnt
    histogram_bins: int = 32  # per window channel (models.reference.HUHistogram says why 32)
    pretrain_changes: tuple = ()  # to every pre-trained row's PretrainConfig: ("field", value) or ("views.field",
    #                               value) pairs (`changed`); bench/ablation.py's variants; none in the table


QUICK = AccuracyConfig(cohort=SynthConfig(n=40, size=48, thickness=(8.0, 10.0), workers=1), img_size=32,
                       corpus=SynthConfig(n=12, seed=7, size=48, thickness=(8.0, 10.0), workers=1),
                       encoders=("vit",), steps=3, batch_size=8, mlp_dim=64, epochs_3d=2, fractions=(0.5, 1.0),
                       fit=cv.FitConfig(targets=("x",), folds=3, epochs=3, n_bootstrap=50),
                       volume=Volume3DConfig(depth=8, size=16), net=Net3DConfig(widths=(4, 8, 8, 8)))


def task_targets(cohort, name, folds):
    """A task's label columns, without those too rare to stratify into `folds` (dropped, and reported)."""
    targets, kind = TASKS[name]
    keep = [t for t in targets if min(sum(s.labels[t] == v for s in cohort) for v in (0, 1)) >= folds] \
        if kind is None and len(targets) > 1 else list(targets)
    return tuple(keep), kind, [t for t in targets if t not in keep]


def changed(cfg, key, value):
    """The dataclass `cfg` with field `key` set to `value`; "outer.inner" sets a field of the nested `cfg.outer`."""
    outer, _, inner = key.partition(".")
    return replace(cfg, **{outer: replace(getattr(cfg, outer), **{inner: value}) if inner else value})


def pretrain_config(cfg, encoder, method):
    """The pre-training of one row: the same budget for every encoder and method, then cfg.pretrain_changes."""
    pcfg = PretrainConfig(encoder=encoder, size=cfg.size, method=method, steps=cfg.steps, batch_size=cfg.batch_size,
                          lr=cfg.lr, mlp_dim=cfg.mlp_dim, img_size=cfg.img_size, thickness=cfg.thickness,
                          windows=named_windows(cfg.windows), matched_levels=cfg.matched_levels and contrastive(method),
                          levels=cfg.levels if contrastive(method) else None,
                          checkpoint_every=max(1, cfg.steps // 4), seed=cfg.cohort.seed)
    for key, value in cfg.pretrain_changes:
        pcfg = changed(pcfg, key, value)
    return pcfg


def histogram(cfg):
    """The reference row's encoder: the HU histogram of each of the table's windows, nothing learnt."""
    return HUHistogram(len(cfg.windows), cfg.histogram_bins)


def training_flops(cfg, encoder, method, n_slices):
    """A row's estimated training FLOPs, from its settings (pretrain_config's, cfg.pretrain_changes included) and
    its bags' slices alone, so that a kept row is counted by the same counter as a new one (models.count_flops):
    pre-training steps x batch x 2 views x (3 for the encoder's forward and backward + 1 for the momentum encoder's
    forward) x one slice's forward (supervised: 1 view x 3), plus the extraction of every bag slice, plus the MIL
    fits (3 x forward per bag slice x the training folds' share x epochs x folds x tasks, as run_3d counts the 3D
    network's). The heads (projector, predictor: about 2 % at mlp-dim 1024) are left out."""
    steps, batch, img_size = 0, 0, cfg.img_size
    if method == "none":
        enc = histogram(cfg)
    elif method == "random":
        enc = build_encoder(encoder, cfg.size, in_chans=len(cfg.windows), img_size=img_size)
    else:
        p = pretrain_config(cfg, encoder, method)
        steps, batch, img_size = p.steps, p.batch_size, p.img_size
        enc = build_encoder(encoder, p.size, in_chans=len(cfg.windows), img_size=img_size)
    per_slice = count_flops(enc, torch.zeros(1, len(cfg.windows), img_size, img_size))  # (1, C, S, S)
    mil = AttentionMIL(enc.embed_dim, 8, cfg.fit.hidden, att_dim=cfg.fit.att_dim)
    per_bag_slice = count_flops(mil, torch.zeros(1, 100, enc.embed_dim)) / 100  # a bag of (1, 100, D)
    k = cfg.fit.folds
    mil_flops = 3 * per_bag_slice * n_slices * (1 - 1 / k) * cfg.fit.epochs * k * len(TASKS)
    per_sample = 3 if method == "supervised" else 2 * 4
    return steps * batch * per_sample * per_slice + n_slices * per_slice + mil_flops


FIT_3D = ("folds", "lr", "weight_decay", "batch_size", "patience", "val_fraction", "seed", "n_bootstrap")  # of
#          cv.FitConfig, what the 3D baseline reads (epochs are its own, epochs_3d; the rest is the MIL's)


def encoder_making(cfg, encoder, method):
    """What a row's checkpoint and bags depend on: the cohort, the slices, and how its encoder is made (the whole
    pre-training config, crops and augmentations included; a random init; or the histogram's bins)."""
    if method == "random":
        made = {"random": encoder, "size": cfg.size, "seed": EncoderSpec.seed, "img_size": cfg.img_size,
                "windows": cfg.windows}
    elif method == "none":
        made = {"histogram": cfg.histogram_bins, "img_size": cfg.img_size, "windows": cfg.windows}
    else:
        made = run_settings(pretrain_config(cfg, encoder, method))  # a switch that is off is left out (checkpoint.py)
    making = {"cohort": cohort_settings(cfg), "thickness": cfg.thickness, "encoder": made}
    if method not in ("random", "none"):
        making["corpus"] = cohort_settings(cfg, "corpus")
    if extraction_device() == "cuda":  # other numbers than the CPU's, so other rows
        making["extraction"] = f"cuda, {'bf16' if amp_dtype('cuda') == torch.bfloat16 else 'fp16'} autocast"
    return making


def extraction_device():
    """Where the benchmark extracts bags: files.pick_device("auto"), the GPU when there is one (embed_slices:
    files.amp_dtype's autocast) as for pre-training's "auto" device, else the CPU (fp32)."""
    return pick_device("auto").type


def encoder_settings(cfg, encoder, method):
    """What a row of the slice pipeline depends on: its encoder's making and the MIL fits (worker processes aside:
    the same fits come out for any number; torch threads stay in, as they may change the order of float sums)."""
    return {**encoder_making(cfg, encoder, method), "fit": asdict(replace(cfg.fit, workers=0))}


def fit_3d(cfg):
    """The fit settings of the 3D network: the MIL's, early-stopped on cfg.val_fraction_3d of the patients."""
    return replace(cfg.fit, val_fraction=cfg.val_fraction_3d)


def settings_3d(cfg):
    """What a task of the 3D baseline depends on: the cohort, the fit settings it reads (FIT_3D) and its own."""
    fit = {k: getattr(fit_3d(cfg), k) for k in FIT_3D}
    return {"cohort": cohort_settings(cfg), "fit": fit, "volume": asdict(cfg.volume), "net": asdict(cfg.net),
            "epochs": cfg.epochs_3d}


def cohort_settings(cfg, which="cohort"):
    """The cohort's (or the corpus's) settings without its worker processes (the same scans come out for any
    number), and synth.SYNTH_FORMAT: a version of synth that draws other scans from the same settings makes
    other rows."""
    return {**asdict(replace(getattr(cfg, which), workers=0)), "format": SYNTH_FORMAT}


def fingerprint(settings):
    """A finished row is reused only by a run whose settings for it hash the same."""
    return hashlib.sha256(json.dumps(plain(settings), sort_keys=True).encode()).hexdigest()[:16]
