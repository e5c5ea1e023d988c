""" dynconv ops: every `dynconv::` operation of the project, registered on import, and the functions over them.

`ddf` is the compiled op (needs ops._C, built by `pip install --no-build-isolation -e .`); `ddf_reference` has the
same signature and semantics in plain PyTorch. `HAS_EXT` tells whether ops._C imported. Layers pick one of the two
by name with `ddf_impl`. `odconv` (ops/odconv.py) is ODConv's convolution: its paths and the ops
`dynconv::odconv_*` (Python custom ops, registered whether or not ops._C is built). Every forward op also has an
ATen decomposition in torch._decomp's table, beside its other registrations, which torch.onnx.export(dynamo=True)
exports; torch.compile and torch.export keep the ops.
"""
from typing import Callable

import torch

from . import odconv
from .ddf import HAS_EXT, ddf
from .reference import ddf_reference

__all__ = ['ddf', 'ddf_reference', 'ddf_impl', 'odconv', 'HAS_EXT', 'backend_info']

_DDF_IMPLS = {'ext': ddf, 'reference': ddf_reference}


def ddf_impl(name: str) -> Callable[..., torch.Tensor]:
    """The ddf implementation a layer's `impl` argument names: 'ext' (`ddf`) or 'reference' (`ddf_reference`)."""
    if name not in _DDF_IMPLS:
        raise ValueError(f"impl must be one of {sorted(_DDF_IMPLS)}, got {name!r}")
    return _DDF_IMPLS[name]


def backend_info() -> dict:
    """Which backends of the extension are built and usable here.

    Returns:
        dict with 'cpu' (CPU kernels built), 'cuda_kernels' (CUDA kernels compiled in), 'gpu' (a CUDA device visible),
        'ops' (the registered `dynconv::` ops, sorted).
    """
    cuda_kernels = False
    if HAS_EXT:
        cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key('dynconv::ddf_forward', 'CUDA')
    names = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith('dynconv::'))
    return dict(cpu=HAS_EXT, cuda_kernels=cuda_kernels, gpu=torch.cuda.is_available(), ops=names)
