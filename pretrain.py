"""How `clear.py pretrain` runs LeCL (lecl.py) on a cohort: the run's settings, the lr schedule, the training
loop, checkpoints and resume, and torchrun. The slice cache is cache.py, the sampler and the two views views.py,
the probe that shows what the encoder sees as it learns watch.py.

    python clear.py pretrain --data data/synth --encoder vit --method lecl --out runs/vit-lecl.pt
    torchrun --nproc_per_node=K clear.py pretrain ...             # K processes: GPUs (nccl) or CPU (gloo)

    step t of T:  ids = batch_ids(t) (a set share of lesion slices);  x1, x2 = make_views(ids)   (views.py)
                  loss = MoCo(x1, x2, lesion, m_t), m_t = momentum_at(t, T, m_0)                    (lecl.py)
                  AdamW at lr_t = base_lr · batch / 256, linear warm-up over warmup · T steps, then cosine

`method="moco"` is the ablation: the same slices without lesion crops and with w = 0, i.e. MoCo v3's InfoNCE.
`method="supervised"` is a supervised reference, not self-supervised: the encoder trained on the mask labels each
slice holds (supervised.py); a "ceiling" of this recipe, not a bound on the slices (docs/results.md).

Rank 0 writes a checkpoint (checkpoint.py: its format, and what --resume checks) to `out` atomically every
`checkpoint_every` steps, at the end, and when asked to stop; a run continued with --resume ends with the weights
of an uninterrupted one (exactly, on CPU).

Distributed (torchrun): DDP on the trainable branch; each process takes its share of every global batch, and
lecl.py gathers the keys and BatchNorm statistics of all; rank 0 builds the slice cache while the others wait. The
heads' BatchNorm becomes SyncBatchNorm on CUDA (as MoCo v3); on CPU, where gloo has none, lecl.GlobalBatchNorm1d.

Departures from the official code (KatherLab/CLEAR, a MoCo v3 fork): its `--sampling Lesion` path crashes on
undefined arguments, so this follows the paper's description and is tested instead; slices come from a cache with
a set share of lesion slices per batch (as an option all from one height of the scans, `matched_levels`); the lr
warm-up starts at lr/warm-up steps (MoCo v3: at 0).
"""
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cohort import Cohort
from data import SliceConfig
from checkpoint import check_resume, load_checkpoint, make_checkpoint, restore
from files import ClearError, amp_dtype, atomic_path, pick_device
from lecl import MoCo, gather, momentum_at
from models import build_encoder, effective_rank, stem
from cache import open_cache
from supervised import SliceClassifier
from views import ViewConfig, Views, batch_ids, level_pool, make_views, mix
from watch import LabelProbe


METHODS = ("lecl", "moco", "supervised")


def contrastive(method):
    """Whether `method` contrasts each slice with negatives (LeCL, MoCo v3): what --matched-levels is for. The
    supervised reference has none, and batches of one height would give its BatchNorm one anatomy's statistics
    (its emphysema fell from 0.94 to 0.60 on the twins, docs/results.md)."""
    return method != "supervised"


@dataclass(frozen=True)
class PretrainConfig:
    encoder: str = "vit"  # vit | gcnn | ssm, the paper's three families | cnn (models/cnn.py)
    size: str = "tiny"  # micro | tiny | small | base: the paper's are tiny to base; micro learns on a laptop CPU
    method: str = "lecl"  # lecl; moco: without lesion crops and lesion term (ablation); supervised: a reference
    steps: int = 1000  # optimizer steps: enough to see the loss fall on a small cohort
    epochs: float | None = None  # if set, replaces steps: ceil(epochs · cached slices / batch_size)
    batch_size: int = 256  # global over all processes; MoCo v3 states its lr rule per 256
    lr: float = 1.5e-4  # base lr at batch 256: MoCo v3's ViT recipe (AdamW)
    weight_decay: float = 0.1  # MoCo v3's ViT recipe
    warmup: float = 0.1  # share of the steps spent warming the lr up (MoCo v3: 40 of 300 epochs)
    momentum: float = 0.99  # m_0, rising to 1 on a cosine: MoCo v3's ViT value
    temperature: float = 0.2  # τ: MoCo v3's ViT recipe (its code's default 1.0 is for ResNets)
    lesion_weight: float = 1.0  # w: how strongly lesion keys count again as hard negatives; 1 is the official
    #                             code's default (KatherLab/CLEAR main_moco.py --sample-weight). Larger w unlearns
    #                             what lesion slices share, such as ground glass (docs/results.md, "Learning curves")
    lesion_fraction: float | None = 0.5  # share of lesion slices per batch; None: as often as in the cohort
    lesion_labels: tuple | None = None  # mask labels that are lesions; None: any non-zero label
    matched_levels: bool = False  # draw each batch from one height of the scans (views.batch_ids), so negatives
    #                               share their anatomy; off: uniform batches, as the paper and MoCo v3
    levels: tuple | None = None  # (lo, hi): pre-train on the slices at these heights of their scans alone, 0 the
    #                              first slice and 1 the last (views.level_pool); None: every slice
    proj_dim: int = 256  # d: MoCo v3's --moco-dim
    mlp_dim: int = 4096  # hidden width of projector and predictor: MoCo v3's --moco-mlp-dim
    img_size: int = 224  # S: the encoder's input, so extraction makes slices this size
    cache_size: int | None = None  # slice size in the cache; None: img_size (cache.py says why)
    thickness: float | None = None  # resample slices to this spacing in mm; None: as stored (data.SliceConfig)
    windows: tuple = SliceConfig.windows  # HU (level, width) per channel: lung, soft tissue, bone
    views: ViewConfig = ViewConfig()  # crops and augmentations
    freeze_stem: bool = False  # keep the encoder's first layer at its random init (models.stem): MoCo v3's remedy
    #                            (its Sec. 5) for the instability of ViTs early in training
    seed: int = 0  # initial weights, data order and every view follow from it
    device: str = "auto"  # auto: CUDA if present (bf16 autocast, fp16 where bf16 is missing), else CPU
    checkpoint_every: int = 500  # steps between checkpoints; one is also written at the end

    def __post_init__(self):
        rules = {"--method lecl, moco or supervised": self.method in METHODS, "--steps >= 1": self.steps >= 1,
                 "--batch-size >= 2": self.batch_size >= 2, "--epochs > 0": self.epochs is None or self.epochs > 0,
                 "--lr > 0": self.lr > 0, "warmup in [0, 1)": 0 <= self.warmup < 1,
                 "momentum in [0, 1)": 0 <= self.momentum < 1, "--temperature > 0": self.temperature > 0,
                 "--lesion-weight >= 0": self.lesion_weight >= 0,
                 "--checkpoint-every >= 1": self.checkpoint_every >= 1,
                 "--lesion-fraction in [0, 1]": self.lesion_fraction is None or 0 <= self.lesion_fraction <= 1,
                 "--device auto, cpu or cuda": self.device in ("auto", "cpu", "cuda"),
                 "--cache-size >= --img-size": (self.cache_size or self.img_size) >= self.img_size,
                 "--thickness > 0": self.thickness is None or self.thickness > 0,
                 "--levels LO HI with 0 <= LO < HI <= 1": self.levels is None or len(self.levels) == 2
                 and 0 <= self.levels[0] < self.levels[1] <= 1}
        for rule, ok in rules.items():
            if not ok:
                name = rule.split()[0].lstrip("-").replace("-", "_")
                raise ClearError(f"expected {rule} (got {getattr(self, name)!r})")


def lr_at(step, total, cfg):
    """AdamW lr: base · batch / 256, rising linearly over warmup · total steps, then a half cosine to 0."""
    peak, warm = cfg.lr * cfg.batch_size / 256, max(1, round(cfg.warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# --------------------------------------------------------------------------------------------- training


@dataclass
class PretrainResult:
    model: nn.Module  # the MoCo model as trained: encoder, heads, momentum copies
    start: int  # the step this call began at (> 0 when resumed)
    step: int  # the step it reached: total, unless interrupted
    total: int  # steps of the whole run
    losses: list  # loss per step of the whole run, mean over processes
    ranks: list  # per step of the whole run, RankMe of the global batch's encoder embeddings (view 1)
    seconds: float  # training time of this call, cache excluded
    run_seconds: float  # training time of the whole run: this call and the ones it resumed
    slices_per_s: float  # global-batch slices per second (each gives two views)
    cache: dict = field(default_factory=dict)  # folder, built, scans, slices, lesion_slices
    rank: int = 0
    interrupted: bool = False


def _join(name):
    """(device, rank, world, own_group): files.pick_device's device, CUDA as this process's LOCAL_RANK GPU; joins
    torchrun's processes (WORLD_SIZE > 1) unless a process group is up already: nccl on CUDA, gloo on CPU."""
    device = pick_device(name)  # under torchrun, CUDA is the LOCAL_RANK GPU
    cuda = device.type == "cuda"
    own = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own:
        if cuda:
            torch.cuda.set_device(device)
        # a long timeout: the other processes wait while rank 0 builds the slice cache
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    if dist.is_initialized():
        return device, dist.get_rank(), dist.get_world_size(), own
    return device, 0, 1, own


def _open_data(cfg, cohort, folder, rank, world, progress, should_stop):
    """The slice cache (built by rank 0 while the others wait), its counts, and the steps of the run."""
    slice_cfg = SliceConfig(cfg.windows, cfg.cache_size or cfg.img_size, cfg.thickness)
    if rank == 0:
        bar = progress and progress("cache", "scan")
        sc, built = open_cache(cohort, folder, slice_cfg, cfg.lesion_labels, bar, should_stop)
    if world > 1:
        dist.barrier()
    if rank != 0:
        sc, built = open_cache(cohort, folder, slice_cfg, cfg.lesion_labels)
    info = {"scans": len(cohort), "slices": len(sc), "lesion_slices": len(sc.lesion_ids)}
    if cfg.method == "supervised":  # the head's outputs: --resume on masks of other labels is refused
        info["label_values"] = list(sc.label_values)
    if cfg.method != "moco" and not len(sc.lesion_ids):
        raise ClearError(f"{cohort.root}: the masks mark no lesion"
                         f"{'' if cfg.lesion_labels is None else ' of --lesion-labels'}; use --method moco")
    if cfg.levels and cfg.batch_size > len(pool := level_pool(sc, cfg.levels)):
        raise ClearError(f"{cohort.root}: --levels {' '.join(map(str, cfg.levels))} holds {len(pool)} slices, "
                         f"fewer than a batch of {cfg.batch_size}; widen it or lower --batch-size")
    mixed = cfg.lesion_fraction is not None and len(sc.lesion_ids)  # else slices are drawn as they come
    n_les = round(cfg.lesion_fraction * cfg.batch_size) if mixed else 0
    if cfg.batch_size > len(sc) or mixed and (n_les > len(sc.lesion_ids)
                                              or cfg.batch_size - n_les > len(sc.other_ids)):
        raise ClearError(f"{cohort.root}: a batch of {cfg.batch_size} slices, {n_les} with lesions, needs more "
                         f"than the cohort's {len(sc)} slices ({len(sc.lesion_ids)} with lesions); lower "
                         "--batch-size or --lesion-fraction")
    total = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * len(sc) / cfg.batch_size)
    return sc, {"folder": str(folder), "built": built}, info, total


def pretrain(cfg, data, out, resume=None, cache=None, progress=None, should_stop=None, probe_every=0, log=print):
    """Pre-train an encoder on the cohort folder `data`; checkpoints go to `out` (atomically, by rank 0).

    resume: a checkpoint of this same run to continue. cache: the slice cache folder (default: `out` +
    ".cache", e.g. runs/vit.pt.cache). progress(desc, unit) -> ((iterable, total) -> iterable), e.g. a tqdm
    factory; a bar with `set_postfix_str` shows loss, effective rank, lr, momentum and slices/s. should_stop() is
    polled after every step: true writes a checkpoint and returns with `interrupted`. probe_every: every so many
    steps, rank 0 `log`s watch.LabelProbe's line (0: never). Under torchrun it runs distributed."""
    device, rank, world, own_group = _join(cfg.device)
    progress, out = progress if rank == 0 else None, Path(out)
    try:
        cohort = Cohort(data)
        if cfg.method != "moco" and not cohort.has_masks:
            raise ClearError(f"{data}: no lesion masks (masks/<scan>.nii.gz), and --method {cfg.method} reads "
                             "them; use --method moco for plain MoCo v3")
        unmasked = [s.scan for s in cohort if s.mask is None] if cfg.method == "supervised" else []
        if unmasked:  # its targets would call every finding of those scans absent
            raise ClearError(f"{data}: {len(unmasked)} scan(s) without a mask (e.g. {unmasked[0]}); --method "
                             "supervised needs every scan's")
        if cfg.batch_size % world:
            raise ClearError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
        torch.manual_seed(cfg.seed)
        try:
            encoder = build_encoder(cfg.encoder, cfg.size, in_chans=len(cfg.windows), img_size=cfg.img_size)
        except ValueError as e:
            raise ClearError(f"--encoder/--size/--img-size: {e}") from None
        ck = load_checkpoint(resume) if resume else None
        if ck is not None:
            check_resume(ck, resume, encoder.encoder_config, cfg)
        sc, cache_info, info, total = _open_data(cfg, cohort, Path(cache) if cache else Path(f"{out}.cache"),
                                                 rank, world, progress, should_stop)
        if cfg.method == "supervised":
            model = SliceClassifier(encoder, len(sc.label_values))
        else:
            model = MoCo(encoder, cfg.proj_dim, cfg.mlp_dim, cfg.temperature,
                         cfg.lesion_weight if cfg.method == "lecl" else 0.0)
        for p in stem(encoder).parameters() if cfg.freeze_stem else ():
            p.requires_grad_(False)  # out of AdamW (it takes the parameters that require grad) and of the momentum
            #                          update (lecl.MoCo.update_momentum): both copies stay at the init
        start, losses, ranks, before = 0, [], [], 0.0
        if ck is not None:
            if ck["data"] != info or ck["steps"] != total:
                raise ClearError(f"{resume}: a run of {ck['steps']} steps on {ck['data']}; this cohort gives "
                                 f"{info} and {total} steps")
            start, losses, ranks, before = ck["step"], list(ck["losses"]), list(ck["ranks"]), ck["seconds"]
        net = model.to(device)
        amp = amp_dtype(device)  # CPU: None, float32
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                      weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        if ck is not None:
            restore(ck, model, optimizer, scaler, device)
        if world > 1:
            if device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # the fused kernels replace GlobalBatchNorm1d
            net = nn.parallel.DistributedDataParallel(  # BN statistics are global already: no buffer sync
                net, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)

        probe = LabelProbe.for_run(sc, cohort, cfg, total, probe_every, log) if rank == 0 else None
        if probe and start == 0:
            probe(-1, encoder, device)  # step 0: random init's figure, the baseline
        n, steps = cfg.batch_size // world, range(start, total)
        views = Views(cfg.img_size, cfg.method == "lecl", cfg.views)
        steps = progress("pretrain", "step")(steps, len(steps)) if progress else steps
        postfix, t0, step, interrupted = getattr(steps, "set_postfix_str", None), time.perf_counter(), start, False
        for step in steps:
            lr, m = lr_at(step, total, cfg), momentum_at(step, total, cfg.momentum)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = batch_ids(sc, step, cfg.batch_size, cfg.seed, cfg.lesion_fraction, cfg.matched_levels, cfg.levels)
            ids = ids[rank * n:(rank + 1) * n]  # this process's share of the global batch
            seeds = [mix(cfg.seed, step, i) for i in range(rank * n, (rank + 1) * n)]  # by place in global batch
            x1, x2, lesion = make_views(sc, ids, seeds, views, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = net(x1, sc.labels[ids].to(device)) if cfg.method == "supervised" else net(x1, x2, lesion, m)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            stop = float(bool(should_stop and should_stop()))
            stats = torch.stack([loss.detach().float(), loss.new_tensor(stop)])
            if world > 1:
                dist.all_reduce(stats)  # the loss summed over processes; stop if any one was asked to
            losses.append(stats[0].item() / world)
            if not math.isfinite(losses[-1]):
                raise ClearError(f"training diverged (loss {losses[-1]} at step {step}); lower --lr")
            ranks.append(effective_rank(gather(model.embeddings)))  # of the global batch; SVD of (B, D): ~1 ms
            if postfix:
                rate = (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0)
                postfix(f"loss={losses[-1]:.3f} rank={ranks[-1]:.1f} lr={lr:.2e} m={m:.4f} {rate:.1f} slices/s")
            interrupted = stats[1].item() > 0
            probed = time.perf_counter()
            if probe and probe(step, encoder, device) is not None:
                t0 += time.perf_counter() - probed  # the probe's time is not training time
            if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total or interrupted):
                out.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(out, clean=True) as tmp:
                    torch.save(make_checkpoint(model, optimizer, scaler, cfg, step + 1, total, losses, ranks, info,
                                               before + time.perf_counter() - t0), tmp)
            if interrupted:
                break
        getattr(steps, "close", lambda: None)()  # a bar stopped early ends its line: the next one starts below
        done, seconds = (step + 1 if total > start else start), time.perf_counter() - t0
        return PretrainResult(model, start, done, total, losses, ranks, seconds, run_seconds=before + seconds,
                              slices_per_s=(done - start) * cfg.batch_size / max(seconds, 1e-9),
                              cache={**cache_info, **info}, rank=rank, interrupted=interrupted)
    finally:
        if own_group:
            dist.destroy_process_group()
