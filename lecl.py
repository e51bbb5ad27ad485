"""LeCL, lesion-enhanced contrastive learning: the self-supervised objective that pre-trains CLEAR's slice
encoder (arXiv 2411.16803, Sec. 3.2), on MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training
Self-Supervised Vision Transformers", Alg. 1). This file is the method alone: the loss, the two branches and
the momentum. How `clear.py pretrain` runs it (lr schedule, loop, checkpoints, torchrun) is pretrain.py; the
slices and their two views are views.py.

    q = pred(proj(f(x)))       base branch: encoder f (models.build_encoder), 3-layer projector, 2-layer predictor
    k = proj_m(f_m(x))         momentum branch, no gradient:  θ_m <- m θ_m + (1 - m) θ            (Alg. 1)
    m_t = 1 - (1 - m_0)(1 + cos(π t / T)) / 2                   m_0 = 0.99 rising to 1    (MoCo v3, Sec. 4)
    L = ℓ(q1, k2) + ℓ(q2, k1)                                  symmetric in the two views       (Alg. 1)
    l_ij = q_i · k_j / τ  (q, k L2-normalised),  p(i) the index of i's own key
    ℓ_i = -[ l_{i,p(i)} - log( Σ_j exp(l_ij) + Σ_{j ∈ lesion, j ≠ p(i)} exp(w · l_ij) ) ]        (LeCL)
    loss = 2τ · mean_i ℓ_i                                      MoCo v3's scaling of the cross-entropy

Keys of lesion slices enter the denominator a second time, up-weighted by w: hard negatives that push lesion
embeddings apart. With no lesion key, or w = 0, ℓ is MoCo v3's InfoNCE. w defaults to 1, as the official
code's --sample-weight does (its forward's own default is 10); at τ = 0.2 a weight of 10 makes each lesion key's
term exp(50 cos), and on the corpus that unlearns what lesion slices share (docs/results.md, "Learning curves").

Across processes (pretrain.py starts them under torchrun): keys and lesion flags are all-gathered, so each
process contrasts its N queries with all M = world · N keys (its own at offset rank · N); the heads' BatchNorm
takes statistics over the global batch (GlobalBatchNorm1d below, on any backend). So K processes compute the
loss and gradient of one process on the same global batch (tested with gloo).

Shapes: N queries (this process's batch), M keys (the global batch), d projection width, D encoder width,
C window channels, S input size, F BatchNorm features.

Departures from MoCo v3 and the official code (KatherLab/CLEAR, a MoCo v3 fork): w = 0 drops the lesion term
(the formula as written would add exp(0) = 1 per lesion key); the two views share one encoder call (the
LayerNorm encoders normalise per sample, so this equals two calls; cnn's BatchNorm takes its statistics over both
views' 2N slices, the official code's over each view's N), the heads see each view alone; MoCo v3 freezes its
ViT's random patch projection (a stability trick, its Sec. 5), here every encoder trains whole by default, and
pretrain.py's `freeze_stem` freezes the first layer of any of the three families alike (models.stem).
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def lecl_loss(q, k, lesion, weight=1.0, temperature=1.0, offset=0):
    """LeCL's contrastive loss of queries q (N, d) against keys k (M, d), M >= N the keys of all processes with
    this one's at rows offset .. offset + N; lesion (M,) bool marks keys of lesion slices. Returns the scalar

        2τ · mean_i -[ l_{i,p(i)} - log( Σ_j exp(l_ij) + Σ_{j ∈ lesion, j ≠ p(i)} exp(w · l_ij) ) ]

    with l_ij = q_i · k_j / τ on L2-normalised q, k and p(i) = offset + i. w = 0 drops the second sum (as
    written it would add exp(0) = 1 per lesion key), so then, as with no lesion key, this is MoCo v3's InfoNCE.
    One logsumexp over both sums, in float32 even under autocast."""
    N, M = q.shape[0], k.shape[0]
    if lesion.shape != (M,) or not 0 <= offset <= M - N:
        raise ValueError(f"lecl_loss: lesion {tuple(lesion.shape)} must be ({M},), offset {offset} "
                         f"in [0, {M - N}]")
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)  # (N, d)
        k = F.normalize(k.float(), dim=1)  # (M, d)
        logits = q @ k.T / temperature  # (N, M): l_ij
        rows = torch.arange(N, device=q.device)
        pos = rows + offset  # (N,): p(i)
        terms = logits
        if weight != 0:
            hard = lesion.to(q.device, torch.bool)[None, :].repeat(N, 1)  # (N, M): lesion keys ...
            hard[rows, pos] = False  # ... except i's own
            if hard.any():
                extra = (weight * logits).masked_fill(~hard, float("-inf"))  # (N, M): w · l_ij on lesion keys
                terms = torch.cat([logits, extra], dim=1)  # (N, 2M)
        loss = torch.logsumexp(terms, dim=1) - logits[rows, pos]  # (N,): ℓ_i
        return loss.mean() * (2 * temperature)


# ------------------------------------------------------------------------- the global batch of all processes


def _world_size():
    """Processes in the group, 1 when none is up: the heads and keys below look past their own batch when > 1."""
    return dist.get_world_size() if dist.is_initialized() else 1


class AllReduceSum(torch.autograd.Function):
    """y = Σ_processes x, differentiable: the gradient of each process's x is the sum of all processes' dy."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx)
        return dx


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with training statistics over the global batch of all processes (SyncBatchNorm's semantics)
    on any backend; gloo has no SyncBatchNorm, and on CUDA pretrain.py swaps in SyncBatchNorm's fused kernels.
    Two differentiable all-reduces: the mean, then the variance around it (safer than E[x²] - E[x]²).
    One process: plain BatchNorm1d."""

    def forward(self, x):  # x: (N, F)
        if not (self.training and _world_size() > 1):
            return super().forward(x)
        x32 = x.float()
        s = AllReduceSum.apply(torch.cat([x32.sum(0), x32.new_tensor([x.shape[0]])]))  # (F + 1,) global sums
        count = s[-1]
        mean = s[:-1] / count  # (F,)
        var = AllReduceSum.apply(((x32 - mean) ** 2).sum(0)) / count  # (F,) biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as BatchNorm
        y = (x32 - mean) * torch.rsqrt(var + self.eps)  # (N, F)
        return (y * self.weight + self.bias if self.affine else y).to(x.dtype)


def gather(x):
    """Concatenate x (N, ...) of every process in rank order: (world · N, ...). No gradient (keys only)."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------- MoCo v3


def mlp(num_layers, in_dim, hidden, out_dim, last_bn):
    """MoCo v3's `_build_mlp`: (Linear, BN, ReLU) x (num_layers - 1), Linear, and BN without affine if last_bn."""
    layers = []
    for i in range(num_layers):
        a, b = in_dim if i == 0 else hidden, out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(a, b, bias=False))
        if i < num_layers - 1:
            layers += [GlobalBatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GlobalBatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


class MoCo(nn.Module):
    """Base encoder + projector + predictor, and their momentum copies (encoder + projector); forward -> loss."""

    def __init__(self, encoder, proj_dim=256, mlp_dim=4096, temperature=0.2, lesion_weight=1.0):
        super().__init__()
        self.temperature, self.lesion_weight = temperature, lesion_weight
        self.encoder = encoder
        self.projector = mlp(3, encoder.embed_dim, mlp_dim, proj_dim, last_bn=True)  # MoCo v3's ViT head
        self.predictor = mlp(2, proj_dim, mlp_dim, proj_dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def base_parameters(self):
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def momentum_parameters(self):
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, m):
        """θ_m <- m θ_m + (1 - m) θ for the encoder and projector (MoCo v3, Alg. 1); a frozen θ (pretrain.py's
        freeze_stem) is left out: its copy equals it already, and the update would only add rounding."""
        for pm, p in zip(self.momentum_parameters(), self.base_parameters()):
            if p.requires_grad:
                pm.mul_(m).add_(p.detach(), alpha=1 - m)

    def forward(self, x1, x2, lesion, m):  # x1, x2: (N, C, S, S); lesion: (N,) bool
        N = x1.shape[0]
        f = self.encoder(torch.cat([x1, x2]))  # (2N, D)
        self.embeddings = f[:N].detach()  # (N, D) the encoder's view-1 embeddings: pretrain.py watches their rank
        q1, q2 = self.predictor(self.projector(f[:N])), self.predictor(self.projector(f[N:]))  # (N, d) each
        with torch.no_grad():
            self.update_momentum(m)
            fk = self.momentum_encoder(torch.cat([x1, x2]))  # (2N, D)
            k1, k2 = gather(self.momentum_projector(fk[:N])), gather(self.momentum_projector(fk[N:]))  # (M, d)
            les = gather(lesion.to(torch.uint8)).bool()  # (M,)
        offset = dist.get_rank() * N if dist.is_initialized() else 0
        w, t = self.lesion_weight, self.temperature
        return lecl_loss(q1, k2, les, w, t, offset) + lecl_loss(q2, k1, les, w, t, offset)


def momentum_at(step, total, m0):
    """m_t = 1 - (1 - m_0)(1 + cos(π t / T)) / 2: m_0 at the start, 1 at the end (MoCo v3)."""
    return 1 - (1 - m0) * (1 + math.cos(math.pi * step / total)) / 2
