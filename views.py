"""The data side of LeCL (arXiv 2411.16803, Sec. 3.2; the method is lecl.py, the training loop that draws from
here is pretrain.py): the batch sampler and the two views of every sampled slice of the slice cache (cache.py),
all batched in torch (no torchvision).

    lesion slice:     view 1 = square crop centred on one of its lesion boxes (picked at random), side s drawn
                      uniformly in [max(√crop_min·S, box extent), S];  view 2 = the whole slice
    other slice:      two random resized crops (area share in [crop_min, 1], aspect in [3/4, 4/3])
    then, per view:   left-right flip, intensity/contrast jitter per window channel, Gaussian blur, noise

Randomness: the views of the i-th sample of the global batch at step t depend on (seed, t, i) alone, so a
run resumed mid-way, or split over any number of processes, sees exactly the same views.

Shapes: B batch, T slices in the cache, C window channels, S encoder input size, Sc cache slice size.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ViewConfig:
    """Crops and augmentations: MoCo v3's recipe (Chen et al. 2021, Sec. 4 and its main_moco.py) for CT."""
    crop_min: float = 0.08  # smallest crop area share: MoCo v3's --crop-min; lesion crop side >= √0.08·S
    ratio: tuple = (3 / 4, 4 / 3)  # aspect range of random resized crops, torchvision's default
    hflip: float = 0.5  # left-right mirror (bodies are near-symmetric); no up-down flip, never seen in CT
    jitter: float = 0.0  # chance of intensity jitter (MoCo v3's ColorJitter: 0.8). Off: on CT an intensity is a
    #                      finding (ground glass +250 HU, emphysema -100 HU; the jitter's ±0.1 lung-window widths is
    #                      ±150 HU), and views that differ in it train the encoder to ignore it
    contrast: float = 0.4  # contrast factor in 1 ± 0.4 per window channel: ColorJitter's contrast=0.4
    brightness: float = 0.1  # level shift in ± 0.1 window widths per channel: a window set a little off
    blur: tuple = (1.0, 0.1)  # chance of Gaussian blur in view 1 / view 2: MoCo v3's asymmetric recipe
    sigma: tuple = (0.1, 2.0)  # blur σ in pixels at 224 px (MoCo v3), scaled to the input size
    noise: float = 0.5  # chance of added Gaussian noise; replaces MoCo v3's grayscale/solarize (not for CT)
    noise_std: float = 0.03  # largest noise σ, in window units (~45 HU in the lung window)


@dataclass(frozen=True)
class Views:
    """What make_views draws: views of `size` px, LeCL's lesion crops or not, and the augmentations."""
    size: int  # S, the encoder's input
    lesion_crops: bool  # view 1 of a lesion slice centred on a lesion (LeCL); False: random crops (MoCo v3)
    augment: ViewConfig = ViewConfig()


def mix(*keys):
    """A seed from integers, splitmix64-style, so that (seed, step, sample) give unrelated random streams."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (int(k) & MASK64)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 29
    return h >> 1  # 63 bits: torch.manual_seed accepts it on every device


# ------------------------------------------------------------------------------------------------ sampler


LEVEL_WINDOW = 0.05  # matched levels: ± this share of a scan's height (about 2 cm of a 40-cm scan), a tenth of
#                      the corpus's slices to draw each batch from


def level_pool(cache, levels=None):
    """(P,) ids of the slices at heights lo <= level <= hi of their scans (cache.level), `levels` = (lo, hi); all
    slices where it is None."""
    if levels is None:
        return torch.arange(len(cache))  # (T,)
    lo, hi = levels
    return ((cache.level >= lo) & (cache.level <= hi)).nonzero()[:, 0]  # (P,)


def batch_ids(cache, step, batch, seed, lesion_fraction, matched_levels=False, levels=None):
    """The global batch of step `step`: (batch,) slice ids, distinct, a function of (seed, step) alone.
    With `lesion_fraction` f (and lesion slices in the cache) round(f·batch) of them are lesion slices.
    matched_levels: all drawn from slices within ±LEVEL_WINDOW of one height (cache.level), drawn per step, so that
    a slice's negatives share its anatomy and what tells them apart is the patient and the pathology. The nearest
    slices to that height stand in where the window holds too few.
    levels (lo, hi): only slices at those heights of their scans (level_pool), e.g. the chest of neck-to-pelvis
    scans; with matched_levels each step's height is drawn in [lo, hi]."""
    g = torch.Generator().manual_seed(mix(seed, step))
    pool = level_pool(cache, levels)  # (P,) the slices this step draws from
    if matched_levels:
        lo, hi = levels or (0.0, 1.0)
        far = (cache.level[pool] - (lo + (hi - lo) * torch.rand((), generator=g))).abs()  # (P,) from this height
        near = far <= LEVEL_WINDOW  # (P,)
        pool = pool[near] if near.sum() >= batch else pool[far.argsort()[:batch]]  # (P',)
    lesion = cache.flags[pool]  # (P,)
    if lesion_fraction is None or not lesion.any():
        return pool[torch.randperm(len(pool), generator=g)[:batch]]  # (batch,)
    les, other = pool[lesion], pool[~lesion]
    n = min(max(round(lesion_fraction * batch), batch - len(other)), len(les))  # f·batch, unless the pool is short
    les = les[torch.randperm(len(les), generator=g)[:n]]  # (n,)
    other = other[torch.randperm(len(other), generator=g)[:batch - n]]  # (batch - n,)
    ids = torch.cat([les, other])  # (batch,)
    return ids[torch.randperm(len(ids), generator=g)]  # shuffled, so every process gets its share of lesions


# -------------------------------------------------------------------------------------------------- crops


def random_resized_boxes(u, size, crop_min, ratio):
    """torchvision's RandomResizedCrop box from uniforms u (B, 4) = (area, aspect, y, x): (B, 4) (y0, x0, y1, x1).
    Departure: a box wider or taller than the image is clipped to it (torchvision redraws up to 10 times)."""
    area = size * size * (crop_min + (1 - crop_min) * u[:, 0])  # (B,)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * log_r.exp()).sqrt().clamp(max=size)  # (B,)
    h = (area / log_r.exp()).sqrt().clamp(max=size)
    y0, x0 = u[:, 2] * (size - h), u[:, 3] * (size - w)
    return torch.stack([y0, x0, y0 + h, x0 + w], dim=1)  # (B, 4)


def lesion_crop_boxes(box, u, size, crop_min):
    """Square crops holding lesion boxes `box` (B, 4): side s uniform (from u (B,)) in [max(√crop_min·size,
    box extent), size], centred on the box, shifted inward where it would leave the image (it still holds the
    box, as s >= its extent). Returns (B, 4) (y0, x0, y1, x1)."""
    extent = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])  # (B,)
    lo = extent.clamp(min=math.sqrt(crop_min) * size, max=size)
    side = lo + (size - lo) * u  # (B,)
    half = side / 2
    cy = ((box[:, 0] + box[:, 2]) / 2).clamp(min=half, max=size - half)  # (B,)
    cx = ((box[:, 1] + box[:, 3]) / 2).clamp(min=half, max=size - half)
    return torch.stack([cy - half, cx - half, cy + half, cx + half], dim=1)  # (B, 4)


def gaussian_blur(x, sigma, sigma_max):
    """Blur each image of x (B, C, H, W) with its own σ (B,) in pixels (0: unchanged); separable, reflect pad.
    The kernel spans ±3 sigma_max, a bound fixed beforehand, so an image's result never depends on its batch."""
    r = min(math.ceil(3 * sigma_max), x.shape[-1] - 1, x.shape[-2] - 1)
    if r <= 0:
        return x
    B, C, H, W = x.shape
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)  # (K,)
    k = torch.exp(-t[None] ** 2 / (2 * sigma.to(x)[:, None] ** 2 + 1e-12))  # (B, K); σ = 0 gives a delta
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B·C, K)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")  # (1, B·C, H + 2r, W + 2r)
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # (1, B·C, H + 2r, W): along x
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # (1, B·C, H, W): along y
    return y.view(B, C, H, W)


def crop_resize(images, boxes, flip, out_size):
    """Sample `boxes` (B, 4) (y0, x0, y1, x1, pixels) of images (B, C, Sc, Sc) at out_size², mirrored where
    `flip` (B,): one affine grid_sample for the batch. Crops that shrink are pre-blurred against aliasing."""
    B, C, Sc, _ = images.shape
    shrink = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / out_size  # (B,)
    if shrink.max() > 1:  # boxes lie inside the image, so shrink <= Sc / out_size
        images = gaussian_blur(images, ((shrink - 1) / 2).clamp(min=0), (Sc / out_size - 1) / 2)  # skimage's σ
    y0, x0, y1, x1 = boxes.to(images).unbind(1)  # (B,) each
    theta = torch.zeros(B, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = (x1 - x0) / Sc * torch.where(flip.to(images.device), -1.0, 1.0)  # x_src = a x_out + b,
    theta[:, 0, 2] = (x0 + x1) / Sc - 1  # in grid_sample's [-1, 1] frame (align_corners=False: pixel edges)
    theta[:, 1, 1] = (y1 - y0) / Sc
    theta[:, 1, 2] = (y0 + y1) / Sc - 1
    grid = F.affine_grid(theta, (B, C, out_size, out_size), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, S, S)


# ----------------------------------------------------------------------------------------------------- views


def _uniforms(seeds, n):
    """(B, n) uniforms, row i from its own generator seeded seeds[i]: independent of how the batch is split."""
    g = torch.Generator()
    return torch.stack([torch.rand(n, generator=g.manual_seed(s)) for s in seeds])  # (B, n)


def augment(x, u, blur_p, seeds, cfg: ViewConfig):
    """Jitter, blur and noise on views x (B, C, S, S) in [0, 1]; u (B, 5 + 2C) uniforms; blur_p (B,) chance;
    seeds (B,) of each view's noise."""
    B, C, S, _ = x.shape
    u = u.to(x)  # (B, 5 + 2C), on the views' device
    contrast = 1 + cfg.contrast * (2 * u[:, 1:1 + C] - 1)  # (B, C)
    level = cfg.brightness * (2 * u[:, 1 + C:1 + 2 * C] - 1)  # (B, C)
    on = (u[:, :1] < cfg.jitter).to(x)  # (B, 1)
    contrast, level = 1 + on * (contrast - 1), on * level
    x = ((x - 0.5) * contrast[..., None, None] + 0.5 + level[..., None, None]).clamp(0, 1)  # (B, C, S, S)
    u = u[:, 1 + 2 * C:]  # (B, 4): blur on, σ, noise on, noise σ
    sigma = (cfg.sigma[0] + (cfg.sigma[1] - cfg.sigma[0]) * u[:, 1]) * S / 224  # (B,)
    x = gaussian_blur(x, torch.where(u[:, 0] < blur_p.to(x.device), sigma, 0.0), cfg.sigma[1] * S / 224)
    std = torch.where(u[:, 2] < cfg.noise, cfg.noise_std * u[:, 3], 0.0)  # (B,)
    if (std > 0).any():
        g = torch.Generator(device=x.device)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g.manual_seed(s), device=x.device)
                             if v > 0 else x.new_zeros(x.shape[1:]) for s, v in zip(seeds, std.tolist())])
        x = (x + std.to(x)[:, None, None, None] * noise).clamp(0, 1)  # (B, C, S, S)
    return x


def make_views(cache, ids, seeds, views: Views, device):
    """The two views of slices `ids` (B,): (x1, x2) each (B, C, S, S) on `device`, and lesion (B,) bool, the
    slices given lesion crops (all False unless `views.lesion_crops`). `seeds` (B,) ints fix each sample's
    randomness."""
    cfg = views.augment
    src = cache.read(ids, device)  # (B, C, Sc, Sc)
    B, C, Sc = src.shape[0], src.shape[1], cache.size
    n = 10 + 2 * C  # per view: crop 4, flip 1, jitter 1 + 2C, blur 2, noise 2; then the lesion box pick
    u = _uniforms(seeds, 2 * n + 1)  # (B, 2n + 1)
    u1, u2, pick = u[:, :n], u[:, n:2 * n], u[:, -1]
    lesion = cache.flags[ids] & views.lesion_crops  # (B,)
    box1 = random_resized_boxes(u1[:, :4], Sc, cfg.crop_min, cfg.ratio)  # (B, 4)
    box2 = random_resized_boxes(u2[:, :4], Sc, cfg.crop_min, cfg.ratio)
    if lesion.any():
        start, count = cache.box_start[ids], cache.box_start[ids + 1] - cache.box_start[ids]  # (B,), (B,)
        chosen = start + (pick * count).long().clamp(max=(count - 1).clamp(min=0))  # (B,) a random box
        les_box = cache.boxes[chosen.clamp(max=max(len(cache.boxes) - 1, 0))]  # (B, 4)
        box1 = torch.where(lesion[:, None], lesion_crop_boxes(les_box, u1[:, 0], Sc, cfg.crop_min), box1)
        box2 = torch.where(lesion[:, None], torch.tensor([0.0, 0.0, Sc, Sc]), box2)  # the whole slice
    flip = torch.cat([u1[:, 4], u2[:, 4]]) < cfg.hflip  # (2B,)
    x = crop_resize(torch.cat([src, src]), torch.cat([box1, box2]), flip, views.size)  # (2B, C, S, S)
    blur_p = torch.tensor([cfg.blur[0]] * B + [cfg.blur[1]] * B)  # (2B,)
    x = augment(x, torch.cat([u1[:, 5:], u2[:, 5:]]), blur_p, [mix(s, v) for v in (1, 2) for s in seeds], cfg)
    return x[:B], x[B:], lesion.to(device)
