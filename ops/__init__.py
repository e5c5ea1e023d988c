""" dynconv ops: compiled dynamic-filter operations (C++ CPU and CUDA kernels) and their pure-PyTorch references.

`ddf` is the compiled op (needs ops._C, built by `pip install --no-build-isolation -e .`); `ddf_reference` has the
same signature and semantics in plain PyTorch. `HAS_EXT` tells whether ops._C imported.
"""
import torch

from .ddf import HAS_EXT, ddf
from .reference import ddf_reference

__all__ = ['ddf', 'ddf_reference', 'HAS_EXT', 'backend_info']


def backend_info() -> dict:
    """Which backends of the extension are built and usable here.

    Returns:
        dict with 'cpu' (CPU kernels built), 'cuda_kernels' (CUDA kernels compiled in), 'gpu' (a CUDA device visible).
    """
    cuda_kernels = False
    if HAS_EXT:
        cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key('dynconv::ddf_forward', 'CUDA')
    return dict(cpu=HAS_EXT, cuda_kernels=cuda_kernels, gpu=torch.cuda.is_available())
