"""The GPU paths on a GPU (skipped without one; bench/gpu_check.sh runs them): the scan against the CPU reference and
under autocast, pre-training of each encoder under AMP with an exact-enough resume, a checkpoint written on the GPU
read on the CPU, bags from the GPU against the CPU's, the memory meter. tests/test_devices.py checks the same logic
on a CPU with torch.cuda's answers patched."""
import json

import pytest
import torch

import phantom
import synth
from bench import speed
from checkpoint import load_checkpoint
from cohort import Cohort
from extract import EncoderSpec, extract_bags, load_encoder
from files import ClearError, amp_dtype, pick_device
from pretrain import PretrainConfig, pretrain
from test_scan import assert_rel_close, make_inputs
from triton_scan import selective_scan, selective_scan_ref

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("method", ["chunked", "parallel"])
def test_scan_on_the_gpu_equals_the_cpu_reference(method):
    inputs = make_inputs(2, 16, 8, 300, seed=7)
    dy = torch.randn(2, 16, 300, generator=torch.Generator().manual_seed(8))
    cpu = [t.clone().requires_grad_() for t in inputs]
    gpu = [t.to(GPU).requires_grad_() for t in inputs]
    want = selective_scan_ref(*cpu, delta_softplus=True)
    got = selective_scan(*gpu, delta_softplus=True, method=method)
    assert_rel_close(got.cpu(), want, 1e-4, "y")
    for name, g, w in zip("u delta A B C D z bias".split(), torch.autograd.grad(got, gpu, dy.to(GPU)),
                          torch.autograd.grad(want, cpu, dy)):
        assert_rel_close(g.cpu(), w, 1e-3, name)


def test_scan_under_cuda_autocast_computes_in_float32():
    inputs = [t.to(GPU) for t in make_inputs(2, 16, 8, 100, seed=9)]
    want = selective_scan(*inputs, delta_softplus=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = selective_scan(*inputs, delta_softplus=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_device_and_precision_of_this_gpu():
    assert pick_device("auto") == GPU
    major, _ = torch.cuda.get_device_capability(GPU)
    assert amp_dtype(GPU) == (torch.bfloat16 if major >= 8 else torch.float16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    synth.write_cohort(phantom.SynthConfig(n=6, size=48, thickness=(8.0, 10.0), workers=1), root / "c")
    return root


@pytest.mark.parametrize("encoder", ["vit", "gcnn", "ssm", "cnn"])
def test_pretraining_under_amp_resumes_as_a_straight_run(cohort, encoder):
    """Six AMP steps straight, and three then a resume for three: finite losses, the same losses within AMP's
    tolerance (the GPU's kernels need not be bit-exact), and a checkpoint the CPU reads."""
    cfg = PretrainConfig(encoder=encoder, steps=6, batch_size=16, img_size=32, mlp_dim=128, proj_dim=64, lr=0.002,
                         device="cuda", checkpoint_every=100)
    cache = cohort / "cache"
    straight = pretrain(cfg, cohort / "c", cohort / f"{encoder}-straight.pt", cache=cache)
    calls = iter(range(100))
    cut = pretrain(cfg, cohort / "c", cohort / f"{encoder}-cut.pt", cache=cache,
                   should_stop=lambda: next(calls) == 2)  # stops after its third step
    assert cut.interrupted and cut.step == 3
    resumed = pretrain(cfg, cohort / "c", cohort / f"{encoder}-cut.pt", resume=cohort / f"{encoder}-cut.pt",
                       cache=cache)
    assert all(torch.isfinite(torch.tensor(straight.losses))) and len(resumed.losses) == 6
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses), rtol=2e-2, atol=2e-2)
    ck = load_checkpoint(cohort / f"{encoder}-cut.pt")
    assert all(t.device.type == "cpu" for t in ck["encoder"].values()) and len(ck["state"]["rng"]["cuda"]) == 1


@pytest.mark.parametrize("encoder", ["vit", "gcnn", "ssm", "cnn"])
def test_bags_from_the_gpu_equal_the_cpu_s_within_autocast_tolerance(cohort, encoder):
    data = Cohort(cohort / "c")
    enc, identity, slices = load_encoder(EncoderSpec(name=encoder, img_size=32))
    for device, folder in ((torch.device("cpu"), "cpu"), (GPU, "gpu")):
        list(extract_bags(data, enc, identity, slices, cohort / f"bags-{encoder}-{folder}", device=device))
    manifest = json.loads((cohort / f"bags-{encoder}-gpu" / "manifest.json").read_text())
    assert manifest["compute"].startswith("cuda, ") and manifest["compute"].endswith(" autocast")
    for scan in data.scans:
        cpu, gpu = (torch.load(cohort / f"bags-{encoder}-{d}" / f"{scan.scan}.pt", weights_only=True)["features"]
                    for d in ("cpu", "gpu"))
        err = (gpu - cpu).norm(dim=1) / cpu.norm(dim=1)  # per slice
        assert err.max() < 0.05, (scan.scan, err.max().item())
    with pytest.raises(ClearError, match="two precisions"):  # and the CPU does not write into the GPU's folder
        list(extract_bags(data, enc, identity, slices, cohort / f"bags-{encoder}-gpu"))


def test_peak_memory_on_the_gpu_sees_an_allocation():
    peak = speed.peak_memory(lambda: torch.ones(2**24, device=GPU).add_(1), GPU)  # 64 MiB
    assert 2**26 <= peak < 2**28
