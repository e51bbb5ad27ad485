"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), sized and initialised as DeiT
(Touvron et al. 2021) / timm's `VisionTransformer`.

    z_0 = [x_cls; x_p^1 E; ...; x_p^hw E] + E_pos                     (Eq. 1)
    z'_l = z_{l-1} + MSA(LN(z_{l-1}))                                 (Eq. 2)
    z_l  = z'_l + MLP(LN(z'_l))                                       (Eq. 3)
    y    = LN(z_L)[class token]                                       (Eq. 4)
with MSA = concat_heads(softmax(Q K^T / sqrt(dh)) V) W_o (Vaswani et al. 2017, Eq. 1) and
MLP = Linear(D, 4D) -> GELU -> Linear(4D, D). With `pool="mean"` the embedding is the mean of the normalised
patch tokens instead of the class token.

Shapes: B batch, C input channels, H W image height and width, h w patch grid (H/P, W/P), L tokens (1 + h·w),
D width, nh heads, dh head width (D / nh).

Departures from timm's VisionTransformer:
- no classifier head, dropout or drop-path: the encoder returns the (B, D) embedding;
- the position grid is stored for `img_size` and resampled bicubically when an input of another size (any
  multiple of the patch size, square or not) arrives, as timm does with `dynamic_img_size=True`;
- `pool="mean"` averages the patch tokens after the final norm (timm averages first, then applies `fc_norm`);
- none in the arithmetic: GELU is the exact (erf) form, as in timm (the tanh form is slower on CPU).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import PatchEmbed, check_choice, init_weights_, resize_pos_embed, trunc_normal_


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 192  # D: DeiT-Ti's width
    depth: int = 12  # blocks: 12 at every DeiT size
    num_heads: int = 3  # nh: keeps dh = 64 at every DeiT size
    patch_size: int = 16  # P: ViT-*/16, the patch of the published checkpoints
    mlp_ratio: float = 4.0  # MLP hidden width / D, as in ViT and DeiT
    in_chans: int = 3  # C: our CT slices carry three HU windows
    img_size: int = 224  # sets the stored position grid (img_size / P)^2; other sizes are resampled
    pool: str = "cls"  # "cls": class token (Eq. 4); "mean": mean of the patch tokens

    def __post_init__(self):
        check_choice("pool", self.pool, ("cls", "mean"))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, then PyTorch's fused SDPA kernel on strided views of
    its output, faster on CPU than q, k, v made contiguous first or the softmax written out (docs/results.md,
    'Implementation choices'); `python benchmark.py encoders` times the whole encoder."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, nh, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, dh), strided views, no copy
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, dh): softmax(q k^T / sqrt(dh)) v
        return self.proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):  # x: (B, L, D)
        return self.fc2(F.gelu(self.fc1(x)))  # (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block (Eqs. 2-3)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):  # x: (B, L, D)
        x = x + self.attn(self.norm1(x))  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class VisionTransformer(nn.Module):
    """(B, C, H, W) -> (B, D); H and W any multiples of the patch size."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg, self.embed_dim = cfg, cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size, "vit")
        self.grid = (cfg.img_size // cfg.patch_size,) * 2  # (h0, w0) of the stored position embeddings
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self):
        """timm's default ('') scheme: Linear weights trunc_normal(0.02) with zero bias, position embedding
        trunc_normal(0.02), class token normal(1e-6); the patch convolution keeps PyTorch's default."""
        trunc_normal_(self.pos_embed)
        nn.init.normal_(self.cls_token, std=1e-6)
        init_weights_(self, (nn.Linear,))

    def forward(self, x):  # x: (B, C, H, W)
        x, grid = self.patch_embed(x)  # (B, h·w, D), (h, w)
        pos = self.pos_embed
        patch_pos = resize_pos_embed(pos[:, 1:], self.grid, grid)  # (1, h·w, D)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x + patch_pos], dim=1)  # (B, L, D)
        for block in self.blocks:
            x = block(x)  # (B, L, D)
        x = self.norm(x)  # (B, L, D)
        return x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
