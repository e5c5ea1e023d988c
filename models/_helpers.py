"""The project's one checkpoint loader, for every entry point: train.py (--initial-checkpoint, --pretrained-path,
--pretrained, --resume), validate.py (--checkpoint, --pretrained), the scripts and the tests.

Released checkpoints of the original repositories are pickles written by old training scripts. They are read with
`torch.load(weights_only=True)` under a short allowlist of harmless types, so nothing pickled can run code; a file
that holds anything else is refused as unsafe. `load_weights` unwraps the release formats (timm `CheckpointSaver`,
ODConv `main.py`, Swin-style `main.py` of DWNet, the torchvision ImageNet example), strips DataParallel/DDP
`module.` and torch.compile `_orig_mod.` prefixes, applies the model module's `checkpoint_filter_fn` (timm
convention) and loads strictly, reporting missing, unexpected and mis-shaped keys when the file belongs to another
model. When fine-tuning starts from a file (`adapt=True`) only a classifier that differs may be left out.

EMA weights: every entry point loads a file's own weights ('state_dict' or 'model') unless asked for the EMA ones
(`--use-ema`: 'state_dict_ema' or 'model_ema'); a file that holds only EMA weights gives those, and says so.
"""
import argparse
import collections
import logging
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

__all__ = [
    'CheckpointError', 'SAFE_GLOBALS', 'load_checkpoint_file', 'unwrap_state_dict', 'state_dict_mismatch',
    'load_weights', 'pretrained_file', 'project_models',
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
# Prefixes of wrapped models' state_dicts: DataParallel/DDP, torch.compile.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_MAX_LISTED_KEYS = 6


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the problem and the fix."""


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _refused_globals(path: str, exc: BaseException) -> List[str]:
    """The globals the weights_only unpickler refused (none: the file is damaged, not unsafe)."""
    named = re.findall(r'GLOBAL ([\w.]+)', str(exc))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            listed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # zip files only; the unpickler's own message still names the first refused global
        listed = []
    return list(dict.fromkeys(listed + named))


def load_checkpoint_file(path: str, map_location: Any = 'cpu') -> Any:
    """Read a checkpoint file without running pickled code.

    Args:
        path: A `torch.save` file (zip or legacy pickle) or a `.safetensors` file.
        map_location: Passed to `torch.load`; releases saved on GPU hold CUDA tensors.

    Returns:
        Whatever the file holds (a state_dict or a dict wrapping one).

    Raises:
        CheckpointError: The file is missing, empty, not a checkpoint, truncated, or refused as unsafe because it
            holds pickled objects outside `SAFE_GLOBALS` (those are refused, never run).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check the path')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'{path} is empty (0 bytes), so it is not a PyTorch checkpoint: copy it again')
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
        refused = _refused_globals(path, e)
        if not refused:
            raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({_short(e)}): copy it again') from e
        raise CheckpointError(
            f'checkpoint {path} refused as unsafe: it holds pickled objects outside the allowlist '
            f'({", ".join(refused)}); nothing was run. Re-save only its weights (torch.save(model.state_dict(), ...)) '
            'where you trust the file') from e
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({_short(e)}): copy it again') from e


def _strip_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Find the weights inside a loaded checkpoint and return them as a flat state_dict.

    Handles a plain state_dict, {'state_dict'} (timm, ODConv and torchvision-style scripts), {'model'} (Swin-style
    scripts), {'state_dict_ema'} (timm EMA), DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes.

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
    return _strip_prefixes(dict(state_dict)), key


def _misshaped_keys(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    own = model.state_dict()
    return [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]


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
        f'{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}' for k in _misshaped_keys(model, state_dict)]
    return missing, unexpected, misshaped


def _listed(name: str, keys: List[str]) -> str:
    more = f', +{len(keys) - _MAX_LISTED_KEYS} more' if len(keys) > _MAX_LISTED_KEYS else ''
    return f'{len(keys)} {name} [{", ".join(keys[:_MAX_LISTED_KEYS])}{more}]'


def _model_name(model: nn.Module) -> str:
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)


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


def _cfg_names(model: nn.Module, field: str) -> Tuple[str, ...]:
    """Module names a pretrained cfg field ('classifier', 'first_conv') gives, as a tuple."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get(field) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _classifier_names(model: nn.Module) -> Tuple[str, ...]:
    """The classifier's module names: the pretrained cfg's 'classifier', else where `get_classifier()` sits."""
    names = _cfg_names(model, 'classifier')
    if names or not callable(getattr(model, 'get_classifier', None)):
        return names
    head = model.get_classifier()
    return tuple(name for name, m in model.named_modules() if m is head and name)


def _is_classifier_key(key: str, names: Tuple[str, ...]) -> bool:
    return any(key.startswith(name + '.') for name in names)


def _adapt_for_fine_tuning(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        source: str,
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Drop a classifier that differs from the model's; adapt an input conv to the model's input channels.

    Returns:
        The state_dict to load and the model keys it may leave out (the classifier's).
    """
    own = model.state_dict()
    names = _classifier_names(model)
    own_head = [k for k in own if _is_classifier_key(k, names)]
    file_head = [k for k in state_dict if _is_classifier_key(k, names)]
    fits = sorted(own_head) == sorted(file_head) and all(state_dict[k].shape == own[k].shape for k in own_head)
    if own_head or file_head:
        if fits:
            own_head = []
        else:
            weight = next((k for k in file_head if k.endswith('.weight')), None)
            file_classes = f'{state_dict[weight].shape[0]} classes' if weight else 'none'
            state_dict = {k: v for k, v in state_dict.items() if k not in file_head}
            _logger.info(f'{source}: classifier {", ".join(names)} not loaded (checkpoint: {file_classes}, model: '
                         f'{getattr(model, "num_classes", "?")} classes); it starts from its initialisation.')
    for name in _cfg_names(model, 'first_conv'):
        key = name + '.weight'
        if key not in state_dict or key not in own or state_dict[key].shape == own[key].shape:
            continue
        file_w, own_w = state_dict[key], own[key]
        if file_w.ndim != 4 or file_w.shape[0] != own_w.shape[0] or file_w.shape[2:] != own_w.shape[2:]:
            continue  # not a difference of input channels: reported as mis-shaped
        try:
            state_dict = {**state_dict, key: adapt_input_conv(own_w.shape[1], file_w)}
        except NotImplementedError:
            continue
        _logger.info(f'{source}: input conv {name} adapted from {file_w.shape[1]} to {own_w.shape[1]} channels.')
    return state_dict, own_head


def _prefix_hint(unexpected: List[str], model_keys: List[str]) -> str:
    """A hint when every unexpected key carries one prefix that the model's keys lack (e.g. 'backbone.')."""
    if not unexpected:
        return ''
    model_keys = set(model_keys)
    first = unexpected[0]
    for end in [i + 1 for i, c in enumerate(first) if c == '.']:
        prefix = first[:end]
        if all(k.startswith(prefix) for k in unexpected) and any(k[end:] in model_keys for k in unexpected):
            return f"; its keys carry the prefix '{prefix}' that the model's lack: re-save the weights without it"
    return ''


def _is_identity(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Identity)
    except AttributeError:
        return False


def _mismatch_message(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        source: str,
        missing: List[str],
        unexpected: List[str],
) -> str:
    misshaped = _misshaped_keys(model, state_dict)
    own = model.state_dict()
    parts = '; '.join(_listed(n, k) for n, k in (
        ('missing', missing), ('unexpected', unexpected),
        ('mis-shaped', [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}' for k in misshaped])) if k)
    name = _model_name(model)
    folded = [k for k in unexpected if k.endswith('.running_mean') and _is_identity(model, k.rsplit('.', 1)[0])]
    if folded:
        return (f'checkpoint {source} does not fit model {name}: the model is reparameterized (its BatchNorms are '
                f'folded, e.g. {folded[0].rsplit(".", 1)[0]}): load the weights into the model as built, then call '
                f'timm.utils.reparameterize_model')
    head = [k for k in misshaped if _is_classifier_key(k, _classifier_names(model))]
    if head and len(head) == len(misshaped) and not missing and not unexpected:
        weight = next((k for k in head if k.endswith('.weight')), head[0])
        file_classes, own_classes = state_dict[weight].shape[0], own[weight].shape[0]
        return (f'checkpoint {source} has {file_classes} classes but model {name} has {own_classes}: {parts}. Pass '
                f'--num-classes {file_classes} (to fine-tune on other classes, start from it with train.py '
                '--pretrained-path)')
    return (f'checkpoint {source} does not fit model {name}: {parts}. Check --model, --model-kwargs and '
            f'--num-classes{_prefix_hint(unexpected, list(own))}')


def load_weights(
        model: nn.Module,
        checkpoint: Union[str, os.PathLike, Dict[str, Any]],
        use_ema: bool = False,
        filter_fn: Optional[Callable] = None,
        adapt: bool = False,
        source: Optional[str] = None,
) -> Dict[str, Any]:
    """Load a checkpoint's weights into a model, whatever release format it has; strict unless `adapt`.

    Args:
        model: The model (its own `checkpoint_filter_fn` maps foreign key layouts).
        checkpoint: A checkpoint file, or what `load_checkpoint_file` returned for one.
        use_ema: Load the EMA weights of a training checkpoint (an error if it has none).
        filter_fn: Overrides the model module's `checkpoint_filter_fn(state_dict, model)`.
        adapt: Fine-tuning start (--pretrained, --pretrained-path): a classifier that differs from the model's (other
            classes, or absent on one side) is left at its initialisation, said in one log line, and an input conv
            for other input channels is adapted (timm's `adapt_input_conv`). Anything else must fit.
        source: Names the checkpoint in messages (default: its path).

    Returns:
        The checkpoint's scalar metadata (e.g. 'epoch', 'arch', 'best_acc') plus 'weights_key', the top-level key
        the weights came from (None for a plain state_dict).

    Raises:
        CheckpointError: Unreadable or unsafe file, or weights that do not fit the model (keys listed).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or os.fspath(checkpoint)
        checkpoint = load_checkpoint_file(checkpoint)
    source = source or 'checkpoint'
    try:
        state_dict, key = unwrap_state_dict(checkpoint, use_ema=use_ema)
        filter_fn = filter_fn or _model_filter_fn(model)
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
    except (CheckpointError, ValueError, KeyError) as e:
        raise CheckpointError(f'{source}: {_short(e)}') from None
    left_out = []
    if adapt:
        state_dict, left_out = _adapt_for_fine_tuning(model, state_dict, source)
    missing, unexpected, misshaped = state_dict_mismatch(model, state_dict)
    missing = [k for k in missing if k not in left_out]
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(model, state_dict, source, missing, unexpected))
    model.load_state_dict(state_dict, strict=not left_out)
    meta = {}
    if key is not None:
        for k, v in checkpoint.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                meta[k] = v.item()  # accuracies saved as tensors (ODConv, torchvision-style scripts)
            elif isinstance(v, (int, float, str)):
                meta[k] = v
    meta['weights_key'] = key
    _logger.info(f'Loaded {source} ({key or "plain state_dict"}).')
    return meta


def _download_from_hf(hub_id: Union[str, Tuple[str, str]]) -> str:
    """The cached file of a hub id (timm's precedence: model.safetensors, then pytorch_model.bin)."""
    from huggingface_hub.utils import EntryNotFoundError
    from timm.models._hub import download_from_hf
    if isinstance(hub_id, (tuple, list)):
        return download_from_hf(*hub_id)
    try:
        return download_from_hf(hub_id, 'model.safetensors')
    except EntryNotFoundError:
        return download_from_hf(hub_id, 'pytorch_model.bin')


def pretrained_file(model: nn.Module) -> str:
    """The local file of the weights the model's pretrained cfg names (timm's source precedence).

    A cfg `file` is used as it is; Hugging Face hub and url weights are downloaded into timm's cache first, then read
    by `load_weights` like any other file (never by timm's loader).
    """
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import download_cached_file
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    load_from, location = _resolve_pretrained_source(cfg)
    name = _model_name(model)
    try:
        if load_from == 'file':
            return location
        if load_from == 'local-dir':
            files = [os.path.join(location, f) for f in ('model.safetensors', 'pytorch_model.bin')]
            return next((f for f in files if os.path.isfile(f)), files[0])
        if load_from == 'hf-hub':
            return _download_from_hf(location)
        if load_from == 'url':
            return download_cached_file(location)
    except Exception as e:  # network and hub errors come in many types; each ends in the same advice
        raise CheckpointError(
            f'cannot download the pretrained weights of {name} ({_short(e)}): download them and pass the file '
            'with --pretrained-path (train.py) or --checkpoint (validate.py)') from None
    raise CheckpointError(
        f'model {name} names no pretrained weights to download: pass a release file with --pretrained-path '
        '(train.py) or --checkpoint (validate.py)')


def project_models() -> List[str]:
    """Names of the models this project registers into timm (entrypoints defined in the `models` package)."""
    package = __name__.rpartition('.')[0]
    return [
        name for name in timm.list_models()
        if timm.models.model_entrypoint(name).__module__.startswith(package + '.')]
