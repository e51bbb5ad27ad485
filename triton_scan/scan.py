"""Selective scan (Mamba, Gu & Dao 2023, Sec. 3.2 and Alg. 2): the readable definition and the default path.

Glossary: B batch, D channels (Mamba's "dim"), N state size, L sequence length. Shapes as in Mamba's
`selective_scan_ref` (state-spaces/mamba): u, delta, z (B, D, L); A (D, N), real; B, C (B, N, L), i.e.
input-dependent; D (D,); delta_bias (D,).

    delta <- softplus(delta + delta_bias)                           (bias and softplus both optional)
    h_t   = exp(delta_t A) * h_{t-1} + delta_t B_t u_t              (Eq. 2a with the zero-order hold of Eq. 4)
    y_t   = C_t . h_t + D * u_t                                     (Eq. 2b plus the skip connection)
    y     <- y * silu(z)                                            (the gate of the Mamba block, Fig. 3)

h_t is (B, D, N): every channel d carries its own N-dim diagonal state, driven by the shared B_t, C_t.
`selective_scan_ref` is that text as a loop over t. `selective_scan` computes the same thing by
`chunked` (chunked.py, a loop with a hand-written, recomputing backward) on every device, or by `parallel`
(parallel.py, an odd-even parallel scan) when asked (triton_scan/README.md has the equations of each form and the
measured figures). Both compute in float32 for half inputs, under autocast too: autocast is switched off around
the scan, else its contractions would run as half-precision matmuls. Departures from Mamba's reference: no
complex A, no grouped or input-independent B/C, no `return_last_state`; and float64 inputs are computed in
float64 (Mamba's reference always computes in float32), so that gradcheck can run.
"""
import contextlib

import torch
import torch.nn.functional as F

from .chunked import scan_chunked
from .parallel import scan_parallel

METHODS = {"chunked": scan_chunked, "parallel": scan_parallel}


def default_method(device):
    """`chunked` on every device. On CPU it is the fastest form (triton_scan/README.md has the figures). On a GPU
    its memory decides: what autograd keeps per scan is a fraction of one (B, L, D, N) float32 tensor against
    several for the parallel form, which SSM-tiny's 48 scans at 224 px and batch 256 cannot hold (the figures and
    their command: docs/results.md). bench/gpu_check.sh measures both forms' speed on a GPU."""
    torch.device(device)  # a device name torch does not know is an error here as before
    return "chunked"


def _no_autocast(device):
    """A region where autocast is off on `device`'s type: the scan's own dtypes (float32 for half inputs) hold.
    Devices without autocast (meta, for shapes and FLOP counts) need none."""
    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # half/bf16 -> float32, float32 stays, float64 stays


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    batch, dim, L = u.shape
    N = A.shape[1]
    expected = {"delta": (delta, (batch, dim, L)), "A": (A, (dim, N)), "B": (B, (batch, N, L)),
                "C": (C, (batch, N, L)), "D": (D, (dim,)), "z": (z, (batch, dim, L)),
                "delta_bias": (delta_bias, (dim,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {shape}")


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The definition: a loop over time steps. Returns y (B, D, L) in u's dtype.
    Loops over `unbind`-ed steps: slicing x[:, t] instead would make backward quadratic in L (each slice's
    gradient allocates the full tensor)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    with _no_autocast(u.device):
        return _ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype_in, ct = u.dtype, _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]  # (B, D, L)
    if delta_softplus:
        delta = F.softplus(delta)  # (B, D, L)
    dA = torch.exp(torch.einsum("bdl,dn->bldn", delta, A))  # (B, L, D, N)
    dBu = torch.einsum("bdl,bnl,bdl->bldn", delta, B, u)  # (B, L, D, N)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])  # (B, D, N)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), C.unbind(2)):
        h = dA_t * h + dBu_t  # (B, D, N): h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))  # (B, D): y_t = C_t . h_t
    y = torch.stack(ys, dim=2)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(ct)[:, None]  # (B, D, L)
    if z is not None:
        y = y * F.silu(z.to(ct))  # (B, D, L)
    return y.to(dtype_in)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, method=None):
    """Same signature, semantics and result as `selective_scan_ref`, by the fastest form for u's device.
    `method` ("chunked" or "parallel") overrides the choice; both forms are tested against the reference.
    The lines around `core` repeat the reference's on purpose: the definition stays self-contained."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    core = METHODS[method or default_method(u.device)]
    with _no_autocast(u.device):
        return _scan(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _scan(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype_in, ct = u.dtype, _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]  # (B, D, L)
    if delta_softplus:
        delta = F.softplus(delta)  # (B, D, L)
    y = core(u, delta, A, B, C)  # (B, D, L): C_t . h_t
    if D is not None:
        y = y + u * D.to(ct)[:, None]  # (B, D, L)
    if z is not None:
        y = y * F.silu(z.to(ct))  # (B, D, L)
    return y.to(dtype_in)
