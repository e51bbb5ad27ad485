"""Pieces shared by the patch-based encoders (ViT and the vision SSM): input checks, patch embedding and
position embeddings that follow the input size.

Patch embedding is Eq. 1 of Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"): x_p^i E, written as
a P×P convolution with stride P (the same linear map applied to every non-overlapping patch).

Shapes: B batch, C input channels, H W image height and width, h w patch grid (H/P, W/P), D width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def check_images(x, in_chans, multiple, encoder):
    """Raise a one-line ValueError unless `x` is a (B, in_chans, H, W) batch with H and W multiples of `multiple`."""
    if x.ndim != 4:
        raise ValueError(f"{encoder}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{encoder}: built with in_chans={in_chans} but the batch has {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}); rebuild with in_chans={x.shape[1]} or fix the input")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"{encoder}: height and width must be multiples of {multiple}, got {x.shape[2]}x{x.shape[3]}")


class PatchEmbed(nn.Module):
    """Cut an image into P×P patches and project each to D channels (one strided convolution)."""

    def __init__(self, in_chans, embed_dim, patch_size, name):
        super().__init__()
        self.in_chans, self.patch_size, self.name = in_chans, patch_size, name
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # x: (B, C, H, W)
        check_images(x, self.in_chans, self.patch_size, self.name)
        x = self.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2), x.shape[2:]  # (B, h·w, D), (h, w)


def resize_pos_embed(pos, old_grid, new_grid):
    """Bicubically resample a (1, h0·w0, D) grid of position embeddings to (1, h·w, D), as timm's
    `resample_abs_pos_embed` does; the stored grid is returned unchanged when the sizes agree."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    D = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, D)  # (1, h·w, D)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def evenly_spaced(n, most):
    """Indices of min(n, most) rows spread evenly over n, first and last included: a sample that keeps the
    order (the slices of every scan, bottom to top) when a computation cannot take every row."""
    return torch.linspace(0, n - 1, min(most, n), dtype=torch.float64).long()


def effective_rank(embeddings, most=20000) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1) of embeddings (N, D): exp of the entropy of the normalised singular
    values, p_k = σ_k / Σ σ + ε. It ranges from 1 (every embedding on one line) to min(N - 1, D) (all directions
    used alike); a self-supervised encoder whose value falls to a few has collapsed, and its embeddings carry
    a few numbers per slice whatever their width. Departure from RankMe: the embeddings are centred first,
    so a shared offset (a LayerNorm bias) does not count as a direction; singular values under 1e-6 of the
    embeddings' norm are rounding, not directions (all embeddings at one point give 1). Of more than `most`
    rows, `most` evenly spaced ones are used (the SVD of a cohort's slices would take minutes)."""
    x = torch.as_tensor(embeddings).detach()
    x = x[evenly_spaced(len(x), most)].double()  # (N', D)
    sigma = torch.linalg.svdvals(x - x.mean(0))  # (min(N', D),)
    sigma = sigma[sigma > 1e-6 * x.norm()]
    if len(sigma) == 0:
        return 1.0
    p = sigma / sigma.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(map(str, choices))}")


def trunc_normal_(tensor, std=0.02):
    """timm's default initialiser: normal(0, std) cut at ±2 (absolute, so ±100 std at std=0.02)."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


def init_weights_(module, layers=(nn.Linear,)):
    """timm's and MambaOut's scheme for every submodule: weights of `layers` trunc_normal(0.02) with zero bias,
    LayerNorms at identity; other layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, layers):
            trunc_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

