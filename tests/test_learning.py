"""benchmark.py learning (bench/learning.py): curves whose points are real pre-training checkpoints."""
import json
import re
from xml.etree import ElementTree

import torch

from bench.learning import FINDINGS, LearningConfig, run, write_report
from checkpoint import load_checkpoint
from phantom import SynthConfig
from pretrain import pretrain

TINY = LearningConfig(corpus=SynthConfig(n=6, seed=7, size=48, thickness=(4.0, 5.0), workers=1),
                      cohort=SynthConfig(n=20, seed=0, size=48, thickness=(4.0, 5.0), workers=1), patients=16,
                      steps=4, every=2, batch_size=16, img_size=32, methods=("lecl", "supervised"), device="cpu")


def test_curves_stop_and_resume_into_the_uninterrupted_run_and_the_report_shows_them(tmp_path):
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
    # a re-run keeps every point and computes nothing again
    assert run(TINY, tmp_path / "out", tmp_path / "work").points == curves.points
    write_report(curves, TINY, tmp_path / "out", "python benchmark.py learning --steps 4")
    kept = json.loads((tmp_path / "out/learning.json").read_text())["points"]
    table = (tmp_path / "out/learning.md").read_text()
    for method, name in (("lecl", "LeCL"), ("supervised", "supervised (ceiling)")):
        for finding in FINDINGS:
            cells = re.search(rf"\| {re.escape(name)} \| {finding} \| (.*) \|", table).group(1).split(" | ")
            assert [float(c) for c in cells] == [round(kept[f"{method}/{s}"][finding], 3) for s in (0, 2, 4)]
    svg = ElementTree.parse(tmp_path / "out/learning.svg").getroot()
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) == len(TINY.methods) * len(FINDINGS)
