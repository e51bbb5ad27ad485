"""The pieces of benchmark.py accuracy and ablate that their smoke tests cannot check for values: the tumour-slice
probe and the slice flags it is trained on, the HU histogram, and which settings each kept row depends on."""
import functools
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import ablation, config
import benchmark
from bench import commands
from bench import probe
from models.reference import HUHistogram, PixelGrid
from cohort import Cohort
from data import SliceConfig
from models import build_encoder, count_flops
from extract import weights_sha256
from mil import Bags
from phantom import SynthConfig, make_phantom
from pretrain import contrastive
from synth import write_cohort
from checkpoint import plain
from views import ViewConfig
from watch import slice_probe


def probe_data(signal, n_patients=40, n_slices=30, dim=16, seed=0):
    """Per patient one scan of n_slices noise embeddings; a fifth of the slices flagged, feature 0 shifted
    by `signal` on them."""
    g = torch.Generator().manual_seed(seed)
    flags = [torch.rand(n_slices, generator=g) < 0.2 for _ in range(n_patients)]
    feats = [torch.randn(n_slices, dim, generator=g) for _ in range(n_patients)]
    for f, y in zip(feats, flags):
        f[:, 0] += signal * y
    return feats, flags, [f"P{i}" for i in range(n_patients)]


def test_probe_finds_a_planted_direction_and_nothing_in_noise():
    feats, flags, patients = probe_data(signal=4.0)
    assert slice_probe(feats, flags, patients) > 0.97  # two classes 4 sd apart: AUROC Φ(4/√2) ≈ 0.998
    feats, flags, patients = probe_data(signal=1.0)
    assert 0.7 < slice_probe(feats, flags, patients) < 0.85  # 1 sd apart: Φ(1/√2) = 0.76
    aucs = [slice_probe(*probe_data(signal=0.0, seed=s)) for s in range(5)]
    assert abs(np.mean(aucs) - 0.5) < 0.06


def test_probe_is_undefined_without_both_classes_in_the_test_patients():
    feats, flags, patients = probe_data(signal=4.0)
    assert np.isnan(slice_probe(feats, [torch.zeros_like(f) for f in flags], patients))


def test_slice_flags_follow_the_mask_at_the_bag_slices_z(tmp_path, capsys):
    cfg = SynthConfig(n=3, size=32, thickness=(4.0, 5.0), workers=1)
    write_cohort(cfg, tmp_path)
    cohort = Cohort(tmp_path)
    truth, z_mm = [], []
    for patient in range(3):
        ph = make_phantom(cfg, patient, 0)
        tumour = ((ph.mask >= 1) & (ph.mask <= 8)).reshape(len(ph.mask), -1).any(1)  # (Z,) per stored slice
        z = 0.37 + np.arange(0.0, (len(ph.mask) - 1) * ph.spacing[0], 4.6)  # bag slices 4.6 mm apart, off-grid
        gap = np.abs(z[:, None] - np.arange(len(ph.mask))[None] * ph.spacing[0])  # (L, Z) mm to every stored slice
        assert (np.sort(gap, 1)[:, 1] - gap.min(1) > 1e-6).all()  # no position halfway between two slices
        truth.append(tumour[gap.argmin(1)])  # the nearest stored slice, by brute force
        z_mm.append(torch.from_numpy(z))
    names = tuple(s.scan for s in cohort.scans)
    assert names == ("P0000_S1", "P0001_S1", "P0002_S1")
    bags = Bags(Path(tmp_path), {}, 4, names, tuple(torch.zeros(len(z), 4) for z in z_mm), tuple(z_mm), ())
    flags = probe.lesion_slice_flags(cohort, bags, config.TUMOUR_LABELS)
    for got, want in zip(flags, truth):
        assert got.numpy().tolist() == want.tolist()
    assert any(t.any() for t in truth) and not all(t.all() for t in truth)  # both kinds of slice to tell apart
    # the same through the command line: bags on disk, the count of lesion slices printed
    (tmp_path / "bags").mkdir()
    for name, z in zip(names, z_mm):
        torch.save({"features": torch.randn(len(z), 4), "z_mm": z, "encoder": {"name": "x"}, "image": name},
                   tmp_path / "bags" / f"{name}.pt")
    argv = ["probe", "--data", str(tmp_path), "--bags", str(tmp_path / "bags"), "--labels", *map(str, range(1, 9))]
    assert benchmark.main(argv) == 0
    n_lesion, n = sum(int(t.sum()) for t in truth), sum(len(t) for t in truth)
    printed = capsys.readouterr().out
    assert f"{n_lesion} of {n} slices hold a lesion" in printed and "effective rank (RankMe)" in printed
    # a cohort without masks has nothing to probe against: one line, exit code 2
    shutil.rmtree(tmp_path / "masks")
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchmark.py probe: error: ") and "lesion mask" in err


def test_probe_command_refuses_a_missing_bag_folder_in_one_line(tmp_path, capsys):
    write_cohort(SynthConfig(n=1, size=32, thickness=(8.0, 10.0), workers=1), tmp_path / "c")
    assert benchmark.main(["probe", "--data", str(tmp_path / "c"), "--bags", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchmark.py probe: error: ") and "none" in err


@pytest.mark.parametrize("change, slices, net", [
    ({"encoders": ("gcnn",)}, True, True), ({"fractions": (1.0,)}, True, True), ({"fit.workers": 1}, True, True),
    ({"cohort.workers": 1}, True, True), ({"steps": 7}, False, True), ({"img_size": 48}, False, True),
    ({"histogram_bins": 8}, True, True), ({"epochs_3d": 3}, True, False), ({"net.widths": (4, 4, 4, 4)}, True, False),
    ({"fit.epochs": 3}, False, True), ({"fit.hidden": 64}, False, True), ({"fit.lr": 0.01}, False, False),
    ({"cohort.seed": 1}, False, False), ({"pretrain_changes": (("temperature", 1.0),)}, False, True)])
def test_a_kept_row_belongs_to_its_own_settings(change, slices, net):
    """A row is reused only by a run whose settings for that row match: the 3D baseline's tasks do not depend on
    the encoders' pre-training, nor those on the 3D network; worker counts change neither."""
    base = config.AccuracyConfig()
    (key, value), = change.items()
    changed = config.changed(base, key, value)
    for encoder, method in [("vit", "lecl"), ("gcnn", "random")]:
        same = config.fingerprint(config.encoder_settings(changed, encoder, method)) == \
            config.fingerprint(config.encoder_settings(base, encoder, method))
        assert same is (slices or key in ("steps", "pretrain_changes") and method == "random")  # no pre-training
    assert (config.fingerprint(config.settings_3d(changed)) == config.fingerprint(config.settings_3d(base))) \
        is net


def test_a_kept_row_follows_the_synthetic_scans_format(monkeypatch):
    """A row made on scans that another version of synth drew (the same settings, other files) is not reused:
    every row's fingerprint, the 3D baseline's and the histogram's included, holds synth.SYNTH_FORMAT."""
    base = config.AccuracyConfig()

    def prints():
        rows = [config.encoder_settings(base, e, m) for e, m in [("cnn", "lecl"), ("cnn", "random"), ("hist", "none")]]
        return [config.fingerprint(s) for s in [config.settings_3d(base), *rows]]
    before = prints()
    monkeypatch.setattr(config, "SYNTH_FORMAT", config.SYNTH_FORMAT + 1)
    assert all(now != then for now, then in zip(prints(), before))


def test_a_kept_pretrained_row_follows_the_views():
    """The crops and augmentations are part of a row's pre-training: PretrainConfig's whole settings, views
    included, enter its fingerprint."""
    base = config.AccuracyConfig()
    settings = config.encoder_settings(base, "vit", "lecl")
    assert settings["encoder"]["views"] == plain(asdict(ViewConfig()))
    assert "checkpoint_every" not in settings["encoder"]  # a runtime field
    hist = config.fingerprint(config.encoder_settings(base, "hist", "none"))
    assert hist != config.fingerprint(config.encoder_settings(replace(base, histogram_bins=8), "hist", "none"))
    assert hist == config.fingerprint(config.encoder_settings(replace(base, steps=7), "hist", "none"))


def test_bags_extracted_on_a_gpu_are_other_rows_than_the_cpus(monkeypatch):
    """On CUDA extraction runs under bf16 autocast (fp16 where bf16 is only emulated): other numbers, so other bags
    folders and rows."""
    base = config.AccuracyConfig()
    cpu = config.encoder_making(base, "vit", "random")
    assert "extraction" not in cpu  # the CPU's rows keep the fingerprints they were kept under
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert config.extraction_device() == "cuda"
    assert config.encoder_making(base, "vit", "random") == {**cpu, "extraction": "cuda, bf16 autocast"}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert config.encoder_making(base, "vit", "random") == {**cpu, "extraction": "cuda, fp16 autocast"}


def test_hu_histogram_counts_pixels_per_bin_worked_by_hand():
    x = torch.zeros(2, 2, 4, 4)
    x[0, 0, :2] = 0.1  # half the pixels in bin 0 of 4 ([0, 0.25)), half at 0.6: bin 2
    x[0, 0, 2:] = 0.6
    x[0, 1] = 1.0  # the top edge belongs to the last bin
    x[1, 0] = -0.5  # values outside [0, 1] clip into the end bins
    x[1, 1, :, :1] = 0.3  # a quarter in bin 1, the rest at 2.0: bin 3
    x[1, 1, :, 1:] = 2.0
    h = HUHistogram(in_chans=2, bins=4)(x)
    want = torch.tensor([[0.5, 0, 0.5, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0.25, 0, 0.75]])
    assert h.shape == (2, 8) and torch.equal(h, want)
    # other bins are another encoder to the bags (their identity holds the weights' sha256), and wrong input says so
    assert weights_sha256(HUHistogram(3, 16)) != weights_sha256(HUHistogram(3, 32))
    with pytest.raises(ValueError, match="in_chans=2"):
        HUHistogram(in_chans=2, bins=4)(torch.zeros(1, 3, 4, 4))


def test_pixel_grid_averages_each_cell_worked_by_hand():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)  # two channels of 4 x 6 pixels, 0..47
    g = PixelGrid(in_chans=2, grid=2)(x)  # cells of 2 x 3 pixels
    # channel 0's top-left cell holds 0, 1, 2, 6, 7, 8 (mean 4); a step right adds 3, a step down 12; channel 1 is +24
    want = torch.tensor([[4.0, 7.0, 16.0, 19.0, 28.0, 31.0, 40.0, 43.0]])
    assert g.shape == (1, 8) and torch.allclose(g, want)
    assert PixelGrid(2, grid=1)(x).flatten().tolist() == [11.5, 35.5]  # one cell: the channel means
    assert weights_sha256(PixelGrid(3, 4)) != weights_sha256(PixelGrid(3, 8))
    with pytest.raises(ValueError, match="in_chans=2"):
        PixelGrid(in_chans=2)(torch.zeros(1, 3, 8, 8))


class Windows(torch.nn.Module):
    """An encoder reading only some of the window channels: a HU histogram of them."""

    def __init__(self, keep):
        super().__init__()
        self.keep, self.hist = list(keep), HUHistogram(in_chans=len(keep))

    def forward(self, x):  # (B, C, H, W)
        return self.hist(x[:, self.keep])


def test_twin_probe_finds_what_an_encoder_reads_and_not_what_it_is_blind_to():
    cfg = SynthConfig(n=30, size=48, thickness=(4.0, 5.0), workers=1)
    twins = probe.twin_slices(cfg, range(30), {"ggo": (9,), "emph": (10,)}, SliceConfig(img_size=48))
    assert len(twins["ggo"]) >= 5 and len(twins["emph"]) >= 5
    assert all(w.shape == wo.shape and w.shape[1:] == (3, 48, 48) and not torch.equal(w, wo)
               for pairs in twins.values() for _, w, wo in pairs)
    for kind in ("ggo", "emph"):  # the lung window's histogram sees both, and moves the same bins every time
        auc, consistency = probe.twin_probe(HUHistogram(), twins[kind])
        assert auc > 0.75 and consistency > 0.3, kind  # measured 0.85 and 0.87; consistency 0.58 and 0.55
    # the soft-tissue and bone windows clip normal lung (-850 HU) and emphysema (-980) alike to their floor
    auc, consistency = probe.twin_probe(Windows([1, 2]), twins["emph"])
    assert abs(auc - 0.5) < 0.1 and consistency < 0.1  # measured 0.52 and 0.02
    # fewer patients than the probe's folds: no figure, rather than one from a fold with no test patient
    assert all(math.isnan(v) for v in probe.twin_probe(HUHistogram(), twins["ggo"][:3]))
    assert not any(math.isnan(v) for v in probe.twin_probe(HUHistogram(), twins["ggo"][:3], folds=3))
    score = probe.twin_direction(HUHistogram(), twins["ggo"])  # fitted on every pair: each slice above its twin
    with_, without = (torch.cat([pair[i] for pair in twins["ggo"]]) for i in (1, 2))
    assert (score(HUHistogram()(with_)) > score(HUHistogram()(without))).double().mean() > 0.9


def test_scan_reading_ranks_scans_by_their_highest_slice_worked_by_hand():
    feats = [torch.tensor([[0.0], [3.0]]), torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0]]), torch.tensor([[5.0]])]
    bags = Bags(Path("."), {}, 1, ("P0000_S1", "P0001_S1", "P0002_S1", "P0003_S1"), tuple(feats),
                tuple(torch.zeros(len(f)) for f in feats), ())
    flags = [torch.tensor([False, True]), torch.tensor([False, False]), torch.tensor([True]), torch.tensor([False])]
    # highest slices 3, 1, 2, 5; scans 0 and 2 hold the finding: of the pairs (3, 1) (3, 5) (2, 1) (2, 5) two are
    # ordered, so 2 / 4; without patient P0003, all of them
    assert probe.scan_reading(lambda f: f[:, 0], bags, flags) == 0.5
    assert probe.scan_reading(lambda f: f[:, 0], bags, flags, skip={"P0003"}) == 1.0
    assert math.isnan(probe.scan_reading(lambda f: f[:, 0], bags, flags, skip={"P0000", "P0002"}))


def test_twin_command_prints_one_row_per_finding_and_refuses_a_bad_checkpoint(tmp_path, capsys):
    hist = f"{Path(benchmark.__file__).parent / 'models' / 'reference.py'}:HUHistogram"
    assert benchmark.main(["twin", "--encoder-module", hist, "--n", "2", "--img-size", "32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| ground glass (mask 9)", "| emphysema (10)", "| tumours (1-8)"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert benchmark.main(["twin", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchmark.py twin: error: ") and "bad.pt" in err
    (tmp_path / "bags").mkdir()  # bags of another encoder than the one tested: refused before any twin is drawn
    torch.save({"features": torch.randn(3, 4), "z_mm": torch.arange(3.0), "encoder": {"name": "x"}, "image": "s"},
               tmp_path / "bags" / "s.pt")
    assert benchmark.main(["twin", "--encoder-module", hist, "--bags", str(tmp_path / "bags"),
                           "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bags of encoder {'name': 'x'}" in err


def test_twin_windows_reach_the_slices_and_a_cut_cnn_is_its_encoder_s_first_layers(monkeypatch):
    """--windows sets the twin slices' channels for an --encoder-module (the LeCL cut takes the checkpoint's four),
    and twin_variants.lecl_cut(k) with every stage layer is the shipped encoder itself; random_cut3 is lecl_cut3's
    architecture at random init."""
    from bench import twin_variants
    from data import named_windows
    from demo import CHECKPOINTS
    from extract import EncoderSpec, load_encoder

    seen, real = [], probe.twin_slices
    monkeypatch.setattr(probe, "twin_slices", lambda cfg, patients, findings, slices: seen.append(slices.windows)
                        or real(cfg, patients, findings, slices))
    cut = f"{Path(benchmark.__file__).parent / 'bench' / 'twin_variants.py'}:lecl_cut3"
    four = ["lung", "soft", "bone", "parenchyma"]
    assert benchmark.main(["twin", "--encoder-module", cut, "--n", "1", "--img-size", "32", "--windows", *four]) == 0
    assert seen == [named_windows(four)]
    full, _, _ = load_encoder(EncoderSpec(checkpoint=str(CHECKPOINTS["lecl"])))
    x = torch.rand(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    with torch.no_grad():
        assert torch.allclose(twin_variants.lecl_cut(len(full.stages))(x), full(x), atol=1e-6)
        assert torch.allclose(twin_variants.lecl_cut(None)(x), full(x), atol=1e-6)  # None: every stage layer
        assert twin_variants.lecl_cut(3)(x).shape == (2, full.stages[2][1].num_features)
    trained, control = twin_variants.lecl_cut(3).state_dict(), twin_variants.random_cut3().state_dict()
    assert {k: v.shape for k, v in control.items()} == {k: v.shape for k, v in trained.items()}  # its control
    assert not torch.equal(control["stem.0.weight"], trained["stem.0.weight"])
    with torch.no_grad():  # max and GeM pooling against the stage grid reduced cell by cell
        grid = full.stages(full.stem(x))  # (B, D, h, w)
        cells = [grid[:, :, i, j] for i in range(grid.shape[2]) for j in range(grid.shape[3])]  # h·w of (B, D)
        peak = functools.reduce(torch.maximum, cells)
        gem = (sum(c.clamp(min=1e-6) ** 3 for c in cells) / len(cells)) ** (1 / 3)
        assert torch.allclose(twin_variants.lecl_max()(x), peak) and not torch.allclose(peak, full(x))
        assert torch.allclose(twin_variants.lecl_gem()(x), gem, atol=1e-6)


def test_first_axis_finds_a_height_code_and_its_share():
    g = torch.Generator().manual_seed(0)
    z = [torch.arange(0.0, 300.0, 5.0, dtype=torch.float64) for _ in range(20)]  # 60 slices per scan
    direction = torch.randn(16, generator=g)
    height = [(t / t.max()).float() for t in z]
    feats = [h[:, None] * direction * 10 + 0.1 * torch.randn(len(h), 16, generator=g) for h in height]
    bags = Bags(Path("."), {}, 16, tuple(f"s{i}" for i in range(20)), tuple(feats), tuple(z), ())
    share, corr = probe.first_axis(bags)
    # the axis's variance: 100 |direction|^2 Var(h) against 0.01 per noise dimension (Var(h) of a uniform grid ~ 1/12)
    want = 100 * float(direction @ direction) / 12 / (100 * float(direction @ direction) / 12 + 16 * 0.01)
    assert share == pytest.approx(want, abs=0.01) and corr > 0.999
    noise = Bags(Path("."), {}, 16, bags.scans, tuple(torch.randn(60, 16, generator=g) for _ in z), tuple(z), ())
    share, corr = probe.first_axis(noise)
    assert share < 0.15 and corr < 0.1  # isotropic: 1/16 of the variance and more by chance, nothing of height


def _flat(cfg):
    """A PretrainConfig as {"field": value, "views.field": value}."""
    d = plain(asdict(cfg))
    return {**{k: v for k, v in d.items() if k != "views"}, **{f"views.{k}": v for k, v in d["views"].items()}}


def test_ablation_variants_change_only_what_they_say():
    """Each of ablation.py's variants pre-trains the ablation's row with exactly its own changes (moco and
    supervised: their method, and the supervised ceiling every slice in uniform batches, as the batch options are
    the contrastive methods'), so no two share a fingerprint; those that change nothing share the table's
    fingerprints, so the ablation reuses its rows."""
    base, encoder = ablation.AblationConfig().base, ablation.AblationConfig().encoder
    table = _flat(config.pretrain_config(base, encoder, "lecl"))
    assert table["matched_levels"] and table["levels"] == list(base.levels)  # the demo's chest batches
    prints = set()
    for key, _, method, changes in ablation.VARIANTS:
        cfg = replace(base, pretrain_changes=changes)
        if method != "random":
            got = _flat(config.pretrain_config(cfg, encoder, method))
            batches = set() if contrastive(method) else {"matched_levels", "levels"}
            assert {k for k in got if got[k] != table[k]} == {k for k, _ in changes} | batches | (
                {"method"} if method != "lecl" else set()), key
            assert all(got[k] == v for k, v in changes), key
        prints.add(config.fingerprint(config.encoder_settings(cfg, encoder, method)))
    assert len(prints) == len(ablation.VARIANTS)
    same = [m for _, _, m, changes in ablation.VARIANTS if not changes]
    assert sorted(same) == ["lecl", "moco", "random", "supervised"]
    for method in same:
        assert config.fingerprint(config.encoder_settings(base, encoder, method)) == \
            config.fingerprint(config.encoder_settings(config.AccuracyConfig(), encoder, method))


def test_training_flops_follow_the_rows_settings_worked_by_formula():
    cfg, n = config.QUICK, 100  # ViT-micro at 32 px, 3 steps of batch 8, the table's 4 windows; 100 bag slices
    per_slice = count_flops(build_encoder("vit", "micro", in_chans=4, img_size=32), torch.zeros(1, 4, 32, 32))
    random = config.training_flops(cfg, "vit", "random", n)  # extraction and MIL fits only
    assert random > n * per_slice
    # pre-training adds steps x batch x 2 views x (3 + 1) forwards, and follows the row's own pre-training changes
    assert config.training_flops(cfg, "vit", "lecl", n) - random == pytest.approx(3 * 8 * 2 * 4 * per_slice)
    longer = replace(cfg, pretrain_changes=(("steps", 6), ("batch_size", 4)))
    assert config.training_flops(longer, "vit", "moco", n) - random == pytest.approx(6 * 4 * 2 * 4 * per_slice)
    assert config.training_flops(cfg, "vit", "random", 2 * n) == pytest.approx(2 * random)  # all per bag slice


def test_accuracy_scale_options_map_onto_its_config_and_are_checked(capsys):
    def configured(*argv):
        return commands.accuracy_config(benchmark.build_parser().parse_args(["accuracy", *argv]))

    assert configured() == configured("--steps", "600", "--img-size", "64") == (config.AccuracyConfig(), "")  # table's
    cfg, scale = configured("--quick", "--scans", "30", "--size", "64", "--img-size", "48", "--steps", "5",
                        "--batch-size", "4", "--encoders", "gcnn")
    assert scale == "scans30-size64-img-size48-steps5-batch-size4"  # QUICK's own 40 scans, 48 px, 3 steps, batch 8
    assert (cfg.cohort.n, cfg.cohort.size, cfg.img_size, cfg.steps, cfg.batch_size) == (30, 64, 48, 5, 4)
    outs = [commands.default_out(benchmark.build_parser().parse_args(["accuracy", *argv]), scale)
            for argv, scale in (([], ""), (["--quick"], ""), ([], "steps5"), (["--quick"], "steps5"),
                                (["--out", "x"], "steps5"))]
    assert outs == ["results", "results/quick", "results/custom-steps5", "results/custom-quick-steps5", "x"]
    assert cfg == replace(config.QUICK, cohort=replace(config.QUICK.cohort, n=30, size=64), img_size=48, steps=5,
                          batch_size=4, encoders=("gcnn",))  # nothing else changes
    abl, scale = commands.ablation_config(benchmark.build_parser().parse_args(["ablate", "--steps", "300"]))
    default = ablation.AblationConfig()
    assert scale == "steps300" and abl == replace(default, base=replace(default.base, steps=300))  # its base
    assert benchmark.main(["accuracy", "--quick", "--img-size", "72"]) == 2  # refused before any work
    err = capsys.readouterr().err
    assert "--img-size a multiple of 16" in err and "72" in err and len(err.strip().splitlines()) == 1
    assert benchmark.main(["accuracy", "--scans", "40"]) == 2 and ">= 50 (10 per fold)" in capsys.readouterr().err


def test_ctrl_c_in_a_benchmark_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "bench_accuracy", interrupted)  # the parser binds each subcommand when it is built
    monkeypatch.setattr(probe, "twin_command", interrupted)
    try:
        codes = benchmark.main(["accuracy", "--quick"]), benchmark.main(["twin", "--encoder", "vit"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped benchmark.main")
    assert codes == (130, 130)
    assert capsys.readouterr().err.splitlines() == [
        "benchmark.py accuracy: interrupted; finished files are kept, run the same command again to continue",
        "benchmark.py twin: interrupted"]  # it writes nothing to continue from
