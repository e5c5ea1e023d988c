"""Each DGConv config's plan equals d-li14/dgconv.pytorch's stated recipe (tests/release_recipes/dgconv.py)."""
import copy

import pytest

from tests.release_recipes import assert_plan_matches
from tests.release_recipes.dgconv import RECIPES
from training.plan import make_plan


@pytest.mark.parametrize('config', sorted(RECIPES))
def test_plan_matches_release(config):
    assert_plan_matches(make_plan(['--config', config]), RECIPES[config]())


def test_comparison_catches_timm_weight_decay_exemptions():
    """timm's default rule (no decay on 1-d parameters and biases) instead of main.py L171-173's must fail."""
    expected = RECIPES['configs/dgconv/g_resnext50.yaml']()
    planted = copy.deepcopy(expected)
    names = planted['param_groups'][0]['params']
    exempt = [n for n in names if n.endswith(('.bias', '.gate')) or '.bn' in n or 'downsample.1' in n]
    planted['param_groups'] = [
        {'weight_decay': 0.0, 'lr_scale': 1.0, 'params': exempt},
        {'weight_decay': 1e-4, 'lr_scale': 1.0, 'params': [n for n in names if n not in exempt]},
    ]
    with pytest.raises(AssertionError, match='param_groups'):
        assert_plan_matches(planted, expected)


def test_comparison_catches_a_dropped_last_batch():
    """drop_last=True (one update per epoch fewer than main.py L214-216's loader) must fail."""
    expected = RECIPES['configs/dgconv/resnext50_32x4d.yaml']()
    planted = copy.deepcopy(expected)
    n = planted['updates_per_epoch'] - 1
    planted.update(updates_per_epoch=n, total_updates=n * planted['epochs'],
                   lr=[lr for e in range(planted['epochs']) for lr in expected['lr'][e * (n + 1):e * (n + 1) + n]])
    with pytest.raises(AssertionError, match='updates_per_epoch'):
        assert_plan_matches(planted, expected)
