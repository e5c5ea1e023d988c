"""The training-hook protocol: how a model takes part in the training loop without the loop knowing its family.

A model implements every method of `TrainingHooks` (ODConv's models anneal their attention temperature with them,
G-ResNeXt adds its group regularizer to the loss); train.py runs them through `ModelHooks` only. Models that do not
implement the protocol train without hooks.
"""
from typing import Any, Dict, List, Optional, Protocol, runtime_checkable

import torch
from timm.utils import unwrap_model

__all__ = ['TrainingHooks', 'ModelHooks']


@runtime_checkable
class TrainingHooks(Protocol):
    """What train.py calls on a model that takes part in its training loop."""

    def set_training_progress(self, epochs: float) -> None:
        """Called before every update with the (fractional) number of epochs done once it completes; sets
        `scheduled_values(epochs)`."""

    def scheduled_values(self, epochs: float) -> Dict[str, float]:
        """What `set_training_progress(epochs)` sets, by name (e.g. {'temperature': 12.6}); the plan reports it."""

    def auxiliary_loss_terms(self) -> List[Dict[str, Any]]:
        """The terms `auxiliary_loss` adds: [{'name': ..., 'weight': ...}], [] for none."""

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """Added to the loss of the forward pass just run; None for nothing."""

    def training_hook_state(self) -> Dict[str, Any]:
        """State to keep in the checkpoint (weights_only-loadable values), beyond the state_dict."""

    def load_training_hook_state(self, state: Dict[str, Any]) -> None:
        """Restores what `training_hook_state` returned, on resume."""

    def training_hook_log(self) -> Dict[str, float]:
        """Scalars for each epoch's summary row."""


class ModelHooks:
    """Runs the training hooks of a model (DDP/compile wrappers removed) and of its EMA copy.

    Args:
        model: The trained model, possibly wrapped.
        model_ema: timm's ModelEmaV3 of it, or None; it follows the progress and the restored state.
    """

    def __init__(self, model: torch.nn.Module, model_ema: Optional[torch.nn.Module] = None):
        trained = unwrap_model(model)
        hook_names = [n for n in dir(TrainingHooks) if not n.startswith('_')]
        missing = [n for n in hook_names if not callable(getattr(trained, n, None))]
        if len(missing) < len(hook_names) and missing:  # a partial implementation would be silently ignored
            raise TypeError(f'{type(trained).__name__} implements part of the training-hook protocol '
                            f'(training/hooks.py); add {", ".join(missing)}')
        self.model = trained if isinstance(trained, TrainingHooks) else None
        copies = [trained] + ([unwrap_model(model_ema)] if model_ema is not None else [])
        self._all: List[TrainingHooks] = [m for m in copies if isinstance(m, TrainingHooks)]

    def set_progress(self, epochs: float):
        for m in self._all:
            m.set_training_progress(epochs)

    def scheduled(self, epochs: float) -> Dict[str, float]:
        return self.model.scheduled_values(epochs) if self.model is not None else {}

    def auxiliary_losses(self) -> List[Dict[str, Any]]:
        return self.model.auxiliary_loss_terms() if self.model is not None else []

    def add_auxiliary_loss(self, loss: torch.Tensor) -> torch.Tensor:
        aux = self.model.auxiliary_loss() if self.model is not None else None
        return loss if aux is None else loss + aux

    def state(self) -> Optional[Dict[str, Any]]:
        return self.model.training_hook_state() if self.model is not None else None

    def load_state(self, state: Optional[Dict[str, Any]]):
        if state is None:
            return
        for m in self._all:
            m.load_training_hook_state(state)

    def log(self) -> Dict[str, float]:
        return self.model.training_hook_log() if self.model is not None else {}
