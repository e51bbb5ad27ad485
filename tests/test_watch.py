"""watch.py: the probe that `clear.py pretrain --probe-every` prints scores each mask label as slice_probe does on
the same slices, finds a planted label and not a random one, and leaves the run it watches unchanged."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clear  # noqa: E402
from cache import SliceCache  # noqa: E402
from pretrain import PretrainConfig, pretrain  # noqa: E402
import test_pretrain  # noqa: E402
from watch import LabelProbe, slice_probe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny
cohort = test_pretrain.cohort  # the fixture: 8 synthetic scans at 32 px, one set for this module


def fake_cache(n_scans=40, per_scan=12, seed=0):
    """A slice cache's fields, made by hand: (T, 1, 4, 4) uint8 slices of noise; label 3 on a quarter of the slices,
    which brightens pixel (0, 0); label 7 on another quarter, which changes nothing; label 9 on too few slices to
    score. Two scans per patient."""
    g = np.random.default_rng(seed)
    T = n_scans * per_scan
    slices = g.integers(0, 100, (T, 1, 4, 4)).astype(np.uint8)
    labels = g.random((T, 3)) < 0.25  # (T, 3): columns for the values 3, 7 and 9
    labels[:, 2] = np.arange(T) < 19  # label 9 on 19 slices: one fewer than the probe scores
    slices[labels[:, 0], 0, 0, 0] += 120
    cache = types.SimpleNamespace(slices=slices, size=4, scan=torch.arange(n_scans).repeat_interleave(per_scan),
                                  labels=torch.from_numpy(labels), label_values=[3, 7, 9])
    cache.read = lambda ids, device: SliceCache.read(cache, ids, device)  # the cache's own reader
    return cache, [f"P{i // 2}" for i in range(n_scans)]


def test_the_probe_scores_each_label_as_slice_probe_does_and_finds_the_planted_one():
    cache, patients = fake_cache()
    lines = []
    probe = LabelProbe(cache, torch.arange(len(cache.scan)), patients, 4, every=5, log=lines.append, n=10_000)
    assert probe(3, nn.Flatten()) is None and not lines  # step 4 of a probe every 5: not yet
    rng = torch.get_rng_state()
    aucs = probe(4, nn.Flatten())
    assert torch.equal(rng, torch.get_rng_state())  # it draws nothing from the global generator
    assert len(lines) == 1 and lines[0].startswith("step 5:") and f"3={aucs[3]:.3f}  7={aucs[7]:.3f}" in lines[0]
    assert lines[0].endswith("(not scored, too few slices with or without them: 9)") and np.isnan(aucs[9])
    # the same figures from the slices themselves, grouped by scan by hand
    x = torch.from_numpy(cache.slices).float().flatten(1) / 255  # (T, 16)
    by_scan = [cache.scan == s for s in range(40)]
    for j, value in enumerate(cache.label_values[:2]):
        want = slice_probe([x[m] for m in by_scan], [cache.labels[m, j] for m in by_scan], patients)
        assert aucs[value] == pytest.approx(want, abs=1e-9)
    assert aucs[3] > 0.95 and 0.35 < aucs[7] < 0.65, aucs  # the planted label, and one that changes nothing


def test_the_probe_draws_its_slices_from_the_pool_alone():
    cache, patients = fake_cache()
    pool = torch.arange(0, len(cache.scan), 3)  # every third slice
    probe = LabelProbe(cache, pool, patients, 4, every=1, log=lambda line: None, n=50)
    assert len(probe.ids) == 50 == len(set(probe.ids.tolist())) and probe.counts.sum() == 50
    assert set(probe.ids.tolist()) <= set(pool.tolist())  # each sampled slice is one of the pool's
    x = torch.from_numpy(cache.slices[probe.ids.numpy()]).float() / 255  # (50, 1, 4, 4), read by hand
    assert torch.equal(probe.slices(probe.ids), x)
    small = LabelProbe(cache, pool, patients, 2, every=1, log=lambda line: None, n=50)  # a cache larger than S
    assert torch.allclose(small.slices(small.ids), F.avg_pool2d(x, 2))  # area: 2 x 2 means


def test_a_run_with_the_probe_ends_with_the_weights_of_one_without(cohort):
    """The probe embeds slices with the encoder between steps, in eval mode: BatchNorm's running statistics are
    read, not updated. cnn-micro has BatchNorm, so a probe that ran in train mode, or left the encoder in eval
    mode, would change the weights and the statistics."""
    cfg = PretrainConfig(encoder="cnn", size="micro", img_size=32, steps=6, batch_size=16, mlp_dim=64, proj_dim=32,
                         device="cpu")
    lines = []
    runs = [pretrain(cfg, cohort / "c", cohort / f"{k}.pt", cache=cohort / "cache", probe_every=k, log=lines.append)
            for k in (0, 2)]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 2", "step 4", "step 6"]
    plain, watched = (r.model.state_dict() for r in runs)
    assert any("running_mean" in k for k in plain)
    for k, v in plain.items():
        assert torch.equal(v, watched[k]), k
    assert runs[0].losses == runs[1].losses


def test_a_negative_probe_interval_is_one_line(cohort, tmp_path, capsys):
    code = clear.main(["pretrain", "--data", str(cohort / "c"), "--out", str(tmp_path / "x.pt"),
                       "--probe-every", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--probe-every" in err[0], err
