"""The five RedNet configs against d-li14/involution's mmcls recipes (tests/release_recipes/rednet.py).

`test_plan_equals_release_recipe` fails on 'lr' until train.py can express mmcv's warm-up: a linear ratio per
iteration (from 0.25) multiplying a cosine set once per epoch (mmcv v1.2.7 runner/hooks/lr_updater.py L83-88 and
L113-140 over L236-248). timm's warm-up adds (warmup_lr + t * (lr - warmup_lr) / warmup_t towards the base LR, not
the epoch's cosine value) and steps with the main schedule (per epoch, or per update for both). The configs step the
cosine per epoch, exact from update 3130 (epoch 5) on, with a per-epoch warm-up from 0.2 in epochs 0-4 (first
difference: update 1, 0.2 vs 0.2001917). Every other key already agrees (`test_plan_equals_release_recipe_but_the_lr`).
"""
import copy
import functools
import json
import math

import pytest

from tests.release_recipes import assert_plan_matches
from tests.release_recipes.rednet import RECIPES, release_loader_len, release_lr_by_hook_protocol, release_lr_per_update
from training.plan import make_plan


def _as_json(value):
    return json.loads(json.dumps(value))


@functools.cache
def _expected(config):
    return _as_json(RECIPES[config]())


@functools.cache
def _plan(config):
    return _as_json(make_plan(['--config', config]))


@pytest.mark.parametrize('config', sorted(RECIPES))
def test_plan_equals_release_recipe(config):
    assert_plan_matches(_plan(config), _expected(config))


@pytest.mark.parametrize('config', sorted(RECIPES))
def test_plan_equals_release_recipe_but_the_lr(config):
    """What agrees today: everything but the warm-up's LRs, and the LR of every update from epoch 5 on."""
    plan, expected = _plan(config), _expected(config)
    assert_plan_matches(plan, {k: v for k, v in expected.items() if k != 'lr'})
    after_warmup = 5 * expected['updates_per_epoch']
    assert_plan_matches({'lr': plan['lr'][after_warmup:]}, {'lr': expected['lr'][after_warmup:]})


def test_recipe_is_consistent():
    recipe = _expected('configs/rednet/rednet50.yaml')
    assert recipe['updates_per_epoch'] == 626 and 5 * 626 == 3130  # the warm-up is 5 epochs at 64 x 32
    assert len(recipe['lr']) == recipe['total_updates'] == 626 * 130
    assert recipe['lr'][0] == pytest.approx(0.2)
    assert recipe['lr'][3130] == pytest.approx(0.4 * (1 + math.cos(math.pi * 5 / 130)))


@pytest.mark.parametrize('loader_len,epochs,warmup_iters', [(626, 130, 3130), (7, 6, 10), (5, 4, 5), (3, 3, 20)])
def test_closed_form_equals_the_hook_protocol(loader_len, epochs, warmup_iters):
    """The closed form against mmcv's hooks stepped in the runner's order, warm-ups ending mid-epoch, at an epoch
    boundary and never."""
    kwargs = dict(epochs=epochs, warmup_iters=warmup_iters)
    assert release_lr_per_update(loader_len, **kwargs) == release_lr_by_hook_protocol(loader_len, **kwargs)


def test_loader_len_rounds_up_per_rank():
    assert release_loader_len(1281167, 64, 32) == 626  # ceil(20018.2) = 20019 samples per rank, 625 full batches + 1
    assert release_loader_len(100, 8, 4) == 4  # 13 per rank


def test_comparison_catches_timm_style_warmup():
    """timm's per-update warm-up (0.2 rising to 0.8, not times the epoch's cosine) must fail on 'lr'."""
    expected = _expected('configs/rednet/rednet26.yaml')
    planted = copy.deepcopy(expected)
    planted['lr'][:3130] = [0.2 + t * 0.6 / 3130 for t in range(3130)]
    # epoch 0's cosine factor is 1, so the two agree there; epoch 1 starts at update 626
    with pytest.raises(AssertionError, match='plan differs from the release:\\n  lr: update 626:'):
        assert_plan_matches(planted, expected)
