"""Small collectives and fingerprints train.py uses to compare its processes."""
import hashlib
from typing import Any, Dict, List

import torch
from timm import utils

__all__ = ['all_gather', 'state_fingerprint', 'bn_running_mean_sum']


def all_gather(args, obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a one-element list when not distributed); every rank must call it."""
    if not args.distributed:
        return [obj]
    out = [None] * args.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def state_fingerprint(state_dict: Dict[str, Any]) -> str:
    """SHA-1 over the names and bytes of every tensor of a state_dict, to compare models across processes."""
    h = hashlib.sha1()
    for k, v in state_dict.items():
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bn_running_mean_sum(model: torch.nn.Module) -> float:
    """Sum of all BatchNorm running means: one number to follow how --dist-bn changed them."""
    return float(sum(
        b.double().sum() for n, b in utils.unwrap_model(model).named_buffers() if n.endswith('running_mean')))
