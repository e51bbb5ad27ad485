"""From scans to bags: every axial slice of every scan embedded once by a frozen 2D encoder (CLEAR, Sec. 3.2).

    encoder, identity, slices = load_encoder(EncoderSpec(checkpoint="ckpt.pt"))
    for event in extract_bags(Cohort("data/synth"), encoder, identity, slices, "bags"): ...

A bag is one file per scan, `BAGS/<scan>.pt` (torch.save of a dict, read with weights_only=True):
    features  float32 (n_slices, D)   the slice embeddings, inferior -> superior
    z_mm      float64 (n_slices,)     each slice's z position in mm from the scan's most inferior slice
    encoder   dict                    the encoder's identity: name, size, source, sha256 of its weights
    image     str                     the source image (attention overlays are drawn on its grid)
and `BAGS/manifest.json` holds the encoder identity, the slice settings and how the bags were computed (device and
precision, `compute`). Bags of different encoders, or of one encoder at two precisions, never share a folder.
Features made elsewhere (a foundation model, another pipeline) can be fitted with `clear.py fit` by writing the same
format.
"""
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from data import SliceConfig, load_ct, prepare_slices
from files import ClearError, amp_dtype, atomic_path
from models import build_encoder


@dataclass(frozen=True)
class EncoderSpec:
    """Where the encoder comes from: exactly one of checkpoint, name (random init) or module."""
    checkpoint: str | None = None  # a `clear.py pretrain` checkpoint: architecture, weights, slice settings
    name: str | None = None  # vit | gcnn | ssm | cnn with random weights: the baseline LeCL must beat
    size: str = "tiny"
    module: str | None = None  # "file.py:factory": any nn.Module mapping (B, C, H, W) -> (B, D)
    img_size: int = 224  # input size for name/module encoders (a checkpoint brings its own)
    seed: int = 0  # random init is seeded, so shards and re-runs build the same encoder
    windows: tuple | None = None  # HU (level, width) per channel for name/module encoders; None: SliceConfig's
    #                               three. A checkpoint brings its own: the random init of a 4-window run needs 4


def weights_sha256(module):
    """A fingerprint of a module's weights: two bags are comparable only if their encoders match."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_checkpoint(path):
    ckpt = load_checkpoint(path)  # weights_only=True: a checkpoint is untrusted input
    try:
        encoder = build_encoder(**ckpt["encoder_config"])
        encoder.load_state_dict(ckpt["encoder"])
        sc = ckpt["slice_config"]
        slices = SliceConfig(windows=tuple(tuple(w) for w in sc["windows"]), img_size=int(sc["img_size"]),
                             thickness_mm=sc.get("thickness_mm"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        why = (lines[1] if len(lines) > 1 else lines[0])[:200]  # load_state_dict's first line only says "Error(s)"
        raise ClearError(f"{path}: encoder weights do not fit {ckpt.get('encoder_config')} "
                         f"({type(e).__name__}: {why})") from None
    return encoder, {**ckpt["encoder_config"], "source": f"checkpoint {Path(path).name}"}, slices


def _load_module(spec, slices):
    file, _, factory = spec.rpartition(":")
    if not file or not factory or not Path(file).is_file():
        raise ClearError(f"{spec}: expected FILE.py:FACTORY naming an existing file")
    module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the user's own code, named by the user on the command line
    if not callable(getattr(module, factory, None)):
        raise ClearError(f"{file}: has no callable {factory!r}")
    encoder = getattr(module, factory)()
    if not isinstance(encoder, torch.nn.Module):
        raise ClearError(f"{file}: {factory}() returned {type(encoder).__name__}, not a torch.nn.Module")
    return encoder, {"name": f"{Path(file).name}:{factory}", "source": "module"}, slices


def load_encoder(spec):
    """(encoder in eval mode, identity dict, SliceConfig) for an EncoderSpec."""
    if sum(x is not None for x in (spec.checkpoint, spec.name, spec.module)) != 1:
        raise ClearError("give exactly one of --checkpoint, --encoder NAME --random-init, --encoder-module")
    if spec.checkpoint is not None and spec.windows is not None:
        raise ClearError("--windows is for --random-init and --encoder-module; a checkpoint brings its own")
    slices = SliceConfig(img_size=spec.img_size, **({} if spec.windows is None else {"windows": spec.windows}))
    if spec.checkpoint is not None:
        encoder, identity, slices = _load_checkpoint(spec.checkpoint)
    elif spec.module is not None:
        encoder, identity, slices = _load_module(spec.module, slices)
    else:
        torch.manual_seed(spec.seed)
        try:
            encoder = build_encoder(spec.name, spec.size, in_chans=len(slices.windows), img_size=spec.img_size)
        except ValueError as e:
            raise ClearError(f"--encoder: {e}") from None
        identity = {**encoder.encoder_config, "source": f"random init, seed {spec.seed}"}
    return encoder.eval(), {**identity, "sha256": weights_sha256(encoder)}, slices


def compute(device):
    """How bags are computed on `device`, as the manifest records it: "cpu, float32", "cuda, bfloat16 autocast"."""
    dtype = amp_dtype(device)
    return f"{torch.device(device).type}, " + ("float32" if dtype is None else f"{str(dtype)[6:]} autocast")


def embed_slices(encoder, slices, batch_size=64, device="cpu"):
    """(n, C, S, S) slices -> (n, D) float32 embeddings, in batches, without gradients; on a GPU under autocast
    (files.amp_dtype: bfloat16, or float16 where bfloat16 is emulated)."""
    out, dtype = [], amp_dtype(device)
    with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type, dtype=dtype,
                                                enabled=dtype is not None):
        for chunk in slices.split(batch_size):
            out.append(encoder(chunk.to(device)).float().cpu())  # (b, D)
    return torch.cat(out)  # (n, D)


def read_manifest(bags):
    path = Path(bags) / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError) as e:
        raise ClearError(f"{path}: unreadable ({e})") from None


def extract_bags(cohort, encoder, identity, slices, out, batch_size=64, device="cpu", shard=(0, 1)):
    """Embed every scan of the shard `shard = (k, n)` (scans k, k + n, ...) into `out`/<scan>.pt.

    A generator: yields ("done" | "skipped" | "failed", scan, detail) per scan, where detail is the number of
    slices embedded, or the one-line cause of a failure. Scans whose bag exists are skipped (re-running after
    a crash continues); a scan that cannot be read fails alone, without stopping the others. One volume
    in memory at a time; every file is written to a temporary name and renamed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"encoder": identity, "slices": {"windows": [list(w) for w in slices.windows],
                                                "img_size": slices.img_size,
                                                "thickness_mm": slices.thickness_mm},
                "compute": compute(device)}
    existing = read_manifest(out)
    if existing is not None:  # one without "compute" is read as CPU float32's, so CPU bags written without it continue
        existing = {**existing, "compute": existing.get("compute", "cpu, float32")}
    if existing is not None and existing["compute"] != manifest["compute"]:
        raise ClearError(f"{out}: holds bags computed as {existing['compute']}, this run computes them as "
                         f"{manifest['compute']}; bags of two precisions never share a folder: use another --out")
    if existing is not None and existing != manifest:
        raise ClearError(f"{out}: holds bags from another encoder or slice setting "
                         f"({existing.get('encoder', {}).get('name')}, {existing.get('slices')}); "
                         "use another --out")
    if existing is None:
        with atomic_path(out / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    encoder = encoder.to(device)
    k, n = shard
    for scan in cohort.scans[k::n]:
        target = out / f"{scan.scan}.pt"
        if target.exists():
            yield "skipped", scan.scan, 0
            continue
        try:
            volume, spacing = load_ct(scan.image)
        except ClearError as e:
            yield "failed", scan.scan, str(e)
            continue
        x, z_mm = prepare_slices(volume, spacing, slices)  # (Z', C, S, S), (Z',)
        del volume
        features = embed_slices(encoder, x, batch_size, device)  # (Z', D)
        with atomic_path(target) as tmp:
            torch.save({"features": features, "z_mm": z_mm.double(), "encoder": identity,
                        "image": str(scan.image)}, tmp)
        yield "done", scan.scan, len(features)


def shard_from_env():
    """Under torchrun every rank takes its own shard: (RANK, WORLD_SIZE), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def parse_shard(text):
    """--shard K/N as (K, N)."""
    try:
        k, n = (int(v) for v in text.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise ClearError(f"--shard {text}: expected K/N with 0 <= K < N") from None
    return k, n
