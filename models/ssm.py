"""Vision state-space encoder: bidirectional Mamba blocks over the patch sequence, after Vision Mamba ("Vim",
Zhu et al. 2024) with the Mamba block of Gu & Dao 2023.

One scan direction of the mixer (Mamba, Alg. 2; Vim, Alg. 1 for one of its two branches):
    x = SiLU(CausalDWConv1d_k4(x))                                  local mixing, sees x_{t-3..t}
    Δ, B, C = x W_Δ, x W_B, x W_C         Δ: rank R, then Δ = softplus(Δ W_dt + b_dt)    (selection, Sec. 3.2)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,   y_t = C_t h_t + D x_t      (Eq. 2a-2b, zero-order hold, Eq. 4)
    y = y * SiLU(z)                                                   the gate
Bidirectional mixer (Vim's "v2"): x, z = Linear_{D -> 2E}(h), shared by both directions; the backward direction
runs the same recipe, with its own conv, projections, A and D, over the reversed sequence, and
    mixer(h) = Linear_{E -> D}((y_fwd + reverse(y_bwd(reverse(x), reverse(z)))) / 2).
Block: r = r + mixer(RMSNorm(r)); the embedding is the token mean of RMSNorm(r) after the last block.

Shapes: B batch, C input channels, H W image height and width, h w patch grid, L tokens (h·w, raster order),
D width, E inner width (expand · D), N state size, R rank of Δ's projection. (Mamba's B and C matrices are
called Bm, Cm in code, to keep B for the batch.)

Departures from Vim: the embedding is the mean of the tokens (Vim's `final_pool_type="mean"` option, as VMamba
pools) rather than Vim-Ti's class token in the middle of the sequence; no drop-path; the patch convolution keeps
PyTorch's default init (Vim: LeCun normal); the two directions' parameters live in submodules `fwd` and `bwd`
(Vim: `conv1d`/`conv1d_b`, ...), so Vim checkpoints need renaming; the position grid is resampled
bicubically for inputs of another size than `img_size`. The scan is `triton_scan.selective_scan`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from triton_scan import selective_scan

from .common import PatchEmbed, resize_pos_embed, trunc_normal_


@dataclass(frozen=True)
class SSMConfig:
    embed_dim: int = 192  # D: Vim-Ti's width, as ViT-Ti
    depth: int = 24  # Vim's depth at every size: a Mamba block costs about half a transformer block
    d_state: int = 16  # N: Mamba's default
    expand: int = 2  # E / D: Mamba's default
    d_conv: int = 4  # causal depthwise conv width, Mamba's default
    dt_rank: int | None = None  # R; None: ceil(D / 16), Mamba's "auto"
    dt_min: float = 1e-3  # initial Δ is log-uniform in [dt_min, dt_max] (Mamba, Sec. 3.6)
    dt_max: float = 1e-1
    patch_size: int = 16  # P: as Vim and ViT-*/16
    in_chans: int = 3  # C: our CT slices carry three HU windows
    img_size: int = 224  # sets the stored position grid (img_size / P)^2; other sizes are resampled

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def rank(self):
        return self.dt_rank or math.ceil(self.embed_dim / 16)


class Direction(nn.Module):
    """One scan direction: causal conv, input-dependent (Δ, B, C), selective scan, SiLU(z) gate."""

    def __init__(self, d_inner, cfg: SSMConfig):
        super().__init__()
        self.rank, self.d_state = cfg.rank, cfg.d_state
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, cfg.rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(cfg.rank, d_inner)
        self.A_log = nn.Parameter(torch.empty(d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.reset_parameters(cfg)

    def reset_parameters(self, cfg):
        """Mamba's init (Sec. 3.6 and its reference code): A = -[1..N] per channel (S4D-real), D = 1, W_dt
        uniform in ±R^-1/2, and b_dt = softplus^-1(Δ0) with Δ0 log-uniform in [dt_min, dt_max]."""
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
            self.D.fill_(1.0)
            nn.init.uniform_(self.dt_proj.weight, -cfg.rank**-0.5, cfg.rank**-0.5)
            dt = torch.exp(torch.rand(self.D.shape) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                           + math.log(cfg.dt_min)).clamp(min=1e-4)  # (E,)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt) = dt + log(1 - e^-dt)

    def forward(self, x, z):  # x, z: (B, E, L), in this direction's time order
        L = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :L])  # (B, E, L): left padding only, so causal
        proj = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(proj, [self.rank, self.d_state, self.d_state], dim=-1)  # (B, L, R|N|N)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, E, L); b_dt is added inside the scan
        A = -torch.exp(self.A_log)  # (E, N): negative real, so exp(Δ A) decays
        return selective_scan(x, dt, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D, z=z,
                              delta_bias=self.dt_proj.bias, delta_softplus=True)  # (B, E, L)


class BiMamba(nn.Module):
    """Vim's bidirectional mixer: shared input projection, a forward and a backward `Direction`, mean, output."""

    def __init__(self, dim, cfg: SSMConfig):
        super().__init__()
        d_inner = cfg.expand * dim
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.fwd = Direction(d_inner, cfg)
        self.bwd = Direction(d_inner, cfg)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, h):  # h: (B, L, D)
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # 2 x (B, E, L)
        y_fwd = self.fwd(x, z)  # (B, E, L)
        y_bwd = self.bwd(x.flip(-1), z.flip(-1)).flip(-1)  # (B, E, L), back in forward order
        return self.out_proj(((y_fwd + y_bwd) / 2).transpose(1, 2))  # (B, L, D)


class MambaBlock(nn.Module):
    """Pre-norm residual block: r + mixer(RMSNorm(r))."""

    def __init__(self, dim, cfg: SSMConfig):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = BiMamba(dim, cfg)

    def forward(self, x):  # x: (B, L, D)
        return x + self.mixer(self.norm(x))  # (B, L, D)


class VisionMamba(nn.Module):
    """(B, C, H, W) -> (B, D); H and W any multiples of the patch size."""

    def __init__(self, cfg: SSMConfig):
        super().__init__()
        self.cfg, self.embed_dim = cfg, cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size, "ssm")
        self.grid = (cfg.img_size // cfg.patch_size,) * 2  # (h0, w0) of the stored position embeddings
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], cfg.embed_dim))
        self.blocks = nn.ModuleList(MambaBlock(cfg.embed_dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.embed_dim, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self):
        """Vim's scheme: position embedding trunc_normal(0.02); Linear layers keep PyTorch's default except that
        out_proj is scaled by 1/sqrt(depth) (GPT-2's residual rescaling, as in Mamba); Δ, A, D as in Direction."""
        trunc_normal_(self.pos_embed)
        for block in self.blocks:
            with torch.no_grad():
                block.mixer.out_proj.weight.div_(math.sqrt(self.cfg.depth))

    def forward(self, x):  # x: (B, C, H, W)
        x, grid = self.patch_embed(x)  # (B, L, D), (h, w)
        x = x + resize_pos_embed(self.pos_embed, self.grid, grid)  # (B, L, D)
        for block in self.blocks:
            x = block(x)  # (B, L, D)
        return self.norm(x).mean(dim=1)  # (B, D)
