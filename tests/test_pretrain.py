"""pretrain.py and views.py: views, the slice cache, the lr schedule, a CPU pre-training run, exact resume, bad
input, and two gloo processes against one."""
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
import checkpoint
import clear
import commands
import data
import lecl
import supervised
import views
from cohort import Cohort
from extract import EncoderSpec, load_encoder
from data import SliceConfig, lesion_boxes, load_ct, load_mask, prepare_slices
from metrics import auroc
from models import build_encoder
from pretrain import PretrainConfig, lr_at, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny

REPO = Path(__file__).resolve().parents[1]
# Small and fast: vit/tiny at 32 px (2 x 2 patches), narrow heads, a global batch of 16.
FAST = ["--img-size", "32", "--batch-size", "16", "--mlp-dim", "128", "--proj-dim", "64", "--lr", "0.02"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("lecl")
    assert clear.main(["synth", "--out", str(root / "c"), "--n", "8", "--size", "32", "--thickness", "4", "5",
                       "--workers", "1"]) == 0
    return root


def cli_pretrain(root, out, *extra):
    """`clear.py pretrain` on the test cohort, small and fast."""
    return clear.main(["pretrain", "--data", str(root / "c"), "--out", str(out), "--cache", str(root / "cache"),
                       *FAST, *extra])


# ---------------------------------------------------------------------------------------- views and cache


def test_lesion_crop_holds_the_lesion_box_and_centres_on_it():
    g = torch.Generator().manual_seed(3)
    S, B = 64, 400
    y0, x0 = torch.rand(B, generator=g) * 60, torch.rand(B, generator=g) * 60
    h, w = 1 + torch.rand(B, generator=g) * (S - y0 - 1), 1 + torch.rand(B, generator=g) * (S - x0 - 1)
    h, w = h.clamp(max=S - y0), w.clamp(max=S - x0)
    box = torch.stack([y0, x0, y0 + h, x0 + w], 1)  # (B, 4) inside the image
    crop = views.lesion_crop_boxes(box, torch.rand(B, generator=g), S, 0.08)
    side = crop[:, 2] - crop[:, 0]
    assert torch.allclose(side, crop[:, 3] - crop[:, 1]) and (side >= math.sqrt(0.08) * S - 1e-4).all()
    assert (crop[:, :2] >= -1e-4).all() and (crop[:, 2:] <= S + 1e-4).all()  # inside the image
    assert (crop[:, :2] <= box[:, :2] + 1e-4).all() and (crop[:, 2:] >= box[:, 2:] - 1e-4).all()  # holds it
    free = (crop[:, :2] > 1e-3).all(1) & (crop[:, 2:] < S - 1e-3).all(1)  # not pushed in by a border
    assert free.sum() > 20 and torch.allclose((crop[free, :2] + crop[free, 2:]) / 2,
                                              (box[free, :2] + box[free, 2:]) / 2, atol=1e-4)
    # and in pixels: a bright lesion square stays whole in the crop (its mass, rescaled, is all there)
    img = torch.zeros(1, 1, S, S)
    img[..., 40:46, 10:14] = 1.0
    crop = views.lesion_crop_boxes(torch.tensor([[40.0, 10.0, 46.0, 14.0]]), torch.tensor([0.3]), S, 0.08)
    out = views.crop_resize(img, crop, torch.tensor([True]), 32)
    side = float(crop[0, 2] - crop[0, 0])
    assert out.sum().item() * (side / 32) ** 2 == pytest.approx(24.0, rel=0.02)


def test_cache_holds_prepare_slices_and_lesion_boxes_and_is_reused(cohort, tmp_path):
    data = Cohort(cohort / "c")
    cfg = SliceConfig(img_size=32)
    sc, built = cache.open_cache(data, tmp_path / "cache", cfg)
    assert built and len(sc.lesion_ids) > 16
    start, values = 0, set()
    for i, scan in enumerate(data):
        volume, spacing = load_ct(scan.image)
        slices, _ = prepare_slices(volume, spacing, cfg)  # (Z', C, S, S)
        mask = load_mask(scan.mask, volume.shape)
        flags, boxes = lesion_boxes(mask, spacing[0], cfg)
        values |= set(np.unique(mask[mask > 0]).tolist())
        got = torch.from_numpy(sc.slices[start:start + len(slices)].copy()).float() / 255
        assert (got - slices).abs().max() <= 0.5 / 255 + 1e-6
        part = slice(start, start + len(slices))
        assert torch.equal(sc.flags[part], flags) and (sc.scan[part] == i).all()
        assert torch.allclose(sc.level[part], torch.linspace(0, 1, len(slices)))  # first slice 0, last 1
        assert sc.labels[part].tolist() == [[bool((m == v).any()) for v in sc.label_values] for m in mask]
        t = start + int(flags.nonzero()[0]) if flags.any() else start
        got_boxes = sc.boxes[sc.box_start[t]:sc.box_start[t + 1]]  # (K, 4)
        assert torch.allclose(got_boxes, torch.tensor(boxes[t - start]).float())
        start += len(slices)
    assert start == len(sc) and sc.label_values == sorted(values) and len(values) > 2
    assert cache.open_cache(data, tmp_path / "cache", cfg)[1] is False  # same settings: reused
    big, built = cache.open_cache(data, tmp_path / "cache", SliceConfig(img_size=64))
    assert built  # other settings: rebuilt; and a cache above the input size gives (nearly) the same slice
    ids = torch.arange(0, len(sc), 7)
    cpu, everything = torch.device("cpu"), torch.tensor([[0.0, 0, 64, 64]]).expand(len(ids), 4)
    whole = views.crop_resize(big.read(ids, cpu), everything, torch.zeros(len(ids), dtype=torch.bool), 32)
    assert (whole - sc.read(ids, cpu)).abs().mean() < 0.01


def test_views_do_not_depend_on_how_the_batch_is_split(cohort, tmp_path):
    sc, _ = cache.open_cache(Cohort(cohort / "c"), tmp_path / "cache", SliceConfig(img_size=32))
    ids = views.batch_ids(sc, step=3, batch=12, seed=7, lesion_fraction=0.5)
    assert sc.flags[ids].sum() == 6 and len(set(ids.tolist())) == 12
    seeds = [views.mix(7, 3, i) for i in range(12)]
    cpu, cfg = torch.device("cpu"), views.Views(32, True)
    x1, x2, les = views.make_views(sc, ids, seeds, cfg, cpu)
    a1, a2, _ = views.make_views(sc, ids[:5], seeds[:5], cfg, cpu)
    b1, b2, _ = views.make_views(sc, ids[5:], seeds[5:], cfg, cpu)
    assert torch.equal(x1, torch.cat([a1, b1])) and torch.equal(x2, torch.cat([a2, b2]))
    assert x1.shape == (12, 3, 32, 32) and 0 <= x1.min() and x1.max() <= 1 and les.sum() == 6


class ToyCache:
    """What views.batch_ids reads of a cache: `scans` scans of `n` slices each, about a third lesion slices."""

    def __init__(self, scans, n):
        self.scan = torch.arange(scans * n) // n  # (T,)
        self.flags = torch.rand(scans * n, generator=torch.Generator().manual_seed(0)) < 0.3  # (T,)
        self.level = cache.slice_levels(self.scan)  # (T,)

    def __len__(self):
        return len(self.scan)


def test_matched_levels_draw_each_batch_from_one_height_of_the_scans():
    """--matched-levels: each step's batch is distinct slices within ±LEVEL_WINDOW of one height, a height drawn per
    step, with f·batch lesion slices; where the window holds too few slices, the batch still fills."""
    sc, w = ToyCache(scans=60, n=50), views.LEVEL_WINDOW
    centres = []
    for step in range(8):
        ids = views.batch_ids(sc, step, batch=32, seed=1, lesion_fraction=0.5, matched_levels=True)
        level = sc.level[ids]
        assert len(set(ids.tolist())) == 32 and sc.flags[ids].sum() == 16
        assert level.max() - level.min() <= 2 * w and len(set(sc.scan[ids].tolist())) > 10  # one height, many scans
        assert torch.equal(ids, views.batch_ids(sc, step, batch=32, seed=1, lesion_fraction=0.5, matched_levels=True))
        centres.append(float(level.mean()))
    assert max(centres) - min(centres) > 0.3  # the height changes from step to step
    uniform = sc.level[views.batch_ids(sc, 0, batch=32, seed=1, lesion_fraction=0.5)]
    assert uniform.max() - uniform.min() > 0.5  # without it, the whole height of the scans
    few = ToyCache(scans=3, n=20)  # the window holds about 3 x 2 slices: the batch is the nearest 16
    ids = views.batch_ids(few, 0, batch=16, seed=1, lesion_fraction=0.5, matched_levels=True)
    assert len(set(ids.tolist())) == 16 and few.level[ids].max() - few.level[ids].min() < 0.5


def test_levels_draw_every_batch_from_that_range_of_heights():
    """--levels LO HI: every slice of every batch lies at a height in [LO, HI] of its scan, uniform or matched (then
    the steps' heights spread over the range); (0, 1) draws the very batches of no range."""
    sc = ToyCache(scans=60, n=50)
    centres = []
    for step in range(20):
        for matched in (False, True):
            ids = views.batch_ids(sc, step, batch=32, seed=1, lesion_fraction=0.5, matched_levels=matched,
                                  levels=(0.5, 0.9))
            level = sc.level[ids]
            assert len(set(ids.tolist())) == 32 and sc.flags[ids].sum() == 16
            assert level.min() >= 0.5 and level.max() <= 0.9
            assert torch.equal(views.batch_ids(sc, step, 32, 1, 0.5, matched),
                               views.batch_ids(sc, step, 32, 1, 0.5, matched, levels=(0.0, 1.0)))
        centres.append(float(level.mean()))
    assert max(centres) - min(centres) > 0.25  # matched heights drawn over the range, not one height
    assert torch.equal(views.level_pool(sc, (0.5, 0.9)),
                       torch.tensor([t for t in range(len(sc)) if 0.5 <= sc.level[t] <= 0.9]))


@pytest.mark.parametrize("option, value, key", [("--matched-levels", (), "matched_levels"),
                                                ("--levels", ("0.25", "1"), "levels")])
def test_batch_options_are_part_of_the_run_and_of_its_checkpoint(cohort, tmp_path, capsys, monkeypatch, option,
                                                                 value, key):
    """--matched-levels and --levels reach the sampler of every step and the checkpoint, and, being settings of the
    run, refuse a resume without them; the settings of a run without them hold no such key, as before they
    existed."""
    out, asked = tmp_path / "levels.pt", []
    monkeypatch.setattr(sys.modules["pretrain"], "batch_ids", lambda *a: asked.append(a[5:]) or views.batch_ids(*a))
    assert cli_pretrain(cohort, out, "--steps", "2", option, *value) == 0
    given = {"matched_levels": (True, None), "levels": (False, (0.25, 1.0))}[key]
    assert asked == [given, given]
    stored = load(out)["config"][key]
    assert stored == (True if key == "matched_levels" else [0.25, 1.0])
    assert cli_pretrain(cohort, out, "--steps", "2", "--resume", str(out)) == 2
    default = {"matched_levels": False, "levels": None}[key]
    assert f"trained with {key}={stored}, this command has {key}={default}" in capsys.readouterr().err
    assert key not in checkpoint.run_settings(PretrainConfig())


def test_a_range_of_levels_too_narrow_for_a_batch_is_one_line(cohort, tmp_path, capsys):
    assert cli_pretrain(cohort, tmp_path / "x.pt", "--steps", "2", "--levels", "0.5", "0.51") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--levels 0.5 0.51 holds" in err and "fewer than a batch of 16" in err


def test_windows_by_name_reach_the_checkpoint_and_extraction(cohort, tmp_path, capsys):
    """--windows NAME...: one input channel per named window (data.WINDOWS), stored in the checkpoint, from which
    extract rebuilds the same slices; the parenchyma window worked by hand; an unknown name is one line, exit 2."""
    hu = torch.tensor([[-1100.0, -980.0, -850.0, -600.0]])  # (1, 4): air, emphysema, lung, ground glass
    got = data.window(hu, (data.WINDOWS["parenchyma"],))[0, 0]  # level -850, width 500: (hu + 1100) / 500
    assert torch.allclose(got, torch.tensor([0.0, 0.24, 0.5, 1.0]))
    out = tmp_path / "w.pt"
    assert cli_pretrain(cohort, out, "--steps", "1", "--windows", "lung", "parenchyma", "--cache", str(tmp_path)) == 0
    assert load(out)["slice_config"]["windows"] == [[-600.0, 1500.0], [-850.0, 500.0]]
    encoder, _, slices = load_encoder(EncoderSpec(checkpoint=str(out)))
    assert slices.windows == ((-600.0, 1500.0), (-850.0, 500.0))
    assert encoder(torch.zeros(1, 2, 32, 32)).shape[0] == 1  # a two-channel encoder
    with pytest.raises(SystemExit) as e:
        cli_pretrain(cohort, tmp_path / "x.pt", "--windows", "lung", "brain")
    assert e.value.code == 2 and "invalid choice: 'brain'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- lr schedule


def test_lr_schedule_by_hand():
    cfg = PretrainConfig(lr=1e-3, batch_size=512, warmup=0.1)  # peak 1e-3 · 512 / 256 = 2e-3
    assert lr_at(9, 100, cfg) == pytest.approx(2e-3) and lr_at(0, 100, cfg) == pytest.approx(2e-4)
    assert lr_at(55, 100, cfg) == pytest.approx(1e-3) and lr_at(99, 100, cfg) < 1e-5


# -------------------------------------------------------------------------------------------- training runs


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # checkpoints are untrusted input


@pytest.fixture(scope="module")
def run60(cohort):
    out = cohort / "run60.pt"
    assert cli_pretrain(cohort, out, "--steps", "60", "--checkpoint-every", "25") == 0
    return out


def test_sixty_steps_lower_the_loss_and_the_checkpoint_rebuilds_the_encoder(run60):
    ck = load(run60)
    assert ck["step"] == 60 and len(ck["losses"]) == 60
    first, last = sum(ck["losses"][:10]) / 10, sum(ck["losses"][-10:]) / 10
    assert last < 0.85 * first, (first, last)  # about 2.46 -> 1.99 here; the same run at --lr 1e-12, which
    #                                            learns nothing, goes 2.63 -> 2.62
    encoder = build_encoder(**ck["encoder_config"])
    encoder.load_state_dict(ck["encoder"])  # strict: no heads, nothing missing
    assert ck["slice_config"] == {"windows": [list(w) for w in SliceConfig.windows], "img_size": 32,
                                  "thickness_mm": None}
    assert ck["config"]["method"] == "lecl" and ck["encoder_config"]["name"] == "vit"


def test_the_supervised_ceiling_learns_the_mask_labels_of_its_slices(cohort, tmp_path):
    """method="supervised": the encoder and a linear head learn which mask labels each slice holds (multi-label);
    after training, its scores rank the slices of lung disease (labels 9, 10) above the others, on the very
    slices it trained on, far better than at its random init."""
    cfg = PretrainConfig(method="supervised", encoder="gcnn", img_size=32, steps=100, batch_size=32, lr=3e-3,
                         weight_decay=0.05, seed=1, device="cpu")
    sc, _ = cache.open_cache(Cohort(cohort / "c"), cohort / "cache", SliceConfig(img_size=32))

    def auc_of(model):
        with torch.no_grad():
            scores = model.head(model.encoder.eval()(sc.read(torch.arange(len(sc)), torch.device("cpu"))))
        disease = [sc.label_values.index(v) for v in (9, 10) if v in sc.label_values]
        return [auroc(sc.labels[:, j].numpy(), scores[:, j].numpy()) for j in disease]

    torch.manual_seed(1)
    before = auc_of(supervised.SliceClassifier(build_encoder("gcnn", "tiny", 3, 32), len(sc.label_values)))
    result = pretrain(cfg, cohort / "c", tmp_path / "sup.pt", cache=cohort / "cache")
    after = auc_of(result.model)
    assert len(after) == 2 and min(after) > 0.8 and all(a > b + 0.15 for a, b in zip(after, before)), (before, after)
    ck = load(tmp_path / "sup.pt")
    assert ck["config"]["method"] == "supervised" and set(ck["state"]["model"]) == {"head.weight", "head.bias"}


@pytest.fixture(scope="module")
def frozen(cohort):
    out = cohort / "frozen.pt"
    assert cli_pretrain(cohort, out, "--steps", "3", "--freeze-stem") == 0
    return out


def test_a_frozen_stem_stays_at_its_random_init_and_the_rest_trains(frozen, run60):
    """--freeze-stem: the patch projection of the trained encoder and of its momentum copy is the one pre-training
    starts from (seed 0), bit for bit; every other tensor has moved, and without the flag the stem moves too."""
    ck = load(frozen)
    torch.manual_seed(0)  # as pretrain() seeds before building the encoder
    init = build_encoder(**ck["encoder_config"]).state_dict()
    stem_keys = {k for k in init if k.startswith("patch_embed.")}
    assert stem_keys and ck["config"]["freeze_stem"] is True
    for k, v in init.items():
        assert torch.equal(ck["encoder"][k], v) is (k in stem_keys), k
        if k in stem_keys:
            assert torch.equal(ck["state"]["model"][f"momentum_encoder.{k}"], v), k
    assert not torch.equal(load(run60)["encoder"]["patch_embed.proj.weight"], init["patch_embed.proj.weight"])


def test_a_checkpoint_of_another_format_or_other_settings_is_refused(cohort, run60, frozen, capsys):
    """A checkpoint of another FORMAT is refused in one line that says to pre-train again; freeze_stem is part of
    the run's settings both ways: a frozen run refuses a command without the flag, and a plain one a command with
    it."""
    ck = load(run60)
    ck["format"] = "clear-pretrain/1"
    old = cohort / "old.pt"
    torch.save(ck, old)
    same = ["--steps", "60", "--checkpoint-every", "25"]
    assert cli_pretrain(cohort, old, *same, "--resume", str(old)) == 2
    assert "it is clear-pretrain/1: pre-train again" in capsys.readouterr().err
    assert cli_pretrain(cohort, run60, *same, "--resume", str(run60), "--freeze-stem") == 2
    assert "trained with freeze_stem=False, this command has freeze_stem=True" in capsys.readouterr().err
    assert cli_pretrain(cohort, frozen, "--steps", "3", "--resume", str(frozen)) == 2
    assert "trained with freeze_stem=True, this command has freeze_stem=False" in capsys.readouterr().err


def test_resume_after_ctrl_c_ends_with_the_uninterrupted_weights(cohort, monkeypatch, capsys):
    args = ["--steps", "12", "--checkpoint-every", "100", "--seed", "3"]
    assert cli_pretrain(cohort, cohort / "full.pt", *args) == 0

    def ctrl_c_at_step_5(desc, unit="scan"):  # a progress bar whose user presses Ctrl-C during step 5
        def wrap(it, total):
            for i, x in enumerate(it):
                if desc == "pretrain" and i == 5:
                    os.kill(os.getpid(), signal.SIGINT)
                yield x
        return wrap

    monkeypatch.setattr(commands, "bar", ctrl_c_at_step_5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_pretrain(cohort, cohort / "cut.pt", *args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 130 and len(err) == 1 and f"--resume {cohort / 'cut.pt'}" in err[0]
    cut_seconds = load(cohort / "cut.pt")["seconds"]
    assert load(cohort / "cut.pt")["step"] == 6 and cut_seconds > 0  # the step running at Ctrl-C was finished
    monkeypatch.undo()
    assert cli_pretrain(cohort, cohort / "cut.pt", *args, "--resume", str(cohort / "cut.pt")) == 0
    full, resumed = load(cohort / "full.pt"), load(cohort / "cut.pt")
    assert resumed["step"] == 12 and resumed["losses"] == full["losses"]  # exactly: CPU, same seed
    assert resumed["ranks"] == full["ranks"] and len(full["ranks"]) == 12 and 1 <= min(full["ranks"])
    # the training time is the run's, over both processes: the first six steps' and the last six's
    assert resumed["seconds"] > cut_seconds and 0.2 < resumed["seconds"] / full["seconds"] < 5

    def weights(ck):  # the encoder, heads, momentum copies and AdamW's moments
        adam = ck["state"]["optimizer"]["state"]
        return {**ck["encoder"], **{f"state.{k}": v for k, v in ck["state"]["model"].items()},
                **{f"adam.{i}.{k}": v for i, s in adam.items() for k, v in s.items()}}

    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def bare(cohort):
    """The cohort without its masks."""
    shutil.copytree(cohort / "c" / "images", cohort / "bare" / "images")
    return cohort / "bare"


def test_bad_input_is_one_line_and_exit_2(cohort, bare, run60, capsys):
    cases = [(["--data", str(bare)], "--method moco"),
             (["--encoder", "resnet"], "unknown encoder 'resnet'"),
             (["--batch-size", "4000"], "lower --batch-size"),
             (["--encoder", "gcnn", "--resume", str(run60)], "a checkpoint of encoder vit/tiny")]
    for args, expect in cases:
        argv = ["pretrain", "--data", str(cohort / "c"), "--out", str(cohort / "bad.pt"), "--cache",
                str(cohort / "cache"), *FAST, "--steps", "2", *args]
        assert clear.main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert not (cohort / "bad.pt").exists()


def test_the_supervised_reference_refuses_a_cohort_with_unmasked_scans(cohort, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(cohort / "c", partial)
    next((partial / "masks").glob("*.nii.gz")).unlink()  # its findings would be trained on as absent
    assert clear.main(["pretrain", "--data", str(partial), "--out", str(tmp_path / "s.pt"), "--method", "supervised",
                       *FAST, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 scan(s) without a mask" in err and not (tmp_path / "s.pt").exists()


def test_a_slim_checkpoint_keeps_the_encoder_and_record_and_refuses_resume(cohort, run60, capsys):
    """--slim: the finished run's checkpoint without its training state; the encoder, slice settings and the run's
    record are those of the full checkpoint of the same run, and --resume is refused in one line."""
    out = cohort / "slim.pt"
    assert cli_pretrain(cohort, out, "--steps", "60", "--checkpoint-every", "25", "--slim") == 0
    slim, full = load(out), load(run60)
    assert "state" not in slim and set(full) - set(slim) == {"state"}
    assert all(torch.equal(slim["encoder"][k], v) for k, v in full["encoder"].items())
    assert {k: slim[k] for k in ("losses", "ranks", "config", "slice_config")} == \
        {k: full[k] for k in ("losses", "ranks", "config", "slice_config")}
    capsys.readouterr()
    assert cli_pretrain(cohort, out, "--steps", "60", "--resume", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a slim checkpoint (no training state), which cannot be resumed" in err


def test_moco_ablation_needs_no_masks(cohort, bare):
    out = cohort / "moco.pt"
    assert clear.main(["pretrain", "--data", str(bare), "--out", str(out), "--method", "moco", *FAST,
                       "--steps", "3"]) == 0
    ck = load(out)
    assert ck["config"]["method"] == "moco" and ck["data"]["lesion_slices"] == 0 and len(ck["losses"]) == 3


WORKER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import lecl
from models import build_encoder
from pretrain import PretrainConfig, pretrain
dist.init_process_group("gloo")
rank, n = dist.get_rank(), 4
# 1) one step by hand: this process's half of a fixed global batch of 8, through DDP
torch.manual_seed(0)
model = lecl.MoCo(build_encoder("vit", "tiny", 3, 32), proj_dim=64, mlp_dim=128)
x1, x2, lesion = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32), torch.arange(8) % 3 == 0
ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = ddp(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n], lesion[rank * n:(rank + 1) * n], 0.99)
loss.backward()
mean = loss.detach().clone()
dist.all_reduce(mean)
grads = {{k: p.grad for k, p in model.named_parameters() if p.grad is not None}}
# 2) the whole pipeline
r = pretrain(PretrainConfig(**{cfg!r}), {data!r}, {out!r}, cache={cache!r})
torch.save({{"loss": mean / 2, "grads": grads, "losses": r.losses, "weights": r.model.state_dict()}},
           {out!r} + ".rank" + os.environ["RANK"])
"""


def test_two_gloo_processes_compute_what_one_does(cohort):
    cfg = dict(steps=4, batch_size=16, img_size=32, mlp_dim=128, proj_dim=64, lr=0.002, seed=5)
    paths = dict(data=str(cohort / "c"), cache=str(cohort / "cache"))
    script = cohort / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), cfg=cfg, out=str(cohort / "two.pt"), **paths))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(f"{cohort / 'two.pt'}.rank{r}", weights_only=True) for r in (0, 1))
    # 1) one step by hand: the loss and every gradient equal one process's on the whole batch
    torch.manual_seed(0)
    model = lecl.MoCo(build_encoder("vit", "tiny", 3, 32), proj_dim=64, mlp_dim=128)
    x1, x2, lesion = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32), torch.arange(8) % 3 == 0
    loss = model(x1, x2, lesion, 0.99)
    loss.backward()
    assert r0["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())  # the few that are ~0 (LN bias before BN) are noise
    for r in (r0, r1):
        assert r["grads"].keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-3, atol=1e-5 * scale, msg=k)
    # 2) the pipeline: the processes stay identical, and follow the one-process run on the same global batches:
    # the same first loss; after it, Adam turns the float noise in gradients that are ~0 in exact arithmetic
    # (a LayerNorm bias before BatchNorm) into steps of up to ~3 lr, so weights part by a few lr per step
    one = pretrain(PretrainConfig(**cfg), out=cohort / "one.pt", **paths)
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # DDP keeps the processes identical
    assert r0["losses"] == r1["losses"] and r0["losses"][0] == pytest.approx(one.losses[0], rel=1e-5)
    assert r0["losses"] == pytest.approx(one.losses, rel=3e-2)  # seen: up to 1.1 % by step 4 (another CPU's BLAS)
    w1 = dict(one.model.named_parameters())  # (BatchNorm's running statistics, unused in training, drift more)
    diff = max((r0["weights"][k] - w1[k]).abs().max().item() for k in w1)
    assert diff < 8 * cfg["steps"] * cfg["lr"] * cfg["batch_size"] / 256, diff
