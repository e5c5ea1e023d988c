"""Each DDF config's plan equals theFoxofSky/ddfnet's recipe (tests/release_recipes/ddf.py), update by update."""
import copy

import pytest

from tests.release_recipes import assert_plan_matches
from tests.release_recipes.ddf import RECIPES
from training.plan import make_plan


@pytest.mark.parametrize('config', sorted(RECIPES))
def test_plan_matches_release(config):
    assert_plan_matches(make_plan(['--config', config]), RECIPES[config]())


def test_comparison_catches_a_missing_cooldown():
    """A plan that forgets timm 0.4.5's 10 cool-down epochs at min_lr (scheduler_factory.py L41) must fail."""
    expected = RECIPES['configs/ddf/ddf_mul_resnet50.yaml']()
    planted = copy.deepcopy(expected)
    cut = planted['updates_per_epoch'] * 120
    planted.update(epochs=120, total_updates=cut, lr=planted['lr'][:cut])
    with pytest.raises(AssertionError, match='epochs'):
        assert_plan_matches(planted, expected)


def test_comparison_catches_warmup_shifted_by_one_epoch():
    """A warm-up that reaches the peak one epoch late (warmup_prefix-like shift) must fail on the lr list."""
    expected = RECIPES['configs/ddf/ddf_mul_resnet50.yaml']()
    planted = copy.deepcopy(expected)
    n = planted['updates_per_epoch']
    planted['lr'] = planted['lr'][:n] + planted['lr'][:-n]
    with pytest.raises(AssertionError, match=r'lr: update 1251'):
        assert_plan_matches(planted, expected)
