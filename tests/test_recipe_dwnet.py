"""The six DWNet configs against Atten4Vis/DemystifyLocalViT's recipes (tests/release_recipes/dwnet.py)."""
import copy
import functools
import json

import pytest
import torch

from tests.release_recipes import assert_plan_matches
from tests.release_recipes.dwnet import BASE_LR, MIN_LR, RECIPES, release_loader_len, release_lr_per_update
from training.plan import make_plan


def _as_json(value):
    """The plan's JSON form (train.py --plan writes the same dict as JSON): tuples become lists."""
    return json.loads(json.dumps(value))


@functools.cache
def _expected(config):
    return _as_json(RECIPES[config]())


@pytest.mark.parametrize('config', sorted(RECIPES))
def test_plan_equals_release_recipe(config):

    plan = make_plan(['--config', config])
    assert_plan_matches(_as_json(plan), _expected(config))


@pytest.mark.parametrize('config', sorted(RECIPES))
def test_recipe_is_consistent(config):
    recipe = _expected(config)
    assert len(recipe['lr']) == recipe['total_updates'] == recipe['updates_per_epoch'] * recipe['epochs']
    names = [n for g in recipe['param_groups'] for n in g['params']]
    assert len(names) == len(set(names))
    assert recipe['global_batch'] == recipe['world_size'] * recipe['batch_size'] * recipe['grad_accum_steps']


def _planted_bugs(expected):
    """Plausible slips, each in a copy of the recipe."""
    updates = expected['updates_per_epoch']
    no_lag = copy.deepcopy(expected)  # the LR of the update's own index, not the previous one's (timm's loop)
    no_lag['lr'] = no_lag['lr'][1:] + [no_lag['lr'][-1]]
    long_warmup = copy.deepcopy(expected)  # warm-up one epoch longer
    lr, warmup_lr = expected['optimizer']['lr'], expected['lr'][0]
    long_warmup['lr'] = release_lr_per_update(
        updates * expected['grad_accum_steps'], expected['grad_accum_steps'], expected['epochs'], lr, warmup_lr,
        MIN_LR * lr / BASE_LR, 21)
    head_bias_decayed = copy.deepcopy(expected)  # one bias moved into the decayed group
    head_bias_decayed['param_groups'][1]['params'].remove('head.bias')
    head_bias_decayed['param_groups'][0]['params'].append('head.bias')
    broadcast_bn = dict(expected, dist_bn='broadcast')  # DDP's default buffer broadcast
    partial_update = dict(expected, updates_per_epoch=updates + 1)  # the trailing micro-batch stepped
    smoothing_in_loss = copy.deepcopy(expected)  # smoothing applied twice
    smoothing_in_loss['loss']['label_smoothing'] = 0.1
    return {'no_lag': no_lag, 'long_warmup': long_warmup, 'head_bias_decayed': head_bias_decayed,
            'broadcast_bn': broadcast_bn, 'partial_update': partial_update, 'smoothing_in_loss': smoothing_in_loss}


@pytest.mark.parametrize('bug,key', [('no_lag', 'lr'), ('long_warmup', 'lr'), ('head_bias_decayed', 'param_groups'),
                                     ('broadcast_bn', 'dist_bn'), ('partial_update', 'updates_per_epoch'),
                                     ('smoothing_in_loss', 'loss')])
def test_comparison_catches_planted_bug(bug, key):
    expected = _expected('configs/dwnet/dwnet_tiny_patch4_window7_224.yaml')
    assert_plan_matches(copy.deepcopy(expected), expected)
    with pytest.raises(AssertionError, match=f'plan differs from the release:\\n  {key}[: ]'):
        assert_plan_matches(_as_json(_planted_bugs(expected)[bug]), expected)


@pytest.mark.parametrize('train_size,world_size,batch_size,accum_steps', [
    (1000, 2, 37, 0),  # 13 iterations an epoch, no accumulation
    (1000, 2, 37, 2),  # 13 iterations: the 13th micro-batch of every epoch never reaches a step
    (1000, 4, 31, 2),  # 8 iterations
])
def test_lr_restatement_equals_timm_scheduler_in_release_loop(train_size, world_size, batch_size, accum_steps):
    """release_lr_per_update against timm's CosineLRScheduler (the release's class; its formula for these arguments
    is unchanged from v0.4.12) built as lr_scheduler.py L8-23 builds it and stepped where main.py L197-200 and
    L234-235 step it."""
    from timm.scheduler import CosineLRScheduler

    epochs, warmup_epochs, lr, warmup_lr, min_lr = 6, 2, 1e-3, 1e-6, 1e-5
    loader_len = release_loader_len(train_size, world_size, batch_size)
    optimizer = torch.optim.AdamW([{'params': [torch.nn.Parameter(torch.zeros(2, 2))]},
                                   {'params': [torch.nn.Parameter(torch.zeros(2))], 'weight_decay': 0.}], lr=lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * loader_len, lr_min=min_lr, warmup_lr_init=warmup_lr,
                                  warmup_t=warmup_epochs * loader_len, cycle_limit=1, t_in_epochs=False)
    used = []
    for epoch in range(epochs):
        for idx in range(loader_len):
            if accum_steps > 1 and (idx + 1) % accum_steps:
                continue
            used.append(optimizer.param_groups[0]['lr'])  # what optimizer.step() uses
            scheduler.step_update(epoch * loader_len + idx)
    assert release_lr_per_update(loader_len, accum_steps, epochs, lr, warmup_lr, min_lr, warmup_epochs) == used
