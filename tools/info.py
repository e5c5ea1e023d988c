"""Parameters and multiply-adds (GMACs) of a model at its default input size.

Counted with torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2), which also counts the project's compiled
dynamic-filter op (ops/ddf.py registers its FLOP formula), so the numbers can be checked against the papers' FLOPs /
Madds. The model is built on the meta device (no memory, no arithmetic) when its forward allows it, else on CPU.
`reparameterize=True` counts the deployment form (`timm.utils.reparameterize_model`: BatchNorms folded, DGConvs as
the grouped convs of their gates). Command line: scripts/model_info.py.
"""
import functools
import logging
from typing import Optional, Sequence, Tuple

import timm
import torch
from timm.utils import reparameterize_model
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the project's models)
from training import cli

__all__ = ['count_params_and_macs', 'create_counting_model', 'default_input_size', 'model_info']

_logger = logging.getLogger(__name__)


def default_input_size(model: torch.nn.Module, img_size: Optional[int] = None) -> Tuple[int, int, int]:
    """(C, H, W) from the model's pretrained cfg, with H = W = img_size if given."""
    channels, height, width = model.pretrained_cfg.get('input_size', (3, 224, 224))
    return (channels, img_size, img_size) if img_size else (channels, height, width)


def count_params_and_macs(
        model: torch.nn.Module,
        input_size: Sequence[int],
        depth: Optional[int] = None,
) -> Tuple[int, int]:
    """Count a model's parameters and the multiply-adds of one eval-mode forward pass of one image.

    Modules that define `count_macs(input_shape, output_shape)` (ODConv2d) are counted by it instead.

    Args:
        model: The model, on any device (meta included); put in eval mode for the count, then restored.
        input_size: (C, H, W) of the image.
        depth: If given, log the GMACs of every module down to this depth.

    Returns:
        (params, macs) as integers.
    """
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    overrides = _CountMacsOverrides(model, counter)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        overrides.remove_hooks()
    if depth:
        _logger.info(_macs_table(model, counter, overrides.corrections, depth))
    return params, counter.get_total_flops() // 2 + sum(overrides.corrections.values())


class _CountMacsOverrides:
    """Forward hooks on the modules that define `count_macs(input_shape, output_shape)`: the MACs they return replace
    those FlopCounterMode counted inside them (a dynamic layer's count then follows its paper's convention, not the
    formulation that happened to run). `corrections` maps such a module's name, as FlopCounterMode names it, to the
    MACs to add to the counter's."""

    def __init__(self, model: torch.nn.Module, counter: FlopCounterMode):
        self.corrections = {}
        self._counter = counter
        self._open = []  # counter totals at the entry of the overriding modules being run
        self._handles = []
        for name, module in model.named_modules():
            if callable(getattr(module, 'count_macs', None)):
                self._handles += [module.register_forward_pre_hook(self._enter), module.register_forward_hook(
                    functools.partial(self._leave, _counter_name(model, name)))]

    def _enter(self, module, args):
        self._open.append(self._counter.get_total_flops())

    def _leave(self, name, module, args, output):
        start = self._open.pop()
        if not self._open:  # an outermost overriding module replaces everything counted inside it
            correction = module.count_macs(args[0].shape, output.shape) - (self._counter.get_total_flops() - start) // 2
            self.corrections[name] = self.corrections.get(name, 0) + correction

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()


def _counter_name(model: torch.nn.Module, name: str) -> str:
    """A submodule's name in FlopCounterMode's counts: the root's class name, then the dotted path."""
    return f'{type(model).__name__}.{name}' if name else type(model).__name__


def _macs_table(model: torch.nn.Module, counter: FlopCounterMode, corrections: dict, depth: int) -> str:
    """GMACs per module down to `depth` (the total first), overridden modules counted by their `count_macs`."""
    counts = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    names = ['Global'] + [_counter_name(model, name) for name, _ in model.named_modules()]
    lines = [f'{"module":<64} {"GMACs":>10}']
    for name in names:
        if name not in counts or (name != 'Global' and name.count('.') + 1 > depth):
            continue
        macs = counts[name] + sum(c for inner, c in corrections.items()
                                  if name in ('Global', inner) or inner.startswith(name + '.'))
        lines.append(f'{name:<64} {macs / 1e9:>10.4f}')
    return '\n'.join(lines)


def create_counting_model(name: str, **kwargs) -> torch.nn.Module:
    """Build a model on the meta device (fast, no memory) for counting; bad arguments are a `cli.UsageError`."""
    with torch.device('meta'):
        return cli.create_model(name, **kwargs)


def model_info(
        name: str,
        img_size: Optional[int] = None,
        depth: Optional[int] = None,
        reparameterize: bool = False,
        **kwargs,
) -> dict:
    """Params (M) and GMACs of a registered model at its default (or the given) input size.

    The count runs on the meta device; models whose forward (or reparameterization) needs real values are counted on
    CPU instead. `reparameterize`: count the model's deployment form; a DGConv's groups follow its gates, random in a
    fresh model (count a trained one with `count_params_and_macs(reparameterize_model(model.eval()), ...)`).
    """
    def count(model):
        model = reparameterize_model(model.eval()) if reparameterize else model
        return count_params_and_macs(model, input_size, depth)

    model = create_counting_model(name, **kwargs)
    input_size = default_input_size(model, img_size)
    try:
        params, macs = count(model)
    except (NotImplementedError, RuntimeError) as e:
        _logger.info(f'{name}: meta-device forward failed ({str(e).splitlines()[0]}); counting on CPU.')
        params, macs = count(timm.create_model(name, **kwargs))
    return dict(model=name, params_m=params / 1e6, gmacs=macs / 1e9, input_size=input_size)
