"""Command-line pieces shared by train.py, validate.py and the scripts.

Bad user input raises `UsageError` (or the loader's `CheckpointError`) wherever it is found; each entry point turns
it into one `<prog>: error: <message>` line and exit status 2, never a traceback: train.py and validate.py with
`usage_errors` + `exit_status`, the scripts by handing the message to their parser's `error`.
"""
import difflib
import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional

import timm
import torch
from timm.data import create_dataset
from timm.data.readers.img_extensions import get_img_extensions

from models._helpers import CheckpointError

__all__ = [
    'UsageError', 'UsageExit', 'usage_errors', 'exit_status', 'check_model_name', 'create_model', 'resolve_device',
    'resolve_amp_dtype', 'check_dataset_root', 'create_image_split',
]

_logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad user input; the message is one line naming the problem and the fix."""


class UsageExit(SystemExit):
    """Ends an entry point on bad input; `code` is its `<prog>: error: <message>` line."""


@contextmanager
def usage_errors(prog: str):
    """Turns a UsageError or CheckpointError raised inside into UsageExit('<prog>: error: <message>')."""
    try:
        yield
    except (UsageError, CheckpointError) as e:
        raise UsageExit(f'{prog}: error: {e}') from None


def exit_status(main: Callable[[], Any]) -> int:
    """Runs an entry point's main(): its result, or 2 after printing the line of a UsageExit to stderr."""
    try:
        return main() or 0
    except UsageExit as e:
        print(e.code, file=sys.stderr)
        return 2


def check_model_name(name: str):
    """Raises a UsageError suggesting the closest registered names if `name` is not a registered model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}?' if close else 'list the names with timm.list_models()'
    raise UsageError(f"unknown model '{name}'; {hint}")


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model without pretrained weights (the loader reads those); bad arguments are a UsageError."""
    check_model_name(name)
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"model '{name}' rejected its arguments {kwargs}: {reason}") from None


def resolve_device(name: Optional[str]) -> torch.device:
    """`--device`: the named device (default: cuda when available, else cpu), which must exist here."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as e:
        raise UsageError(f'--device {name}: {str(e).splitlines()[0]}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine; use --device cpu')
    return device


def resolve_amp_dtype(name: str, device: torch.device, doing: str = 'training') -> torch.dtype:
    """The autocast dtype for `--amp-dtype name`; float16 on CPU falls back to bfloat16 with a warning."""
    dtype = getattr(torch, name)
    if dtype == torch.float16 and device.type == 'cpu':
        _logger.warning(f'float16 AMP is not offered on CPU; {doing} with bfloat16 autocast instead '
                        f'(pass --amp-dtype bfloat16 to silence this).')
        return torch.bfloat16
    return dtype


def check_dataset_root(name: str, root: str):
    """A folder dataset (`--dataset` empty) needs its root folder."""
    if not name and not os.path.isdir(root):
        raise UsageError(f'dataset folder {root} does not exist: pass the dataset root as DIR or --data-dir')


def _check_class_folders(folder: str, class_to_idx: Dict[str, int]):
    """An ImageFolder split needs one subfolder per class, each with images, and no images outside them."""
    entries = list(os.scandir(folder))
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UsageError(f"'{folder}' has no class subfolders: an ImageFolder needs one subfolder per class, "
                         f"{folder}/<class>/<image>")
    extensions = get_img_extensions()
    loose = sorted(e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions)
    if loose:
        raise UsageError(f"'{folder}' holds images outside class subfolders (e.g. '{loose[0]}'); move them into "
                         f"{folder}/<class>/")
    empty = [c for c in classes if c not in class_to_idx]
    if empty:
        raise UsageError(
            f'class folders without images in {folder}: {", ".join(empty[:5])} ({len(empty)} of {len(classes)}); a '
            'class folder that has no images shifts the indices of the classes after it: add images or remove it')


def create_image_split(
        name: str,
        root: str,
        split: str,
        split_required: bool = False,
        missing_split_hint: str = '',
        **dataset_kwargs,
):
    """timm's create_dataset for one split; the layout of an ImageFolder is checked, each problem a UsageError.

    Args:
        name: timm dataset name (`--dataset`); empty for an ImageFolder or ImageTar.
        root: The dataset root (`--data-dir`).
        split: The split, searched under root by timm (val/validation alike); without such a folder timm reads the
            root itself, which `split_required` forbids (train.py: the root holds train/ and val/, not classes).
        missing_split_hint: Added to the error for a missing required split folder.
        dataset_kwargs: Passed to create_dataset.
    """
    check_dataset_root(name, root)
    try:
        dataset = create_dataset(name, root=root, split=split, **dataset_kwargs)
    except (RuntimeError, FileNotFoundError, ValueError) as e:  # timm's folder reader: a folder without images
        raise UsageError(f'cannot read dataset {root} ({split} split): {str(e).splitlines()[0]}') from None
    reader = getattr(dataset, 'reader', None)
    class_to_idx: Optional[Dict[str, int]] = getattr(reader, 'class_to_idx', None)
    if class_to_idx is None or not os.path.isdir(getattr(reader, 'root', '')):
        return dataset
    if split_required and os.path.abspath(reader.root) == os.path.abspath(root):
        raise UsageError(f"no '{split}' folder in '{root}'; add {root}/{split}/{missing_split_hint}")
    _check_class_folders(reader.root, class_to_idx)
    return dataset
