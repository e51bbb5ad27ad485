"""data.py and cohort.py: NIfTI orientation and scaling, HU windows, z resampling, lesion boxes, cohorts, and bad
input."""
import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from cohort import Cohort, read_labels
from data import (SliceConfig, canonical_grid, lesion_boxes, load_ct, load_mask, prepare_slices, resample_z,
                  save_overlay, slice_labels, window)
from files import ClearError


def _ras_volume(shape=(6, 5, 4)):
    """A (X, Y, Z) array with every voxel distinct, and its RAS+ affine (spacing 0.7, 0.8, 2.5 mm)."""
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 500
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, -300.0)
    return data, affine


def _flip(data, affine, axis):
    """The same image stored with voxel axis `axis` reversed, worked out by hand."""
    a = affine.copy()
    a[:3, 3] += a[:3, axis] * (data.shape[axis] - 1)
    a[:3, axis] *= -1
    return np.flip(data, axis).copy(), a


def _swap(data, affine, i, j):
    """The same image stored with voxel axes i and j exchanged."""
    a = affine.copy()
    a[:, [i, j]] = a[:, [j, i]]
    return np.swapaxes(data, i, j).copy(), a


@pytest.mark.parametrize("steps", [[], [("flip", 0)], [("flip", 0), ("flip", 1)], [("swap", 0, 1)],
                                   [("swap", 0, 2), ("flip", 1)], [("swap", 1, 2), ("flip", 2), ("flip", 0)]])
def test_any_stored_orientation_loads_as_canonical(tmp_path, steps):
    data, affine = _ras_volume()
    stored, a = data, affine
    for step in steps:
        stored, a = _flip(stored, a, step[1]) if step[0] == "flip" else _swap(stored, a, *step[1:])
    nib.save(nib.Nifti1Image(stored, a), tmp_path / "ct.nii.gz")
    volume, spacing = load_ct(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(volume, data.transpose(2, 1, 0))  # (Z, Y, X) of the RAS+ original
    np.testing.assert_allclose(spacing, (2.5, 0.8, 0.7))
    assert canonical_grid(tmp_path / "ct.nii.gz")[1] == volume.shape
    np.testing.assert_allclose(canonical_grid(tmp_path / "ct.nii.gz")[0], affine)


def test_header_scaling_gives_hounsfield_units(tmp_path):
    raw = np.array([[[0, 1000], [2024, 4095]]], dtype=np.uint16)  # as a DICOM export stores it
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "a.nii")
    np.testing.assert_array_equal(load_ct(tmp_path / "a.nii")[0], raw.transpose(2, 1, 0) - 1024.0)  # (Z, Y, X)
    img = nib.Nifti1Image(np.array([[[1, -3]]], dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(2.5, 10.0)
    nib.save(img, tmp_path / "b.nii.gz")
    np.testing.assert_allclose(sorted(load_ct(tmp_path / "b.nii.gz")[0].ravel()), [2.5, 12.5])  # 2.5 * raw + 10


def test_windows_at_their_edges():
    hu = torch.tensor([[-1350.0, -600.0, 150.0, 160.0, 240.0]])  # (1, 5) as (H, W)
    got = window(hu, ((-600, 1500), (40, 400)))  # (2, 1, 5)
    np.testing.assert_allclose(got[0, 0], [0.0, 0.5, 1.0, 1.0, 1.0])  # lung: -1350 .. 150
    np.testing.assert_allclose(got[1, 0], [0.0, 0.0, 0.775, 0.8, 1.0], atol=1e-6)  # soft tissue: -160 .. 240


def test_resampling_keeps_a_linear_ramp():
    z = torch.arange(11, dtype=torch.float64) * 1.0  # 1 mm slices
    ramp = (3 * z + 7).view(-1, 1, 1).expand(11, 2, 2).float()  # (Z, Y, X)
    z_new = torch.arange(0, 10.01, 2.5)
    got = resample_z(ramp, 1.0, z_new)
    np.testing.assert_allclose(got[:, 0, 0], 3 * z_new.numpy() + 7, rtol=1e-6)
    slices, z_mm = prepare_slices(ramp.numpy() * 0 + (3 * z + 7).view(-1, 1, 1).numpy(), (1.0, 1, 1),
                                  SliceConfig(windows=((500, 1000),), img_size=4, thickness_mm=2.5))
    np.testing.assert_allclose(z_mm, [0, 2.5, 5, 7.5, 10])
    np.testing.assert_allclose(slices[:, 0, 0, 0], (3 * z_new.numpy() + 7) / 1000, rtol=1e-5)


def test_a_cube_gives_its_slices_and_box():
    mask = np.zeros((10, 40, 60), np.int64)
    mask[3:6, 8:16, 30:42] = 4  # a cube: slices 3-5, rows 8-15, columns 30-41
    mask[4, 30:32, 2:4] = 4  # a second, separate component on slice 4
    flags, boxes = lesion_boxes(mask, 2.0, SliceConfig(img_size=20))
    assert flags.tolist() == [False] * 3 + [True] * 3 + [False] * 4
    sy, sx = 20 / 40, 20 / 60
    cube = (8 * sy, 30 * sx, 16 * sy, 42 * sx)
    assert boxes[3] == [pytest.approx(cube)] and boxes[5] == [pytest.approx(cube)]
    found, expected = sorted(boxes[4]), sorted([cube, (30 * sy, 2 * sx, 32 * sy, 4 * sx)])
    assert len(found) == 2 and all(f == pytest.approx(e) for f, e in zip(found, expected))
    flags, _ = lesion_boxes(mask, 2.0, SliceConfig(img_size=20), labels=[1, 2])
    assert not flags.any()
    flags, _ = lesion_boxes(mask, 2.0, SliceConfig(img_size=20, thickness_mm=4.0))  # z = 0, 4, ..., 16 mm
    assert flags.tolist() == [False, False, True, False, False]  # nearest stored slices 0, 2, 4, 6, 8
    assert slice_labels(mask, 2.0, SliceConfig(img_size=20, thickness_mm=4.0)) == [set(), set(), {4}, set(), set()]
    mask[5, 0, 0] = 7
    assert slice_labels(mask, 2.0)[3:7] == [{4}, {4}, {4, 7}, set()]


def test_overlay_puts_each_value_on_its_slices(tmp_path):
    data, affine = _ras_volume((3, 2, 6))
    stored, a = _flip(data, affine, 2)  # stored inferior <- superior: the overlay must still line up
    nib.save(nib.Nifti1Image(stored, a), tmp_path / "ct.nii.gz")
    save_overlay(tmp_path / "ct.nii.gz", [0.0, 5.0, 12.5], [0.1, 0.2, 0.7], tmp_path / "att.nii.gz")
    over, _ = load_ct(tmp_path / "att.nii.gz")  # z = 0, 2.5, ..., 12.5 mm -> nearest bag slice
    np.testing.assert_allclose(over[:, 0, 0], [0.1, 0.1, 0.2, 0.2, 0.7, 0.7], rtol=1e-6)


# ------------------------------------------------------------------------------------------- bad input


def _raw(path, blob):
    path.write_bytes(blob)
    return path


def _write(tmp_path, name, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope.nii.gz", "no such file"),
    (lambda p: _raw(p / "e.nii.gz", b""), "empty file"),
    (lambda p: _raw(p / "t.nii.gz", b"patient,scan\n"), "not a NIfTI"),
    (lambda p: _write(p, "2d.nii", np.zeros((4, 4), np.int16)), "expected a 3D volume"),
    (lambda p: _write(p, "4d.nii", np.zeros((4, 4, 4, 2), np.int16)), "expected a 3D volume"),
    (lambda p: _write(p, "nan.nii", np.full((4, 4, 4), np.nan, np.float32)), "NaN or infinite"),
    (lambda p: _write(p, "inf.nii", np.array([[[np.inf, 0.0]]], np.float32)), "NaN or infinite"),
])
def test_bad_images_are_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ClearError, match=message) as e:
        load_ct(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_truncated_and_lying_files_are_one_line_errors(tmp_path):
    path = _write(tmp_path, "ct.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (32, 32, 32), np.int16))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ClearError, match="truncated or corrupt"):
        load_ct(path)
    img = nib.Nifti2Image(np.zeros((8, 8, 4), np.int16), np.eye(4))
    nib.save(img, tmp_path / "big.nii")
    img.header.set_data_shape((8, 8, 100_000))  # a header claiming far more slices than the file holds
    path = _raw(tmp_path / "big.nii", img.header.binaryblock + b"\0" * 4 + np.zeros(256, np.int16).tobytes())
    with pytest.raises(ClearError, match="truncated or corrupt"):
        load_ct(path)
    img = nib.Nifti1Image(np.array([[[1, 100]]], np.int8), np.eye(4))
    img.header.set_slope_inter(1e30, 0)  # absurd scaling
    nib.save(img, tmp_path / "i8.nii")
    with pytest.raises(ClearError, match="not Hounsfield|NaN or infinite"):
        load_ct(tmp_path / "i8.nii")


def test_mask_of_another_shape(tmp_path):
    _write(tmp_path, "m.nii.gz", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(ClearError, match="differs from its image"):
        load_mask(tmp_path / "m.nii.gz", shape=(6, 5, 5))
    assert load_mask(tmp_path / "m.nii.gz", shape=(6, 5, 4)).shape == (6, 5, 4)


def test_gzip_member_garbage_is_reported(tmp_path):
    path = tmp_path / "g.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 10))  # valid gzip, far too short for a header
    with pytest.raises(ClearError, match="not a NIfTI"):
        load_ct(path)


# ---------------------------------------------------------------------------------------------- cohorts


def _cohort(tmp_path, labels_text, images=("a", "b")):
    (tmp_path / "images").mkdir()
    for name in images:
        _write(tmp_path / "images", f"{name}.nii.gz", np.zeros((4, 4, 3), np.int16))
    if labels_text is not None:
        (tmp_path / "labels.csv").write_text(labels_text, encoding="utf-8")
    return tmp_path


def test_cohort_reads_labels_masks_and_bom(tmp_path):
    root = _cohort(tmp_path, "\ufeffpatient,scan,stage,lung\nP1,a,2,\nP1,b,0,1\n")
    (root / "masks").mkdir()
    _write(root / "masks", "b.nii.gz", np.zeros((4, 4, 3), np.uint8))
    cohort = Cohort(root)
    assert cohort.endpoints == ["stage", "lung"] and len(cohort) == 2 and cohort.has_masks
    a, b = cohort.scans
    assert (a.patient, a.labels["stage"], a.mask) == ("P1", 2.0, None) and np.isnan(a.labels["lung"])
    assert b.mask.name == "b.nii.gz" and b.labels == {"stage": 0.0, "lung": 1.0}


def test_cohort_without_labels_lists_images(tmp_path):
    cohort = Cohort(_cohort(tmp_path, None, images=("z", "y")))
    assert [s.scan for s in cohort] == ["y", "z"] and [s.patient for s in cohort] == ["y", "z"]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("patient,stage\nP1,1\n", "missing column 'scan'"),
    ("patient,scan,stage\nP1,a,1\nP2,a,0\n", "listed twice"),
    ("patient,scan,stage\nP1,a,high\n", "is not a number"),
    ("patient,scan,stage\nP1,a\n", "2 fields"),
    ("patient,scan,stage\nP1,c,1\n", "has no image"),
])
def test_bad_label_tables(tmp_path, text, message):
    root = _cohort(tmp_path, text)
    with pytest.raises(ClearError, match=message) as e:
        Cohort(root)
    assert "labels.csv" in str(e.value) and "\n" not in str(e.value)


def test_read_labels_values(tmp_path):
    (tmp_path / "l.csv").write_text("scan,patient,x\ns1,p,0.5\ns2,p,-1\n")
    endpoints, table = read_labels(tmp_path / "l.csv")
    assert endpoints == ["x"] and table == {"s1": {"patient": "p", "x": 0.5}, "s2": {"patient": "p", "x": -1.0}}
