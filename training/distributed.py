"""Small collectives and fingerprints train.py uses to compare its processes, and the end of a distributed run."""
import gc
import hashlib
from typing import Any, Dict, List

import torch
from timm import utils

__all__ = ['all_gather', 'state_fingerprint', 'bn_running_mean_sum', 'close_process_group']


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


def close_process_group() -> None:
    """Destroys the default process group and frees whatever still holds it, while the interpreter is whole.

    `destroy_process_group` only drops the group from torch's tables: DDP's reducer and the store keep gloo's threads
    (pt_gloo_runloop, gloo_tcp_loop) and the TCPStore's (pt_tcpstore_uv) running while they are referenced, and a
    finished run's objects sit in reference cycles that the garbage collector would free at interpreter teardown,
    where destroying those threads can abort the process ("terminate called without an active exception", SIGABRT,
    which torchrun reports as a failed run). Call it once the run's objects are out of scope.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
