"""Selective scan (Mamba, Gu & Dao 2023): the readable reference. The fast path is work in progress.

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D (D,); delta_bias (D,).
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (Eq. 2a/4, zero-order hold)
    y_t = C_t . h_t + D * u_t                                      (Eq. 2b)
    y   = y * silu(z)
"""
import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The definition: a loop over time steps (unbind, so backward stays linear in L)."""
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]  # (B, D, L)
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(torch.einsum("bdl,dn->bldn", delta, A))  # (B, L, D, N)
    dBu = torch.einsum("bdl,bnl,bdl->bldn", delta, B, u)  # (B, L, D, N)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])  # (B, D, N)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), C.unbind(2)):
        h = dA_t * h + dBu_t  # (B, D, N)
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))  # (B, D)
    y = torch.stack(ys, dim=2)  # (B, D, L)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


selective_scan = selective_scan_ref
