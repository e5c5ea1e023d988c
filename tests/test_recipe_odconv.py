"""configs/odconv/*.yaml against the OSVAI/ODConv release's recipe (tests/release_recipes/odconv.py), update by update."""
import copy
import math
from pathlib import Path

import pytest

from models.layers.odconv import odconv_temperature
from tests.release_recipes import assert_plan_matches
from tests.release_recipes.odconv import RECIPES, release_recipe
from training.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_has_a_recipe():
    assert {str(p.relative_to(ROOT)) for p in (ROOT / 'configs' / 'odconv').glob('*.yaml')} == set(RECIPES)


@pytest.mark.parametrize('config', sorted(RECIPES), ids=lambda c: Path(c).stem)
def test_plan_equals_release(config):
    assert_plan_matches(make_plan(['--config', str(ROOT / config)]), RECIPES[config]())


def test_recipe_arithmetic_by_hand():
    """A few values worked out by hand from main.py/utils, so the recipe module itself is checked."""
    r = release_recipe('od_resnet18_4x')
    steps = 5005  # ceil(ceil(1281167 / 8) / 32) = ceil(160146 / 32): the partial last batch is kept
    assert (r['batch_size'], r['global_batch'], r['updates_per_epoch'], r['total_updates']) == (32, 256, steps, 500500)
    assert r['lr'][30 * steps - 1] == 0.1 and math.isclose(r['lr'][30 * steps], 0.01)
    assert math.isclose(r['lr'][-1], 1e-4)
    assert math.isclose(r['temperature'][0], 30 - 29 / (10 * steps))  # the first step counts itself
    assert r['temperature'][10 * steps - 1] == 1.0 and r['temperature'][-1] == 1.0
    m = release_recipe('od_mobilenetv2_100_4x')
    assert m['lr'][0] == 0.05 and m['lr'][steps - 1] == 0.05  # set once per epoch
    assert math.isclose(m['lr'][-1], 0.05 * (1 + math.cos(math.pi * 149 / 150)) / 2)


def _milestone_one_epoch_late(plan):
    steps = plan['updates_per_epoch']
    plan['lr'][30 * steps:31 * steps] = [plan['lr'][0]] * steps


def _temperature_one_step_behind(plan):
    steps = plan['updates_per_epoch']
    plan['temperature'] = [odconv_temperature(i / steps, 30., 10) for i in range(plan['total_updates'])]


def _bn_not_decayed(plan):
    (group,) = plan['param_groups']
    bn = [n for n in group['params'] if '.bn' in n or n.startswith('bn')]
    plan['param_groups'] = [dict(group, params=[n for n in group['params'] if n not in bn]),
                            dict(group, weight_decay=0.0, params=bn)]


def _last_partial_batch_dropped(plan):
    steps = plan['updates_per_epoch'] - 1
    plan.update(updates_per_epoch=steps, total_updates=steps * plan['epochs'])


@pytest.mark.parametrize('plant, key', [
    (_milestone_one_epoch_late, 'lr: update 150150'),
    (_temperature_one_step_behind, 'temperature: update 0'),
    (_bn_not_decayed, 'param_groups'),
    (_last_partial_batch_dropped, 'updates_per_epoch'),
], ids=lambda v: getattr(v, '__name__', '').lstrip('_') or None)
def test_planted_bug_is_caught(plant, key):
    release = release_recipe('od_resnet18_4x')
    plan = copy.deepcopy(release)
    plant(plan)
    with pytest.raises(AssertionError, match=key):
        assert_plan_matches(plan, release)
