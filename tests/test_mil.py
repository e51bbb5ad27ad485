"""mil.py: the attention pooling against a hand-written per-bag computation, its invariances, the ordinal head,
and one ClearError per bad bag file. The helpers here (write_bags, error) serve test_cv.py too."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mil  # noqa: E402
from files import ClearError  # noqa: E402

ENCODER = {"name": "toy", "size": "s", "sha256": "0" * 64}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny


def write_bags(folder, n, dim=16, seed=0, labels=None, encoder=ENCODER, signal=0.0, lengths=(6, 30)):
    """n bags of Gaussian noise with random lengths; where labels[i] is 1 and `signal` > 0, one random slice
    gets `signal` x a fixed direction added. Returns the index of that slice per scan (-1: none)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(123))
    special = []
    for i in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        x = torch.randn(length, dim, generator=g)
        k = -1
        if signal and labels is not None and labels[i] == 1:
            k = int(torch.randint(0, length, (1,), generator=g))
            x[k] += signal * direction
        special.append(k)
        torch.save({"features": x, "z_mm": torch.arange(length, dtype=torch.float64) * 2.5, "encoder": encoder,
                    "image": f"images/s{i:03d}.nii.gz"}, folder / f"s{i:03d}.pt")
    return special


def error(fn, *args, **kw):
    with pytest.raises(ClearError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)

# -------------------------------------------------------------------------------------------- model


def per_bag_reference(model, x):
    """Ilse et al. Eq. 8/9 written out for one unpadded bag x (L, D), from the model's weights."""
    W, b = model.embed[0].weight, model.embed[0].bias
    h = torch.relu(x @ W.T + b)  # (L, H)
    e = torch.tanh(h @ model.V.weight.T + model.V.bias)  # (L, A)
    if model.U is not None:
        e = e * torch.sigmoid(h @ model.U.weight.T + model.U.bias)
    e = (e @ model.w.weight.T)[:, 0]  # (L,)
    a = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
    z = (a[:, None] * h).sum(0)  # (H,)
    return model.head(z[None])[0], a


@pytest.mark.parametrize("gated", [False, True])
def test_pooling_matches_per_bag_computation(gated):
    torch.manual_seed(0)
    model = mil.AttentionMIL(12, 3, hidden=20, att_dim=10, gated=gated).eval()
    bags = [torch.randn(n, 12) for n in (3, 7, 1, 5)]
    with torch.no_grad():
        logits, att = model(*mil.pad_bags(bags))
        for i, x in enumerate(bags):
            ref_logits, ref_a = per_bag_reference(model, x)
            torch.testing.assert_close(logits[i], ref_logits, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(att[i, :len(x)], ref_a, rtol=1e-5, atol=1e-7)
            assert (att[i, len(x):] == 0).all()  # exactly zero on padding
            assert att[i].sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_permutation_and_padding_invariance(gated):
    torch.manual_seed(1)
    model = mil.AttentionMIL(8, 2, hidden=16, att_dim=8, gated=gated).eval()
    x = torch.randn(9, 8)
    perm = torch.randperm(9)
    with torch.no_grad():
        alone, a_alone = model(x[None])
        permuted, a_perm = model(x[perm][None])
        padded, a_pad = model(*mil.pad_bags([x, torch.randn(40, 8)]))  # padded to 40 inside a batch
    torch.testing.assert_close(permuted, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_perm[0], a_alone[0, perm], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_pad[0, :9], a_alone[0], rtol=1e-5, atol=1e-7)
    assert (a_pad[0, 9:] == 0).all()


def test_pooling_matches_torchmil_when_installed():
    nn = pytest.importorskip("torchmil.nn")
    torch.manual_seed(2)
    ours = mil.AttentionMIL(8, 1, hidden=16, att_dim=8, gated=True).eval()
    peer = nn.AttentionPool(in_dim=16, att_dim=8, gated=True)
    with torch.no_grad():  # torchmil's fc1 / fc_gated wrap an nn.Linear (LazyLinear.module); fc2 has no bias
        for mine, theirs in ((ours.V, peer.fc1), (ours.U, peer.fc_gated), (ours.w, peer.fc2)):
            theirs = getattr(theirs, "module", theirs)
            theirs.weight.copy_(mine.weight)
            if mine.bias is not None:
                theirs.bias.copy_(mine.bias)
    x, mask = mil.pad_bags([torch.randn(5, 8), torch.randn(11, 8)])
    with torch.no_grad():
        h = ours.embed(x)  # (B, L, H)
        z, _ = ours.pool(h[mask], mask)
        torch.testing.assert_close(z, peer(h, mask), rtol=1e-5, atol=1e-6)


def test_ordinal_head_gives_class_probabilities():
    torch.manual_seed(3)
    model = mil.AttentionMIL(8, 3, hidden=16, ordinal=True).eval()
    with torch.no_grad():
        logits, _ = model(torch.randn(50, 4, 8) * 5)
    assert logits.shape == (50, 3)
    assert (model.link.thresholds().diff() > 0).all()
    p = mil.Task("ordinal", ("stage",), (1.0, 2.0, 3.0, 4.0)).scores(logits)  # (50, 4)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(50))

# -------------------------------------------------------------------------------------------- bags


def test_bad_bag_files(tmp_path):
    assert error(mil.load_bags, tmp_path / "nope").startswith(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no bags" in error(mil.load_bags, tmp_path / "empty")
    cases = {"dims": {"features": torch.zeros(2, 3, 4), "z_mm": torch.zeros(2), "encoder": ENCODER, "image": ""},
             "keys": {"features": torch.zeros(2, 4)},
             "zlen": {"features": torch.zeros(2, 4), "z_mm": torch.zeros(3), "encoder": ENCODER, "image": ""},
             "nan": {"features": torch.full((2, 4), float("nan")), "z_mm": torch.zeros(2), "encoder": ENCODER,
                     "image": ""}}
    expect = {"dims": "features has shape (2, 3, 4), expected 2 dims", "keys": "expected a dict with features",
              "zlen": "z_mm has shape (3,), expected (2,)", "nan": "8 NaN or infinite"}
    for name, bag in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        torch.save(bag, folder / "x.pt")
        msg = error(mil.load_bags, folder)
        assert msg.startswith(f"{folder / 'x.pt'}: ") and expect[name] in msg
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.pt").write_bytes(b"not a zip file")
    assert error(mil.load_bags, tmp_path / "junk").startswith(f"{tmp_path / 'junk' / 'x.pt'}: cannot read bag")


def test_mixed_encoders_and_widths(tmp_path):
    write_bags(tmp_path / "a", 3)
    write_bags(tmp_path / "b", 1, encoder={**ENCODER, "sha256": "1" * 64})
    (tmp_path / "b" / "s000.pt").rename(tmp_path / "a" / "s999.pt")
    msg = error(mil.load_bags, tmp_path / "a")
    assert msg.startswith(str(tmp_path / "a" / "s999.pt")) and "different encoders" in msg
    (tmp_path / "a" / "s999.pt").unlink()
    write_bags(tmp_path / "c", 1, dim=24)
    (tmp_path / "c" / "s000.pt").rename(tmp_path / "a" / "s999.pt")
    assert "width 24" in error(mil.load_bags, tmp_path / "a")



def test_standardisation_makes_the_head_blind_to_feature_scale():
    torch.manual_seed(0)
    bags = [torch.randn(n, 6) for n in (3, 7, 5)]
    model = mil.AttentionMIL(6, 2).eval().standardize(bags)
    allx = torch.cat(bags).double()
    torch.testing.assert_close(model.shift, allx.mean(0).float())
    torch.testing.assert_close(model.scale, allx.std(0).float())  # (hand: the unbiased std over all slices)
    scale, offset = torch.tensor([1e3, 1e-2, 5.0, 1.0, 20.0, 0.1]), torch.randn(6) * 3
    rescaled = [b * scale + offset for b in bags]  # what another encoder's units might look like
    other = mil.AttentionMIL(6, 2).eval()
    other.load_state_dict(model.state_dict())
    other.standardize(rescaled)
    x, mask = mil.pad_bags(bags)
    xr, _ = mil.pad_bags(rescaled)
    torch.testing.assert_close(other(xr, mask)[0], model(x, mask)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ordinal", [False, True])
def test_mean_pool_is_a_linear_model_of_the_mean_slice(ordinal):
    """pool="mean": logits = W mean_k (x_k - shift) / scale + b per bag, written out by hand; attention 1/L on a
    bag's slices and exactly 0 on padding; no hidden layer or attention weights to fit."""
    torch.manual_seed(2)
    model = mil.AttentionMIL(12, 3, ordinal=ordinal, pool="mean").eval()
    model.standardize([torch.randn(9, 12) * 5 + 2])
    bags = [torch.randn(n, 12) * 5 + 2 for n in (3, 7, 1)]
    with torch.no_grad():
        logits, att = model(*mil.pad_bags(bags))
        for i, x in enumerate(bags):
            z = ((x - model.shift) / model.scale).mean(0)  # (D,)
            ref = z @ model.head.weight.T + model.head.bias  # (1,) ordinal score g, else (3,) logits
            ref = ref - model.link.thresholds() if ordinal else ref  # ordinal: (2,) cumulative logits g - theta_k
            torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(att[i, :len(x)], torch.full((len(x),), 1 / len(x)))
            assert (att[i, len(x):] == 0).all()
    k = 1 if ordinal else 3  # the head's outputs: one ordinal score, or a logit per class
    assert sum(p.numel() for p in model.parameters()) == 12 * k + k + (3 if ordinal else 0)  # W, b, cut-points
