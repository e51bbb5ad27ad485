"""The GPU paths' logic, checked on a CPU: which GPU a process takes, which autocast dtype a GPU gets, checkpoints
written on a GPU read on a CPU, the CUDA RNG state a checkpoint keeps, the memory meter's choice of counter, and the
bag manifest's precision. torch.cuda's answers are patched where the logic asks them; tests/test_cuda.py runs the
same paths on a real GPU."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.serialization

import lecl
import pretrain
from bench import speed
from checkpoint import load_checkpoint, make_checkpoint, restore, rng_state
from cohort import Cohort
from extract import EncoderSpec, extract_bags, load_encoder
from files import ClearError, amp_dtype, load_untrusted, pick_device
from models import build_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as it answers on a machine with two GPUs (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return monkeypatch


def test_a_gpu_without_index_is_this_torchrun_process_s_own(two_gpus):
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda", 0)  # no torchrun: the first
    two_gpus.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # an index given is kept
    assert pick_device("cpu") == torch.device("cpu")
    assert pretrain._join("auto")[:3] == (torch.device("cuda", 1), 0, 1)  # pre-training takes the same GPU
    two_gpus.setenv("LOCAL_RANK", "2")
    with pytest.raises(ClearError, match="GPU 2 asked for .*torch sees 2"):
        pick_device("auto")


def test_no_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ClearError, match="no CUDA device"):
        pick_device("cuda")


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """A V100 or T4 emulates bf16: torch.cuda.is_bf16_supported() says yes unless told not to count emulation."""
    assert amp_dtype("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert amp_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("cuda") == torch.float16  # V100, T4: fp16, and pre-training's GradScaler with it
    assert "is_bf16_supported" not in (REPO / "pretrain.py").read_text()  # pre-training asks amp_dtype


def _save_as_if_on_gpu(obj, path, monkeypatch):
    """torch.save with every storage tagged "cuda:0", as a checkpoint written on a GPU is."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


def test_a_checkpoint_written_on_a_gpu_is_read_on_a_cpu(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = lecl.MoCo(build_encoder("vit", "tiny", 3, 32), proj_dim=16, mlp_dim=32)
    opt = torch.optim.AdamW(model.parameters())
    ck = make_checkpoint(model, opt, torch.amp.GradScaler("cpu", enabled=False), pretrain.PretrainConfig(img_size=32),
                         1, 2, [1.0], [2.0], {})
    _save_as_if_on_gpu(ck, tmp_path / "gpu.pt", monkeypatch)
    if not torch.cuda.is_available():  # what a plain torch.load does with it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    back = load_checkpoint(tmp_path / "gpu.pt")
    assert all(v.device.type == "cpu" and torch.equal(v, ck["encoder"][k]) for k, v in back["encoder"].items())
    assert load_untrusted(tmp_path / "gpu.pt", "x")["step"] == 1
    encoder, identity, _ = load_encoder(EncoderSpec(checkpoint=str(tmp_path / "gpu.pt")))  # extraction reads it
    assert identity["name"] == "vit"


def test_every_torch_load_of_the_code_goes_through_load_untrusted():
    """files.load_untrusted is the one torch.load of the code (weights_only, and map_location="cpu" so that a
    checkpoint written on a GPU is read on a CPU); the tests read their own files as they like."""
    found = [f"{p.relative_to(REPO)}:{i}" for p in sorted(REPO.rglob("*.py")) if "tests" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"torch\.load\((?!weights_only)", line) and p.name != "files.py"]  # not prose
    assert not found, found


def test_a_checkpoint_keeps_the_cuda_rng_state_of_its_own_gpu_alone(two_gpus):
    """Reading every GPU's RNG state (get_rng_state_all) opens a CUDA context on each, in every process."""
    calls = []

    def refuse(*args):
        raise AssertionError("reads or writes the RNG state of every GPU")

    two_gpus.setattr(torch.cuda, "get_rng_state_all", refuse)
    two_gpus.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = torch.zeros(8, dtype=torch.uint8)
    two_gpus.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or state)
    two_gpus.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device)))
    torch.manual_seed(0)
    model = lecl.MoCo(build_encoder("vit", "tiny", 3, 32), proj_dim=16, mlp_dim=32)
    opt, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    ck = make_checkpoint(model, opt, scaler, pretrain.PretrainConfig(img_size=32), 1, 2, [1.0], [2.0], {})
    assert ck["state"]["rng"]["cuda"] == [] and calls == []  # a model on the CPU: no CUDA call at all
    gpu1 = torch.device("cuda", 1)
    assert len(rng_state(gpu1)["cuda"]) == 1 and calls == [("get", gpu1)]
    ck["state"]["rng"]["cuda"] = rng_state(gpu1)["cuda"]
    restore(ck, model, opt, scaler, gpu1)
    assert calls[-1] == ("set", gpu1)


def test_peak_memory_of_cpu_work_never_asks_the_cuda_allocator(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: asked.append(name))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: asked.append("allocated") or 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: asked.append("max") or 100 + 2**26)
    peak = speed.peak_memory(lambda: torch.ones(2**24).add_(1), "cpu")  # 64 MiB on the CPU
    # the resident-set rise is the CPU's answer (0 where the heap reuses pages already resident), never the GPU's
    assert asked == [] and (peak is None or peak >= 0)
    assert speed.peak_memory(lambda: None, torch.device("cuda", 0)) == 2**26 and "max" in asked


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_bags_of_two_precisions_never_share_a_folder(tmp_path):
    import phantom
    import synth

    synth.write_cohort(phantom.SynthConfig(n=2, size=32, thickness=(8.0, 10.0), workers=1), tmp_path / "c")
    cohort = Cohort(tmp_path / "c")
    encoder, identity, slices = load_encoder(EncoderSpec(name="vit", img_size=32))
    bags = tmp_path / "bags"
    assert [e[0] for e in extract_bags(cohort, encoder, identity, slices, bags, shard=(0, 2))] == ["done"]
    assert _manifest(bags)["compute"] == "cpu, float32"
    gpu = {**_manifest(bags), "compute": "cuda, bfloat16 autocast"}  # as a GPU writes it
    (bags / "manifest.json").write_text(json.dumps(gpu))
    with pytest.raises(ClearError, match="computed as cuda, bfloat16 autocast, this run computes them as cpu, "
                                         "float32"):
        list(extract_bags(cohort, encoder, identity, slices, bags, shard=(1, 2)))
    unrecorded = {k: v for k, v in gpu.items() if k != "compute"}  # a CPU folder whose manifest has no "compute"
    (bags / "manifest.json").write_text(json.dumps(unrecorded))
    assert [e[0] for e in extract_bags(cohort, encoder, identity, slices, bags, shard=(1, 2))] == ["done"]


def test_the_gpu_check_script_parses_and_without_a_gpu_stops_in_one_line(tmp_path):
    import subprocess

    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: the script would run")
    import sys

    run = subprocess.run(["bash", str(script), str(tmp_path / "r.md")], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "no CUDA device" in run.stderr, run
    assert not (tmp_path / "r.md").exists()
