"""The synthetic cohort: reproducible, labels that agree with the masks, anatomy at plausible HU, and a CLI."""
import numpy as np
import pytest

import clear
import phantom as P
import synth as S
from cohort import Cohort
from data import load_ct, load_mask

SMALL = P.SynthConfig(n=6, size=48, thickness=(4.0, 5.0), workers=1)


@pytest.fixture(scope="module")
def phantoms():
    return [P.make_phantom(SMALL, p) for p in range(12)]


def test_stage_rules_on_worked_cases():
    assert P.stage_of([]) == 0
    assert P.stage_of([("liver", 12.0)]) == 1
    assert P.stage_of([("liver", 12.0), ("liver", 19.9)]) == 1  # one organ, all small
    assert P.stage_of([("kidney", 20.0)]) == 2  # one organ, a large lesion
    assert P.stage_of([("lung", 6.0), ("mediastinum", 12.0)]) == 2  # a node
    assert P.stage_of([("mediastinum", 12.0)]) == 2
    assert P.stage_of([("lung", 6.0), ("bone", 7.0)]) == 3  # distant metastasis
    assert P.stage_of([("abdomen", 15.0), ("mediastinum", 9.0)]) == 2  # nodes only are not M1


def test_labels_agree_with_the_mask_and_lie_in_their_organ(phantoms):
    for ph in phantoms:
        for i, site in enumerate(P.SITES):
            where = ph.mask == i + 1
            assert ph.labels[f"loc_{site}"] == int(where.any()), site
            assert np.all(ph.tissue[where] == P.SITE_TISSUE[site]), f"{site} lesion outside its organ"
        disease = np.isin(ph.mask, [P.LUNG_GGO, P.LUNG_EMPHYSEMA])
        assert ph.labels["lung_disease"] == int(disease.any())
        for name, kind, other in (("ground_glass", P.LUNG_GGO, P.LUNG_EMPHYSEMA),
                                  ("emphysema", P.LUNG_EMPHYSEMA, P.LUNG_GGO)):  # 1, 0, or unknown: the other one
            assert ph.labels[name] == (None if (ph.mask == other).any() else int((ph.mask == kind).any())), name
        assert np.all(ph.tissue[disease] == P.LUNG)


def test_stage_agrees_with_the_findings_in_the_mask(phantoms):
    stages = set()
    for ph in phantoms:
        sites = {P.SITES[k - 1] for k in np.unique(ph.mask) if 1 <= k <= 8}
        organs, nodes = sites & set(P.ORGAN_SITES), sites & set(P.NODAL_SITES)
        stage = ph.labels["stage"]
        stages.add(stage)
        assert (stage == 0) == (not sites)
        assert (stage == 3) == (len(organs) >= 2)
        if stage == 1:
            assert len(organs) == 1 and not nodes
    assert stages == {0, 1, 2, 3}


def test_a_twin_is_the_same_scan_without_its_findings():
    """make_phantom(findings=False), the twin test's control: same anatomy, acquisition and noise, no findings.
    Voxels beyond the blur's reach (2 px in-plane) of every finding are identical; the findings' own changed."""
    a, b = P.make_phantom(SMALL, 1), P.make_phantom(SMALL, 1, findings=False)  # patient 1: ground glass, tumours
    assert (a.mask == P.LUNG_GGO).any() and (a.mask[a.mask < P.LUNG_GGO] > 0).any() and a.labels["lung_disease"]
    assert not b.mask.any() and not any(b.labels.values()) and not b.lesions
    assert np.array_equal(a.tissue, b.tissue) and np.array_equal(a.affine, b.affine)
    near = a.mask > 0
    for axis in (1, 2):
        for _ in range(2):
            near = near | np.roll(near, 1, axis) | np.roll(near, -1, axis)
    assert (~near).sum() > 0.9 * near.size and np.array_equal(a.hu[~near], b.hu[~near])
    assert (a.hu - b.hu)[a.mask == P.LUNG_GGO].mean() > 150  # +250 or +850 HU, before the blur and rounding


def test_anatomy_sits_at_plausible_hounsfield_units():
    ranges = {P.AIR: (-1010, -950), P.FAT: (-140, -60), P.MUSCLE: (20, 70), P.LUNG: (-900, -780),
              P.LIVER: (45, 75), P.SPLEEN: (35, 65), P.KIDNEY: (20, 50), P.BLADDER: (-5, 25),
              P.BONE: (300, 1000), P.HEART: (20, 60), P.MEDIASTINUM: (-110, -40)}
    ph = P.make_phantom(P.SynthConfig(), 0)  # the default grid: thin layers at 48 px are partial volume
    for tissue, (lo, hi) in ranges.items():
        median = np.median(ph.hu[(ph.tissue == tissue) & (ph.mask == 0)])
        assert lo <= median <= hi, (tissue, median)


def test_cohort_is_reproducible_and_loads_back(tmp_path):
    a, b = S.write_cohort(SMALL, tmp_path / "a"), S.write_cohort(SMALL, tmp_path / "b")
    assert a == b and len(a) == SMALL.n
    for name in ("labels.csv", *(f"images/{r['scan']}.nii.gz" for r in a), *(f"masks/{r['scan']}.nii.gz" for r in a)):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = S.write_cohort(P.SynthConfig(n=2, size=48, thickness=(4.0, 5.0), workers=1, seed=1), tmp_path / "c")
    assert (tmp_path / "c/images/P0000_S1.nii.gz").read_bytes() != (tmp_path / "a/images/P0000_S1.nii.gz").read_bytes()
    cohort = Cohort(tmp_path / "a")
    assert cohort.has_masks and len(cohort) == SMALL.n and other
    plan = S.cohort_plan(SMALL)
    for scan, (patient, k) in zip(cohort, plan):  # whatever orientation/dtype was stored, the same voxels
        ph = P.make_phantom(SMALL, patient, k)
        hu, spacing = load_ct(scan.image)
        np.testing.assert_array_equal(hu, ph.hu)
        np.testing.assert_allclose(spacing, ph.spacing, rtol=1e-5)
        np.testing.assert_array_equal(load_mask(scan.mask, hu.shape), ph.mask)
        assert scan.labels.keys() == ph.labels.keys()  # None (the other finding) is blank, read back as NaN
        assert all(np.isnan(scan.labels[k]) if v is None else scan.labels[k] == v for k, v in ph.labels.items())


@pytest.mark.parametrize("storage", S.STORAGE, ids=lambda s: f"{s[0]}-{np.dtype(s[1]).name}")
def test_every_storage_variant_reads_back_as_the_phantom(tmp_path, storage):
    ph = P.make_phantom(SMALL, 3)  # patient 3 has lung disease: HU from air to bone, well below 0
    assert ph.hu.min() <= -1000 and ph.hu.max() > 300
    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    S.save_scan(ph, tmp_path, "scan", storage)
    hu, spacing = load_ct(tmp_path / "images/scan.nii.gz")
    np.testing.assert_array_equal(hu, ph.hu)
    np.testing.assert_allclose(spacing, ph.spacing, rtol=1e-5)
    np.testing.assert_array_equal(load_mask(tmp_path / "masks/scan.nii.gz", hu.shape), ph.mask)


def test_cli_refuses_a_non_empty_out_unless_forced(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    args = ["synth", "--out", str(tmp_path), "--n", "2", "--size", "48", "--thickness", "4", "5", "--workers", "1"]
    assert clear.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and str(tmp_path) in err
    assert clear.main(args + ["--force"]) == 0
    assert (tmp_path / "keep.txt").read_text() == "mine" and len(Cohort(tmp_path)) == 2
    (tmp_path / "file").write_text("x")
    assert clear.main(["synth", "--out", str(tmp_path / "file"), "--n", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err
