"""Checkpoint loading shared by validate.py, the scripts and the tests.

Released checkpoints of the original repositories are pickles written by old training scripts. They are read with
`torch.load(weights_only=True)` under a short allowlist of harmless types, so nothing pickled can run code. The loader
unwraps the release formats (timm `CheckpointSaver`, ODConv `main.py`, Swin-style `main.py` of DWNet, the torchvision
ImageNet example), applies the model module's `checkpoint_filter_fn` (timm convention) and loads strictly, reporting
missing, unexpected and mis-shaped keys when the file belongs to another model.
"""
import argparse
import collections
import logging
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
from torch import nn

__all__ = [
    'CheckpointError', 'SAFE_GLOBALS', 'load_checkpoint_file', 'unwrap_state_dict', 'state_dict_mismatch',
    'load_checkpoint', 'project_models',
]

_logger = logging.getLogger(__name__)

# Harmless types found in the pickles of the original releases. Each one only builds plain data.
SAFE_GLOBALS = [
    # timm-era CheckpointSaver (ddfnet train.py) stores the run's arguments under 'args'.
    argparse.Namespace,
    # Already a torch default; listed so this allowlist names every container the releases use.
    collections.OrderedDict,
    # Metrics saved as numpy scalars (np.float64 accuracies); numpy < 2 pickled them under `numpy.core`.
    (np._core.multiarray.scalar, 'numpy.core.multiarray.scalar'),
    (np._core.multiarray.scalar, 'numpy._core.multiarray.scalar'),
    np.dtype,
    *sorted({type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)},
            key=lambda t: t.__name__),
    # DWNet's Swin-style main.py saves its yacs config under 'config'. A yacs CfgNode is a dict subclass whose extra
    # state is a few flags in __dict__; the weights_only unpickler only fills exact dict/OrderedDict types, so the
    # node is rebuilt as an OrderedDict (flags land in its __dict__). yacs itself is never imported.
    (collections.OrderedDict, 'yacs.config.CfgNode'),
]

# Keys under which training scripts nest the weights, in the order they are looked up.
_WEIGHT_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')
_MAX_LISTED_KEYS = 6


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the problem and the fix."""


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unpickler_reason(exc: BaseException) -> str:
    """The reason torch's weights_only unpickler gives, without its advice to disable it."""
    match = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)', str(exc))
    return match.group(1) if match else _short(exc)


def _refused_globals(path: str) -> List[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing is best effort on top of the refusal that already happened
        return []


def load_checkpoint_file(path: str, map_location: Any = 'cpu') -> Any:
    """Read a checkpoint file without running pickled code.

    Args:
        path: A `torch.save` file (zip or legacy pickle) or a `.safetensors` file.
        map_location: Passed to `torch.load`; releases saved on GPU hold CUDA tensors.

    Returns:
        Whatever the file holds (a state_dict or a dict wrapping one).

    Raises:
        CheckpointError: The file is missing, is not a checkpoint, is truncated, or holds pickled objects outside
            `SAFE_GLOBALS` (those are refused, never run).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check the path')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device=str(map_location))
        except SafetensorError as e:
            raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({_short(e)}): copy it again') from e
    with open(path, 'rb') as f:
        head = f.read(4)
    is_zip = head.startswith(b'PK\x03\x04')
    # torch.save writes a zip archive; torch < 1.6 wrote a protocol-2 pickle starting with its magic number (a LONG1).
    if not is_zip and head != b'\x80\x02\x8a\x0a':
        raise CheckpointError(
            f'{path} is not a PyTorch checkpoint (not written by torch.save): pass a .pth/.pth.tar file')
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt (its zip index is missing): copy it again')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'WeightsUnpickler error' not in str(e) or 'truncated' in str(e):
            raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({_short(e)}): copy it again') from e
        refused = ', '.join(_refused_globals(path)) or _unpickler_reason(e)
        raise CheckpointError(
            f'checkpoint {path} holds pickled objects outside the allowlist ({refused}); nothing was run. '
            'Re-save only its weights (torch.save(model.state_dict(), ...)) where you trust the file') from e
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({_short(e)}): copy it again') from e


def _strip_prefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Find the weights inside a loaded checkpoint and return them as a flat state_dict.

    Handles a plain state_dict, {'state_dict'} (timm, ODConv and torchvision-style scripts), {'model'} (Swin-style
    scripts), {'state_dict_ema'} (timm EMA) and DataParallel/DDP `module.` prefixes.

    Args:
        checkpoint: What `load_checkpoint_file` returned.
        use_ema: Take the EMA weights; an error if the file has none.

    Returns:
        (state_dict, key): the weights, and the top-level key they came from (None for a plain state_dict).
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint holds a {type(checkpoint).__name__}, not a state_dict or a dict of them')
    key = None
    if use_ema:
        key = next((k for k in _EMA_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if key is None:
            raise CheckpointError(
                f'checkpoint has no EMA weights (no {" or ".join(_EMA_KEYS)} entry): drop --use-ema')
    elif not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        key = next((k for k in _WEIGHT_KEYS + _EMA_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if key is None:
            raise CheckpointError(
                'checkpoint has no weights: expected a state_dict or one under '
                f'{", ".join(repr(k) for k in _WEIGHT_KEYS + _EMA_KEYS)}; found keys {sorted(map(str, checkpoint))}')
        if key in _EMA_KEYS:
            _logger.info(f'Checkpoint holds only EMA weights ({key}); using them.')
    state_dict = checkpoint if key is None else checkpoint[key]
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'checkpoint weights hold non-tensor entries {not_tensors[:_MAX_LISTED_KEYS]}')
    return _strip_prefix(dict(state_dict), 'module.'), key


def state_dict_mismatch(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
) -> Tuple[List[str], List[str], List[str]]:
    """Compare a state_dict with a model's.

    Returns:
        (missing, unexpected, mis-shaped) key lists; mis-shaped entries read `key (checkpoint shape vs model shape)`.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    return missing, unexpected, misshaped


def _listed(name: str, keys: List[str]) -> str:
    more = f', +{len(keys) - _MAX_LISTED_KEYS} more' if len(keys) > _MAX_LISTED_KEYS else ''
    return f'{len(keys)} {name} [{", ".join(keys[:_MAX_LISTED_KEYS])}{more}]'


def _model_filter_fn(model: nn.Module) -> Optional[Callable]:
    """The `checkpoint_filter_fn` of the module that registered the model (else of its class's module)."""
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    modules = []
    if arch and timm.is_model(arch):
        modules.append(timm.models.model_entrypoint(arch).__module__)
    modules.append(type(model).__module__)
    for name in modules:
        fn = getattr(sys.modules.get(name), 'checkpoint_filter_fn', None)
        if fn is not None:
            return fn
    return None


def load_checkpoint(
        model: nn.Module,
        path: str,
        use_ema: bool = False,
        filter_fn: Optional[Callable] = None,
) -> Dict[str, Any]:
    """Load a checkpoint file into a model strictly, whatever release format it has.

    Args:
        model: The model (its own `checkpoint_filter_fn` maps foreign key layouts).
        path: The checkpoint file.
        use_ema: Load the EMA weights of a timm training checkpoint.
        filter_fn: Overrides the model module's `checkpoint_filter_fn(state_dict, model)`.

    Returns:
        The checkpoint's scalar metadata (e.g. 'epoch', 'arch', 'best_acc') plus 'weights_key', the top-level key
        the weights came from (None for a plain state_dict).

    Raises:
        CheckpointError: Unreadable or unsafe file, or weights that do not fit the model (keys listed).
    """
    checkpoint = load_checkpoint_file(path)
    try:
        state_dict, key = unwrap_state_dict(checkpoint, use_ema=use_ema)
    except CheckpointError as e:
        raise CheckpointError(f'{path}: {e}') from None
    filter_fn = filter_fn or _model_filter_fn(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    missing, unexpected, misshaped = state_dict_mismatch(model, state_dict)
    if missing or unexpected or misshaped:
        parts = [_listed(n, k) for n, k in (
            ('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)) if k]
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
        raise CheckpointError(
            f'checkpoint {path} does not fit model {name}: {"; ".join(parts)}. '
            'Check --model, --model-kwargs and --num-classes')
    model.load_state_dict(state_dict, strict=True)
    meta = {}
    if key is not None:
        for k, v in checkpoint.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                meta[k] = v.item()  # accuracies saved as tensors (ODConv, torchvision-style scripts)
            elif isinstance(v, (int, float, str)):
                meta[k] = v
    meta['weights_key'] = key
    _logger.info(f'Loaded {path} ({key or "plain state_dict"}).')
    return meta


def project_models() -> List[str]:
    """Names of the models this project registers into timm (entrypoints defined in the `models` package)."""
    package = __name__.rpartition('.')[0]
    return [
        name for name in timm.list_models()
        if timm.models.model_entrypoint(name).__module__.startswith(package + '.')]
