"""The selective scan of Mamba (Gu & Dao 2023, Alg. 2) in plain PyTorch: no Triton, no CUDA needed."""
from .scan import selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref"]
