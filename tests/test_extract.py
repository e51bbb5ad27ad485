"""clear.py extract: bags equal slice-by-slice embedding, resume after a crash, shards, encoders, bad input."""
import json
import os

import pytest
import torch

import clear
import phantom as P
import synth
from cohort import Cohort
from data import SliceConfig, load_ct, prepare_slices
from files import ClearError
from extract import EncoderSpec, extract_bags, load_encoder, weights_sha256
from models import build_encoder
from checkpoint import FORMAT


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(P.SynthConfig(n=4, size=32, thickness=(8.0, 10.0), workers=1), root)
    return Cohort(root)


SPEC = EncoderSpec(name="vit", img_size=32)


def _run(cohort, out, spec=SPEC, shard=(0, 1), stop_after=None):
    encoder, identity, slices = load_encoder(spec)
    events = []
    for event in extract_bags(cohort, encoder, identity, slices, out, batch_size=16, shard=shard):
        events.append(event)
        if stop_after is not None and len(events) == stop_after:
            break  # as if the process were killed here
    return events


def _bags(folder):
    return {p.stem: torch.load(p, weights_only=True) for p in sorted(folder.glob("*.pt"))}


def test_bags_equal_slice_by_slice_embedding(cohort, tmp_path):
    _run(cohort, tmp_path)
    bags = _bags(tmp_path)
    assert sorted(bags) == sorted(s.scan for s in cohort)
    torch.manual_seed(0)
    reference = build_encoder("vit", img_size=32).eval()  # built independently with the same seed
    scan = cohort.scans[1]
    volume, spacing = load_ct(scan.image)
    x, z = prepare_slices(volume, spacing, SliceConfig(img_size=32))
    with torch.no_grad():
        one_by_one = torch.cat([reference(x[i: i + 1]) for i in range(len(x))])
    bag = bags[scan.scan]
    assert bag["features"].shape == (volume.shape[0], 192) and bag["features"].dtype == torch.float32
    torch.testing.assert_close(bag["features"], one_by_one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bag["z_mm"], torch.arange(volume.shape[0], dtype=torch.float64) * spacing[0])
    assert bag["encoder"]["sha256"] == weights_sha256(reference) and bag["image"] == str(scan.image)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["encoder"] == bag["encoder"] and manifest["slices"]["img_size"] == 32


def test_interrupted_run_resumes_to_the_same_bags(cohort, tmp_path):
    _run(cohort, tmp_path / "full")
    partial = _run(cohort, tmp_path / "resumed", stop_after=2)
    assert [e[0] for e in partial] == ["done", "done"]
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.endswith(".tmp")]
    events = _run(cohort, tmp_path / "resumed")
    assert [e[0] for e in events] == ["skipped", "skipped", "done", "done"]
    full, resumed = _bags(tmp_path / "full"), _bags(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(full[k]["features"], resumed[k]["features"], rtol=0, atol=0)


def test_shards_make_one_folder(cohort, tmp_path):
    _run(cohort, tmp_path / "full")
    for k in range(3):
        _run(cohort, tmp_path / "sharded", shard=(k, 3))
    full, sharded = _bags(tmp_path / "full"), _bags(tmp_path / "sharded")
    assert full.keys() == sharded.keys()
    for k in full:
        torch.testing.assert_close(full[k]["features"], sharded[k]["features"])


def test_another_encoder_cannot_write_into_the_same_folder(cohort, tmp_path):
    _run(cohort, tmp_path, stop_after=1)
    with pytest.raises(ClearError, match="another encoder"):
        _run(cohort, tmp_path, spec=EncoderSpec(name="vit", img_size=32, seed=1))


def test_checkpoint_and_module_encoders(cohort, tmp_path):
    torch.manual_seed(3)
    enc = build_encoder("gcnn", img_size=32)
    torch.save({"format": FORMAT, "encoder_config": enc.encoder_config, "encoder": enc.state_dict(),
                "slice_config": {"windows": [[40, 400]] * 3, "img_size": 32, "thickness_mm": 20.0}},
               tmp_path / "ckpt.pt")
    encoder, identity, slices = load_encoder(EncoderSpec(checkpoint=str(tmp_path / "ckpt.pt")))
    assert identity["name"] == "gcnn" and identity["sha256"] == weights_sha256(enc)
    assert slices.thickness_mm == 20.0 and slices.windows == ((40, 400),) * 3
    (tmp_path / "mine.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    _run(cohort, tmp_path / "bags", spec=EncoderSpec(module=f"{tmp_path}/mine.py:make", img_size=32))
    bags = _bags(tmp_path / "bags")
    assert {b["features"].shape[1] for b in bags.values()} == {5}
    assert bags[cohort.scans[0].scan]["encoder"]["name"] == "mine.py:make"


def test_windows_give_the_random_init_one_channel_each(cohort, tmp_path, capsys):
    """extract --random-init --windows NAME...: the floor of a run with other windows is the same encoder, built
    for that many channels, on slices in those windows; a checkpoint brings its own, so --windows with it is one
    line, exit 2."""
    out = tmp_path / "bags"
    assert clear.main(["extract", "--data", str(cohort.root), "--out", str(out), "--encoder", "cnn", "--size",
                       "micro", "--random-init", "--img-size", "32", "--windows", "lung", "parenchyma"]) == 0
    torch.manual_seed(0)
    reference = build_encoder("cnn", "micro", in_chans=2, img_size=32).eval()  # the same seed, by hand
    scan = cohort.scans[0]
    volume, spacing = load_ct(scan.image)
    x, _ = prepare_slices(volume, spacing, SliceConfig(windows=((-600.0, 1500.0), (-850.0, 500.0)), img_size=32))
    with torch.no_grad():
        want = reference(x)  # (Z, D) from 2-channel slices in the lung and parenchyma windows
    torch.testing.assert_close(_bags(out)[scan.scan]["features"], want, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["slices"]["windows"] == [[-600.0, 1500.0],
                                                                                    [-850.0, 500.0]]
    enc = build_encoder("cnn", "micro", img_size=32)
    torch.save({"format": FORMAT, "encoder_config": enc.encoder_config, "encoder": enc.state_dict(),
                "slice_config": {"windows": [[40, 400]] * 3, "img_size": 32, "thickness_mm": None}},
               tmp_path / "ckpt.pt")
    assert clear.main(["extract", "--data", str(cohort.root), "--out", str(tmp_path / "b2"), "--checkpoint",
                       str(tmp_path / "ckpt.pt"), "--windows", "lung"]) == 2
    assert "--windows is for --random-init and --encoder-module" in capsys.readouterr().err


def test_a_pickled_payload_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"encoder_config": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ClearError, match="not a readable checkpoint"):
        load_encoder(EncoderSpec(checkpoint=str(tmp_path / "evil.pt")))
    assert not marker.exists()


def test_cli_skips_a_bad_scan_and_reports_it(tmp_path, capsys):
    root = tmp_path / "cohort"
    synth.write_cohort(P.SynthConfig(n=3, size=32, thickness=(8.0, 10.0), workers=1), root)
    bad = sorted((root / "images").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    code = clear.main(["extract", "--data", str(root), "--out", str(tmp_path / "bags"), "--encoder", "vit",
                       "--random-init", "--img-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "1 scan(s) skipped" in err and bad.name in err and "truncated or corrupt" in err
    assert len(list((tmp_path / "bags").glob("*.pt"))) == 2
    assert clear.main(["extract", "--data", str(root), "--out", str(tmp_path / "b2"), "--encoder", "vit"]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert clear.main(["extract", "--data", str(root), "--out", str(tmp_path / "b3"), "--encoder", "resnet",
                       "--random-init"]) == 2
    assert "resnet" in capsys.readouterr().err
