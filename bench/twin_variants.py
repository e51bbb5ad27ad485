"""The ad hoc encoders of the twin test's variants (docs/results.md, 'With anatomy and noise held fixed'), kept so
that its figures can be made again: variants of the random-init ViT-tiny (seed 0, the draw of `benchmark.py twin
--encoder vit`), pixel grids of other sizes than models.reference.PixelGrid's default, and the shipped LeCL encoder
cut short (docs/results.md, 'Levers for emphysema'). Each name is a factory for

    python benchmark.py twin --encoder-module bench/twin_variants.py:NAME --img-size 64
    (the cnn cuts: ... --windows lung soft bone parenchyma, the shipped checkpoint's)

Measurements, not part of the method: the library never imports this file.
"""
import dataclasses

import torch
import torch.nn as nn

from demo import CHECKPOINTS
from extract import EncoderSpec, load_encoder
from models import build_encoder
from models.reference import PixelGrid


def vit():
    """The ViT-tiny of `benchmark.py twin --encoder vit`: the same seed, so the same weights in every variant."""
    torch.manual_seed(0)
    return build_encoder("vit", size="tiny", img_size=64)


def vit_no_norm():
    """Every LayerNorm (the blocks' two and the final one) replaced by an identity."""
    m = vit()
    m.norm = nn.Identity()
    for block in m.blocks:
        block.norm1, block.norm2 = nn.Identity(), nn.Identity()
    return m


def vit_no_final_norm():
    m = vit()
    m.norm = nn.Identity()
    return m


def vit_mean_pool():
    """The mean of the patch tokens instead of the class token."""
    m = vit()
    m.cfg = dataclasses.replace(m.cfg, pool="mean")
    return m


class PatchProjection(nn.Module):
    """The ViT's random patch projection alone, averaged over the slice's patches: (B, C, H, W) -> (B, D), linear."""

    def __init__(self):
        super().__init__()
        self.vit = vit()
        self.embed_dim = self.vit.embed_dim

    def forward(self, x):  # x: (B, C, H, W)
        tokens, _ = self.vit.patch_embed(x)  # (B, h·w, D)
        return tokens.mean(1)  # (B, D)


def grid1():
    return PixelGrid(3, 1)  # the slice's mean in each window


def grid2():
    return PixelGrid(3, 2)


def grid8():
    return PixelGrid(3, 8)


class CutCNN(nn.Module):
    """A models.cnn.PlainCNN's stem and first `k` stage layers (None: all), pooled over the grid: (B, C, H, W) ->
    (B, D_k). Its earlier features, before the later layers have made them invariant to what the contrastive task
    did not need. pool: "mean" (the encoder's own), "max", or "gem" (generalised mean, p = 3: Radenović et al.
    2018), which weigh a finding that covers a few cells of the grid more than the mean does."""

    def __init__(self, cnn, k=None, pool="mean"):
        super().__init__()
        self.stem, self.stages, self.pool = cnn.stem, cnn.stages[:k], pool
        self.embed_dim = self.stages[-1][1].num_features  # the last conv-BN-ReLU's BatchNorm width

    def forward(self, x):  # x: (B, C, H, W)
        f = self.stages(self.stem(x))  # (B, D_k, h, w), >= 0 after the ReLU
        if self.pool == "max":
            return f.amax(dim=(2, 3))  # (B, D_k)
        if self.pool == "gem":
            return f.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)  # (B, D_k)
        return f.mean(dim=(2, 3))  # (B, D_k)


def shipped(which):
    """One of the demo's shipped cnn-micro encoders (demo.CHECKPOINTS: "lecl" or "supervised")."""
    encoder, _, _ = load_encoder(EncoderSpec(checkpoint=str(CHECKPOINTS[which])))
    return encoder


def lecl_cut(k, pool="mean"):
    """The shipped LeCL encoder cut after `k` of its stage layers (None: uncut)."""
    return CutCNN(shipped("lecl"), k, pool).eval()


def lecl_cut3():
    return lecl_cut(3)


def random_cut3():
    """The control of lecl_cut3: the same architecture (cnn-micro, the four windows) at random init, cut the same
    way, so what pre-training added to those layers shows."""
    torch.manual_seed(0)
    return CutCNN(build_encoder("cnn", size="micro", in_chans=4, img_size=64), 3).eval()


def lecl_cut4():
    return lecl_cut(4)


def lecl_max():
    """The whole shipped LeCL encoder, max-pooled instead of mean-pooled."""
    return lecl_cut(None, "max")


def lecl_gem():
    return lecl_cut(None, "gem")


def lecl_cut3_max():
    return lecl_cut(3, "max")


def supervised_max():
    """The shipped supervised reference, max-pooled: does max pooling keep what it finds?"""
    return CutCNN(shipped("supervised"), pool="max").eval()
