"""triton_scan: the reference against hand-worked numbers, every fast form against the reference (values and
gradients of every input), fp64 gradcheck, long-sequence stability under strong decay, low-precision dtypes."""
import math

import numpy as np
import pytest
import torch

from triton_scan import chunked, default_method, scan_chunked, selective_scan, selective_scan_ref
from triton_scan.parallel import linear_scan

METHODS = ["chunked", "parallel"]


def make_inputs(batch, dim, N, L, seed=0, dtype=torch.float32, decay=3.0):
    """Random inputs in Mamba's layout: u, delta (B, D, L), A (D, N) negative, B, C (B, N, L), D, z, bias."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    u, z, B, C = randn(batch, dim, L), randn(batch, dim, L), randn(batch, N, L), randn(batch, N, L)
    delta = torch.rand(batch, dim, L, generator=g, dtype=dtype)  # (B, D, L), in [0, 1)
    A = -decay * torch.rand(dim, N, generator=g, dtype=dtype)  # (D, N), in (-decay, 0]
    D, delta_bias = randn(dim), 0.5 * randn(dim)
    return u, delta, A, B, C, D, z, delta_bias


def assert_rel_close(actual, expected, tol=1e-4, what=""):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= tol, f"{what}: max relative error {err:.2e} > {tol:.0e}"


def test_reference_hand_worked_scalar():
    # One channel, one state, A = -ln 2 and delta = 1 so exp(delta A) = 1/2; B = C = u = 1:
    # h = 1, 1/2 + 1 = 1.5, 0.75 + 1 = 1.75, 0.875 + 1 = 1.875; y = C h.
    u = torch.ones(1, 1, 4)
    delta = torch.ones(1, 1, 4)
    A = torch.full((1, 1), -math.log(2.0))
    B = C = torch.ones(1, 1, 4)
    y = selective_scan_ref(u, delta, A, B, C)
    assert torch.allclose(y, torch.tensor([[[1.0, 1.5, 1.75, 1.875]]]), atol=1e-6)
    # With the skip D u = 2 and the gate silu(z), z = ln 3: silu = ln 3 * 3/4.
    y = selective_scan_ref(u, delta, A, B, C, D=torch.full((1,), 2.0), z=torch.full((1, 1, 4), math.log(3.0)))
    expected = (torch.tensor([1.0, 1.5, 1.75, 1.875]) + 2.0) * math.log(3.0) * 0.75
    assert torch.allclose(y[0, 0], expected, atol=1e-6)


def test_reference_matches_numpy_loops():
    # An independent float64 loop over b, d, n, t, including delta_bias, softplus, D and z.
    u, delta, A, B, C, D, z, bias = make_inputs(2, 3, 2, 5, seed=1)
    y = selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True).numpy()
    u, delta, A, B, C, D, z, bias = (t.double().numpy() for t in (u, delta, A, B, C, D, z, bias))
    want = np.zeros_like(u)
    for b in range(2):
        for d in range(3):
            dt = np.log1p(np.exp(delta[b, d] + bias[d]))  # softplus, (L,)
            for n in range(2):
                h = 0.0
                for t in range(5):
                    h = np.exp(dt[t] * A[d, n]) * h + dt[t] * B[b, n, t] * u[b, d, t]
                    want[b, d, t] += C[b, n, t] * h
            want[b, d] = (want[b, d] + D[d] * u[b, d]) * z[b, d] / (1 + np.exp(-z[b, d]))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


CASES = [  # (batch, dim, N, L, with D/z/bias/softplus)
    (2, 4, 16, 1, True), (1, 3, 1, 7, False), (2, 5, 16, 33, True), (3, 2, 1, 70, True), (1, 4, 16, 64, False),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch,dim,N,L,extras", CASES)
def test_matches_reference_values_and_grads(method, batch, dim, N, L, extras):
    u, delta, A, B, C, D, z, bias = make_inputs(batch, dim, N, L, seed=L + N)
    inputs = [u, delta, A, B, C] + ([D, z, bias] if extras else [])
    inputs = [t.requires_grad_() for t in inputs]
    kwargs = dict(D=D, z=z, delta_bias=bias, delta_softplus=True) if extras else {}
    want = selective_scan_ref(*inputs[:5], **kwargs)
    got = selective_scan(*inputs[:5], **kwargs, method=method)
    assert got.shape == want.shape == (batch, dim, L) and got.dtype == torch.float32
    assert_rel_close(got, want, what="y")
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, g_got, g_want in zip(names, torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        assert_rel_close(g_got, g_want, what=f"d{name}")


@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_chunk_length_does_not_matter(chunk):
    # Chunk boundaries (checkpoints, the adjoint carried between chunks), a short last chunk, one chunk only.
    u, delta, A, B, C, *_ = make_inputs(2, 3, 4, 20, seed=chunk)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C)]
    want = selective_scan_ref(*inputs)
    got = scan_chunked(*inputs, chunk=chunk)
    assert_rel_close(got, want, what="y")
    dy = torch.randn_like(want)
    for g_got, g_want in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        assert_rel_close(g_got, g_want)


def test_reused_workspace_between_interleaved_calls():
    # Two graphs of different sizes, forward, forward, backward, backward: the shared work blocks are scratch
    # within one call only, so each result and gradient is its own reference's.
    cases = [make_inputs(3, 5, 4, 37, seed=1), make_inputs(1, 2, 6, 9, seed=2)]
    inputs = [[t.requires_grad_() for t in c[:5]] for c in cases]
    got = [scan_chunked(*i, chunk=8) for i in inputs]
    for i, y in zip(inputs, got):
        want = selective_scan_ref(*i)
        assert_rel_close(y, want, what="y")
        dy = torch.randn_like(want)
        for g_got, g_want in zip(torch.autograd.grad(y, i, dy), torch.autograd.grad(want, i, dy)):
            assert_rel_close(g_got, g_want)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_fp64(method):
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in make_inputs(2, 2, 3, 5, dtype=torch.float64))

    def f(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, method=method)

    assert torch.autograd.gradcheck(f, (u, delta, A, B, C, D, z, bias))
    assert torch.autograd.gradcheck(lambda *x: scan_chunked(*x, chunk=2), (u, delta, A, B, C))


def test_linear_scan_odd_even_matches_loop():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 13, 3, 2, generator=g), torch.randn(2, 13, 3, 2, generator=g)  # (B, L, D, N)
    h, want = torch.zeros(2, 3, 2), []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        want.append(h)
    assert_rel_close(linear_scan(a, b), torch.stack(want, 1), tol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_long_sequence_strong_decay_stays_finite(method):
    # L = 4096 with delta * A reaching -20: products of exp(delta A) underflow to 0, which must stay harmless.
    L = 4096
    u, delta, A, B, C, *_ = make_inputs(1, 4, 16, L, seed=5, decay=20.0)  # delta * A in (-20, 0]
    assert (delta * A[:, :1]).min() < -15
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C)]
    y = selective_scan(*inputs, method=method)
    grads = torch.autograd.grad(y.sum(), inputs)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    want = selective_scan_ref(*inputs)
    assert_rel_close(y, want, what="y")
    for g_got, g_want in zip(grads, torch.autograd.grad(want.sum(), inputs)):
        assert_rel_close(g_got, g_want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scan", ["ref", *METHODS])
def test_low_precision_in_low_precision_out(dtype, scan):
    u, delta, A, B, C, D, z, bias = make_inputs(2, 3, 4, 9, dtype=dtype)
    if scan == "ref":
        y = selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    else:
        y = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, method=scan)
    assert y.dtype == dtype and y.shape == (2, 3, 9)
    want = selective_scan_ref(*(t.float() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert_rel_close(y.float(), want, tol=1e-2)


def test_default_method_and_shape_errors():
    assert default_method("cpu") == "chunked"
    assert default_method("cuda") == "chunked"  # on a GPU too: the parallel form's memory (test below)
    u, delta, A, B, C, *_ = make_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(u, delta, A, B.transpose(1, 2), C)
    with pytest.raises(ValueError, match="delta_bias"):
        selective_scan_ref(u, delta, A, B, C, delta_bias=torch.zeros(4))


@pytest.mark.parametrize("method", METHODS)
def test_inference_mode(method):
    # The encoders run the scan under torch.inference_mode; the custom autograd.Function must work there too.
    u, delta, A, B, C, D, z, bias = make_inputs(2, 3, 4, 40)
    chunked.WORKSPACE.flat.clear()  # as in a fresh process, whose first scan is an extraction's
    with torch.inference_mode():
        got = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, method=method)
    want = selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert_rel_close(got, want)
    # and after it, outside it: the chunked scan's kept work blocks were made under inference_mode the first time
    # (a bag extraction, then a FLOP count in the same process raised "Inplace update to inference tensor")
    with torch.no_grad():
        again = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, method=method)
    assert_rel_close(again, want)


@pytest.mark.parametrize("method", [*METHODS, "reference"])
def test_under_autocast_the_scan_computes_in_float32(method):
    """Under a bf16 autocast (the CPU's here, as pre-training's on a GPU) the scan returns what it returns without
    it, values and gradients (backward called after the autocast region, as pretrain.py does): its contractions are
    not turned into bf16 matmuls."""
    inputs = [t.requires_grad_() for t in make_inputs(2, 8, 4, 37, seed=4)]
    dy = torch.randn(2, 8, 37, generator=torch.Generator().manual_seed(5))

    def run():
        if method == "reference":
            return selective_scan_ref(*inputs, delta_softplus=True)
        return selective_scan(*inputs, delta_softplus=True, method=method)

    y = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = run()
    grads, grads_amp = (torch.autograd.grad(out, inputs, dy) for out in (y, y_amp))
    assert y_amp.dtype == torch.float32
    torch.testing.assert_close(y_amp, y, rtol=1e-5, atol=1e-6)
    for name, g_amp, g in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), grads_amp, grads):
        torch.testing.assert_close(g_amp, g, rtol=1e-5, atol=1e-5, msg=name)


def test_what_autograd_keeps_of_the_default_scan_is_a_fraction_of_one_state_tensor():
    """Saved-tensor hooks count what autograd keeps for the backward of one SSM-tiny scan direction (D = 384,
    N = 16, L = 196: 224 px) at batch 4: the default form (on every device) keeps less than one (B, L, D, N)
    float32 tensor, the parallel form several of them (docs/results.md has the figures)."""
    from bench.speed import saved_bytes

    batch, dim, N, L = 4, 384, 16, 196
    inputs = [t.requires_grad_() for t in make_inputs(batch, dim, N, L, seed=6)]
    state = batch * L * dim * N * 4  # bytes of one (B, L, D, N) float32 tensor
    kept = {m: saved_bytes(lambda: selective_scan(*inputs, delta_softplus=True, method=m)) / state
            for m in ("parallel", default_method("cuda"))}
    assert kept["chunked"] < 1 and kept["parallel"] > 3, kept
