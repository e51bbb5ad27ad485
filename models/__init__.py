"""Slice encoders of CLEAR (arXiv 2411.16803): a 2D network mapping a batch of CT slices (B, C, H, W)
to slice embeddings (B, D), later pooled per scan by attention-MIL and pre-trained with LeCL.

    enc = build_encoder("vit", size="tiny", in_chans=3, img_size=128)
    enc(torch.randn(4, 3, 128, 128)).shape == (4, enc.embed_dim)
    build_encoder(**enc.encoder_config)      # the same architecture, e.g. to load a checkpoint into

The paper's three families, each in the paper's three sizes from the one table below, and micro, a size much
smaller than tiny for pre-training on a CPU budget at 64 px:
    vit   Vision Transformer /16 (DeiT sizes)                         models/vit.py
    gcnn  gated CNN, MambaOut (sizes chosen by compute, see gcnn.py)   models/gcnn.py
    ssm   bidirectional Mamba over patches (Vim sizes)                 models/ssm.py
and a fourth, the demo's: a plain conv-BatchNorm-ReLU CNN, the one family whose normalisation keeps a slice's HU
level (models/cnn.py says why that decides whether ground glass is learnt at a CPU budget):
    cnn   four stride-2 stages of two 3x3 conv-BN-ReLU, mean-pooled    models/cnn.py
Every encoder takes any H, W that are multiples of its patch size (16 for vit and ssm, 8 at micro; gcnn any size,
and multiples of 32 keep its grids exact), so the 64-128 px synthetic slices work as well as 224².
"""
import dataclasses
from unittest import mock

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import ssm as ssm_module
from .cnn import CNNConfig, PlainCNN
from .common import check_choice, count_parameters, effective_rank
from .gcnn import GatedCNN, GCNNConfig
from .ssm import SSMConfig, VisionMamba
from .vit import VisionTransformer, ViTConfig

ENCODERS = {"vit": VisionTransformer, "gcnn": GatedCNN, "ssm": VisionMamba, "cnn": PlainCNN}
# each family's first layer: pixels -> features
STEMS = {"vit": "patch_embed", "gcnn": "stem", "ssm": "patch_embed", "cnn": "stem"}

# name -> size -> architecture (in_chans and img_size are filled in by build_encoder).
SIZES = {
    "vit": {  # DeiT-Ti/S/B, patch 16: head width 64 throughout; micro, patch 8, for CPU budgets at 64 px
        "micro": ViTConfig(embed_dim=128, depth=4, num_heads=2, patch_size=8),
        "tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
        "small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
        "base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    },
    "gcnn": {  # MambaOut-Femto / -Tiny / -Base, matched to the ViT of the same name by MACs; micro for CPU budgets
        "micro": GCNNConfig(depths=(1, 1, 3, 1), dims=(32, 64, 128, 192)),
        "tiny": GCNNConfig(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288)),
        "small": GCNNConfig(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576)),
        "base": GCNNConfig(depths=(3, 4, 27, 3), dims=(128, 256, 512, 768)),
    },
    "ssm": {  # Vim-Ti/S/B: depth 24, N = 16, expand 2; micro, patch 8, for CPU budgets at 64 px
        "micro": SSMConfig(embed_dim=128, depth=6, patch_size=8),
        "tiny": SSMConfig(embed_dim=192, depth=24),
        "small": SSMConfig(embed_dim=384, depth=24),
        "base": SSMConfig(embed_dim=768, depth=24),
    },
    "cnn": {  # widths doubling per stage, the last kept; micro (0.58 M parameters) is the demo's encoder
        "micro": CNNConfig(dims=(32, 64, 128, 128)),
        "tiny": CNNConfig(dims=(64, 128, 256, 256)),
        "small": CNNConfig(dims=(64, 128, 256, 512)),
        "base": CNNConfig(dims=(128, 256, 512, 1024)),
    },
}


def build_encoder(name, size="tiny", in_chans=3, img_size=224) -> nn.Module:
    """An encoder mapping (B, in_chans, H, W) to (B, embed_dim). `img_size` sets the stored position grid of
    vit and ssm (other input sizes are resampled to); the returned module records its arguments in
    `encoder_config`, so `build_encoder(**enc.encoder_config)` rebuilds the same architecture."""
    check_choice("encoder", name, tuple(SIZES))
    check_choice(f"{name} size", size, tuple(SIZES[name]))
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    cfg = dataclasses.replace(SIZES[name][size], in_chans=in_chans, img_size=img_size)
    encoder = ENCODERS[name](cfg)
    encoder.encoder_config = {"name": name, "size": size, "in_chans": in_chans, "img_size": img_size}
    return encoder


def stem(encoder) -> nn.Module:
    """The encoder's first layer, the one that maps pixels to features: the patch projection of vit and ssm, the
    convolutional stem of gcnn. MoCo v3 (Chen et al. 2021, Sec. 5) freezes it at its random init (pretrain.py's
    `freeze_stem`)."""
    return getattr(encoder, STEMS[encoder.encoder_config["name"]])


def count_flops(module, *inputs) -> int:
    """FLOPs of one forward pass of `module` on `inputs` (in eval mode, no grad): 2 x MACs of every matmul,
    convolution and attention (QK^T and PV included), by torch.utils.flop_counter.FlopCounterMode. It knows the CUDA
    attention kernels but not the CPU one, which is counted here as they are. The SSM's selective scan is counted
    analytically, 7 FLOPs per state update (exp(Δ A), the two terms of h_t, C·h; exp as one), so that the count
    does not depend on which scan implementation runs; only models/ssm.py's call is replaced, so another module's
    own call of triton_scan is counted by whatever that scan runs. Mamba's authors count 9 per update
    (state-spaces/mamba issue #110: a parallel scan's extra operations), which would put SSM-tiny at 64 px 4 %
    higher. Elementwise work (norms, activations, gates) is counted for no model. The project's one FLOP counter:
    benchmark.py's encoder table and the accuracy table use it."""
    scan_flops = 0

    def counted_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        nonlocal scan_flops
        scan_flops += 7 * u.numel() * A.shape[1]  # (B, E, L) x N state updates
        return u * torch.nn.functional.silu(z)  # the right shape, and no matmul for the counter to see

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})
    training = module.training
    try:
        with mock.patch.object(ssm_module, "selective_scan", counted_scan), counter, torch.inference_mode():
            module.eval()(*inputs)
    finally:
        module.train(training)
    return counter.get_total_flops() + scan_flops


__all__ = ["ENCODERS", "SIZES", "STEMS", "build_encoder", "stem", "count_flops", "count_parameters", "effective_rank",
           "CNNConfig", "PlainCNN", "GCNNConfig", "SSMConfig", "ViTConfig", "GatedCNN", "VisionMamba",
           "VisionTransformer"]
