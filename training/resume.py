"""Exact resume: a run continued from its checkpoint repeats the uninterrupted run bit for bit.

Beyond timm's checkpoint (weights, optimizer, AMP scaler, epoch, EMA weights, the saver's history), a train.py
checkpoint holds the LR scheduler, the RNG states of every rank, the model's training-hook state and, for a recovery
checkpoint written inside an epoch, the number of updates done. From a recovery checkpoint the epoch's sample order
is replayed from the RNG states at its start and the done updates are skipped; that is exact when the main process
draws no random numbers for the data it skips (augmentation in workers, ``-j`` > 0, and no ``--reprob``) or the model
draws none (no dropout/drop-path).

train.py calls `ExactResume` at a few named points: `load` (the file), `restore` (weights, optimizer, EMA, hooks),
`start` (first epoch and update, scheduler positioned), `restore_saver`, `restore_rng` (just before the loop), and in
the loop `begin_epoch`, `replayed`, `recovery_point`, `end_epoch`; `checkpoint_state` is what the saver adds.
"""
import logging
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from timm import utils

from models._helpers import CheckpointError, load_checkpoint_file, load_weights

from .cli import UsageError
from .distributed import all_gather
from .hooks import ModelHooks

__all__ = ['CHECKPOINT_EXT', 'ExactResume', 'TrainCheckpointSaver', 'find_auto_resume']

_logger = logging.getLogger(__name__)

CHECKPOINT_EXT = '.pth.tar'
# What a checkpoint needs to be resumed: timm's CheckpointSaver layout (this project's train.py, ddfnet's timm-era
# train.py). Other scripts' files (ODConv's and torchvision's main.py, Swin's) differ in optimizer parameter groups,
# scheduler state and epoch meaning: their weights start a run through --initial-checkpoint/--pretrained-path.
_TRAINING_KEYS = ('state_dict', 'optimizer', 'epoch', 'version')


class TrainCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver (atomic tmp + os.replace writes, last/best/top-k) plus the state for an exact resume.

    The extra keys go through the ``task`` hook of ``CheckpointSaver._save``, which merges a provider's
    ``get_checkpoint_state()`` into the saved dict; this saver is its own provider.

    Args:
        extra_state_fn: Returns the extra entries (scheduler, step, RNG states, training hooks) at save time.
    """

    def __init__(self, *, extra_state_fn, **kwargs):
        super().__init__(task=self, **kwargs)
        self.extra_state_fn = extra_state_fn

    def get_checkpoint_state(self, ema=False, unwrap_fn=utils.unwrap_model):
        if ema:
            return {} if self.model_ema is None else {'state_dict_ema': utils.get_state_dict(self.model_ema, unwrap_fn)}
        return {'state_dict': utils.get_state_dict(self.model, unwrap_fn), **self.extra_state_fn()}


def find_auto_resume(run_dir: str) -> str:
    """The newest checkpoint a run left in its folder (last.pth.tar or a recovery file), or '' if none."""
    if not os.path.isdir(run_dir):
        return ''
    names = [n for n in os.listdir(run_dir) if n.endswith(CHECKPOINT_EXT) and (
        n == 'last' + CHECKPOINT_EXT or n.startswith('recovery-'))]
    paths = [os.path.join(run_dir, n) for n in names]
    return max(paths, key=os.path.getmtime) if paths else ''


def _rng_state() -> Dict[str, Any]:
    """The RNG states of this process (torch, CUDA, numpy, python) as weights_only-loadable values."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'python': random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]):
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


class ExactResume:
    """The resume state of one run, fresh or continued; owns what its checkpoints add to timm's.

    Args:
        args: train.py's arguments (rank, world_size, distributed, no_resume_opt, start_epoch).
        checkpoint: The training checkpoint resumed from (None for a fresh run), read by `load`.
        path: Its file.
    """

    def __init__(self, args, checkpoint: Optional[Dict[str, Any]] = None, path: str = ''):
        self.args = args
        self.checkpoint = checkpoint
        self.path = path
        self.start_epoch = 0
        self.start_update = 0
        self._lr_scheduler = None
        self._hooks: Optional[ModelHooks] = None
        self._step: Optional[int] = None  # updates done in the epoch; set for a recovery checkpoint only
        self._rng: Optional[List[Dict[str, Any]]] = None  # every rank's RNG state at the last save point
        self._rng_epoch: Optional[List[Dict[str, Any]]] = None  # every rank's RNG state at the epoch start
        self._rng_epoch_local: Optional[Dict[str, Any]] = None  # this rank's, at the start of the current epoch
        self._replay_rng: Optional[Dict[str, Any]] = None  # this rank's, after the updates a recovery file holds

    @classmethod
    def load(cls, args, path: str) -> 'ExactResume':
        """Reads a training checkpoint through the project's safe loader; '' starts a fresh run."""
        if not path:
            return cls(args)
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as e:
            raise UsageError(f"cannot resume from '{path}': {e}") from None
        missing = [k for k in _TRAINING_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
        if missing:
            raise UsageError(
                f"cannot resume from '{path}': it is not a training checkpoint of train.py or timm (no "
                f"{', '.join(repr(k) for k in missing)}); start from its weights with --initial-checkpoint or "
                '--pretrained-path')
        return cls(args, checkpoint, path)

    def _fail(self, reason: str):
        raise UsageError(f"cannot resume from '{self.path}': {reason}")

    def restore(self, model, optimizer, loss_scaler=None, model_ema=None, hooks: Optional[ModelHooks] = None):
        """Weights, optimizer and AMP scaler state, EMA weights and training-hook state (before any wrapper)."""
        self._hooks = hooks
        if self.checkpoint is None:
            return
        checkpoint = self.checkpoint
        try:
            load_weights(model, checkpoint, source=self.path)
            if model_ema is not None and 'state_dict_ema' in checkpoint:
                load_weights(model_ema.module, checkpoint, use_ema=True, source=self.path)
            elif model_ema is not None:
                model_ema.set(model)  # a run that starts its EMA here averages from the resumed weights
        except CheckpointError as e:
            self._fail(str(e))
        if not self.args.no_resume_opt:
            try:
                optimizer.load_state_dict(checkpoint['optimizer'])
            except (ValueError, KeyError, RuntimeError) as e:
                self._fail(f'its optimizer state does not fit ({str(e).splitlines()[0]}); pass --no-resume-opt to '
                           'start the optimizer afresh')
            if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
                loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
        if hooks is not None:
            hooks.load_state(checkpoint.get('training_hooks'))
        if utils.is_primary(self.args):
            _logger.info(f"Resumed from '{self.path}' (epoch {checkpoint['epoch']}"
                         f"{', step ' + str(checkpoint['step']) if checkpoint.get('step') else ''}).")

    def start(self, schedule) -> int:
        """The first epoch to run (and `start_update` inside it); positions the run's TrainingSchedule there."""
        lr_scheduler = self._lr_scheduler = schedule.lr_scheduler
        checkpoint = self.checkpoint
        if checkpoint is not None:
            if checkpoint.get('step'):  # a recovery checkpoint continues its own epoch
                self.start_epoch, self.start_update = checkpoint['epoch'], checkpoint['step']
            else:  # timm's rule: checkpoints of version > 1 hold the epoch just completed
                self.start_epoch = checkpoint['epoch'] + (1 if checkpoint.get('version', 1) > 1 else 0)
        if self.args.start_epoch is not None:
            self.start_epoch = self.args.start_epoch
        if lr_scheduler is None:
            return self.start_epoch
        if checkpoint is not None and checkpoint.get('scheduler') is not None:
            lr_scheduler.load_state_dict(checkpoint['scheduler'])
        schedule.resume_at(self.start_epoch, self.start_update)
        return self.start_epoch

    def restore_saver(self, saver: utils.CheckpointSaver):
        """The saver's history (best metric, top-k files) when resuming inside the same run folder."""
        if self.checkpoint is None or os.path.dirname(os.path.abspath(self.path)) != os.path.abspath(
                saver.checkpoint_dir):
            return
        if self.checkpoint.get('saver') is None:
            _logger.warning(f"No checkpoint history in '{self.path}', ranked checkpoints start fresh.")
            return
        saver.load_state_dict(self.checkpoint['saver'])

    def restore_rng(self):
        """Every RNG of this rank as saved (at the epoch start, for a recovery checkpoint); last before the loop."""
        if self.checkpoint is None:
            return
        rng_all = self.checkpoint.get('rng_epoch' if self.start_update else 'rng')
        if rng_all is not None and len(rng_all) == self.args.world_size:
            _set_rng_state(rng_all[self.args.rank])
            if self.start_update:
                self._rng_epoch_local = rng_all[self.args.rank]
                self._replay_rng = self.checkpoint['rng'][self.args.rank]
        elif utils.is_primary(self.args):
            _logger.warning('The checkpoint holds no RNG state for this number of processes; the resumed run gets '
                            'fresh random streams and will not repeat the original run exactly.')

    def begin_epoch(self, epoch: int) -> int:
        """Called before the epoch draws any random number; returns the updates to skip (done before the save)."""
        skip_updates = self.start_update if epoch == self.start_epoch else 0
        if not skip_updates or self._rng_epoch_local is None:
            self._rng_epoch_local = _rng_state()
        return skip_updates

    def replayed(self):
        """Called once the skipped batches are drawn: the RNG continues as it was after the saved updates."""
        if self._replay_rng is not None:
            _set_rng_state(self._replay_rng)
            self._replay_rng = None

    def recovery_point(self, updates_done: int):
        """Before a recovery checkpoint: the updates done in this epoch and every rank's RNG states (collective)."""
        self._step = updates_done
        self._rng = all_gather(self.args, _rng_state())
        self._rng_epoch = all_gather(self.args, self._rng_epoch_local)

    def end_epoch(self):
        """Before the epoch's checkpoint: every rank's RNG state (collective)."""
        self._step = None
        self._rng = all_gather(self.args, _rng_state())

    def checkpoint_state(self) -> Dict[str, Any]:
        """What the saver adds to timm's checkpoint (TrainCheckpointSaver's `extra_state_fn`)."""
        state = {
            'scheduler': self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
            'step': self._step,
            'rng': self._rng,
        }
        if self._step:
            state['rng_epoch'] = self._rng_epoch
        hook_state = self._hooks.state() if self._hooks is not None else None
        if hook_state is not None:
            state['training_hooks'] = hook_state
        return state
