"""The selective scan as a parallel (Blelloch-style, odd-even) scan: log2(L) levels instead of L steps.

The recurrence h_t = a_t * h_{t-1} + b_t (Mamba, Gu & Dao 2023, Eq. 2a; a_t = exp(delta_t A),
b_t = delta_t u_t B_t) composes associatively: applying step s then step t is one step

    (a_s, b_s) then (a_t, b_t)  =  (a_t a_s,  a_t b_s + b_t)

so the pairs (1, 2), (3, 4), ... can be merged all at once, the half-length problem solved recursively for
the odd-indexed states, and the even-indexed states filled in from their left neighbour:

    h_{2k+1} = scan over k of (a_{2k+1} a_{2k},  a_{2k+1} b_{2k} + b_{2k+1})
    h_{2k}   = a_{2k} h_{2k-1} + b_{2k}                     (h_0 = b_0)

Cost: the work is O(L) elementwise products on (B, L, D, N) tensors (the levels halve: L/2 + L/4 + ... < L
merges), the depth is 2 log2(L) dependent steps instead of L. Each level is a handful of large tensor ops,
which suits a GPU; but all of a, b and h are materialised at (B, L, D, N), and autograd keeps each level for
the backward, so memory and memory traffic are several times those of the chunked loop (chunked.py). Only
products of a's are formed, never divided back out, so strong decay underflows harmlessly to 0.

Glossary: B batch, L sequence, D channels, N state size. Tensors here are (B, L, D, N), as in mambapy.
"""
import torch


def _interleave(even, odd):
    """(B, ceil(L/2), ...) and (B, floor(L/2), ...) -> (B, L, ...) with even[k] at 2k and odd[k] at 2k+1."""
    m = odd.shape[1]
    pairs = torch.stack([even[:, :m], odd], dim=2).flatten(1, 2)  # (B, 2m, D, N)
    return pairs if even.shape[1] == m else torch.cat([pairs, even[:, m:]], dim=1)  # (B, L, D, N)


def linear_scan(a, b):
    """All states h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along dim 1, by recursive odd-even merging.
    a, b: (B, L, D, N) -> h: (B, L, D, N). Plain autograd ops, so the backward comes for free."""
    L = b.shape[1]
    if L == 1:
        return torch.addcmul(b, a, torch.zeros_like(b))  # a_0 h_{-1} + b_0: keeps a in the graph (zero grad)
    m = L // 2
    a_even, a_odd = a[:, 0:2 * m:2], a[:, 1:2 * m:2]  # (B, m, D, N)
    b_even, b_odd = b[:, 0:2 * m:2], b[:, 1:2 * m:2]  # (B, m, D, N)
    h_odd = linear_scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))  # (B, m, D, N): h_1, h_3, ...
    n_even = (L + 1) // 2
    h_even = torch.cat([b[:, :1], torch.addcmul(b[:, 2::2], a[:, 2::2], h_odd[:, :n_even - 1])], dim=1)
    return _interleave(h_even, h_odd)  # (B, L, D, N)


def scan_parallel(u, delta, A, B, C):
    """y_t = C_t . h_t (B, D, L) from Mamba-layout inputs u, delta (B, D, L), A (D, N), B, C (B, N, L)."""
    a = torch.exp(torch.einsum("bdl,dn->bldn", delta, A))  # (B, L, D, N)
    b = torch.einsum("bdl,bnl->bldn", delta * u, B)  # (B, L, D, N)
    h = linear_scan(a, b)  # (B, L, D, N)
    return torch.einsum("bldn,bnl->bdl", h, C)  # (B, D, L)
