"""Checkpoint loading (models/_helpers.py): every release format, unsafe pickles refused, broken files reported."""
import argparse
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from torch import nn

from models._helpers import CheckpointError, load_checkpoint_file, load_weights, state_dict_mismatch, unwrap_state_dict

TINY_MODEL = 'test_resnet'  # timm's 0.4M-parameter test ResNet: builds in milliseconds


def _tiny(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_MODEL, num_classes=10, **kwargs)


def _assert_same_weights(model: nn.Module, state_dict: dict):
    own = model.state_dict()
    assert own.keys() == state_dict.keys()
    for k, v in state_dict.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def _optimizer_state(model: nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # fills the momentum buffers a real training checkpoint carries
    return opt.state_dict()


def _module_prefixed(state_dict: dict) -> OrderedDict:
    return OrderedDict(('module.' + k, v) for k, v in state_dict.items())


def _fake_yacs_cfgnode():
    """A stand-in for yacs.config.CfgNode that pickles exactly like it (dict items plus four flags in __dict__)."""

    class CfgNode(dict):
        def __init__(self, init_dict=None):
            super().__init__(init_dict or {})
            self.__dict__['__immutable__'] = False
            self.__dict__['__deprecated_keys__'] = set()
            self.__dict__['__renamed_keys__'] = {}
            self.__dict__['__new_allowed__'] = False

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            self[name] = value

    CfgNode.__module__ = 'yacs.config'
    CfgNode.__qualname__ = 'CfgNode'
    return CfgNode


def _swin_config(monkeypatch):
    """DWNet's Swin-style `config` (yacs CfgNode); the fake yacs module exists only while saving."""
    cfg_node = _fake_yacs_cfgnode()
    yacs, yacs_config = types.ModuleType('yacs'), types.ModuleType('yacs.config')
    yacs_config.CfgNode = cfg_node
    yacs.config = yacs_config
    monkeypatch.setitem(sys.modules, 'yacs', yacs)
    monkeypatch.setitem(sys.modules, 'yacs.config', yacs_config)
    config = cfg_node()
    config.MODEL = cfg_node({'TYPE': 'dwnet', 'NAME': 'dwnet_tiny_patch4_window7_224', 'DROP_PATH_RATE': 0.2})
    config.MODEL.DWNET = cfg_node({'DEPTHS': [2, 2, 6, 2], 'WINDOW_SIZE': 7, 'DYNAMIC': False})
    config.DATA = cfg_node({'IMG_SIZE': 224, 'INTERPOLATION': 'bicubic', 'MEAN': (0.485, 0.456, 0.406)})
    config.AMP_OPT_LEVEL = 'O1'
    config.__dict__['__immutable__'] = True
    return config


def build_release(fmt: str, src: nn.Module, monkeypatch) -> dict:
    """The dict a release's training script would have saved for `src` (see the original repositories)."""
    sd = src.state_dict()
    if fmt == 'plain':
        return sd
    if fmt == 'state_dict':
        return {'state_dict': sd}
    if fmt == 'model':
        return {'model': sd}
    if fmt == 'state_dict_ema':
        return {'state_dict_ema': sd}
    if fmt == 'module_prefix':
        return _module_prefixed(sd)
    if fmt == 'ddfnet_timm':
        # timm 0.4.5 CheckpointSaver as run by ddfnet's train.py with --amp (native scaler) and a float metric.
        args = argparse.Namespace(
            model='ddf_mul_resnet50', lr=0.4, batch_size=128, epochs=120, sched='cosine', aa='rand-m7-mstd0.5-inc1',
            mean=None, std=None, input_size=None, amp=True, dist_bn='reduce', distributed=True, world_size=8)
        return {
            'epoch': 119, 'arch': args.model, 'state_dict': sd, 'optimizer': _optimizer_state(src), 'version': 2,
            'args': args, 'amp_scaler': torch.amp.GradScaler('cpu').state_dict(), 'metric': np.float64(79.1)}
    if fmt == 'odconv_main':
        # OSVAI/ODConv main.py: DataParallel/DDP weights, accuracies as tensors.
        return {
            'epoch': 100, 'state_dict': _module_prefixed(sd), 'acc': torch.tensor(74.2), 'best_acc': torch.tensor(74.3),
            'optimizer': _optimizer_state(src)}
    if fmt == 'swin':
        # Atten4Vis/DemystifyLocalViT utils.save_checkpoint: weights under 'model', yacs config, apex amp state.
        return {
            'model': sd, 'optimizer': _optimizer_state(src), 'lr_scheduler': {'last_epoch': 300},
            'max_accuracy': 81.2, 'epoch': 299, 'config': _swin_config(monkeypatch),
            'amp': {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 0}}}
    if fmt == 'torchvision':
        # pytorch/examples imagenet/main.py save_checkpoint.
        return {
            'epoch': 120, 'arch': 'g_resnext50', 'state_dict': _module_prefixed(sd), 'best_acc1': torch.tensor(78.6),
            'optimizer': _optimizer_state(src), 'scheduler': {'last_epoch': 120}}
    raise ValueError(fmt)


FORMATS = [
    'plain', 'state_dict', 'model', 'state_dict_ema', 'module_prefix', 'ddfnet_timm', 'odconv_main', 'swin',
    'torchvision']


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
@pytest.mark.parametrize('fmt', FORMATS)
def test_release_formats_load_strict(fmt, legacy, tmp_path, monkeypatch):
    src = _tiny(0)
    path = tmp_path / 'release.pth'
    torch.save(build_release(fmt, src, monkeypatch), path, _use_new_zipfile_serialization=not legacy)
    monkeypatch.delitem(sys.modules, 'yacs', raising=False)
    monkeypatch.delitem(sys.modules, 'yacs.config', raising=False)

    dst = _tiny(1)
    meta = load_weights(dst, str(path))
    _assert_same_weights(dst, src.state_dict())
    assert 'yacs' not in sys.modules  # the config was rebuilt without importing (or running) yacs
    expected_key = {'plain': None, 'module_prefix': None, 'model': 'model', 'swin': 'model',
                    'state_dict_ema': 'state_dict_ema'}.get(fmt, 'state_dict')
    assert meta['weights_key'] == expected_key
    if fmt == 'swin':
        assert meta['max_accuracy'] == 81.2 and meta['epoch'] == 299
        config = load_checkpoint_file(str(path))['config']
        assert config['MODEL']['DWNET']['DEPTHS'] == [2, 2, 6, 2] and config['AMP_OPT_LEVEL'] == 'O1'
    if fmt == 'ddfnet_timm':
        assert meta['arch'] == 'ddf_mul_resnet50' and meta['metric'] == pytest.approx(79.1)
        assert load_checkpoint_file(str(path))['args'].lr == 0.4
    if fmt == 'odconv_main':
        assert meta['best_acc'] == pytest.approx(74.3)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    src = _tiny(0)
    path = tmp_path / 'weights.safetensors'
    save_file(src.state_dict(), str(path))
    dst = _tiny(1)
    load_weights(dst, str(path))
    _assert_same_weights(dst, src.state_dict())


def test_numpy1_scalars_load(tmp_path):
    """Files written under numpy < 2 name the scalar constructor `numpy.core.multiarray.scalar`."""
    path = tmp_path / 'old_numpy.pth'
    torch.save({'state_dict': _tiny(0).state_dict(), 'metric': np.float64(78.5), 'best': np.float32(1.5)}, path,
               _use_new_zipfile_serialization=False)  # one plain pickle stream: names can be rewritten in place
    data = path.read_bytes()
    assert b'numpy._core.multiarray\nscalar' in data
    path.write_bytes(data.replace(b'numpy._core.multiarray\nscalar', b'numpy.core.multiarray\nscalar'))
    checkpoint = load_checkpoint_file(str(path))
    assert checkpoint['metric'] == 78.5 and checkpoint['best'] == 1.5


def test_use_ema_selects_ema_weights(tmp_path):
    model, ema = _tiny(0), _tiny(1)
    path = tmp_path / 'train.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict(), 'epoch': 3}, path)
    dst = _tiny(2)
    load_weights(dst, str(path), use_ema=True)
    _assert_same_weights(dst, ema.state_dict())
    load_weights(dst, str(path))
    _assert_same_weights(dst, model.state_dict())


def test_use_ema_without_ema_weights(tmp_path):
    path = tmp_path / 'plain.pth'
    torch.save({'state_dict': _tiny(0).state_dict()}, path)
    with pytest.raises(CheckpointError, match='no EMA weights.*drop --use-ema'):
        load_weights(_tiny(1), str(path), use_ema=True)


class _RunsCode:
    """Unpickling this creates the marker file: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_pickled_code_is_refused_not_run(legacy, tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': _tiny(0).state_dict(), 'payload': _RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)

    with pytest.raises(CheckpointError, match=r'outside the allowlist \(.*open.*\); nothing was run'):
        load_weights(_tiny(1), str(path))
    assert not marker.exists()

    # The payload is live: an unrestricted load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / 'full.pth'
    torch.save({'state_dict': _tiny(0).state_dict()}, path)
    data = path.read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_weights(_tiny(1), str(cut))

    legacy = tmp_path / 'legacy.pth'
    torch.save({'state_dict': _tiny(0).state_dict()}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_weights(_tiny(1), str(legacy))


@pytest.mark.parametrize(
    'content', [b'\xff\xd8\xff\xe0 a JPEG', b'model weights\n', b''], ids=['jpeg', 'text', 'empty'])
def test_not_a_checkpoint(content, tmp_path):
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
        load_weights(_tiny(0), str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        load_weights(_tiny(0), str(tmp_path / 'nope.pth'))


def test_checkpoint_without_weights(tmp_path):
    path = tmp_path / 'opt_only.pth'
    torch.save({'optimizer': {'state': {}}, 'epoch': 1}, path)
    with pytest.raises(CheckpointError, match="has no weights.*found keys \\['epoch', 'optimizer'\\]"):
        load_weights(_tiny(0), str(path))


def test_checkpoint_of_another_model_lists_keys(tmp_path):
    path = tmp_path / 'other.pth'
    torch.manual_seed(0)
    torch.save({'state_dict': timm.create_model('test_convnext', num_classes=10).state_dict()}, path)
    dst = _tiny(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(dst, str(path))
    msg = str(info.value)
    assert '\n' not in msg
    assert 'does not fit model test_resnet' in msg
    assert 'missing [conv1.0.weight' in msg and 'unexpected [stem.0.weight' in msg
    _assert_same_weights(dst, before)  # nothing was half-loaded


def test_wrong_num_classes_names_shapes(tmp_path):
    path = tmp_path / 'head.pth'
    torch.save(_tiny(0).state_dict(), path)
    torch.manual_seed(0)
    dst = timm.create_model(TINY_MODEL, num_classes=1000)
    with pytest.raises(CheckpointError, match=r'2 mis-shaped \[fc.weight \(10, .*\) vs model \(1000, .*\)'):
        load_weights(dst, str(path))


def test_state_dict_mismatch_lists():
    model = _tiny(0)
    sd = model.state_dict()
    sd['extra'] = torch.zeros(1)
    sd.pop('fc.bias')
    sd['fc.weight'] = torch.zeros(3, 3)
    missing, unexpected, misshaped = state_dict_mismatch(model, sd)
    assert missing == ['fc.bias'] and unexpected == ['extra']
    assert len(misshaped) == 1 and misshaped[0].startswith('fc.weight (3, 3) vs model (10,')


def test_model_module_filter_fn_is_applied(tmp_path, monkeypatch):
    """A model's module-level checkpoint_filter_fn (timm convention) maps foreign key names before loading."""
    module = types.ModuleType('foreign_release_model')

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

    def checkpoint_filter_fn(state_dict, model):
        return {k.replace('classifier.', 'head.'): v for k, v in state_dict.items()}

    Net.__module__ = module.__name__
    module.Net, module.checkpoint_filter_fn = Net, checkpoint_filter_fn
    monkeypatch.setitem(sys.modules, module.__name__, module)

    torch.manual_seed(0)
    src = Net()
    path = tmp_path / 'foreign.pth'
    torch.save({'state_dict': {k.replace('head.', 'classifier.'): v for k, v in src.state_dict().items()}}, path)
    dst = Net()
    load_weights(dst, str(path))
    _assert_same_weights(dst, src.state_dict())
    with pytest.raises(CheckpointError, match=r'missing \[head.weight, head.bias\]'):
        load_weights(Net(), str(path), filter_fn=lambda sd, model: sd)


def test_not_a_dict(tmp_path):
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match='holds a list, not a state_dict'):
        load_weights(_tiny(0), str(path))


@pytest.mark.parametrize('prefix', ['_orig_mod.module.', 'module._orig_mod.', 'module.module.', '_orig_mod.'])
def test_every_wrapper_prefix_is_stripped(prefix):
    """compile(DDP(m)), DDP(compile(m)), nested DataParallel: all wrappers go, and only them ('modules.' stays)."""
    weights = {'modules.0.weight': torch.ones(1), 'fc.bias': torch.zeros(2)}
    state_dict, key = unwrap_state_dict({'state_dict': {prefix + k: v for k, v in weights.items()}})
    assert key == 'state_dict' and state_dict.keys() == weights.keys()
    assert all(state_dict[k] is v for k, v in weights.items())


class _HeadNet(nn.Module):
    """No pretrained cfg: the classifier is found through get_classifier()."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, num_classes)

    def get_classifier(self):
        return self.head


def test_fine_tuning_start_finds_the_classifier_without_a_pretrained_cfg(tmp_path, caplog):
    torch.manual_seed(0)
    src = _HeadNet(5)
    path = tmp_path / 'five.pth'
    torch.save({'state_dict': src.state_dict()}, path)
    dst = _HeadNet(3)
    head = dst.head.weight.clone()
    load_weights(dst, str(path), adapt=True)
    assert torch.equal(dst.body.weight, src.body.weight) and torch.equal(dst.head.weight, head)
    same = _HeadNet(5)
    load_weights(same, str(path), adapt=True)  # a classifier that fits is loaded too
    _assert_same_weights(same, src.state_dict())
    headless = tmp_path / 'headless.pth'
    torch.save({k: v for k, v in src.state_dict().items() if k.startswith('body.')}, headless)
    caplog.set_level('INFO')
    load_weights(_HeadNet(3), str(headless), adapt=True)  # no classifier in the file: the model's stays
    assert 'classifier head not loaded (checkpoint: none, model: ? classes)' in caplog.text
    with pytest.raises(CheckpointError, match=r'mis-shaped \[head.weight \(5, 4\) vs model \(3, 4\)'):
        load_weights(_HeadNet(3), str(path))


class _TwoStems(nn.Module):
    """Two input convs named by the pretrained cfg; stem `a` takes 2 channels, stem `b` 1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3)
        self.b = nn.Conv2d(1, 4, 3)
        self.pretrained_cfg = {'first_conv': ('a', 'b')}


def _stems_file(tmp_path, a_shape):
    torch.manual_seed(0)
    weights = {'b.weight': torch.randn(4, 3, 3, 3), 'b.bias': torch.randn(4), 'a.bias': torch.randn(4)}
    if a_shape is not None:
        weights['a.weight'] = torch.randn(a_shape)
    path = tmp_path / f'stems_{a_shape}.pth'
    torch.save(weights, path)
    return str(path), weights


@pytest.mark.parametrize('a_shape, a_misshaped', [
    ((4, 2, 3, 3), False),  # fits already
    ((5, 3, 3, 3), True),  # other output channels: not an input-channel difference
    ((4, 4, 3, 3), True),  # 4 to 2 channels: timm's adapt_input_conv cannot
], ids=['fits', 'out-channels', 'unsupported'])
def test_every_first_conv_is_adapted_whatever_the_one_before(tmp_path, a_shape, a_misshaped):
    path, weights = _stems_file(tmp_path, a_shape)
    model = _TwoStems()
    if a_misshaped:
        with pytest.raises(CheckpointError, match=r': 1 mis-shaped \[a.weight'):
            load_weights(model, path, adapt=True)
        return
    load_weights(model, path, adapt=True)
    torch.testing.assert_close(model.b.weight, weights['b.weight'].sum(1, keepdim=True))


def test_first_conv_missing_from_the_file_is_reported(tmp_path):
    path, _ = _stems_file(tmp_path, None)
    with pytest.raises(CheckpointError, match=r'1 missing \[a.weight\]'):
        load_weights(_TwoStems(), path, adapt=True)


def test_empty_and_one_byte_files_are_told_apart(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'one.pth').write_bytes(b'x')
    with pytest.raises(CheckpointError, match=r'is empty \(0 bytes\)'):
        load_checkpoint_file(tmp_path / 'empty.pth')
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
        load_checkpoint_file(tmp_path / 'one.pth')


def test_map_location_is_passed_on(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save({'w': torch.ones(2)}, path)
    assert load_checkpoint_file(path, map_location='meta')['w'].is_meta


def test_non_tensor_weights_are_refused_and_ema_only_files_said(caplog):
    with pytest.raises(CheckpointError, match=r"non-tensor entries \['step'\]"):
        unwrap_state_dict({'state_dict': {'w': torch.ones(1), 'step': 3}})
    caplog.set_level('INFO')
    unwrap_state_dict({'state_dict': {'w': torch.ones(1)}, 'epoch': 1})
    assert 'only EMA' not in caplog.text
    unwrap_state_dict({'state_dict_ema': {'w': torch.ones(1)}, 'epoch': 1})
    assert 'Checkpoint holds only EMA weights (state_dict_ema); using them.' in caplog.text


def test_messages_name_the_file_or_say_checkpoint(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save(timm.create_model(TINY_MODEL, num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match=f'^checkpoint {path} has 3 classes'):
        load_weights(_tiny(0), str(path))
    with pytest.raises(CheckpointError, match='has 3 classes') as e:  # weights given as a dict: no file to name
        load_weights(_tiny(0), torch.load(path, weights_only=True))
    assert 'None' not in str(e.value)


def test_filter_fn_of_the_registering_module_comes_first(monkeypatch):
    """A model built by an entrypoint of one module from a class of another (DDF-ResNets are timm ResNets) takes the
    checkpoint_filter_fn of the module that registered it."""
    import models.ddf_resnet
    from models._helpers import _model_filter_fn

    def registering(state_dict, model):
        return state_dict

    def own(state_dict, model):
        return state_dict

    class Net(nn.Module):
        pretrained_cfg = {'architecture': 'ddf_mul_resnet50'}

    module = types.ModuleType('net_class_module')
    module.checkpoint_filter_fn = own
    Net.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert _model_filter_fn(Net()) is own  # the registering module has none
    monkeypatch.setattr(models.ddf_resnet, 'checkpoint_filter_fn', registering, raising=False)
    assert _model_filter_fn(Net()) is registering


def test_every_refused_global_is_named(tmp_path):
    path = tmp_path / 'evil2.pth'
    torch.save({'a': _RunsCode(tmp_path / 'a'), 'c': argparse.ArgumentParser}, path)
    with pytest.raises(CheckpointError, match='outside the allowlist') as e:
        load_checkpoint_file(path)
    assert 'argparse.ArgumentParser' in str(e.value) and 'io.open' in str(e.value)  # all, not the first only


def test_filter_fn_is_given_the_model(tmp_path):
    model, seen = _tiny(0), []

    def filter_fn(state_dict, into):
        seen.append(into)
        return state_dict

    load_weights(model, model.state_dict(), filter_fn=filter_fn)
    assert seen == [model]
