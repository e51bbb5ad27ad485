"""The supervised reference, not part of LeCL: the same slice encoder trained on what the masks say about each
slice, to show what a task allows from these slices at this size and data (docs/results.md: "floor and
ceiling"). pretrain.py runs it as `method="supervised"`, in place of lecl.MoCo, on view 1 of each slice (a
random resized crop, no lesion crop); its targets are the mask labels each cached slice holds (cache.py).

    logits = W f(x) + b                         a linear head on the encoder's embedding f(x) (D,) -> (L,)
    loss = mean over slices and labels of BCE(logits, targets)    multi-label: a slice may hold several findings
"""
import torch.nn as nn
import torch.nn.functional as F


class SliceClassifier(nn.Module):
    """Encoder + linear head, trained with multi-label cross-entropy over the L mask labels."""

    def __init__(self, encoder, n_labels):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, n_labels)

    def forward(self, x, targets):  # x: (N, C, S, S); targets: (N, L) 0/1
        f = self.encoder(x)  # (N, D)
        self.embeddings = f.detach()  # as MoCo's: pretrain.py watches their rank
        return F.binary_cross_entropy_with_logits(self.head(f), targets.float())
