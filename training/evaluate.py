"""The one evaluation loop: loss, top-1 and top-5 of a model over a loader, for train.py, validate.py and reproduce.py.

Precision rule, the same for every caller: the forward pass runs under the caller's autocast (AMP or none); the loss
is computed in float32 from the logits, outside autocast, so AMP changes the logits' precision but not the loss's.
"""
import logging
import time
from collections import OrderedDict
from contextlib import suppress
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from timm import utils

__all__ = ['evaluate']

_logger = logging.getLogger(__name__)


def evaluate(
        model: torch.nn.Module,
        loader,
        device: torch.device,
        amp_autocast: Callable = suppress,
        channels_last: bool = False,
        prefetcher: bool = True,
        world_size: int = 1,
        log_interval: int = 50,
        log_name: str = 'Test',
        log: bool = True,
) -> Dict[str, float]:
    """Loss (cross-entropy), top-1 and top-5 (%) of `model` in eval mode over `loader`.

    Args:
        loader: timm's eval loader (the prefetcher moves batches to `device` itself).
        amp_autocast: Context manager factory of the forward pass (e.g. a partial of torch.autocast).
        prefetcher: The loader already yields `device` tensors.
        world_size: Processes evaluating their shards; > 1 averages each batch's metrics over them.
        log_interval: Batches between progress lines (the last batch is always logged).
        log: This process writes the progress lines (rank 0).

    Returns:
        OrderedDict of loss, top1, top5 and samples (images counted on this process).
    """
    batch_time, losses, top1, top5 = (utils.AverageMeter() for _ in range(4))
    model.eval()
    last_idx = len(loader) - 1
    end = time.time()
    with torch.inference_mode():
        for batch_idx, (images, target) in enumerate(loader):
            if not prefetcher:
                images, target = images.to(device), target.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(images)
            if isinstance(output, (tuple, list)):
                output = output[0]
            loss = F.cross_entropy(output.float(), target)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            if world_size > 1:
                loss, acc1, acc5 = (utils.reduce_tensor(t, world_size) for t in (loss, acc1, acc5))
            if device.type == 'cuda':
                torch.cuda.synchronize()
            n = output.shape[0]
            losses.update(loss.item(), n)
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
            batch_time.update(time.time() - end)
            end = time.time()
            if log and (batch_idx % log_interval == 0 or batch_idx == last_idx):
                _logger.info(
                    f'{log_name}: [{batch_idx:>4d}/{last_idx}]  Time: {batch_time.val:.3f}s '
                    f'({n / batch_time.avg:>7.2f}/s)  Loss: {losses.val:>7.4f} ({losses.avg:>6.4f})  '
                    f'Acc@1: {top1.val:>7.3f} ({top1.avg:>7.3f})  Acc@5: {top5.val:>7.3f} ({top5.avg:>7.3f})')
    return OrderedDict([('loss', losses.avg), ('top1', top1.avg), ('top5', top5.avg), ('samples', top1.count)])
