"""The pieces beside train.py (training/) and the shared helpers of issue 13: the training-hook protocol and its
runner, the command-line helpers, the loader's fine-tuning and prefix rules, ops.ddf_impl and DWNet's patch merging."""
import logging
import os

import pytest
import timm
import torch
from timm.models.swin_transformer import PatchMerging
from timm.utils import ModelEmaV3

import ops
from models._helpers import CheckpointError, load_weights
from training import cli
from training.hooks import ModelHooks, TrainingHooks


# --- the training-hook protocol ---

def test_odconv_and_dgconv_models_implement_the_protocol():
    tiny = dict(layers=(1, 1, 1, 1), num_classes=4)
    for name, kwargs in (('od_resnet18', dict(tiny, channels=(8, 8, 8, 8), stem_width=8)),
                         ('od_mobilenetv2_050', dict(num_classes=4)), ('g_resnext50', tiny)):
        with torch.device('meta'):
            assert isinstance(timm.create_model(name, **kwargs), TrainingHooks), name
    assert not isinstance(timm.create_model('test_resnet'), TrainingHooks)


def test_a_partial_hook_implementation_is_an_error():
    """A model written for fewer hooks (e.g. before the plan's two) would otherwise train without any of them."""
    class OldHooks(torch.nn.Module):
        def set_training_progress(self, epochs):
            pass

        def auxiliary_loss(self):
            return None

    with pytest.raises(TypeError, match='add auxiliary_loss_terms, load_training_hook_state, scheduled_values'):
        ModelHooks(OldHooks())


def test_model_hooks_run_the_model_and_its_ema_copy():
    torch.manual_seed(0)
    model = timm.create_model('od_resnet18', layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8,
                              num_classes=4, kernel_num=2, temp_init=30., temp_epochs=2.)
    ema = ModelEmaV3(model, decay=0.9)
    hooks = ModelHooks(torch.compile(model, backend='eager'), ema)  # wrappers are looked through
    hooks.set_progress(1.)  # halfway through the annealing: 1 + 29 / 2
    assert hooks.log() == {'temperature': pytest.approx(15.5)}
    assert ema.module.training_hook_log() == {'temperature': pytest.approx(15.5)}
    loss = torch.tensor(2.)
    assert hooks.add_auxiliary_loss(loss) is loss  # ODConv adds nothing
    fresh = timm.create_model('od_resnet18', layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8,
                              num_classes=4, kernel_num=2)
    fresh_ema = ModelEmaV3(fresh)
    ModelHooks(fresh, fresh_ema).load_state(hooks.state())
    assert fresh.training_hook_log() == fresh_ema.module.training_hook_log() == {'temperature': pytest.approx(15.5)}

    g = timm.create_model('g_resnext50', layers=(1, 1, 1, 1), num_classes=4, reg_weight=0.5)
    g_hooks = ModelHooks(g)
    expected = 2. + 0.5 * g.group_regularizer().item()
    assert g_hooks.add_auxiliary_loss(torch.tensor(2.)).item() == pytest.approx(expected)
    assert g_hooks.state() == {} and set(g_hooks.log()) == set(f'groups/{n}' for n in g.dgconv_layers())

    plain = ModelHooks(timm.create_model('test_resnet'))
    plain.set_progress(0.5)
    plain.load_state({'temperature': 3.})
    assert plain.state() is None and plain.log() == {} and plain.add_auxiliary_loss(loss) is loss


# --- command-line helpers shared by train.py, validate.py and the scripts ---

def test_usage_errors_become_one_line_and_status_2(capsys):
    def main():
        with cli.usage_errors('prog.py'):
            cli.check_model_name('resnet5O')

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code.startswith("prog.py: error: unknown model 'resnet5O'; did you mean resnet50, ")
    assert cli.exit_status(main) == 2
    assert capsys.readouterr().err == f'{e.value.code}\n'
    assert cli.exit_status(lambda: None) == 0

    with pytest.raises(cli.UsageError, match=r"model 'test_resnet' rejected its arguments \{'layerz': 2\}"):
        cli.create_model('test_resnet', layerz=2)


def test_device_checks():
    assert cli.resolve_device('cpu') == torch.device('cpu')
    assert cli.resolve_device(None) == torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(cli.UsageError, match='--device gpu0: '):
        cli.resolve_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(cli.UsageError, match='--device cuda: CUDA is not available on this machine; use --device'):
            cli.resolve_device('cuda')


def test_amp_dtype_falls_back_to_bfloat16_on_cpu(caplog):
    assert cli.resolve_amp_dtype('float16', torch.device('cpu'), doing='validating') == torch.bfloat16
    assert 'float16 AMP is not offered on CPU; validating with bfloat16 autocast instead' in caplog.text
    assert cli.resolve_amp_dtype('bfloat16', torch.device('cpu')) == torch.bfloat16
    assert cli.resolve_amp_dtype('float16', torch.device('cuda')) == torch.float16


def test_image_split_checks(tiny_imagefolder, tmp_path):
    dataset = cli.create_image_split('', tiny_imagefolder, 'validation')
    assert len(dataset) == 40
    loose = tmp_path / 'loose'
    (loose / 'train' / 'a').mkdir(parents=True)
    first = os.path.join(tiny_imagefolder, 'train', 'circle', sorted(os.listdir(
        os.path.join(tiny_imagefolder, 'train', 'circle')))[0])
    for name in ('a/x.jpg', 'stray.jpg'):
        os.link(first, loose / 'train' / name)
    (loose / 'train' / 'README.txt').write_text('not an image: ignored, as timm ignores it')
    with pytest.raises(cli.UsageError, match=r"holds images outside class subfolders \(e.g. 'stray.jpg'\)"):
        cli.create_image_split('', str(loose), 'train', split_required=True)
    with pytest.raises(cli.UsageError, match="no 'val' folder in .*; add .*/val/ or skip"):
        cli.create_image_split('', str(loose), 'val', split_required=True, missing_split_hint=' or skip')
    with pytest.raises(cli.UsageError, match='dataset folder .* does not exist'):
        cli.create_image_split('', str(tmp_path / 'nope'), 'train')


# --- the loader's rules for fine-tuning starts and prefixes ---

def test_compiled_model_state_dict_loads(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('test_resnet', num_classes=4)
    path = tmp_path / 'compiled.pth'
    torch.save({'state_dict': {'_orig_mod.' + k: v for k, v in src.state_dict().items()}}, path)
    dst = timm.create_model('test_resnet', num_classes=4)
    load_weights(dst, str(path))
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_fine_tuning_start_adapts_input_channels_and_classifier(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    src = timm.create_model('test_resnet', num_classes=1000)
    path = tmp_path / 'rgb.pth'
    torch.save(src.state_dict(), path)
    gray = timm.create_model('test_resnet', num_classes=4, in_chans=1)
    with pytest.raises(CheckpointError, match=r'mis-shaped \[conv1.0.weight \(16, 3, 3, 3\) vs model \(16, 1, 3, 3\)'):
        load_weights(gray, str(path))
    load_weights(gray, str(path), adapt=True)
    assert torch.allclose(gray.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True))
    assert torch.equal(gray.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert 'input conv conv1.0 adapted from 3 to 1 channels' in caplog.text
    assert 'classifier fc not loaded (checkpoint: 1000 classes, model: 4 classes)' in caplog.text

    headless = timm.create_model('test_resnet', num_classes=0)
    load_weights(headless, str(path), adapt=True)  # the file's classifier has no place in the model: left out
    with pytest.raises(CheckpointError, match=r'2 unexpected \[fc.weight, fc.bias\]'):
        load_weights(headless, str(path))


# --- item 5: one ddf lookup, timm's PatchMerging ---

def test_ddf_impl_lookup():
    assert ops.ddf_impl('ext') is ops.ddf and ops.ddf_impl('reference') is ops.ddf_reference
    with pytest.raises(ValueError, match=r"impl must be one of \['ext', 'reference'\], got 'cuda'"):
        ops.ddf_impl('cuda')


def test_timm_patch_merging_is_the_originals():
    """DWNet's original (Swin's): concatenate x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], then
    LayerNorm(4C) and Linear(4C, 2C); odd sizes zero-padded first."""
    torch.manual_seed(0)
    merge = PatchMerging(8)
    for h, w in ((6, 4), (5, 7)):
        x = torch.randn(2, h, w, 8)
        padded = torch.nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        parts = [padded[:, i::2, j::2] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
        expected = merge.reduction(merge.norm(torch.cat(parts, -1)))
        torch.testing.assert_close(merge(x), expected)
    assert set(merge.state_dict()) == {'norm.weight', 'norm.bias', 'reduction.weight'}


# --- unreadable images ---

def test_skip_recording_dataset_names_the_broken_files_across_loader_workers(tiny_imagefolder, tmp_path):
    """Indices of the files timm's ImageDataset skipped, marked by forked workers in the parent's bitmap; a readable
    image that follows a broken one is not marked."""
    import shutil

    from timm.data import create_dataset

    from training.skips import SkipRecordingDataset

    data = tmp_path / 'data'
    shutil.copytree(tiny_imagefolder, data)
    plain = create_dataset('', root=str(data), split='train')
    broken = {3, 4, 40}  # 3 and 4 in a row: the item of index 3 reads 3, 4 and 5
    for index in broken:
        path = plain.reader.filename(index, absolute=True)
        with open(path, 'wb') as f:
            f.write(b'not an image')
    dataset = SkipRecordingDataset(create_dataset('', root=str(data), split='train'))
    dataset.transform = lambda img: torch.zeros(1)  # create_loader sets the transform on the dataset it is given
    assert dataset.dataset.transform is dataset.transform
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    assert sum(len(target) for _, target in loader) == len(plain)
    assert sorted(dataset.take()) == sorted(broken)
    assert dataset.take() == []  # cleared
    assert dataset.reader.class_to_idx == plain.reader.class_to_idx
