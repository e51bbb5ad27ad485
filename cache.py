"""The slice cache that LeCL pre-training draws from (views.py makes the views, pretrain.py runs the loop): every
scan of a cohort read once and kept as encoder-ready slices, with what the masks say about each slice.

Cache: every scan is read once (load_ct -> prepare_slices; its mask -> lesion_boxes), one volume at a time,
into `slices.u8`, a (T, C, Sc, Sc) uint8 memmap (the [0, 1] windows quantised to 1/255, a quarter of float32's
size), `index.npz` (scan of each slice, lesion flags, boxes) and `cache.json` (the settings, written last: a
cache whose settings and scan files match is reused on a re-run or --resume). Sc, the cache size, defaults
to the encoder's input size S: the whole-slice view then starts from exactly the slice extraction will feed
(up to the 1/255 quantisation), at the cost of lesion crops upsampled by up to 1/√crop_min ≈ 3.5x; a larger
`cache_size` keeps crops sharp (4x the disk at 2x), and views that shrink their crop are pre-blurred against
aliasing (σ = (shrink - 1) / 2, as skimage's resize).

Each slice also records which mask labels it holds (`labels`, (T, L) bool over the cohort's label values
`label_values`): the targets of the supervised ceiling (supervised.py).

Shapes: T slices in the cache, C window channels, Sc cache slice size, L mask label values, K boxes.
"""
import json
from pathlib import Path

import numpy as np
import torch

from data import lesion_boxes, load_ct, load_mask, prepare_slices, slice_labels
from files import ClearError, atomic_path

CACHE_VERSION = 2  # of the folder's layout: a cache of another version is rebuilt


def slice_levels(scan):
    """(T,) scan number of each slice, each scan's slices together and in z order (as open_cache writes them) ->
    (T,) float, each slice's height in its scan: 0 for its first slice, 1 for its last (0.5 for a single slice).
    Where scans cover the same body region, equal heights are roughly equal anatomy (views.batch_ids uses it)."""
    _, count = torch.unique_consecutive(scan.long(), return_counts=True)  # (n_scans,) slices per scan
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)  # (T,) index of its scan's first slice
    n = torch.repeat_interleave(count, count)  # (T,) its scan's slice count
    place = (torch.arange(len(scan)) - first).float()  # (T,) 0 .. n - 1
    return torch.where(n > 1, place / (n - 1).clamp(min=1), 0.5)


class SliceCache:
    """A built cache folder, read-only: slices (T, C, Sc, Sc) uint8 memmap, lesion flags (T,), boxes per slice,
    mask labels per slice, and the height of each slice in its scan."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "cache.json").read_text())
        T, C, Sc = self.meta["n_slices"], self.meta["channels"], self.meta["size"]
        self.size = Sc
        self.slices = np.memmap(self.folder / "slices.u8", np.uint8, "r", shape=(T, C, Sc, Sc))
        with np.load(self.folder / "index.npz", allow_pickle=False) as z:
            self.scan = torch.from_numpy(z["scan"])  # (T,) scan number of each slice
            self.flags = torch.from_numpy(z["flags"])  # (T,) bool: the slice shows a lesion
            self.box_start = torch.from_numpy(z["box_start"])  # (T + 1,): boxes of slice t are rows [t, t+1)
            self.boxes = torch.from_numpy(z["boxes"])  # (K, 4) float32 (y0, x0, y1, x1) in Sc pixels
            self.label_values = z["label_values"].tolist()  # (L,) the mask labels found in the cohort, ascending
            self.labels = torch.from_numpy(z["labels"])  # (T, L) bool: slice t holds label_values[l]
        self.lesion_ids = self.flags.nonzero()[:, 0]  # (T_lesion,)
        self.other_ids = (~self.flags).nonzero()[:, 0]  # (T - T_lesion,)
        self.level = slice_levels(self.scan)  # (T,) height of each slice in its scan, 0 first to 1 last

    def __len__(self):
        return self.slices.shape[0]

    def read(self, ids, device):
        """The slices `ids` (B,) as float in [0, 1] on `device`: (B, C, Sc, Sc)."""
        x = torch.from_numpy(np.ascontiguousarray(self.slices[ids.numpy()]))  # (B, C, Sc, Sc) uint8
        if device.type == "cuda":
            x = x.pin_memory()
        return x.to(device, non_blocking=True).float().div_(255)


def _cohort_files(cohort):
    """What the cache depends on in the cohort: each scan's image and mask, with size and mtime."""
    def stamp(path):
        return None if path is None else [str(path), path.stat().st_size, path.stat().st_mtime_ns]
    return [[s.scan, stamp(s.image), stamp(s.mask)] for s in cohort]


def open_cache(cohort, folder, slice_cfg, lesion_labels=None, progress=None, should_stop=None):
    """The cache of `cohort` in `folder` for these settings: reused when it matches, else built (one volume in
    memory at a time). Returns (SliceCache, built: bool). `progress(iterable, total)` wraps the scan loop;
    `should_stop()` true aborts the build with KeyboardInterrupt, leaving no partial file under its name."""
    folder = Path(folder)
    want = json.loads(json.dumps({  # through JSON, so tuples compare equal to the lists read back
        "version": CACHE_VERSION, "windows": slice_cfg.windows, "size": slice_cfg.img_size,
        "thickness_mm": slice_cfg.thickness_mm, "lesion_labels": lesion_labels, "files": _cohort_files(cohort)}))
    meta_path = folder / "cache.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if {k: meta.get(k) for k in want} == want:
            return SliceCache(folder), False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClearError(f"{folder}: cannot create the cache folder ({e.strerror})") from None
    meta_path.unlink(missing_ok=True)  # invalidate first: a build cut short never looks valid
    scans = enumerate(cohort.scans)
    scans = progress(scans, len(cohort)) if progress else scans
    scan_of, flags, box_start, boxes, held = [], [], [0], [], []
    with atomic_path(folder / "slices.u8") as tmp, open(tmp, "wb") as f:
        for i, scan in scans:
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            volume, spacing = load_ct(scan.image)  # (Z, Y, X) HU
            slices, _ = prepare_slices(volume, spacing, slice_cfg)  # (Z', C, Sc, Sc) in [0, 1]
            f.write(slices.mul_(255).round_().to(torch.uint8).numpy().tobytes())
            if scan.mask is not None:
                mask = load_mask(scan.mask, volume.shape)
                fl, bx = lesion_boxes(mask, spacing[0], slice_cfg, lesion_labels)
                held += slice_labels(mask, spacing[0], slice_cfg)
            else:  # a scan without a mask counts as lesion-free
                fl, bx = torch.zeros(len(slices), dtype=torch.bool), [[] for _ in range(len(slices))]
                held += [set() for _ in range(len(slices))]
            del volume, slices  # one volume in float memory at a time
            scan_of += [i] * len(fl)
            flags += fl.tolist()
            for b in bx:
                boxes += b
                box_start.append(box_start[-1] + len(b))
    values = sorted(set().union(*held))  # (L,)
    labels = np.array([[v in h for v in values] for h in held], bool).reshape(len(held), len(values))  # (T, L)
    with atomic_path(folder / "index.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, scan=np.asarray(scan_of, np.int32), flags=np.asarray(flags, bool),
                 box_start=np.asarray(box_start, np.int64), boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                 label_values=np.asarray(values, np.int64), labels=labels)
    meta = {**want, "n_slices": len(flags), "channels": len(slice_cfg.windows), "scans": len(cohort),
            "lesion_slices": int(sum(flags))}
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta))
    return SliceCache(folder), True
