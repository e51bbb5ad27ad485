"""lecl.py: the LeCL loss against its formula, and the momentum update and schedule. The MoCo model under two
gloo processes, and the training around it, are tested in test_pretrain.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import lecl
from models import build_encoder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny


# ------------------------------------------------------------------------------------------------ the loss


def loop_loss(q, k, lesion, weight, temperature, offset):
    """The LeCL formula, written out one term at a time in float64."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        p = offset + i
        logit = [float(q[i] @ k[j]) / temperature for j in range(k.shape[0])]
        denom = sum(math.exp(v) for v in logit)
        denom += sum(math.exp(weight * logit[j]) for j in range(k.shape[0]) if lesion[j] and j != p)
        total += -(logit[p] - math.log(denom))
    return total / q.shape[0] * 2 * temperature


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
@pytest.mark.parametrize("weight,temperature", [(10.0, 1.0), (2.5, 0.2)])
def test_loss_matches_the_formula_term_by_term(world, rank, weight, temperature):
    g = torch.Generator().manual_seed(world * 10 + rank)
    N, d = 5, 8
    q, k = torch.randn(N, d, generator=g), torch.randn(world * N, d, generator=g)
    lesion = torch.rand(world * N, generator=g) < 0.4
    lesion[rank * N] = True  # a lesion key that is a positive: must not count as its own negative
    got = lecl.lecl_loss(q, k, lesion, weight, temperature, offset=rank * N)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loop_loss(q, k, lesion, weight, temperature, rank * N), rel=1e-5)


def test_without_lesion_keys_or_weight_it_is_infonce():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g), torch.randn(12, 16, generator=g)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2  # (6, 12)
    infonce = F.cross_entropy(logits, torch.arange(6, 12)) * 2 * 0.2  # MoCo v3's ctr(), keys of rank 1
    none, some = torch.zeros(12, dtype=torch.bool), torch.rand(12, generator=g) < 0.5
    assert lecl.lecl_loss(q, k, none, 10.0, 0.2, 6).item() == pytest.approx(infonce.item(), rel=1e-6)
    assert lecl.lecl_loss(q, k, some, 0.0, 0.2, 6).item() == pytest.approx(infonce.item(), rel=1e-6)
    assert lecl.lecl_loss(q, k, some, 1.0, 0.2, 6).item() > infonce.item() + 1e-3


def test_loss_grows_with_weight_when_lesion_keys_resemble_queries():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 16, generator=g)
    near = q + 0.05 * torch.randn(4, 16, generator=g)  # positives
    k = torch.cat([near, q.roll(1, 0) + 0.1 * torch.randn(4, 16, generator=g)])
    lesion = torch.tensor([False] * 4 + [True] * 4)  # lesion keys close to other queries: hard negatives
    losses = [lecl.lecl_loss(q, k, lesion, w, 0.5).item() for w in (0.0, 0.5, 1.0, 2.0, 5.0)]
    assert all(b > a for a, b in zip(losses, losses[1:])), losses


def test_gradient_is_finite_at_extreme_logits_and_loss_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 32, generator=g, requires_grad=True)
    k = torch.cat([q.detach(), q.detach()])  # |l_ij| up to 1/τ = 50, w · l up to 1000: exp would overflow
    lesion = torch.ones(16, dtype=torch.bool)
    loss = lecl.lecl_loss(q, k, lesion, weight=20.0, temperature=0.02)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lecl.lecl_loss(q.bfloat16(), k.bfloat16(), lesion).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- momentum


def test_momentum_update_and_schedule_by_hand():
    torch.manual_seed(0)
    model = lecl.MoCo(build_encoder("gcnn", "tiny", 3, 32), proj_dim=8, mlp_dim=16)
    base, mom = model.base_parameters(), model.momentum_parameters()
    for p in base:
        p.data.normal_()  # base and momentum now differ
    before = [(b.detach().clone(), m.detach().clone()) for b, m in zip(base, mom)]
    model.update_momentum(0.9)
    for (b, m), new in zip(before, mom):
        assert torch.allclose(new, 0.9 * m + 0.1 * b, atol=1e-6)  # θ_m <- m θ_m + (1 - m) θ
    assert lecl.momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert lecl.momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert lecl.momentum_at(100, 100, 0.99) == pytest.approx(1.0)


def test_the_model_keeps_the_encoders_view_1_embeddings_whose_rank_pretraining_reports():
    torch.manual_seed(0)
    model = lecl.MoCo(build_encoder("vit", "tiny", 3, 32), proj_dim=8, mlp_dim=16)
    x1, x2 = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)
    model(x1, x2, torch.zeros(6, dtype=torch.bool), 0.99)
    with torch.no_grad():
        assert torch.allclose(model.embeddings, model.encoder(x1), atol=1e-5)  # view 1 of this batch, as it is
    assert not model.embeddings.requires_grad
