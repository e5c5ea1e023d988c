"""Model zoo table (tools/zoo.py) is current; params/MACs counting (tools/info.py) is right;
scripts/reproduce.py validates checkpoints in every release format and compares them with the published numbers."""
import csv
import json
import re

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import tools.info
import tools.zoo
from models._helpers import project_models
from scripts import benchmark_models, model_info, reproduce
from tests.conftest import TINY_NUM_CLASSES
from tests.test_checkpoints import build_release

STALE = 'is stale: regenerate it with `python scripts/model_zoo.py`'


@pytest.fixture(scope='module')
def zoo_rows():
    """The regenerated table (counting every model once on the meta device)."""
    return tools.zoo.zoo_rows(tools.zoo.DEFAULT_REFERENCE)


def test_every_project_model_has_a_row(zoo_rows):
    default_rows = {r['model'] for r in zoo_rows if not r['kwargs'] and r['kind'] == 'dynamic'}
    assert set(project_models()) <= default_rows


def test_committed_counts_are_current(zoo_rows):
    """Params and GMACs of the committed CSV equal a fresh count."""
    with open(tools.zoo.DOC_CSV) as f:
        committed = {(r['model'], r['kwargs']): r for r in csv.DictReader(f)}
    fresh = {(r['model'], r['kwargs']): r for r in csv.DictReader(tools.zoo.to_csv(zoo_rows).splitlines())}
    for key, row in fresh.items():
        assert key in committed, f'{key} missing: docs/model_zoo.csv {STALE}'
        assert (committed[key]['params_m'], committed[key]['gmacs']) == (row['params_m'], row['gmacs']), \
            f'{key}: docs/model_zoo.csv {STALE}'


def test_committed_docs_are_current(zoo_rows):
    assert tools.zoo.DOC_CSV.read_text() == tools.zoo.to_csv(zoo_rows), f'docs/model_zoo.csv {STALE}'
    assert tools.zoo.DOC_MD.read_text() == tools.zoo.to_markdown(zoo_rows), f'docs/model_zoo.md {STALE}'


def test_readme_model_table_matches_the_zoo():
    """Every README row naming one model (and its kwargs) shows the zoo CSV's params and GMACs."""
    with open(tools.zoo.DOC_CSV) as f:
        zoo = {(r['model'], r['kwargs']): (r['params_m'], r['gmacs']) for r in csv.DictReader(f)}
    readme = (tools.zoo.REPO / 'README.md').read_text()
    rows = re.findall(r'^\| `([^`]+)` \|\s*([^|]*?)\s*\| ([0-9.]+) \| ([0-9.]+) \|', readme, flags=re.M)
    assert len(rows) >= 20
    for model, kwargs, params, gmacs in rows:
        assert zoo[(model, kwargs)] == (params, gmacs), f'README row {model} {kwargs}: update it from docs/model_zoo.csv'


def test_published_rows_match_by_name_and_args(tmp_path):
    reference = tmp_path / 'paper_tables.yaml'
    reference.write_text(
        'dwnet:\n  models:\n'
        '    - {name: ddwnet_tiny_patch4_window7_224, args: {dynamic: true}, params_m: 51, flops_g: 3.8, top1: 81.8}\n'
        '    - {name: iddwnet_nano_patch4_window7_224, params_m: 1}\n'
        'odconv:\n  models:\n'
        '    - {name: resnet18, baseline: true, params_m: 11.69, madds_g: 1.814, top1: 70.25, top5: 89.38}\n'
        '    - {name: od_resnet18, args: {kernel_num: 4, reduction: 0.0625}, params_m: 44.9, madds_g: 1.916}\n'
        '    - {name: od_resnet18, args: {kernel_num: 1}, params_m: 11.94}\n'
        'ddf:\n  models:\n'
        '    - {name: resnet50, baseline: true, top1_official: 76.0, top1_retrained: 77.2, top5_retrained: 93.5}\n'
        '    - {related: true, name: R50 CondConv, params_m: 104.8}\n')
    rows = tools.zoo._published(reference)
    by_name = {(r['model'], str(r['kwargs'])): r for r in rows}
    dynamic = by_name[('dynamic_dwnet_tiny_patch4_window7_224', '{}')]
    assert (dynamic['kind'], dynamic['pub_params_m'], dynamic['pub_gmacs'], dynamic['pub_top1']) == (
        'dynamic', 51, 3.8, 81.8)
    assert by_name[('resnet18', '{}')]['pub_gmacs'] == 1.814 and by_name[('resnet18', '{}')]['kind'] == 'baseline'
    assert (by_name[('resnet50', '{}')]['pub_top1'], by_name[('resnet50', '{}')]['pub_top5']) == (77.2, 93.5)
    if timm.is_model('od_resnet18'):
        assert by_name[('od_resnet18', "{'kernel_num': 4}")]['pub_gmacs'] == 1.916
        assert by_name[('od_resnet18', '{}')]['pub_params_m'] == 11.94
    assert all('nano' not in r['model'] and 'CondConv' not in r['model'] for r in rows)


def test_find_config():
    configs = [dict(path='configs/odconv/od_resnet18.yaml', model='od_resnet18', kwargs={}),
               dict(path='configs/odconv/od_resnet18_4x.yaml', model='od_resnet18', kwargs={'kernel_num': 4})]
    assert tools.zoo.find_config('od_resnet18', {'kernel_num': 4}, configs) == 'configs/odconv/od_resnet18_4x.yaml'
    assert tools.zoo.find_config('od_resnet18', {}, configs) == 'configs/odconv/od_resnet18.yaml'
    assert tools.zoo.find_config('od_resnet50', {}, configs) == ''
    assert tools.zoo._variant_kwargs({'kernel_num': 1, 'temp_init': 30}) == {}


def test_count_params_and_macs_known_models():
    # torchvision-style ResNet-18: 11.69M params, 1.814 GMACs at 224 (every conv and the fc).
    params, macs = tools.info.count_params_and_macs(tools.info.create_counting_model('resnet18'), (3, 224, 224))
    assert params == 11_689_512
    assert macs == pytest.approx(1.814e9, rel=1e-3)
    # The same count on CPU with real tensors, at another size; training mode is restored.
    model = timm.create_model('test_resnet').train()
    meta_counts = tools.info.count_params_and_macs(tools.info.create_counting_model('test_resnet'), (3, 96, 96))
    assert tools.info.count_params_and_macs(model, (3, 96, 96)) == meta_counts
    assert model.training


def test_dynamic_filter_op_is_counted():
    """The compiled DDF op's multiply-adds are in the total (one per tap and output element)."""
    ops = pytest.importorskip('ops')
    if not ops.HAS_EXT:
        pytest.skip('ops._C is not built')
    x = torch.zeros(1, 8, 10, 10, device='meta')
    channel_filter = torch.zeros(1, 8, 3, 3, device='meta')
    spatial_filter = torch.zeros(1, 9, 10, 10, device='meta')
    counter = FlopCounterMode(display=False)
    with counter:
        ops.ddf(x, channel_filter, spatial_filter, kernel_size=3)
    assert counter.get_total_flops() // 2 == 8 * 10 * 10 * 9


def test_model_info_counts_on_cpu_when_meta_fails(monkeypatch):
    real_count = tools.info.count_params_and_macs

    def meta_unfriendly(model, input_size, depth=None):
        if next(model.parameters()).is_meta:  # as a forward that reads a tensor value (.item()) would fail
            raise NotImplementedError('aten::_local_scalar_dense: no meta kernel')
        return real_count(model, input_size, depth)

    monkeypatch.setattr(tools.info, 'count_params_and_macs', meta_unfriendly)
    info = tools.info.model_info('resnet18', img_size=112)
    assert info['gmacs'] == pytest.approx(0.485, abs=1e-3) and info['input_size'] == (3, 112, 112)


def test_model_info_cli(capsys):
    assert model_info.main(['resnet18', '--img-size', '112']) == 0
    assert capsys.readouterr().out.strip() == 'resnet18: 11.69M params, 0.485 GMACs at 3x112x112'
    with pytest.raises(SystemExit):
        model_info.main(['resnet_18'])
    assert 'did you mean resnet18' in capsys.readouterr().err
    # A published row with a static baseline: the overhead over it, here and in the paper.
    assert model_info.main(['od_resnet18', '--model-kwargs', 'kernel_num=4']) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith('over resnet18: +0.132 GMACs here, +0.1020 published')


REFERENCE_YAML = """
ddf:
  models:
    - {name: ddf_mul_resnet50, params_m: 16.8, flops_g: 2.3, top1: 79.1, top5: 94.5}
  eval: {crop: {value: 224}, crop_pct: 0.875, interpolation: {value: bicubic}, mean: [0.485, 0.456, 0.406],
         std: [0.229, 0.224, 0.225]}
odconv:
  models:
    - {name: od_resnet18, args: {kernel_num: 4}, params_m: 44.9, top1: 74.19, top5: 91.47}
  eval: {crop: 224, crop_pct: 0.875, interpolation: bilinear}
dwnet:
  models:
    - {name: dwnet_tiny_patch4_window7_224, params_m: 24, top1: 81.2, top5: null}
  eval: {crop: 224, crop_pct: 0.875, interpolation: bicubic}
dgconv:
  models:
    - {name: g_resnext50, top1: 78.592, top5: 94.106}
  eval: {crop: 224, crop_pct: 0.875, interpolation: bilinear}
"""

# (row key, model, kwargs, release format): one release format per family, small depth to keep the test fast.
RELEASES = [
    ('ddf_mul_resnet50', 'ddf_mul_resnet50', dict(layers=(1, 1, 1, 1)), 'ddfnet_timm'),
    ('od_resnet18_4x', 'od_resnet18', dict(layers=(1, 1, 1, 1), kernel_num=4), 'odconv_main'),
    ('g_resnext50', 'g_resnext50', dict(layers=(1, 1, 1, 1)), 'torchvision'),
    ('dwnet_tiny_patch4_window7_224', 'dwnet_tiny_patch4_window7_224', dict(depths=(1, 1, 1, 1)), 'swin'),
]


def _constant_release(model_name, kwargs, fmt, monkeypatch):
    """A release-format checkpoint whose model ignores the image and ranks classes 0, 1, 2, ... (top-1 10%, top-5 50%
    on the balanced 10-class val set)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=TINY_NUM_CLASSES, **kwargs)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(TINY_NUM_CLASSES, 0, -1, dtype=torch.float32))
    return build_release(fmt, model, monkeypatch)


@pytest.fixture(scope='module')
def release_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('released')
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, model_name, kwargs, fmt in RELEASES:
            # ODConv's file goes under a custom name, found through --names.
            name = 'odconv4x_resnet18.pth' if key == 'od_resnet18_4x' else f'{key}.pth.tar'
            torch.save(_constant_release(model_name, kwargs, fmt, monkeypatch), folder / name)
    (folder / 'names.yaml').write_text('od_resnet18_4x: odconv4x_resnet18.pth\n')
    reference = folder / 'paper_tables.yaml'
    reference.write_text(REFERENCE_YAML)
    return folder


def _reproduce(data, folder, *extra):
    return reproduce.main([data, str(folder), '--reference', str(folder / 'paper_tables.yaml'), '--names',
                           str(folder / 'names.yaml'), '--img-size', '32', '--num-classes', str(TINY_NUM_CLASSES),
                           '-b', '20', '-j', '0', '--device', 'cpu', *extra])


def test_reproduce_release_formats(tiny_imagefolder, release_dir, tmp_path, capsys):
    results_file, output = tmp_path / 'r.json', tmp_path / 'r.md'
    assert _reproduce(tiny_imagefolder, release_dir, '--models', 'ddf_*,od_*,g_*', '--model-kwargs',
                      'layers=(1, 1, 1, 1)', '--results-file', str(results_file), '--output', str(output)) == 0
    assert _reproduce(tiny_imagefolder, release_dir, '--models', 'dwnet_*', '--model-kwargs',
                      'depths=(1, 1, 1, 1)') == 0
    printed = capsys.readouterr().out

    rows = {r['key']: r for r in json.loads(results_file.read_text())}
    assert sorted(rows) == ['ddf_mul_resnet50', 'g_resnext50', 'od_resnet18_4x']
    for row in rows.values():
        assert (row['top1'], row['top5'], row['samples']) == (pytest.approx(10.), pytest.approx(50.), 40)
        assert row['top1_diff'] == pytest.approx(10. - row['pub_top1'])
        assert row['top5_diff'] == pytest.approx(50. - row['pub_top5'])
        assert (row['img_size'], row['crop_pct']) == (32, 0.875)
    # Each paper's evaluation protocol is applied.
    assert rows['ddf_mul_resnet50']['interpolation'] == 'bicubic'
    assert rows['od_resnet18_4x']['interpolation'] == 'bilinear'
    assert rows['od_resnet18_4x']['checkpoint'].endswith('odconv4x_resnet18.pth')
    assert '| ddf | `ddf_mul_resnet50` |  | ddf_mul_resnet50.pth.tar | 32px 0.875 bicubic | 79.1 | 10.00 | -69.10 |' \
        in output.read_text()
    dwnet_line = next(line for line in printed.splitlines() if 'dwnet_tiny' in line)
    assert '| 81.2 | 10.00 | -71.20 |  | 50.00 |  |' in dwnet_line  # no published top-5: no difference


def test_reproduce_lists_keys_and_reports_missing_checkpoints(tiny_imagefolder, release_dir, tmp_path, capsys):
    assert _reproduce(tiny_imagefolder, release_dir, '--list') == 0
    listed = capsys.readouterr().out.splitlines()
    assert 'od_resnet18_4x: odconv4x_resnet18.pth' in listed and 'g_resnext50: g_resnext50.pth.tar' in listed
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'names.yaml').write_text('{}\n')
    (empty / 'paper_tables.yaml').write_text(REFERENCE_YAML)
    with pytest.raises(SystemExit):
        _reproduce(tiny_imagefolder, empty)
    assert f'no released checkpoint found in {empty}' in capsys.readouterr().err


def test_reproduce_reports_a_wrong_checkpoint(tiny_imagefolder, release_dir, tmp_path):
    folder = tmp_path / 'wrong'
    folder.mkdir()
    (folder / 'names.yaml').write_text('{}\n')
    (folder / 'paper_tables.yaml').write_text(REFERENCE_YAML)
    # DDF weights under DGConv's name: the table row reports the key mismatch instead of a number.
    (folder / 'g_resnext50.pth.tar').write_bytes((release_dir / 'ddf_mul_resnet50.pth.tar').read_bytes())
    results_file = tmp_path / 'r.csv'
    with pytest.raises(SystemExit, match='1 of 1 checkpoints failed'):
        _reproduce(tiny_imagefolder, folder, '--model-kwargs', 'layers=(1, 1, 1, 1)', '--results-file',
                   str(results_file))
    with open(results_file) as f:
        (row,) = list(csv.DictReader(f))
    assert row['key'] == 'g_resnext50' and 'does not fit model g_resnext50' in row['error']


def test_benchmark_models_table(tmp_path):
    output = tmp_path / 'bench.md'
    assert benchmark_models.main([
        '--families', 'ddf', '--device', 'cpu', '--img-size', '32', '-b', '2', '--warmup', '0', '--iters', '1',
        '--model-kwargs', 'layers=(1, 1, 1, 1)', 'num_classes=10', '--output', str(output)]) == 0
    text = output.read_text()
    assert '### CPU, batch 2, 32x32, float32' in text and 'Command: `python scripts/benchmark_models.py' in text
    rows = [line.split('|')[1:-1] for line in text.splitlines() if line.startswith('| ddf |')]
    assert [r[1].strip() for r in rows] == ['`resnet50` (baseline)', '`ddf_mul_resnet50`']
    assert rows[0][5].strip() == '1.00x' and rows[0][7].strip() == '1.00x'
    assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        benchmark_models.main(['--families', 'nope'])
