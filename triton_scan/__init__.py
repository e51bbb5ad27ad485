"""The selective scan of Mamba (Gu & Dao 2023, Alg. 2) in plain PyTorch: no Triton, no CUDA needed.
See triton_scan/README.md for the recurrence, its parallel form and the measured choice of default."""
from .chunked import scan_chunked
from .parallel import linear_scan, scan_parallel
from .scan import default_method, selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "default_method", "scan_chunked", "scan_parallel",
           "linear_scan"]
