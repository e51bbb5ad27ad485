"""The reference encoders that learn nothing: what a learnt slice encoder has to beat.

- HUHistogram: the histogram of each HU window's pixel values, (B, C, H, W) -> (B, C · bins). As bags it shows
  what attention-MIL can read from intensities alone: diffuse disease shifts the lung histogram, a small
  lesion's site or size barely moves any bin. The demo's control runs it
  (`clear.py extract --encoder-module models/reference.py:HUHistogram`).
- PixelGrid: raw pixels, each window's pixels averaged in a grid x grid of cells, (B, C, H, W) -> (B, C · grid²).
  Linear in the pixels, as a random-init encoder nearly is: the floor that an encoder's features have to clear.

Both are plain nn.Modules with an `embed_dim`, so extract.py runs them as any encoder; how they score is in
docs/results.md.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import check_images  # absolute: --encoder-module loads this file by its path


class HUHistogram(nn.Module):
    """(B, C, H, W) window channels in [0, 1] -> (B, C · bins): per channel, the share of the slice's pixels in each
    of `bins` equal bins of [0, 1] (pixels clipped to a window's ends fall in its first or last bin). Each row
    sums to C. Nothing is learnt; `bins` sets the resolution, 1/bins of a window's width: at 32, 47 HU of the
    1500-HU lung window, a third of the step from normal lung to ground glass (docs/results.md compares 16, 32
    and 64)."""

    def __init__(self, in_chans=3, bins=32):
        super().__init__()
        if bins < 1 or in_chans < 1:
            raise ValueError(f"HUHistogram: needs bins >= 1 and in_chans >= 1, got {bins} and {in_chans}")
        self.in_chans, self.bins, self.embed_dim = in_chans, bins, in_chans * bins
        # the bin edges, unused in forward (bins are found by scaling): a buffer, so that the weights' sha256 in a
        # bag's identity (extract.weights_sha256) tells histograms of other bins apart
        self.register_buffer("edges", torch.linspace(0, 1, bins + 1))

    def forward(self, x):  # x: (B, C, H, W)
        check_images(x, self.in_chans, 1, "HUHistogram")
        B, C, H, W = x.shape
        idx = (x.clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)  # (B, C, H, W) bin of each pixel
        idx = idx + self.bins * torch.arange(B * C, device=x.device).view(B, C, 1, 1)  # one bin range per image
        counts = torch.bincount(idx.flatten(), minlength=B * C * self.bins)  # (B · C · bins,)
        return counts.view(B, C * self.bins).float() / (H * W)  # (B, C · bins)


class PixelGrid(nn.Module):
    """(B, C, H, W) -> (B, C · grid²): per channel, the mean pixel of each of grid x grid cells of the slice
    (adaptive average pooling: where grid does not divide H or W, neighbouring cells share a row or column of
    pixels). Nothing is learnt and nothing but averaging is done: a linear encoder. The default grid, 4, is the best
    of the four sizes the twin test tried (docs/results.md)."""

    def __init__(self, in_chans=3, grid=4):
        super().__init__()
        if grid < 1 or in_chans < 1:
            raise ValueError(f"PixelGrid: needs grid >= 1 and in_chans >= 1, got {grid} and {in_chans}")
        self.in_chans, self.grid, self.embed_dim = in_chans, grid, in_chans * grid * grid
        # a buffer, so that the weights' sha256 in a bag's identity tells grids apart (as HUHistogram's edges)
        self.register_buffer("cells", torch.tensor(grid))

    def forward(self, x):  # x: (B, C, H, W)
        check_images(x, self.in_chans, 1, "PixelGrid")
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # (B, C · grid²)
