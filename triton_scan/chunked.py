"""The selective scan as a chunked loop with a hand-written backward: the default path on CPU.

Only the state-space part lives here: given u, delta, A, B, C (delta already biased / softplus-ed, all in the
compute dtype) it returns y_t = C_t . h_t, where (Mamba, Gu & Dao 2023, Eq. 2a/2b with the zero-order hold
of Eq. 4, as in Alg. 2)

    h_t = a_t * h_{t-1} + b_t,      a_t = exp(delta_t A),   b_t = delta_t u_t B_t,   h_{-1} = 0
    y_t = sum_n C_t[n] h_t[n]

Glossary: B batch, D channels (Mamba's "dim"), N state size, L sequence length, T chunk length, K number of
chunks. Inside this file blocks are time-major and channel-last, (T, B, N, D): one time step is then a
contiguous (B, N, D) slab, and the contractions over N and D become batched row-vector products.

Forward: walk t in chunks of T. For each chunk fill a = exp(delta A) and b = delta u B as (T, B, N, D) blocks
in one vectorised op each, run the recurrence in place over the block (one addcmul_ per step), contract with
C in one bmm, and keep only the state entering each chunk (K checkpoints of (B, N, D)), never all L states.

Backward: the adjoint g_t = dLoss/dh_t obeys the reversed recurrence

    g_t = a_{t+1} * g_{t+1} + C_t dy_t                                      (g_{L-1} = C_{L-1} dy_{L-1})

and, with P_t = g_t * a_t * h_{t-1} (the part of the loss sensitivity that flows through a_t),

    dC_t[n]   = sum_d dy_t[d] h_t[n, d]
    dB_t[n]   = sum_d g_t[n, d] delta_t[d] u_t[d]
    du_t[d]   = delta_t[d] sum_n g_t[n, d] B_t[n]
    ddelta_t  = sum_n P_t[n, d] A[d, n] + u_t[d] sum_n g_t[n, d] B_t[n]
    dA[d, n]  = sum_{b, t} P_t[n, d] delta_t[d]

Chunks are visited last to first; inside a chunk the states are recomputed from its checkpoint (the same
forward code), g is run backwards in place, and every sum above is one vectorised op over the (T, B, N, D)
block. Nothing is divided, so strong decay only drives a_t toward 0 (no underflow turned into inf/NaN).
Memory: K checkpoints of (B, N, D), four (T, B, N, D) work blocks and time-major copies of the (B, D, L)
inputs, instead of the (B, L, D, N) tensors that autograd would keep for the loop. The work blocks are kept
between calls (`Workspace`): a fresh CPU tensor of many MiB comes from mmap, and the first write into it pays a
page fault per 4 KiB page; for Vim-Ti at 64 px that was 2/3 of the encoder's time.
"""
import math
import threading

import torch

CHUNK = 16  # time steps per block: the fastest of 8, 16, 32, 64 in README.md's measurement; a
#             (T, B, N, D) block is then 3 MiB at B=8, D=384, N=16, so the backward's four fit in L3 together.
LOG2_E = 1.4426950408889634  # exp(x) = 2 ** (x log2 e); torch.exp2 is faster than torch.exp on CPU


class Workspace(threading.local):
    """The (T, B, N, D) work blocks, reused from call to call (per thread, device, dtype and inference mode) and
    grown to the largest size asked for: at most 4 T B N D numbers, 100 MiB for Vim-Ti at B = 64. Blocks made under
    torch.inference_mode are inference tensors, which may not be written outside it (extraction, then a FLOP count
    or training in the same process), so each mode has its own."""

    def __init__(self):
        self.flat = {}

    def blocks(self, count, shape, like):
        numel = count * math.prod(shape)
        key = (like.device, like.dtype, torch.is_inference_mode_enabled())
        if key not in self.flat or self.flat[key].numel() < numel:
            self.flat[key] = like.new_empty(numel)
        return self.flat[key][:numel].view(count, *shape).unbind(0)  # count x (T, B, N, D)


WORKSPACE = Workspace()


def _time_major(x):
    """(B, K, L) -> (L, B, K) contiguous. As one 2-D transpose of (B*K, L): torch copies 2-D transposes in
    cache-sized tiles, faster than .permute(2, 0, 1).contiguous()."""
    batch, k, L = x.shape
    return x.reshape(batch * k, L).t().contiguous().view(L, batch, k)  # (L, B, K)


def _batch_major(x):
    """(L, B, K) -> (B, K, L) contiguous, the inverse of _time_major."""
    L, batch, k = x.shape
    return x.view(L, batch * k).t().contiguous().view(batch, k, L)  # (B, K, L)


def _rows(x, width):
    return x.view(-1, 1, width)  # (T, B, width) -> (T*B, 1, width): one row vector per (t, b)


def _fill(a, b, delta, delta_u, B, A2_t):
    """a = exp(delta A) = 2 ** (delta A log2 e), b = delta u B for one chunk, into the (T, B, N, D) blocks."""
    torch.exp2(torch.mul(delta[:, :, None, :], A2_t, out=a), out=a)  # (T, B, N, D)
    torch.mul(B[:, :, :, None], delta_u[:, :, None, :], out=b)  # (T, B, N, D)


def _recur(a, h, h0):
    """In place, step by step: h[t] <- a[t] * h[t-1] + h[t], starting from h0; turns b into the states."""
    prev = h0  # (B, N, D)
    for a_t, h_t in zip(a.unbind(0), h.unbind(0)):
        h_t.addcmul_(a_t, prev)  # (B, N, D)
        prev = h_t


def _recur_reverse(a, g, g_next):
    """In place, last to first: g[t] <- a[t+1] * g[t+1] + g[t]; g_next = a[T] * g[T] from the chunk after."""
    g[-1].add_(g_next)
    for a_next, g_t, g_after in zip(a[1:].unbind(0)[::-1], g[:-1].unbind(0)[::-1], g[1:].unbind(0)[::-1]):
        g_t.addcmul_(a_next, g_after)  # (B, N, D)


class ChunkedScan(torch.autograd.Function):
    """y = C . h with h the selective-scan states; inputs in Mamba's layout, u, delta (B, D, L), A (D, N),
    B, C (B, N, L); returns y (B, D, L). The backward recomputes states chunk by chunk (module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        batch, dim, L = u.shape
        N = A.shape[1]
        T = max(1, min(chunk, L))
        A2_t = (A * LOG2_E).t().contiguous()  # (N, D)
        delta_tm, u_tm = _time_major(delta), _time_major(u)  # (L, B, D)
        B_tm, C_tm = _time_major(B), _time_major(C)  # (L, B, N)
        du_tm = delta_tm * u_tm  # (L, B, D)
        starts = range(0, L, T)
        checkpoints = u.new_empty(len(starts), batch, N, dim)  # (K, B, N, D): the state entering each chunk
        checkpoints[0].zero_()
        a, h = WORKSPACE.blocks(2, (T, batch, N, dim), u)  # (T, B, N, D) work blocks
        y = u.new_empty(L, batch, dim)  # (L, B, D)
        for k, s in enumerate(starts):
            e = min(s + T, L)
            n = e - s
            _fill(a[:n], h[:n], delta_tm[s:e], du_tm[s:e], B_tm[s:e], A2_t)
            _recur(a[:n], h[:n], checkpoints[k])  # h holds the states h_s .. h_{e-1}
            if k + 1 < len(starts):
                checkpoints[k + 1].copy_(h[n - 1])
            # y_t = C_t . h_t for the whole chunk: (n*B, 1, N) @ (n*B, N, D)
            torch.bmm(_rows(C_tm[s:e], N), h[:n].view(n * batch, N, dim), out=_rows(y[s:e], dim))
        ctx.save_for_backward(delta_tm, u_tm, A, B_tm, C_tm, checkpoints)
        ctx.chunk = T
        return _batch_major(y)  # (B, D, L)

    @staticmethod
    def backward(ctx, dy):
        if not torch.amp.is_autocast_available(dy.device.type):
            return ChunkedScan._backward(ctx, dy)
        with torch.autocast(dy.device.type, enabled=False):  # float32 also when backward is called under autocast
            return ChunkedScan._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        delta_tm, u_tm, A, B_tm, C_tm, checkpoints = ctx.saved_tensors
        T = ctx.chunk
        L, batch, dim = u_tm.shape
        N = A.shape[1]
        A_t = A.t().contiguous()  # (N, D)
        A2_t = A_t * LOG2_E  # (N, D)
        du_tm, dy_tm = delta_tm * u_tm, _time_major(dy)  # (L, B, D)
        d_u, d_delta = torch.empty_like(u_tm), torch.empty_like(u_tm)  # (L, B, D)
        d_B, d_C = torch.empty_like(B_tm), torch.empty_like(B_tm)  # (L, B, N)
        d_A_t = torch.zeros_like(A_t)  # (N, D)
        a, h, g, work = WORKSPACE.blocks(4, (T, batch, N, dim), u_tm)  # (T, B, N, D) work blocks
        g_next = u_tm.new_zeros(batch, N, dim)  # (B, N, D): a_{s+T} g_{s+T}, what flows in from the next chunk
        for k, s in reversed(list(enumerate(range(0, L, T)))):
            e = min(s + T, L)
            n = e - s
            a_, h_, g_, w_ = a[:n], h[:n], g[:n], work[:n]
            dy_c, du_c, dt_c = dy_tm[s:e], du_tm[s:e], delta_tm[s:e]  # (n, B, D)
            _fill(a_, h_, dt_c, du_c, B_tm[s:e], A2_t)
            _recur(a_, h_, checkpoints[k])  # h_ holds the states h_s .. h_{e-1} again
            torch.mul(C_tm[s:e, :, :, None], dy_c[:, :, None, :], out=g_)  # (n, B, N, D): C_t dy_t
            _recur_reverse(a_, g_, g_next)  # g_ holds the adjoints g_s .. g_{e-1}
            torch.mul(a_[0], g_[0], out=g_next)
            # dC_t = sum_d dy_t h_t, dB_t = sum_d (delta u)_t g_t: batched row-vector products over D
            torch.bmm(_rows(dy_c, dim), h_.view(n * batch, N, dim).transpose(1, 2), out=_rows(d_C[s:e], N))
            torch.bmm(_rows(du_c, dim), g_.view(n * batch, N, dim).transpose(1, 2), out=_rows(d_B[s:e], N))
            # gB_t = sum_n g_t B_t, then du_t = delta_t gB_t and the b-part of ddelta_t, u_t gB_t
            gB = torch.bmm(_rows(B_tm[s:e], N), g_.view(n * batch, N, dim)).view(n, batch, dim)  # (n, B, D)
            torch.mul(gB, dt_c, out=d_u[s:e])
            torch.mul(gB, u_tm[s:e], out=d_delta[s:e])
            # P_t = g_t * a_t * h_{t-1}, built in place of a_ (a is no longer needed)
            a_[1:].mul_(h_[:-1])
            a_[0].mul_(checkpoints[k])
            a_.mul_(g_)  # (n, B, N, D)
            # dA = sum_{t, b} P_t delta_t and the a-part of ddelta_t, sum_n P_t A
            d_A_t += torch.mul(a_, dt_c[:, :, None, :], out=w_).view(n * batch, N * dim).sum(0).view(N, dim)
            d_delta[s:e] += a_.mul_(A_t).sum(2)  # (n, B, D)
        d_u, d_delta, d_B, d_C = (_batch_major(t) for t in (d_u, d_delta, d_B, d_C))  # (B, D, L), (B, N, L)
        return d_u, d_delta, d_A_t.t(), d_B, d_C, None


def scan_chunked(u, delta, A, B, C, chunk=CHUNK):
    """y_t = C_t . h_t (B, D, L) by the chunked recurrence with recomputation in backward."""
    return ChunkedScan.apply(u, delta, A, B, C, chunk)
