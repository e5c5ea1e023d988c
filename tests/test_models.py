"""Registry-wide checks of every model the project registers into timm.

Full-size models are built on the meta device (no memory, no compute) to compare their state_dicts with the
original releases' tables in reference/state_dicts; forward/backward runs use small inputs.
"""
import json
from pathlib import Path

import pytest
import timm
import torch

import models

PROJECT_MODULES = models.MODULES
MODEL_NAMES = sorted(timm.list_models(module=PROJECT_MODULES))
REFERENCE_DIR = Path(__file__).resolve().parents[1] / 'reference' / 'state_dicts'
# Forward/backward on CPU is kept to models small enough to build in a second or two.
MAX_PARAMS_FOR_FWD_BWD = 60e6


def _reference_tables():
    """(entrypoint, kwargs, table) for each original model; `od_<arch>_<k>x` means kernel_num=k."""
    tables = []
    for path in sorted(REFERENCE_DIR.glob('*.json')):
        name = path.stem
        kwargs = {}
        if name.startswith('od_'):
            name, kernels = name.rsplit('_', 1)
            kwargs['kernel_num'] = int(kernels.rstrip('x'))
        elif 'dwnet' in name:
            name += '_patch4_window7_224'
        tables.append(pytest.param(name, kwargs, path, id=path.stem))
    return tables


def _meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def test_every_family_registers_models():
    for module in PROJECT_MODULES:
        assert timm.list_models(module=module), f'models/{module}.py registers no model'


@pytest.mark.parametrize('name,kwargs,table_path', _reference_tables())
def test_state_dict_matches_original_release(name, kwargs, table_path):
    table = json.loads(table_path.read_text())
    assert name in MODEL_NAMES, f'{name} is not registered'
    model = _meta_model(name, **kwargs)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = table['state_dict']
    assert sorted(set(theirs) - set(ours)) == [], 'keys missing from our model'
    assert sorted(set(ours) - set(theirs)) == [], 'keys the original does not have'
    mismatched = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert mismatched == {}
    assert sum(p.numel() for p in model.parameters()) == table['params']


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_default_cfg_and_contract(name):
    model = _meta_model(name)
    cfg = model.pretrained_cfg
    for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes', 'classifier'):
        assert key in cfg, f'{name} pretrained_cfg lacks {key}'
    assert model.num_classes == cfg['num_classes']
    assert model.get_classifier() is not None
    assert len(model.feature_info) >= 4


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_backward_small_input(name):
    if sum(p.numel() for p in _meta_model(name).parameters()) > MAX_PARAMS_FOR_FWD_BWD:
        pytest.skip('large model: its family tests run a narrow variant instead')
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(dim=1).mean().backward()
    missing_grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing_grads == []
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
