"""Hostile and malformed input: a catalogue, one row per case, each run through `clear.main` as a user
would type it. Every row must end with

    exit code 2;
    one line on stderr, `clear.py <command>: error: ...`, naming the offending file and the cause (progress
    bars, which a terminal redraws in place, are not lines: `shown` reads stderr as a terminal shows it);
    no new file anywhere under the test's folder: no partial output under a final name, no *.tmp left
    (folders may have been made, except by `fit`); and a pickled code payload never ran.

After the table: a BOM in labels.csv is accepted, and a cohort run (`extract` over scans of which some are bad)
writes the good bags, skips each bad scan with its line and ends with exit code 2 and a summary (the truncated
case of it is tests/test_extract.py::test_cli_skips_a_bad_scan_and_reports_it).
DICOM rows use pydicom's CT5N series (helpers of test_dicom.py) and are skipped without pydicom.
"""
import gzip
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import clear
from cohort import read_labels
from mil import MIL_FORMAT, AttentionMIL, Task
from models import build_encoder
from checkpoint import FORMAT
from test_dicom import copy_series, ct5n

# ------------------------------------------------------------------------------------------- helpers

BAR = re.compile(r"^[^:]{1,40}: +\d+%\|")  # a tqdm bar as `cli.bar` draws it: "extract vit:  50%|█..."
CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal controls: tqdm.write moves up over the bar with one


def shown(err):
    """stderr as a terminal shows it: per line what follows the last carriage return, without cursor controls,
    blank lines and progress bars left out."""
    lines = (CURSOR.sub("", part.split("\r")[-1]).strip() for part in err.split("\n"))
    return [line for line in lines if line and not BAR.match(line)]


def files(root):
    """Every file under `root` (folders aside), with its size and mtime."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*") if p.is_file()}


UNDO = []  # folders made read-only by a row, made writable again after it


@pytest.fixture(autouse=True)
def _writable_again():
    yield
    while UNDO:
        subprocess.run(["chattr", "-i", str(UNDO[-1])], capture_output=True)
        os.chmod(UNDO.pop(), 0o755)


def read_only(folder):
    """Make `folder` unwritable even for root (an immutable folder, chattr +i), or skip the row."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o555)
    UNDO.append(folder)
    if os.access(folder, os.W_OK):  # root ignores permission bits
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("running as root, and this file system cannot make a folder immutable (chattr +i)")
    return folder


def raw_nifti(path, data, dtype=np.int16, shape=None, slope=1.0, inter=0.0):
    """A .nii.gz written byte by byte, so the header can say what the writer would not: `shape` other than the
    data's, any scl_slope/scl_inter. NIfTI-2 (int64 dims) when a dimension exceeds NIfTI-1's 32767."""
    shape = shape or data.shape
    hdr = (nib.Nifti2Header if max(shape) > 32767 else nib.Nifti1Header)()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.diag([1.0, 1.0, 4.0, 1.0]), code=1)
    offset = hdr.sizeof_hdr + 4  # the header, then 4 bytes saying "no extensions"
    hdr["vox_offset"], hdr["scl_slope"], hdr["scl_inter"] = offset, slope, inter
    hdr["magic"] = hdr.single_magic
    raw = hdr.binaryblock + b"\0" * 4 + np.asarray(data, dtype).tobytes(order="F")
    path.write_bytes(gzip.compress(raw))


def image(data, affine=np.diag([1.0, 1.0, 4.0, 1.0])):
    """An image maker: `path` -> that array saved as NIfTI."""
    return lambda path: nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


NOISE = np.random.default_rng(0).integers(-1000, 1000, (16, 16, 8)).astype(np.int16)  # (X, Y, Z) HU
GOOD = image(NOISE)


def truncated(path):
    GOOD(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def text(path):
    path.write_text("patient,scan,stage\nP1,S1,2\n")  # a CSV someone saved as .nii.gz


def empty(path):
    path.write_bytes(b"")


def nan_and_inf(path):
    x = NOISE.astype(np.float32)
    x[3, 4, 5], x[0, 0, 0] = np.nan, np.inf
    image(x)(path)


def claims_more_slices(path):  # the data of 8 slices, a header saying 100008
    raw_nifti(path, NOISE, shape=(16, 16, 8 + 100_000))


def int8_absurd_scaling(path):  # int8 stored values, each 10^6 HU apart
    raw_nifti(path, NOISE // 8, dtype=np.int8, slope=1e6)


def cohort(tmp, make_image=GOOD, make_mask=None, suffix=".nii.gz"):
    """A cohort folder of one scan -> (root, image path, mask path)."""
    root = tmp / "cohort"
    (root / "images").mkdir(parents=True, exist_ok=True)
    img, mask = root / "images" / f"s{suffix}", root / "masks" / "s.nii.gz"
    make_image(img)
    if make_mask is not None:
        mask.parent.mkdir(exist_ok=True)
        make_mask(mask)
    return root, img, mask


# pretrain's smallest run; every row stops before its first step. ssm: the quickest encoder to build (0.3 s)
TINY = ["--encoder", "ssm", "--img-size", "32", "--batch-size", "4", "--mlp-dim", "32", "--proj-dim", "16",
        "--steps", "1", "--device", "cpu"]


def pretrain_on(make_image, make_mask=None, culprit="image", suffix=".nii.gz"):
    """Row builder: `pretrain` on a one-scan cohort whose image (or mask) is bad."""
    def build(tmp):
        root, img, mask = cohort(tmp, make_image, make_mask, suffix)
        method = "lecl" if make_mask else "moco"
        return (["pretrain", "--data", root, "--out", tmp / "run" / "enc.pt", "--method", method, *TINY],
                mask if culprit == "mask" else img)
    return build


ENCODER = {"name": "vit", "size": "tiny", "sha256": "a" * 64}


def write_bags(folder, n=6, encoder=ENCODER, dim=8):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        torch.save({"features": torch.randn(5, dim, generator=g), "z_mm": torch.arange(5, dtype=torch.float64),
                    "encoder": encoder, "image": ""}, folder / f"s{i}.pt")
    return folder


def fit_with_labels(content, *options):
    """Row builder: `fit` on good bags with a labels.csv of `content` (bytes or str), and `options`."""
    def build(tmp):
        bags, labels = write_bags(tmp / "bags"), tmp / "labels.csv"
        labels.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["fit", "--bags", bags, "--labels", labels, "--target", "y", "--out", tmp / "fit",
                "--folds", "2", "--epochs", "1", *options], labels
    return build


LABELS = "patient,scan,y\n" + "".join(f"p{i // 2},s{i},{i % 2}\n" for i in range(6))


def fit_with_bag(write_bad):
    """Row builder: `fit` on a bag folder where s5.pt is replaced by `write_bad(path)`."""
    def build(tmp):
        bags = write_bags(tmp / "bags")
        write_bad(bags / "s5.pt")
        (tmp / "labels.csv").write_text(LABELS)
        return ["fit", "--bags", bags, "--labels", tmp / "labels.csv", "--target", "y", "--out", tmp / "fit"], \
            bags / "s5.pt"
    return build


class Payload:
    """Unpickling this runs a shell command: `torch.load(weights_only=False)` would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def payload(path):
    torch.save({"format": FORMAT, "encoder_config": Payload(path.parent / "pwned")}, path)


REFUSED = f"it holds pickled Python objects ({os.system.__module__}.system)"  # what the loaders say of a payload


def from_another_encoder(path):
    torch.save({"features": torch.randn(5, 8), "z_mm": torch.arange(5, dtype=torch.float64),
                "encoder": {**ENCODER, "sha256": "b" * 64}, "image": ""}, path)


def mil_run(folder):
    """A run folder as `clear.py fit` writes it, with one fold model for the bags of `write_bags`."""
    folder.mkdir(parents=True, exist_ok=True)
    model = AttentionMIL(8, 1)
    torch.save(dict(format=MIL_FORMAT, fold=0, best_epoch=0, model=model.config, state_dict=model.state_dict(),
                    task=asdict(Task("binary", ("y",), (0.0, 1.0))), encoder=ENCODER, test_scans=[]),
               folder / "fold0.pt")
    return folder


def mismatched_weights(path):  # a pre-training checkpoint that says SSM and holds a gated CNN's weights
    torch.save({"format": FORMAT, "encoder_config": build_encoder("ssm", img_size=32).encoder_config,
                "encoder": build_encoder("gcnn", img_size=32).state_dict(),
                "slice_config": {"windows": [[40, 400]] * 3, "img_size": 32, "thickness_mm": None}}, path)


def extract_with_checkpoint(write_bad):
    """Row builder: `extract` of a good one-scan cohort with the checkpoint `write_bad(path)`."""
    def build(tmp):
        root, _, _ = cohort(tmp)
        ckpt = tmp / "enc.pt"
        write_bad(ckpt)
        return ["extract", "--data", root, "--out", tmp / "bags", "--checkpoint", ckpt], ckpt
    return build


def predict_with(run=None, bags=None, out="p.csv"):
    """Row builder: `predict`; `run(path)` spoils the fold model, `bags` is another encoder for the bags, `out`
    the --out under the test's folder."""
    def build(tmp):
        folder = mil_run(tmp / "run")
        if run is not None:
            run(folder / "fold0.pt")
        bag_folder = write_bags(tmp / "bags", encoder=bags or ENCODER)
        culprit = folder / "fold0.pt" if run is not None else bag_folder if bags is not None else tmp / out
        return ["predict", "--model", folder, "--bags", bag_folder, "--out", tmp / out], culprit
    return build


def resume_from(write_bad):
    """Row builder: `pretrain --resume` of the checkpoint `write_bad(path)`."""
    def build(tmp):
        root, _, _ = cohort(tmp)
        write_bad(tmp / "enc.pt")
        argv = ["pretrain", "--data", root, "--out", tmp / "enc.pt", "--resume", tmp / "enc.pt", "--method", "moco"]
        return argv + TINY, tmp / "enc.pt"
    return build


def pretrain_out_folder(tmp):
    (tmp / "runs").mkdir()
    return ["pretrain", "--data", cohort(tmp)[0], "--out", tmp / "runs", *TINY], tmp / "runs"


def out_is_a_file(command):
    """Row builder: `command` with --out (or OUT) naming an existing file."""
    def build(tmp):
        out = tmp / "taken"
        out.write_text("the user's notes\n")
        root, _, _ = cohort(tmp)
        (tmp / "labels.csv").write_text(LABELS)
        argv = {"synth": ["synth", "--out", out, "--n", "1", "--size", "32"],
                "extract": ["extract", "--data", root, "--out", out, "--encoder", "ssm", "--random-init",
                            "--img-size", "32"],
                "fit": ["fit", "--bags", write_bags(tmp / "bags"), "--labels", tmp / "labels.csv", "--target", "y",
                        "--out", out],
                "convert": ["convert", tmp, out / "ct.nii.gz"]}[command]
        return argv, out
    return build


def out_is_read_only(command):
    """Row builder: `command` writing into a folder nobody may write in."""
    def build(tmp):
        (tmp / "labels.csv").write_text(LABELS)
        bags = write_bags(tmp / "bags")
        ro = tmp / "ro"
        argv = {"synth": ["synth", "--out", ro / "cohort", "--n", "1", "--size", "32"],
                "fit": ["fit", "--bags", bags, "--labels", tmp / "labels.csv", "--target", "y", "--out", ro,
                        "--folds", "2", "--epochs", "1"],
                "predict": ["predict", "--model", mil_run(tmp / "run"), "--bags", bags, "--out", ro / "p.csv"]}
        read_only(ro)
        return argv[command], ro
    return build


def dicom(edit):
    """Row builder: `convert` of pydicom's CT5N series, file i changed by `edit(i, ds, files)` on the way."""
    def build(tmp):
        files = ct5n()
        folder = copy_series(files, tmp / "dicom", edit=lambda i, ds: edit(i, ds, files))
        return ["convert", folder, tmp / "ct.nii.gz"], folder
    return build


def mixed_series(i, ds, files):
    if i >= 3:
        ds.SeriesInstanceUID = "1.2.3.4"


def not_ct(i, ds, files):
    ds.Modality = "MR"


def duplicate_position(i, ds, files):
    import pydicom

    if i == 2:
        ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient


def volume_2d(path):
    image(NOISE[:, :, 0])(path)


def volume_4d(path):
    image(np.stack([NOISE, NOISE], -1))(path)


def mask_of_other_shape(path):
    image(np.zeros((16, 16, 9), np.uint8))(path)


def mil_model(path):
    shutil.copy(mil_run(path.parent / "other_run") / "fold0.pt", path)


CATALOGUE = [  # case, command, build(tmp) -> (argv, the file the message must name), a phrase of the cause
    ("truncated .nii.gz", "pretrain", pretrain_on(truncated), "truncated or corrupt"),
    ("truncated .nii", "pretrain", pretrain_on(truncated, suffix=".nii"), "can hold: file truncated"),
    (".nii.gz that is text", "pretrain", pretrain_on(text), "not a NIfTI image"),
    ("zero-sized .nii.gz", "pretrain", pretrain_on(empty), "empty file"),
    ("2D image", "pretrain", pretrain_on(volume_2d), "expected a 3D volume, got shape (16, 16)"),
    ("4D image", "pretrain", pretrain_on(volume_4d), "expected a 3D volume, got shape (16, 16, 8, 2)"),
    ("header claims 1e5 more slices", "pretrain", pretrain_on(claims_more_slices),
     "16 x 16 x 100008 voxels of int16 (51,204,096 bytes), more than this file of"),
    ("NaN and inf voxels", "pretrain", pretrain_on(nan_and_inf), "2 voxels are NaN or infinite"),
    ("int8 with absurd scaling", "pretrain", pretrain_on(int8_absurd_scaling), "not Hounsfield units"),
    ("mask shape differs from image", "pretrain", pretrain_on(GOOD, mask_of_other_shape, "mask"),
     "mask shape (9, 16, 16) (z, y, x) differs from its image's (8, 16, 16)"),
    ("labels.csv missing a column", "fit", fit_with_labels("scan,y\ns0,1\n"), "missing column 'patient'"),
    ("labels.csv duplicate scan", "fit", fit_with_labels(LABELS + "p9,s2,1\n"), "scan 's2' listed twice"),
    ("labels.csv non-numeric label", "fit", fit_with_labels(LABELS.replace("p1,s3,1", "p1,s3,yes")),
     "y='yes' is not a number"),
    ("labels.csv empty", "fit", fit_with_labels(""), "empty, expected a header line"),
    ("labels.csv in UTF-16", "fit", fit_with_labels(LABELS.encode("utf-16")), "not a UTF-8 CSV table"),
    ("too few patients to hold some out", "fit", fit_with_labels(LABELS, "--val-fraction", "0.5"),
     "keeps no training scan"),
    ("bag from another encoder", "fit", fit_with_bag(from_another_encoder),
     "bags from different encoders cannot be mixed"),
    ("bag is a code payload", "fit", fit_with_bag(payload), f"cannot read bag: {REFUSED}"),
    ("zero-sized bag", "fit", fit_with_bag(empty), "cannot read bag (empty file)"),
    ("bags of another encoder than the model", "predict", predict_with(bags={**ENCODER, "sha256": "c" * 64}),
     "extract the bags with the same encoder"),
    ("checkpoint is a code payload", "extract", extract_with_checkpoint(payload),
     f"not a readable checkpoint: {REFUSED}"),
    ("checkpoint of another model (MIL)", "extract", extract_with_checkpoint(mil_model),
     "not a CLEAR pre-training checkpoint"),
    ("checkpoint weights of another encoder", "extract", extract_with_checkpoint(mismatched_weights),
     "encoder weights do not fit"),
    ("zero-sized checkpoint", "extract", extract_with_checkpoint(empty), "not a readable checkpoint (empty file)"),
    ("resume from a code payload", "pretrain", resume_from(payload),
     f"not a readable checkpoint: {REFUSED}"),
    ("MIL model is a code payload", "predict", predict_with(run=payload),
     f"not a CLEAR MIL model: {REFUSED}"),
    ("MIL model is a pre-training checkpoint", "predict", predict_with(run=mismatched_weights),
     "not a CLEAR MIL model (format clear-mil-1)"),
    ("--out is a file", "synth", out_is_a_file("synth"), "exists and is not a folder"),
    ("--out is a file", "extract", out_is_a_file("extract"), "exists and is not a folder"),
    ("--out is a file", "fit", out_is_a_file("fit"), "exists and is not a folder"),
    ("OUT inside a file", "convert", out_is_a_file("convert"), "exists and is not a folder"),
    ("--out is a folder", "pretrain", pretrain_out_folder, "is a folder; --out names the checkpoint file"),
    ("--out is a folder", "predict", predict_with(out="."), "is a folder, expected a .csv file name"),
    ("read-only output folder", "synth", out_is_read_only("synth"), "cannot create folder or write in it"),
    ("read-only output folder", "fit", out_is_read_only("fit"), "cannot create folder or write in it"),
    ("read-only output folder", "predict", out_is_read_only("predict"), "cannot write"),
    ("DICOM mixed series", "convert", dicom(mixed_series), "2 series in one folder"),
    ("DICOM not CT", "convert", dicom(not_ct), "modality MR, not CT"),
    ("DICOM duplicate positions", "convert", dicom(duplicate_position), "at the same position"),
]


@pytest.mark.parametrize("command, build, phrase", [c[1:] for c in CATALOGUE],
                         ids=[f"{c[1]}: {c[0]}" for c in CATALOGUE])
def test_catalogue(command, build, phrase, tmp_path, capsys):
    argv, culprit = build(tmp_path)
    assert argv[0] == command
    before = files(tmp_path)
    folders = {p for p in tmp_path.rglob("*") if p.is_dir()}
    capsys.readouterr()
    code = clear.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = shown(err)
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith(f"clear.py {command}: error: "), lines
    assert str(culprit) in lines[0] and phrase in lines[0], (str(culprit), phrase, lines[0])
    assert files(tmp_path) == before, set(files(tmp_path)) ^ set(before)  # nothing written, nothing half-written
    if command == "fit":  # whose outputs all come at the end: not even its --out folder is left behind
        assert {p for p in tmp_path.rglob("*") if p.is_dir()} == folders
    assert not list(tmp_path.rglob("pwned"))  # the payload never ran


def test_the_catalogue_spans_every_command():
    assert len(CATALOGUE) >= 15
    assert {c[1] for c in CATALOGUE} == {"synth", "convert", "pretrain", "extract", "fit", "predict"}


# ------------------------------------------------------------------------------------- not errors, and cohorts


def test_a_labels_csv_with_a_byte_order_mark_is_read(tmp_path, capsys):
    """Spreadsheets save CSV as UTF-8 with a BOM; its first column must still be `patient`."""
    build = fit_with_labels(LABELS.encode("utf-8-sig"))
    argv, labels = build(tmp_path)
    assert labels.read_bytes().startswith(b"\xef\xbb\xbfpatient,scan,y")
    endpoints, table = read_labels(labels)
    assert endpoints == ["y"] and table["s3"] == {"patient": "p1", "y": 1.0}
    assert clear.main([str(a) for a in argv] + ["--val-fraction", "0"]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics["n_scans"] == 6 and metrics["n_patients"] == 3


def test_a_cohort_run_skips_each_bad_scan_and_writes_the_others(tmp_path, capsys):
    images = tmp_path / "cohort" / "images"
    images.mkdir(parents=True)
    good = ["a", "c", "e"]
    for name in good:
        GOOD(images / f"{name}.nii.gz")
    bad = {images / "b.nii.gz": (text, "not a NIfTI image"), images / "d.nii.gz": (nan_and_inf, "NaN or infinite")}
    for path, (make, _) in bad.items():
        make(path)
    bags = tmp_path / "bags"
    argv = ["extract", "--data", str(tmp_path / "cohort"), "--out", str(bags), "--encoder", "vit", "--random-init",
            "--img-size", "32", "--device", "cpu"]
    capsys.readouterr()
    assert clear.main(argv) == 2
    lines = shown(capsys.readouterr().err)
    assert len(lines) == 3, lines  # one per skipped scan as it happens, then the summary
    for line, (path, (_, cause)) in zip(lines, bad.items()):
        assert line.startswith(f"clear.py extract: skipped {path}: ") and cause in line
    assert lines[2].startswith("clear.py extract: error: 2 scan(s) skipped, no bag written for them: ")
    assert all(str(path) in lines[2] for path in bad)
    assert sorted(p.name for p in bags.iterdir()) == ["a.pt", "c.pt", "e.pt", "manifest.json"]  # nothing else
    for name in good:
        assert torch.load(bags / f"{name}.pt", weights_only=True)["features"].shape == (8, 192)
    written = files(bags)
    assert clear.main(argv) == 2 and files(bags) == written  # a re-run keeps the bags and skips the same two
    assert "2 scan(s) skipped" in capsys.readouterr().err
    for path in bad:
        path.unlink()  # the user takes the bad scans out: the run completes
    assert clear.main(argv) == 0 and files(bags) == written
