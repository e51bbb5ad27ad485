"""The pre-training checkpoint: what `clear.py pretrain` writes, `extract` reads, and `--resume` continues.

A checkpoint is a torch.save dict of tensors, dicts, lists, numbers and strings only, so torch.load(weights_only=True)
reads it (load_checkpoint, through files.load_untrusted):

    format         FORMAT: a checkpoint of another format is refused in one line
    encoder_config build_encoder's arguments         \\
    encoder        the encoder's state_dict           > what extract.py needs
    slice_config   windows, img_size, thickness_mm   /
    losses, ranks  per step of the whole run: the loss, and the effective rank of the batch's embeddings
    seconds        training time of the run so far, over every process that resumed it
    config, step, steps, data, state   the run's settings, where it stands, its cohort's counts, and the heads,
                   momentum copies, AdamW, GradScaler and RNG states (the CPU's, and the GPU's the run was on):
                   what --resume needs to continue exactly; a slim checkpoint (slim) has no state: the encoder
                   and the run's record, to share or ship

A run is defined by its settings without RUNTIME_FIELDS (run_settings); --resume continues only a checkpoint of
the same run on the same data (check_resume). A change to what a checkpoint holds bumps FORMAT.
"""
from dataclasses import asdict
from pathlib import Path

import torch

from files import ClearError, atomic_path, load_untrusted

FORMAT = "clear-pretrain/2"
RUNTIME_FIELDS = ("device", "checkpoint_every")  # may change on --resume; every other field defines the run
OFF_WHEN_NONE = ("levels",)  # options that None turns off, as False turns off a switch (run_settings)


def plain(x):
    """Tuples -> lists, recursively: a checkpoint holds only tensors, dicts, lists, numbers and strings."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def run_settings(cfg):
    """The settings that define a run (a PretrainConfig, or the config as a checkpoint stores it): all but
    RUNTIME_FIELDS, and but the options that are off (a switch False, OFF_WHEN_NONE None): turning one on makes
    another run, adding one to PretrainConfig leaves every earlier run, checkpoint and kept result what it was."""
    d = cfg if isinstance(cfg, dict) else plain(asdict(cfg))
    return {k: v for k, v in d.items()
            if k not in RUNTIME_FIELDS and v is not False and not (k in OFF_WHEN_NONE and v is None)}


def rng_state(device):
    """The RNG states --resume puts back: the CPU generator's, and the CUDA generator of `device` alone, [] on the
    CPU (reading every GPU's would open a CUDA context on each, in every process of a torchrun)."""
    return {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def make_checkpoint(model, optimizer, scaler, cfg, step, total, losses, ranks, data_info, seconds=0.0):
    """The checkpoint of a lecl.MoCo (or supervised.SliceClassifier) `model` trained with PretrainConfig `cfg` to
    `step` of `total` steps.
    `seconds`: training time of the run so far, over every process that resumed it."""
    sd = model.state_dict()
    rng = rng_state(next(model.parameters()).device)
    return {"format": FORMAT, "encoder_config": dict(model.encoder.encoder_config),
            "encoder": {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")},
            "slice_config": {"windows": plain(cfg.windows), "img_size": cfg.img_size,
                             "thickness_mm": cfg.thickness},
            "config": plain(asdict(cfg)), "step": step, "steps": total, "losses": list(losses), "ranks": list(ranks),
            "seconds": seconds,
            "data": data_info, "state": {"model": {k: v for k, v in sd.items() if not k.startswith("encoder.")},
                                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                         "rng": rng}}


def load_checkpoint(path):
    """Read a pre-training checkpoint as the untrusted input it is (weights_only=True), or raise ClearError."""
    path = Path(path)
    if not path.is_file():
        raise ClearError(f"{path}: no such checkpoint")
    ck = load_untrusted(path, "not a readable checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        found = ck.get("format") if isinstance(ck, dict) else None
        raise ClearError(f"{path}: not a CLEAR pre-training checkpoint of format {FORMAT}"
                         + (f" (it is {found}: pre-train again)" if isinstance(found, str) else ""))
    return ck


def slim(path):
    """Rewrite the checkpoint at `path` without its training state (heads, momentum copies, AdamW, RNG): what extract
    needs and the run's record, a fraction of the size; it can no longer be resumed."""
    ck = load_checkpoint(path)
    ck.pop("state", None)
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


def check_resume(ck, path, encoder_config, cfg):
    """Raise ClearError unless checkpoint `ck` is of this very run: same encoder, same settings."""
    if "state" not in ck:
        raise ClearError(f"{path}: a slim checkpoint (no training state), which cannot be resumed")
    have, want = ck["encoder_config"], encoder_config
    if have != want:
        raise ClearError(f"{path}: a checkpoint of encoder {have['name']}/{have['size']} at {have['img_size']} "
                         f"px; this command asks for {want['name']}/{want['size']} at {want['img_size']} px")
    have, want = run_settings(ck["config"]), run_settings(cfg)
    for k in sorted(have.keys() | want.keys()):
        off = None if k in OFF_WHEN_NONE else False  # what a setting left out is: an option that is off
        h, w = have.get(k, off), want.get(k, off)
        if h != w:
            raise ClearError(f"{path}: trained with {k}={h!r}, this command has {k}={w!r}; resume with the same "
                             "settings")


def restore(ck, model, optimizer, scaler, device):
    """Put checkpoint `ck`'s weights into `model` and its optimizer, scaler and RNG states back, for --resume."""
    encoder_state = {f"encoder.{k}": v for k, v in ck["encoder"].items()}
    model.load_state_dict({**encoder_state, **ck["state"]["model"]})
    torch.set_rng_state(ck["state"]["rng"]["torch"])
    optimizer.load_state_dict(ck["state"]["optimizer"])
    if ck["state"]["scaler"]:  # empty when saved without fp16 (CPU or bf16): a fresh scaler then
        scaler.load_state_dict(ck["state"]["scaler"])
    if device.type == "cuda" and len(ck["state"]["rng"]["cuda"]) == 1:  # a checkpoint written on a GPU
        torch.cuda.set_rng_state(ck["state"]["rng"]["cuda"][0], device)
