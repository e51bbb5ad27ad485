"""benchmark.py learning (bench/learning.py): curves whose points are real pre-training checkpoints."""
import json
import re
from dataclasses import replace
from xml.etree import ElementTree

import pytest
import torch

from bench import learning
from bench.learning import FINDINGS, LearningConfig, run, write_report
from checkpoint import load_checkpoint
from extract import EncoderSpec, load_encoder
from files import ClearError
from models import build_encoder
from phantom import SynthConfig
from pretrain import pretrain

TINY = LearningConfig(corpus=SynthConfig(n=6, seed=7, size=48, thickness=(4.0, 5.0), workers=1),
                      cohort=SynthConfig(n=20, seed=0, size=48, thickness=(4.0, 5.0), workers=1), patients=16,
                      steps=4, every=2, batch_size=16, img_size=32, methods=("lecl", "supervised"), device="cpu")


def test_curves_stop_and_resume_into_the_uninterrupted_run_and_the_report_shows_them(tmp_path, monkeypatch):
    curves = run(TINY, tmp_path / "out", tmp_path / "work")
    assert sorted(curves.points) == ["lecl/0", "lecl/2", "lecl/4", "supervised/0", "supervised/2", "supervised/4"]
    assert curves.points["lecl/0"] == curves.points["supervised/0"]  # one random init, the floor of both
    assert all(set(p) == set(FINDINGS) for p in curves.points.values())
    # the last point is the checkpoint an uninterrupted run makes: stopping and resuming changed nothing
    straight = pretrain(TINY.pretrain_config("lecl"), tmp_path / "work/corpus", tmp_path / "straight.pt",
                        cache=tmp_path / "work/cache")
    assert straight.step == 4 and not straight.interrupted
    stepped, whole = (load_checkpoint(p)["encoder"] for p in (tmp_path / "work/lecl.pt", tmp_path / "straight.pt"))
    assert all(torch.equal(stepped[k], whole[k]) for k in whole)
    # step 0 is the encoder pretrain starts from: the same seed builds the same weights
    torch.manual_seed(TINY.seed)
    built = build_encoder(TINY.encoder, TINY.size, len(TINY.windows), TINY.img_size).state_dict()  # 4 channels
    loaded = load_encoder(EncoderSpec(name=TINY.encoder, size=TINY.size, img_size=TINY.img_size,
                                      windows=TINY.hu_windows()))[0].state_dict()
    assert built["stem.0.weight"].shape[1] == 4  # the first conv takes one channel per window
    assert all(torch.equal(built[k], loaded[k]) for k in built)
    # a re-run keeps every point and trains nothing; a point lost between a checkpoint and its twin test is made
    # again from that checkpoint; a run of one method keeps the other's curve
    record = json.loads((tmp_path / "out/learning.json").read_text())
    del record["points"]["supervised/4"]
    (tmp_path / "out/learning.json").write_text(json.dumps(record))
    monkeypatch.setattr(learning, "pretrain", lambda *a, **k: pytest.fail("trained again"))
    again = run(replace(TINY, methods=("supervised",)), tmp_path / "out", tmp_path / "work")
    assert again.points == curves.points
    with pytest.raises(ClearError, match="a run of other settings"):  # a checkpoint is never taken for another run
        run(replace(TINY, lr=1e-3), tmp_path / "out", tmp_path / "work")
    write_report(curves, TINY, tmp_path / "out", "python benchmark.py learning --steps 4")
    kept = json.loads((tmp_path / "out/learning.json").read_text())["points"]
    table = (tmp_path / "out/learning.md").read_text()
    for method, name in (("lecl", "LeCL"), ("supervised", "supervised (ceiling)")):
        for finding in FINDINGS:
            cells = re.search(rf"\| {re.escape(name)} \| {finding} \| (.*) \|", table).group(1).split(" | ")
            assert [float(c) for c in cells] == [round(kept[f"{method}/{s}"][finding], 3) for s in (0, 2, 4)]
    svg = ElementTree.parse(tmp_path / "out/learning.svg").getroot()
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) == len(TINY.methods) * len(FINDINGS)


@pytest.mark.parametrize("cfg, out", [(LearningConfig(), "results"),
                                      (replace(LearningConfig(), encoder="gcnn", steps=300), "results/gcnn"),
                                      (replace(LearningConfig(), lesion_weight=0.0, seed=1), "results/lecl-w0"),
                                      (replace(LearningConfig(), img_size=128, every=300), "results/cnn-128"),
                                      (replace(LearningConfig(), temperature=0.1, every=200), "results/lecl-tau01"),
                                      (replace(LearningConfig(), lesion_labels=(10,), lesion_weight=0.0, every=200),
                                       "results/lecl-emphysema-w0"),
                                      (replace(LearningConfig(), levels=(0.52, 0.88), every=200),
                                       "results/lecl-chest"),
                                      (replace(LearningConfig(), matched_levels=False, windows=("lung", "soft", "bone"),
                                               seed=2), "results/lecl-seed2")])
def test_the_report_s_command_makes_the_curves_it_shows(cfg, out):
    """learning.md names the command that makes its curves, whichever runs (--methods, --work) filled it: read back
    through benchmark.py's own parser, it gives the same settings and the same folder."""
    import shlex

    import benchmark

    line = learning.command_line(cfg, out)
    args = benchmark.build_parser().parse_args(shlex.split(line)[2:])
    assert line.startswith("python benchmark.py learning") and "--methods" not in line and "--work" not in line
    assert learning.config_from(args) == cfg and (args.out or "results") == out
