"""CT on disk -> tensors a 2D slice encoder can eat: NIfTI in; windowed slices and lesion boxes out.

Every CT that CLEAR reads goes through this module (it knows NIfTI and tensors, no models):

    load_ct(path)                 -> volume (Z, Y, X) float32 in HU, spacing (z, y, x) in mm
    prepare_slices(volume, ...)   -> slices (Z', C, S, S) in [0, 1], one channel per HU window; z in mm
    lesion_boxes(mask, ...)       -> per-slice lesion flags and boxes, in the prepared slices' pixels

(The folder of scans these come from, images/ masks/ labels.csv, is cohort.py's.)

Orientation: volumes are reoriented to canonical RAS+ (as nibabel's `as_closest_canonical` does), so a scan
stored with any flip or permutation of its axes comes back as the same array. In the returned (Z, Y, X)
array axis 0 runs inferior -> superior, axis 1 posterior -> anterior, axis 2 patient-left -> patient-right
(+x of RAS+ points to the patient's Right). A z position in mm is `slice index * spacing_z` from the most
inferior slice; bags, attention overlays and resampling all use it.

Shapes: Z slices, Y rows, X columns, C window channels, S the encoder's square input size.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from files import ClearError, atomic_path, cause


# ----------------------------------------------------------------------------------------------- NIfTI


def to_ras(affine, shape):
    """The axis flips/permutation taking a stored array to canonical RAS+, and the affine after it."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt("RAS"))
    return ornt, affine @ nib.orientations.inv_ornt_aff(ornt, shape)


DEFLATE_MAX_RATIO = 1032  # gzip (deflate) never shrinks data by more than ~1032:1


def _check_size(path, img):
    """Refuse a header that claims more voxels than the file can hold (a truncated file, or a wrong dim[]),
    from the header and the file size alone, before the voxel data is allocated and read."""
    size = path.stat().st_size
    offset = int(getattr(img.dataobj, "offset", 0))  # where the voxel data starts
    need = math.prod(int(n) for n in img.shape) * img.get_data_dtype().itemsize  # bytes of voxel data
    most = size * DEFLATE_MAX_RATIO if path.name.endswith(".gz") else size - offset
    if need > most:
        raise ClearError(f"{path}: the header claims {' x '.join(map(str, img.shape))} voxels of "
                         f"{img.get_data_dtype()} ({need:,} bytes), more than this file of {size:,} bytes can hold: "
                         "file truncated or corrupt")


def _read_nifti(path):
    """Open a NIfTI image and move it to canonical RAS+; returns (array (X, Y, Z) in RAS+, affine, img)."""
    path = Path(path)
    if not path.is_file():
        raise ClearError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ClearError(f"{path}: empty file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for files that are not NIfTI at all
        raise ClearError(f"{path}: not a NIfTI image ({cause(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ClearError(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ClearError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    if min(shape) < 1:
        raise ClearError(f"{path}: empty volume of shape {tuple(img.shape)}")
    _check_size(path, img)
    try:
        arr = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    except Exception as e:  # truncated gzip, header claiming more voxels than the file holds, ...
        raise ClearError(f"{path}: cannot read the voxel data, file truncated or corrupt ({cause(e)})") from None
    arr = arr.reshape(shape)
    ornt, affine = to_ras(img.affine, shape)
    return np.ascontiguousarray(nib.orientations.apply_orientation(arr, ornt)), affine, img


def voxel_spacing(affine):
    """(x, y, z) voxel sizes in mm: the column norms of the affine (right for oblique grids too)."""
    return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0)))  # (x, y, z) voxel sizes in mm


def load_ct(path):
    """Read a CT volume: (volume (Z, Y, X) float32 in HU, spacing (z, y, x) in mm), canonical RAS+."""
    arr, affine, _ = _read_nifti(path)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ClearError(f"{path}: {bad} voxels are NaN or infinite")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -10_000 or hi > 100_000:  # no CT spans this: scaling in the header is wrong, or not a CT
        raise ClearError(f"{path}: voxel values span [{lo:.3g}, {hi:.3g}], not Hounsfield units "
                         "(check scl_slope/scl_inter)")
    sx, sy, sz = voxel_spacing(affine)
    if min(sx, sy, sz) <= 0:
        raise ClearError(f"{path}: voxel spacing {(sx, sy, sz)} is not positive")
    return arr.transpose(2, 1, 0).copy(), (sz, sy, sx)  # (Z, Y, X)


def load_mask(path, shape=None):
    """Read a lesion mask (integer labels, 0 = background) on the same grid as its image: (Z, Y, X) int64."""
    arr, _, _ = _read_nifti(path)
    if not np.isfinite(arr).all():
        raise ClearError(f"{path}: mask has NaN or infinite values")
    mask = np.rint(arr).astype(np.int64).transpose(2, 1, 0).copy()  # (Z, Y, X)
    if shape is not None and mask.shape != tuple(shape):
        raise ClearError(f"{path}: mask shape {mask.shape} (z, y, x) differs from its image's {tuple(shape)}")
    return mask


def canonical_grid(path):
    """The canonical (RAS+) affine and (Z, Y, X) shape of a NIfTI image, read from its header alone."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise ClearError(f"{path}: not a NIfTI image ({cause(e)})") from None
    ornt, affine = to_ras(img.affine, img.shape[:3])
    xyz = [0, 0, 0]
    for n, (axis, _) in zip(img.shape[:3], ornt):  # stored axis i becomes canonical axis ornt[i, 0]
        xyz[int(axis)] = n
    return affine, tuple(xyz[::-1])


def save_nifti(path, volume, affine, dtype=np.float32, slope=1.0, inter=0.0, axcodes="RAS"):
    """Write a canonical (Z, Y, X) volume with its RAS+ `affine`, atomically, stored with the axis order
    and directions `axcodes` (e.g. "LPS", as DICOM exports do; the affine follows, so readers see the same
    anatomy). With an integer `dtype` values are stored as round((v - inter) / slope)."""
    data = np.asarray(volume).transpose(2, 1, 0)  # (X, Y, Z): NIfTI's axis order
    if np.issubdtype(np.dtype(dtype), np.integer):
        # Scale here: handed floats, nibabel chooses its own scaling and clips what the dtype cannot hold
        # (uint16 would lose every negative value), so it gets the stored integers themselves.
        info = np.iinfo(dtype)
        data = np.clip(np.round((data.astype(np.float64) - inter) / slope), info.min, info.max).astype(dtype)
    else:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, affine)
    if axcodes != "RAS":
        img = img.as_reoriented(nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                                nib.orientations.axcodes2ornt(axcodes)))
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header.set_slope_inter(slope, inter)
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + suffix)  # nibabel chooses compression from the file name
        try:
            nib.save(img, str(named))
            os.replace(named, tmp)
        finally:
            if named.exists():
                named.unlink()


def save_overlay(image_path, z_mm, values, out_path):
    """Broadcast one value per slice (e.g. MIL attention at bag positions `z_mm`) over the image's canonical
    grid and save it as a float32 NIfTI that viewers (ITK-SNAP, 3D Slicer) open over the image."""
    affine, (nz, ny, nx) = canonical_grid(image_path)
    dz = voxel_spacing(affine)[2]
    z_mm = np.asarray(z_mm, dtype=np.float64)
    nearest = np.abs(np.arange(nz)[:, None] * dz - z_mm[None, :]).argmin(1)  # (Z,) bag slice per image slice
    volume = np.broadcast_to(np.asarray(values, np.float32)[nearest][:, None, None], (nz, ny, nx))
    save_nifti(out_path, volume, affine)


# --------------------------------------------------------------------------------------- slices from HU


WINDOWS = {  # name -> (level, width) in HU: what `clear.py pretrain --windows` takes, one channel each
    "lung": (-600.0, 1500.0),  # the lung window: air to soft tissue
    "soft": (40.0, 400.0),  # soft tissue (mediastinum, abdomen)
    "bone": (400.0, 1800.0),
    "parenchyma": (-850.0, 500.0),  # narrow, on lung parenchyma: ground glass (+250 HU) and emphysema (-130 HU)
    #                                 take a third and a quarter of its width, a sixth and a twelfth of the lung's
}


def named_windows(names):
    """(level, width) in HU of each of WINDOWS' `names`, in order: one input channel each."""
    return tuple(WINDOWS[name] for name in names)


@dataclass(frozen=True)
class SliceConfig:
    """How a CT volume becomes encoder input."""
    # (level, width) in HU per channel: lung, soft tissue, bone, the three windows radiologists read CT in
    windows: tuple = named_windows(("lung", "soft", "bone"))
    img_size: int = 224  # in-plane size S the encoder sees; extraction takes it from the encoder
    thickness_mm: float | None = None  # None: every slice as stored; else resample along z to this spacing


def window(hu, windows):
    """HU -> one channel per (level, width) window, each clipped to [0, 1]: (..., H, W) -> (..., C, H, W).
    A voxel at level - width/2 maps to 0 and one at level + width/2 to 1, linearly in between."""
    level = torch.tensor([w[0] for w in windows], dtype=torch.float32, device=hu.device)  # (C,)
    width = torch.tensor([w[1] for w in windows], dtype=torch.float32, device=hu.device)  # (C,)
    lo = (level - width / 2)[:, None, None]  # (C, 1, 1)
    return ((hu.unsqueeze(-3) - lo) / width[:, None, None]).clamp_(0.0, 1.0)  # (..., C, H, W)


def slice_positions(n_slices, spacing_z, thickness_mm=None):
    """z positions (mm) of the slices to take: every stored one, or every `thickness_mm` along the scan."""
    if thickness_mm is None:
        return torch.arange(n_slices, dtype=torch.float64) * spacing_z
    length = (n_slices - 1) * spacing_z
    return torch.arange(0.0, length + 1e-6, thickness_mm, dtype=torch.float64)


def nearest_slices(z_mm, spacing_z, n_slices):
    """Index of the stored slice nearest to each z position (mm from the first slice): (Z',) long."""
    return (torch.as_tensor(z_mm) / spacing_z).round().long().clamp(0, n_slices - 1)


def resample_z(volume, spacing_z, z_mm):
    """Linear interpolation of a (Z, ...) tensor at the z positions `z_mm` (mm from the first slice)."""
    pos = (z_mm / spacing_z).clamp(0, volume.shape[0] - 1)  # fractional slice index, (Z',)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=volume.shape[0] - 1)
    w = (pos - i0).to(volume.dtype).view(-1, *([1] * (volume.dim() - 1)))  # (Z', 1, ...)
    return volume[i0] * (1 - w) + volume[i1] * w  # (Z', ...)


def prepare_slices(volume, spacing, cfg=SliceConfig()):
    """A (Z, Y, X) HU volume -> (slices (Z', C, S, S) float32 in [0, 1], z positions (Z',) in mm).

    Resample along z (if asked), resize in-plane to S x S (antialiased bilinear, on HU: one channel, not C),
    then window. All in torch on the whole volume."""
    vol = torch.as_tensor(volume, dtype=torch.float32)  # (Z, Y, X)
    z_mm = slice_positions(vol.shape[0], spacing[0], cfg.thickness_mm)  # (Z',)
    if cfg.thickness_mm is not None:
        vol = resample_z(vol, spacing[0], z_mm)  # (Z', Y, X)
    if vol.shape[1:] != (cfg.img_size, cfg.img_size):
        vol = F.interpolate(vol[:, None], size=(cfg.img_size, cfg.img_size), mode="bilinear",
                            antialias=True, align_corners=False)[:, 0]  # (Z', S, S)
    return window(vol, cfg.windows), z_mm  # (Z', C, S, S), (Z',)


# ------------------------------------------------------------------------------------- masks and boxes


def connected_components(fg):
    """8-connected components of each 2D slice of a boolean (Z, Y, X) tensor -> int64 labels, 0 = background.
    Label propagation: every foreground pixel starts with a unique id and takes the max of its 3x3
    neighbourhood until nothing changes (iterations ~ the longest component's diameter)."""
    ids = torch.arange(1, fg.numel() + 1, dtype=torch.float64).view(fg.shape) * fg  # (Z, Y, X)
    while True:
        grown = F.max_pool2d(ids[:, None], 3, stride=1, padding=1)[:, 0] * fg  # (Z, Y, X)
        if torch.equal(grown, ids):
            return ids.long()
        ids = grown


def slice_labels(mask, spacing_z, cfg=SliceConfig()):
    """The set of non-zero mask labels on each slice `prepare_slices` makes from the same volume (the nearest
    stored mask slice, as lesion_boxes): a list of Z' sets of ints. mask: (Z, Y, X) integer labels."""
    mask = torch.as_tensor(mask)
    mask = mask[nearest_slices(slice_positions(mask.shape[0], spacing_z, cfg.thickness_mm), spacing_z, mask.shape[0])]
    held = [set() for _ in range(mask.shape[0])]
    for v in mask.unique().tolist():
        for i in (mask == v).flatten(1).any(1).nonzero()[:, 0].tolist() if v != 0 else ():
            held[i].add(v)
    return held


def lesion_boxes(mask, spacing_z, cfg=SliceConfig(), labels=None):
    """Lesion flags and boxes for the slices `prepare_slices` makes from the same volume.

    mask: (Z, Y, X) integer labels; `labels` selects which count as lesions (default: any non-zero).
    Returns (flags (Z',) bool, boxes): boxes[i] lists (y0, x0, y1, x1) float boxes, one per 8-connected
    component of slice i, in the S x S pixel frame of the prepared slice (y1, x1 exclusive). Slices
    resampled along z take the nearest stored mask slice."""
    mask = torch.as_tensor(mask)
    fg = mask != 0 if labels is None else torch.isin(mask, torch.as_tensor(list(labels)))  # (Z, Y, X)
    z_mm = slice_positions(mask.shape[0], spacing_z, cfg.thickness_mm)
    fg = fg[nearest_slices(z_mm, spacing_z, mask.shape[0])]  # (Z', Y, X)
    sy, sx = cfg.img_size / mask.shape[1], cfg.img_size / mask.shape[2]
    flags = fg.flatten(1).any(1)  # (Z',)
    boxes = [[] for _ in range(fg.shape[0])]
    hit = flags.nonzero()[:, 0]
    if len(hit):
        comp = connected_components(fg[hit])  # (Z'', Y, X)
        for j, i in enumerate(hit.tolist()):
            for c in comp[j].unique()[1:].tolist():
                ys, xs = (comp[j] == c).nonzero(as_tuple=True)
                boxes[i].append((ys.min().item() * sy, xs.min().item() * sx,
                                 (ys.max().item() + 1) * sy, (xs.max().item() + 1) * sx))
    return flags, boxes
