"""Tests marked `cuda` are skipped, each with its reason, where torch sees no CUDA device."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs it on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
