"""models/: the build_encoder interface, sizes against published parameter counts, independent numeric references
for the attention, gated-CNN and bidirectional-SSM blocks, and a toy task every encoder must learn."""
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.ssm
from data import named_windows, window
from models import SIZES, build_encoder, count_flops, count_parameters, stem
from models.gcnn import GatedCNNBlock
from models.ssm import BiMamba, Direction, SSMConfig
from models.vit import Attention, VisionTransformer, ViTConfig
from triton_scan import selective_scan_ref

NAMES = tuple(SIZES)

# Our head-less counts, and the published count of the same architecture with its ImageNet head, where
# head(D) is what the published model adds: timm's ViT a Linear(D, 1000); MambaOut an MLP head
# (Linear(D, 4D), LayerNorm(4D), Linear(4D, 1000)); Vim a class token and a Linear(D, 1000).
PARAMS = {  # (name, size): (embed_dim, ours, published, tolerance of the published figure)
    ("vit", "tiny"): (192, 5_524_416, 5_717_416, 0),  # timm vit_tiny_patch16_224 / DeiT-Ti "5.7M"
    ("vit", "small"): (384, 21_665_664, 22_050_664, 0),  # timm vit_small_patch16_224 / DeiT-S "22M"
    ("vit", "base"): (768, 85_798_656, 86_567_656, 0),  # timm vit_base_patch16_224 / DeiT-B "86M"
    ("gcnn", "tiny"): (288, 5_816_304, 7.3e6, 0.05e6),  # MambaOut-Femto 7.3M
    ("gcnn", "small"): (576, 22_906_080, 26.5e6, 0.05e6),  # MambaOut-Tiny 26.5M
    ("gcnn", "base"): (768, 79_371_580, 84.8e6, 0.05e6),  # MambaOut-Base 84.8M
    ("ssm", "tiny"): (192, 6_954_624, 7e6, 0.5e6),  # Vim-Ti 7M
    ("ssm", "small"): (384, 25_410_816, 26e6, 0.5e6),  # Vim-S 26M
    ("ssm", "base"): (768, 96_827_904, 98e6, 0.5e6),  # Vim-B 98M
}
HEAD = {"vit": lambda D: D * 1000 + 1000,
        "gcnn": lambda D: (D * 4 * D + 4 * D) + 2 * 4 * D + (4 * D * 1000 + 1000),
        "ssm": lambda D: D + D * 1000 + 1000}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny, so OpenMP's fork/join per op costs more than a second core gives, and on a
    busy machine its spinning threads stall (the SSM toy below: 47 s on 2 threads, 9 s on 1, at load 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(batch, channels=3, height=32, width=32, seed=0):
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("kwargs, choices", [({"name": "resnet"}, ("vit", "gcnn", "ssm")),
                                             ({"name": "gcnn", "size": "huge"}, ("micro", "tiny", "small", "base"))])
def test_unknown_name_or_size_is_a_one_line_error_listing_the_choices(kwargs, choices):
    with pytest.raises(ValueError) as err:
        build_encoder(**kwargs)
    assert "\n" not in str(err.value) and all(c in str(err.value) for c in choices)


@pytest.mark.parametrize("name, size", list(PARAMS))
def test_sizes_match_published_parameter_counts_and_map_to_their_width(name, size):
    with torch.device("meta"):  # no memory, no init: shapes and counts only
        enc = build_encoder(name, size)
        out = enc(torch.empty(2, 3, 64, 96))
    D, ours, published, tol = PARAMS[(name, size)]
    assert enc.embed_dim == D and out.shape == (2, D)
    assert count_parameters(enc) == ours
    assert abs(ours + HEAD[name](D) - published) <= tol


@pytest.mark.parametrize("name", NAMES)
def test_tiny_encoders_embed_our_slice_sizes(name):
    enc = build_encoder(name, img_size=128).eval()
    with torch.no_grad():
        for side in (64, 128):
            out = enc(images(2, height=side, width=side))
            assert out.shape == (2, enc.embed_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    enc = build_encoder(name, img_size=32)
    out = enc(images(2))  # (2, D)
    (out * torch.randn_like(out)).sum().backward()  # a random projection: sum() alone is blind behind a norm
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", NAMES)
def test_the_stem_is_the_layer_that_sees_the_pixels(name):
    """models.stem (what pretrain's freeze_stem freezes): with its weights zeroed, every image gives the same
    embedding, so it is the one layer between the pixels and the rest; it is a small part of the encoder."""
    enc = build_encoder(name, img_size=32).eval()
    first = stem(enc)
    x = images(2)
    with torch.no_grad():
        assert not torch.allclose(enc(x)[0], enc(x)[1], atol=1e-4)
        for p in first.parameters():
            if p.dim() > 1:  # the weights; biases and norms are not the pixels' way in
                p.zero_()
        out = enc(x)
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert 0 < count_parameters(first) < 0.05 * count_parameters(enc)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_each_slice_independent_of_its_batch(name):
    enc = build_encoder(name, img_size=32).eval()
    x = images(3)
    with torch.no_grad():
        a, b, alone = enc(x), enc(x), enc(x[1:2])
    assert torch.equal(a, b)
    assert torch.allclose(alone, a[1:2], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_non_square_and_other_multiples_of_the_patch_work(name):
    enc = build_encoder(name, img_size=64).eval()
    with torch.no_grad():
        for h, w in ((48, 80), (96, 32), (64, 64)):
            assert enc(images(2, height=h, width=w)).shape == (2, enc.embed_dim)
        if name in ("gcnn", "cnn"):  # padded stride-2 convs: any size
            assert enc(images(2, height=50, width=70)).shape == (2, enc.embed_dim)
        else:
            with pytest.raises(ValueError, match="multiples of 16"):
                enc(images(2, height=40, width=48))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_in_chans_is_a_clear_error(name):
    enc = build_encoder(name, in_chans=1, img_size=32).eval()
    with torch.no_grad():
        assert enc(images(2, channels=1)).shape == (2, enc.embed_dim)
        with pytest.raises(ValueError, match="in_chans=1 but the batch has 3 channels"):
            enc(images(2, channels=3))


@pytest.mark.parametrize("name", NAMES)
def test_encoder_config_rebuilds_the_same_architecture(name):
    enc = build_encoder(name, "tiny", in_chans=1, img_size=64).eval()
    cfg = json.loads(json.dumps(enc.encoder_config))  # a checkpoint stores it as plain data
    assert cfg == {"name": name, "size": "tiny", "in_chans": 1, "img_size": 64}
    twin = build_encoder(**cfg).eval()
    twin.load_state_dict(enc.state_dict())  # strict: same names and shapes
    x = images(2, channels=1, height=64, width=64)
    with torch.no_grad():
        assert torch.equal(twin(x), enc(x))


def test_cnn_is_the_composition_of_its_convs_batchnorms_and_relus():
    """models/cnn.py against the same arithmetic written out with torch.nn.functional, in both BatchNorm modes."""
    enc = build_encoder("cnn", "micro", img_size=32)
    x = images(4)

    def by_hand(x, training):
        for unit in [enc.stem, *enc.stages]:
            conv, bn = unit[0], unit[1]
            x = F.conv2d(x, conv.weight, None, conv.stride, 1)  # (B, D, h, w)
            if training:  # the batch's own statistics, biased variance (BatchNorm's normalisation)
                mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            else:
                mean, var = bn.running_mean, bn.running_var
            x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
            x = torch.relu(x * bn.weight[:, None, None] + bn.bias[:, None, None])
        return x.mean((2, 3))  # (B, D)

    with torch.no_grad():
        expected = by_hand(x, training=True)
        assert torch.allclose(enc.train()(x), expected, atol=1e-5)
        enc(x + 1.0)  # move the running statistics off their init
        assert torch.allclose(enc.eval()(x), by_hand(x, training=False), atol=1e-5)


def test_cnn_keeps_the_hu_level_that_a_pixel_layernorm_divides_out():
    """A lung slice in the lung window is one channel at v, the others 0 (models/cnn.py): normal lung at 0.33, ground
    glass at 0.5. The gated CNN's per-pixel LayerNorm gives both nearly the same embedding; the CNN does not. A
    fourth channel, the parenchyma window, is another affine function of the HU, so the pixel is no longer v times
    one vector and the LayerNorm keeps the difference (the demo's four windows)."""
    def uniform(hu, names):
        return window(torch.full((1, 32, 32), hu), named_windows(names))  # (1, C, 32, 32)

    def relative_change(name, names):
        torch.manual_seed(0)
        enc = build_encoder(name, "micro", in_chans=len(names), img_size=32).eval()
        with torch.no_grad():
            a, b = enc(uniform(-850.0, names)), enc(uniform(-600.0, names))
        return float((a - b).norm() / a.norm())

    three, four = ("lung", "soft", "bone"), ("lung", "soft", "bone", "parenchyma")
    assert uniform(-850.0, three)[0, :, 0, 0].tolist() == pytest.approx([1 / 3, 0, 0])
    assert relative_change("gcnn", three) < 1e-2
    assert relative_change("cnn", three) > 0.2
    assert relative_change("gcnn", four) > 0.1


def test_vit_mean_pool_averages_the_normalised_patch_tokens():
    cls_vit = build_encoder("vit", img_size=32).eval()
    mean_vit = VisionTransformer(dataclasses.replace(cls_vit.cfg, pool="mean")).eval()
    mean_vit.load_state_dict(cls_vit.state_dict())
    x = images(2)
    with torch.no_grad():
        patches, grid = cls_vit.patch_embed(x)  # (B, 4, D): the 2x2 grid of img_size, nothing to resample
        assert tuple(grid) == (2, 2)
        z = torch.cat([(cls_vit.cls_token + cls_vit.pos_embed[:, :1]).expand(2, -1, -1),
                       patches + cls_vit.pos_embed[:, 1:]], dim=1)  # (B, L, D): Eq. 1 by hand
        for block in cls_vit.blocks:
            z = block(z)
        z = cls_vit.norm(z)
        assert torch.allclose(cls_vit(x), z[:, 0], atol=1e-5)
        assert torch.allclose(mean_vit(x), z[:, 1:].mean(dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        ViTConfig(pool="max")


def test_initialisations_follow_the_published_schemes():
    vit = build_encoder("vit", img_size=32)
    qkv = vit.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 2e-3 and not qkv.bias.any()  # timm: trunc_normal(.02), 0
    assert vit.cls_token.abs().max() < 1e-4  # timm: normal(1e-6)
    ssm = build_encoder("ssm", img_size=32)
    d = ssm.blocks[0].mixer.bwd
    assert torch.allclose(d.A_log, torch.log(torch.arange(1.0, 17.0)).expand(384, 16))  # A = -(1..N)
    assert torch.equal(d.D, torch.ones(384))
    dt = F.softplus(d.dt_proj.bias)  # the initial step size of each channel
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001 and dt.max() / dt.min() > 10


# -------------------------------------------------------------------------------- blocks against references
def test_attention_matches_manual_softmax_and_torch_multihead_attention():
    torch.manual_seed(0)
    D, heads, dh = 48, 4, 12
    attn = Attention(D, heads).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)  # (B, L, D)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(D, dim=-1)  # 3 x (B, L, D)
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * dh:(h + 1) * dh] for t in (q, k, v))  # (B, L, dh)
        weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(dh), dim=-1)  # (B, L, L)
        outs.append(weights @ vh)
    manual = F.linear(torch.cat(outs, dim=-1), attn.proj.weight, attn.proj.bias)
    assert torch.allclose(attn(x), manual, atol=1e-10)

    mha = nn.MultiheadAttention(D, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight), mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight), mha.out_proj.bias.copy_(attn.proj.bias)
    assert torch.allclose(attn(x), mha(x, x, x, need_weights=False)[0], atol=1e-10)


def test_gated_cnn_block_matches_manual_recomputation():
    torch.manual_seed(0)
    D, k = 8, 7
    block = GatedCNNBlock(D, expand=8 / 3, kernel_size=k).double()
    E = int(8 / 3 * D)  # 21: gate 21, identity 13, conv 8
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 9, 10, D, dtype=torch.float64)  # (B, h, w, D)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    n = (x - mu) / torch.sqrt(var + 1e-6) * block.norm.weight + block.norm.bias
    t = torch.einsum("bhwd,ed->bhwe", n, block.fc1.weight) + block.fc1.bias  # (B, h, w, 2E)
    g, i, c = t[..., :E], t[..., E:2 * E - D], t[..., 2 * E - D:]
    cp = F.pad(c, (0, 0, k // 2, k // 2, k // 2, k // 2))  # zero-pad h and w
    conv = block.conv.bias.expand_as(c).clone()
    for dy in range(k):  # depthwise: channel d only ever meets filter d
        for dx in range(k):
            conv += cp[:, dy:dy + 9, dx:dx + 10] * block.conv.weight[:, 0, dy, dx]
    gelu = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    mixed = gelu * torch.cat([i, conv], dim=-1)  # (B, h, w, E)
    manual = x + torch.einsum("bhwe,de->bhwd", mixed, block.fc2.weight) + block.fc2.bias
    assert torch.allclose(block(x), manual, atol=1e-10)


SMALL_SSM = SSMConfig(embed_dim=8, depth=1, d_state=4, expand=2, dt_rank=2)


def randomised(module, seed=0):
    """A copy with every parameter redrawn, so that the two directions really differ (at init only the
    projections do: A and D start equal)."""
    module = copy.deepcopy(module).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def test_direction_matches_the_recurrence_written_out():
    d = randomised(Direction(16, SMALL_SSM))
    x, z = torch.randn(2, 16, 9, dtype=torch.float64), torch.randn(2, 16, 9, dtype=torch.float64)  # (B, E, L)
    w = d.conv1d.weight[:, 0]  # (E, 4)
    xp = F.pad(x, (3, 0))
    xc = F.silu(sum(w[:, j, None] * xp[..., j:j + 9] for j in range(4)) + d.conv1d.bias[:, None])  # causal
    A = -torch.exp(d.A_log)  # (E, N)
    h, ys = torch.zeros(2, 16, 4, dtype=torch.float64), []  # (B, E, N)
    for t in range(9):
        proj = xc[..., t] @ d.x_proj.weight.T  # (B, R + 2N)
        dt = F.softplus(proj[:, :2] @ d.dt_proj.weight.T + d.dt_proj.bias)  # (B, E)
        Bt, Ct = proj[:, 2:6], proj[:, 6:]  # (B, N)
        h = torch.exp(dt[..., None] * A) * h + (dt * xc[..., t])[..., None] * Bt[:, None]  # (B, E, N)
        ys.append(((h * Ct[:, None]).sum(-1) + d.D * xc[..., t]) * F.silu(z[..., t]))  # (B, E)
    assert torch.allclose(d(x, z), torch.stack(ys, dim=-1), atol=1e-8)


def test_reversing_the_sequence_swaps_the_two_directions_roles():
    mixer = randomised(BiMamba(8, SMALL_SSM))
    h = torch.randn(2, 11, 8, dtype=torch.float64)  # (B, L, D)
    out = mixer(h)
    assert not torch.allclose(mixer(h.flip(1)), out.flip(1), atol=1e-3)  # the directions really differ
    swapped = copy.deepcopy(mixer)
    swapped.fwd, swapped.bwd = mixer.bwd, mixer.fwd
    assert torch.allclose(swapped(h.flip(1)), out.flip(1), atol=1e-10)


def test_each_direction_is_causal_and_the_mixer_sees_both_ways():
    mixer = randomised(BiMamba(8, SMALL_SSM))
    x = torch.randn(1, 16, 11, dtype=torch.float64)  # (B, E, L)
    bumped = x.clone()
    bumped[..., 5] += 1.0
    diff = (mixer.fwd(bumped, x) - mixer.fwd(x, x)).abs().amax(dim=(0, 1))  # (L,)
    assert diff[:5].max() == 0 and diff[5:].min() > 0
    h = torch.randn(1, 11, 8, dtype=torch.float64)  # (B, L, D)
    bumped = h.clone()
    bumped[:, 5] += 1.0
    diff = (mixer(bumped) - mixer(h)).abs().amax(dim=(0, 2))  # (L,)
    assert diff.min() > 0  # tokens before 5 hear of it through the backward scan, after it the forward


def test_ssm_encoder_with_the_default_scan_matches_the_reference_scan(monkeypatch):
    enc = build_encoder("ssm", img_size=32).eval()
    x = images(2, height=64, width=48)
    with torch.no_grad():
        fast = enc(x)
        monkeypatch.setattr(models.ssm, "selective_scan", selective_scan_ref)
        assert torch.allclose(enc(x), fast, atol=1e-4)


# ------------------------------------------------------------------------------------------- learning a toy
def discs(n, side, g, bright=2.0):
    """A disc (radius 3-6 px, +`bright`) at a random place in noise of std 0.5 (label 1), or noise alone (0)."""
    label = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (H, W)
    centre = torch.rand(n, 2, generator=g) * (side - 12) + 6  # (n, 2)
    radius = torch.rand(n, generator=g) * 3 + 3  # (n,)
    disc = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2
    x = 0.5 * torch.randn(n, 3, side, side, generator=g) + bright * (label[:, None, None] * disc)[:, None]
    return x, label


@pytest.mark.parametrize("name, lr, steps", [("vit", 3e-4, 25), ("gcnn", 1e-3, 30), ("ssm", 1e-3, 15),
                                             ("cnn", 1e-3, 30)])
def test_each_encoder_learns_bright_disc_vs_none(name, lr, steps):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    enc = build_encoder(name, "tiny", img_size=32)
    head = nn.Linear(enc.embed_dim, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        x, y = discs(16, 32, g)
        loss = F.cross_entropy(head(enc(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        x, y = discs(128, 32, g)  # unseen slices
        held_out = F.cross_entropy(head(enc(x)), y).item()
    assert held_out < 0.4, f"{name}: held-out loss {held_out:.3f} after {steps} steps (chance: 0.693)"


def test_effective_rank_counts_the_directions_used():
    from models import effective_rank

    g = torch.Generator().manual_seed(0)
    line = torch.randn(500, 1, generator=g) @ torch.randn(1, 64, generator=g) + 3.0  # one direction, an offset
    assert abs(effective_rank(line) - 1) < 1e-3
    # k orthogonal directions, each with the same spread (a ±1 design): exactly k
    k = 6
    signs = torch.tensor([[1.0 if (i >> j) & 1 else -1.0 for j in range(k)] for i in range(2 ** k)])  # (64, k)
    basis, _ = torch.linalg.qr(torch.randn(32, k, generator=g))  # (32, k) orthonormal columns
    assert abs(effective_rank(signs @ basis.T) - k) < 1e-4
    # isotropic noise in D = 16 uses nearly all of them; unequal spreads use fewer, whatever the width
    assert effective_rank(torch.randn(4000, 16, generator=g)) > 15.5
    skewed = torch.randn(4000, 16, generator=g) * torch.logspace(0, -3, 16)  # RankMe of the spreads alone: 5.9
    assert 4.5 < effective_rank(skewed) < 7.5
    assert effective_rank(torch.full((50, 8), 0.3)) == 1.0  # every embedding at one point: no direction at all


def test_count_flops_worked_by_hand_counts_attention_and_the_scan():
    """2 x MACs per layer, worked out for one block at width 8 on a 32² image (4 patches of 16², 3 channels)."""
    x = torch.zeros(2, 3, 32, 32)
    patch = 2 * 4 * (3 * 16 * 16) * 8  # the patch projection: 4 patches x 768 pixels -> 8
    # ViT, 2 heads of 4, L = 5 tokens with the class token: qkv, q k^T and p v (the CPU attention kernel, which
    # FlopCounterMode alone does not count), the output projection, the MLP of 4 x 8
    vit = 2 * 5 * 8 * 24 + 2 * (2 * 2 * 5 * 5 * 4) + 2 * 5 * 8 * 8 + 2 * (2 * 5 * 8 * 32)
    assert count_flops(VisionTransformer(ViTConfig(embed_dim=8, depth=1, num_heads=2, img_size=32)), x) == \
        2 * (patch + vit)
    # SSM, E = 16, N = 2, R = 1, L = 4: in_proj 8 -> 32; per direction the depthwise conv (width 4, L + 3 outputs
    # before the crop), x_proj 16 -> R + 2N, dt_proj R -> 16, and 7 FLOPs per state update of the scan; out_proj
    direction = 2 * 16 * 7 * 4 + 2 * 4 * 16 * 5 + 2 * 4 * 1 * 16 + 7 * 16 * 4 * 2
    ssm = 2 * 4 * 8 * 32 + 2 * direction + 2 * 4 * 16 * 8
    assert count_flops(models.ssm.VisionMamba(SSMConfig(embed_dim=8, depth=1, d_state=2, img_size=32)), x) == \
        2 * (patch + ssm)
    encoder = build_encoder("gcnn", img_size=32).train()
    count_flops(encoder, x[:1])
    assert encoder.training  # the count leaves the module's mode as it was
