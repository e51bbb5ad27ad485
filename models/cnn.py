"""Plain CNN with BatchNorm: the encoder that learns CT intensity findings at a CPU budget.

Stage i (of four), each halving the grid (He et al. 2016's conv-BN-ReLU unit, VGG's stacking; no residuals at
this depth):
    x = ReLU(BN(Conv_{3x3, stride 2}(x)))          D_{i-1} -> D_i channels, grid / 2
    x = ReLU(BN(Conv_{3x3}(x)))                    D_i -> D_i
then the embedding is the mean over the final grid (global average pooling), as in ResNet.

Why this family beside the paper's three: on CT an intensity is a finding (ground glass is lung 250 HU denser,
emphysema 130 HU lighter), and a lung region shows up in only one of the three HU windows, so a conv's output
there is the intensity v times a fixed vector. A LayerNorm over a pixel's channels divides v out; the ViT,
gated CNN and SSM normalise every token or pixel that way. BatchNorm normalises each channel over the batch,
so the same features keep v, centred on the batch: a threshold ("denser than the usual lung") is there from the
first step. Trained supervised on the corpus's mask labels, this network registers ground glass within 200 steps,
where gcnn-micro does not in 600 (docs/results.md, "Which encoder can see the finding"); that is what makes it the
demo's encoder and the learning curves' (bench/learning.py), whose ceiling has to be above chance. A fourth input
channel, the narrow parenchyma window (data.WINDOWS), is another affine function of v, so a lung pixel is no longer
v times one vector and a LayerNorm keeps v: with it gcnn-micro learns too, later (the same section).

Departure: BatchNorm makes a slice's embedding depend on its batch in training mode. Extraction runs in eval
mode (running statistics). Pre-training on several GPUs converts it to SyncBatchNorm (pretrain.py), as MoCo v3's
ResNet-50 does; on several CPU processes (gloo has no SyncBatchNorm) each normalises over its own share of the
batch, so there, unlike the other families, a run's result depends on the number of processes.

Shapes: B batch, C input channels, H W image height and width, h w grid of a stage, D_i stage width.
"""
from dataclasses import dataclass

import torch.nn as nn

from .common import check_images


@dataclass(frozen=True)
class CNNConfig:
    dims: tuple = (64, 128, 256, 256)  # D_i, stage widths; one stride-2 stage per entry
    in_chans: int = 3  # C: our CT slices carry three HU windows
    img_size: int = 224  # recorded for rebuilding; a CNN has no stored grid, any input size works


def conv_bn_relu(dim_in, dim_out, stride):
    """3x3 conv (no bias: BatchNorm's shift replaces it), BatchNorm, ReLU: (B, D_in, h, w) -> (B, D_out, h/s, w/s)."""
    return nn.Sequential(nn.Conv2d(dim_in, dim_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(dim_out), nn.ReLU(inplace=True))


class PlainCNN(nn.Module):
    """(B, C, H, W) -> (B, D) with D the last stage's width."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg, self.in_chans, self.embed_dim = cfg, cfg.in_chans, cfg.dims[-1]
        self.stem = conv_bn_relu(cfg.in_chans, cfg.dims[0], 2)  # the first stride-2 conv: pixels -> features
        layers = [conv_bn_relu(cfg.dims[0], cfg.dims[0], 1)]
        for a, b in zip(cfg.dims[:-1], cfg.dims[1:]):
            layers += [conv_bn_relu(a, b, 2), conv_bn_relu(b, b, 1)]
        self.stages = nn.Sequential(*layers)  # PyTorch's default init (BatchNorm rescales whatever the conv gives)

    def forward(self, x):  # x: (B, C, H, W)
        check_images(x, self.in_chans, 1, "cnn")
        x = self.stages(self.stem(x))  # (B, D, H/16, W/16)
        return x.mean(dim=(2, 3))  # (B, D)
