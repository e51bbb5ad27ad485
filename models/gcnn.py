"""Gated CNN, the MambaOut encoder (Yu & Wang 2024, "MambaOut: Do We Really Need Mamba for Vision?"): a Mamba
block with its state-space model taken out, stacked in a 4-stage hierarchy.

Gated CNN block (MambaOut Alg. 1; the gated linear unit of Dauphin et al. 2017 with a token mixer):
    g, i, c = split(Linear_{D -> 2E}(LN(x)))          gate (E), identity (E - D_c), conv part (D_c = D)
    c = DWConv_{7x7}(c)                               depthwise: one 7x7 filter per channel
    x = x + Linear_{E -> D}(GELU(g) * [i, c])         E = 8/3 D, the hidden width of MambaOut
Stages: stem (two 3x3 stride-2 convs, /4), then stages of blocks at strides 4, 8, 16, 32 joined by a 3x3
stride-2 conv + LN; the embedding is LN(mean over the final grid).

Shapes: B batch, C input channels, H W image height and width, h w feature grid of a stage, D stage width,
E hidden width of a block. Inside a stage features are channels-last (B, h, w, D), as in the official code,
so the norms and linears act on the last axis; only the depthwise conv sees (B, D, h, w).

Size table (models/__init__.py) maps our names to the MambaOut family by compute, so that each is comparable to
the ViT of the same name (MACs at 224², with their 1000-class heads):
    tiny  = MambaOut-Femto  depths (3, 3, 9, 3)  widths (48, 96, 192, 288)   1.2 G  (ViT-Ti 1.3 G)
    small = MambaOut-Tiny   depths (3, 3, 9, 3)  widths (96, 192, 384, 576)  4.5 G  (ViT-S  4.6 G)
    base  = MambaOut-Base   depths (3, 4, 27, 3) widths (128, 256, 512, 768) 15.8 G (ViT-B 17.6 G)

Departures from the official MambaOut: no classifier head (its MLP head) and no drop-path; the stride-2 convs
pad by one, so any input size works (odd sizes round up), while a multiple of 32 keeps every stage's grid exact.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import check_images, init_weights_


@dataclass(frozen=True)
class GCNNConfig:
    depths: tuple = (3, 3, 9, 3)  # blocks per stage: MambaOut-Femto
    dims: tuple = (48, 96, 192, 288)  # stage widths: MambaOut-Femto
    expand: float = 8 / 3  # E / D: MambaOut's hidden ratio (keeps the block's cost near a 4x MLP's)
    kernel_size: int = 7  # depthwise token mixer, as in MambaOut and ConvNeXt
    in_chans: int = 3  # C: our CT slices carry three HU windows
    img_size: int = 224  # recorded for rebuilding; a CNN has no stored grid, any input size works

    def __post_init__(self):
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} differ in length")


class GatedCNNBlock(nn.Module):
    """The Gated CNN block; acts on channels-last features (B, h, w, D)."""

    def __init__(self, dim, expand, kernel_size):
        super().__init__()
        hidden = int(expand * dim)
        self.split = (hidden, hidden - dim, dim)  # gate, identity, conv part (MambaOut's conv_ratio = 1)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):  # x: (B, h, w, D)
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split, dim=-1)  # (B, h, w, E), (.., E - D), (.., D)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, h, w, D)
        return x + self.fc2(F.gelu(g) * torch.cat([i, c], dim=-1))  # (B, h, w, D)


class Downsample(nn.Module):
    """3x3 stride-2 convolution then LayerNorm: halves the grid, changes the width."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out, eps=1e-6)

    def forward(self, x):  # x: (B, h, w, D_in)
        x = self.conv(x.permute(0, 3, 1, 2))  # (B, D_out, h/2, w/2)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, h/2, w/2, D_out)


class Stem(nn.Module):
    """Two 3x3 stride-2 convolutions (C -> D/2 -> D), LN after each and GELU between: the image at 1/4."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2, eps=1e-6)
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):  # x: (B, C, H, W)
        x = self.norm1(self.conv1(x).permute(0, 2, 3, 1))  # (B, H/2, W/2, D/2)
        x = self.conv2(F.gelu(x).permute(0, 3, 1, 2))  # (B, D, H/4, W/4)
        return self.norm2(x.permute(0, 2, 3, 1))  # (B, H/4, W/4, D)


class GatedCNN(nn.Module):
    """(B, C, H, W) -> (B, D) with D the last stage's width."""

    def __init__(self, cfg: GCNNConfig):
        super().__init__()
        self.cfg, self.in_chans, self.embed_dim = cfg, cfg.in_chans, cfg.dims[-1]
        self.stem = Stem(cfg.in_chans, cfg.dims[0])
        self.downsamples = nn.ModuleList(Downsample(a, b) for a, b in zip(cfg.dims[:-1], cfg.dims[1:]))
        self.stages = nn.ModuleList(
            nn.Sequential(*(GatedCNNBlock(dim, cfg.expand, cfg.kernel_size) for _ in range(depth)))
            for depth, dim in zip(cfg.depths, cfg.dims))
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self):
        """MambaOut's scheme: conv and linear weights trunc_normal(0.02), biases zero; norms at identity."""
        init_weights_(self, (nn.Conv2d, nn.Linear))

    def forward(self, x):  # x: (B, C, H, W)
        check_images(x, self.in_chans, 1, "gcnn")
        x = self.stem(x)  # (B, H/4, W/4, D_0)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)  # (B, h/2, w/2, D_i)
            x = stage(x)  # (B, h, w, D_i)
        return self.norm(x.mean(dim=(1, 2)))  # (B, D_3)
