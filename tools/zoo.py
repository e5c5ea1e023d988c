"""The model zoo table: every registered model's params and GMACs beside the published numbers.

One row per model the project registers (default arguments), plus one per published architecture variant (ODConv
`kernel_num`) and per published static baseline that timm provides. Params and GMACs are counted by
tools/info.py (FlopCounterMode on the meta device, the compiled dynamic-filter op included) at each model's
default input size; published params, FLOPs/Madds and top-1/top-5 come from the reference paper tables.
scripts/model_zoo.py writes docs/model_zoo.md and docs/model_zoo.csv; tests/test_zoo.py fails when they are stale.
"""
import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import yaml

import models
from models._helpers import project_models
from tools.info import count_params_and_macs, create_counting_model, default_input_size

REPO = Path(__file__).resolve().parents[1]

__all__ = ['table_rows', 'zoo_rows', 'to_markdown', 'to_csv', 'count_model', 'find_config', 'published_overhead']

DEFAULT_REFERENCE = REPO / 'reference' / 'paper_tables.yaml'
DOC_MD = REPO / 'docs' / 'model_zoo.md'
DOC_CSV = REPO / 'docs' / 'model_zoo.csv'
CONFIG_DIR = REPO / 'configs'

# Entrypoint kwargs that change the architecture, with their defaults: a published row with another value is a
# separate zoo row (ODConv's `kernel_num`; the paper tables name its rows by name + args).
VARIANT_KWARGS = {'kernel_num': 1}
# DWNet's README names its dynamic models ddwnet_* / iddwnet_*; the registered names spell them out.
_NAME_PREFIXES = (('iddwnet_', 'i_dynamic_dwnet_'), ('ddwnet_', 'dynamic_dwnet_'))
_FAMILY_OF_MODULE = {module.__name__.rpartition('.')[2]: family for family, modules in models.FAMILIES.items()
                     for module in modules}

CSV_FIELDS = [
    'family', 'kind', 'model', 'kwargs', 'img_size', 'params_m', 'gmacs', 'pub_params_m', 'pub_gmacs',
    'params_diff_pct', 'gmacs_diff_pct', 'baseline', 'overhead_gmacs', 'pub_overhead_gmacs', 'overhead_diff_pct',
    'pub_top1', 'pub_top5', 'config', 'source']


def _registered_name(name: str) -> Optional[str]:
    if timm.is_model(name):
        return name
    for old, new in _NAME_PREFIXES:
        if name.startswith(old) and timm.is_model(new + name[len(old):]):
            return new + name[len(old):]
    return None


def _variant_kwargs(args: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The architecture kwargs of a published row that differ from the entrypoint defaults."""
    args = args or {}
    return {k: args[k] for k, default in VARIANT_KWARGS.items() if k in args and args[k] != default}


def _published(reference: Path) -> List[Dict[str, Any]]:
    """Rows of the paper tables that name a model timm can build (registered project model or timm baseline)."""
    tables = yaml.safe_load(reference.read_text())
    rows = []
    for family, section in tables.items():
        for entry in section.get('models', []):
            if entry.get('related') or not isinstance(entry.get('name'), str):
                continue
            model = _registered_name(entry['name'])
            if model is None:
                continue
            rows.append(dict(
                family=family,
                kind='baseline' if entry.get('baseline') else 'dynamic',
                model=model,
                kwargs=_variant_kwargs(entry.get('args')),
                pub_params_m=entry.get('params_m'),
                pub_gmacs=entry.get('flops_g') if entry.get('flops_g') is not None else entry.get('madds_g'),
                pub_top1=next((entry[k] for k in ('top1', 'top1_retrained', 'top1_official') if entry.get(k)), None),
                pub_top5=next((entry[k] for k in ('top5', 'top5_retrained') if entry.get(k)), None),
                source=entry.get('from', ''),
            ))
    return rows


def _read_configs() -> List[Dict[str, Any]]:
    configs = []
    for path in sorted(CONFIG_DIR.glob('*/*.yaml')):
        cfg = yaml.safe_load(path.read_text()) or {}
        if isinstance(cfg, dict) and cfg.get('model'):
            configs.append(dict(path=path.relative_to(REPO).as_posix(), model=cfg['model'],
                                kwargs=_variant_kwargs(cfg.get('model_kwargs'))))
    return configs


def find_config(model: str, kwargs: Dict[str, Any], configs: List[Dict[str, Any]]) -> str:
    """Path of the training config for this model and architecture kwargs ('' if none)."""
    return next((c['path'] for c in configs if c['model'] == model and c['kwargs'] == kwargs), '')


def count_model(model: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Params (M), GMACs and input size of a model counted on the meta device."""
    net = create_counting_model(model, **kwargs)
    input_size = default_input_size(net)
    params, macs = count_params_and_macs(net, input_size)
    return dict(params_m=params / 1e6, gmacs=macs / 1e9, img_size=input_size[-1])


def _diff_pct(ours: Optional[float], published: Optional[float]) -> Optional[float]:
    if ours is None or not published:
        return None
    return 100. * (ours - published) / published


def table_rows(reference: Optional[Path] = DEFAULT_REFERENCE) -> List[Dict[str, Any]]:
    """The zoo's rows before counting: published rows timm can build, then project models without a published row.

    Args:
        reference: paper_tables.yaml; None or a missing file gives the project models only, without published columns.

    Returns:
        Dicts with family, kind ('dynamic' or 'baseline'), model, kwargs, source and the published values, sorted.
    """
    published = _published(reference) if reference is not None and reference.is_file() else []
    seen = {(r['model'], json.dumps(r['kwargs'], sort_keys=True)) for r in published if r['kind'] == 'dynamic'}
    rows = list(published)
    for model in project_models():
        if (model, '{}') not in seen:
            module = timm.models.model_entrypoint(model).__module__.rsplit('.', 1)[-1]
            rows.append(dict(family=_FAMILY_OF_MODULE.get(module, module), kind='dynamic', model=model, kwargs={},
                             source=''))
    family_order = {f: i for i, f in enumerate(models.FAMILIES)}
    rows.sort(key=lambda r: (r['kind'] != 'dynamic', family_order.get(r['family'], 9), r['family'], r['model'],
                             bool(r['kwargs']), json.dumps(r['kwargs'], sort_keys=True)))
    return rows


def zoo_rows(reference: Optional[Path] = DEFAULT_REFERENCE) -> List[Dict[str, Any]]:
    """`table_rows` with params (M), GMACs, input size, differences to the published values and the config file."""
    rows = table_rows(reference)
    configs = _read_configs()
    counts = {}
    for row in rows:
        key = (row['model'], json.dumps(row['kwargs'], sort_keys=True))
        if key not in counts:
            counts[key] = count_model(row['model'], row['kwargs'])
        row.update(counts[key])
        row['params_diff_pct'] = _diff_pct(row['params_m'], row.get('pub_params_m'))
        row['gmacs_diff_pct'] = _diff_pct(row['gmacs'], row.get('pub_gmacs'))
        row['config'] = find_config(row['model'], row['kwargs'], configs)
    for row in rows:
        _add_overhead(row, _baseline_of(row, rows))
    return rows


def _baseline_of(row: Dict[str, Any], rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The static baseline of a dynamic row: the same table's baseline whose name ends the model's name."""
    if row['kind'] != 'dynamic':
        return None
    candidates = [b for b in rows if b['kind'] == 'baseline' and b['family'] == row['family']
                  and row['model'].endswith('_' + b['model'])]
    return max(candidates, key=lambda b: len(b['model']), default=None)


def _add_overhead(row: Dict[str, Any], baseline: Optional[Dict[str, Any]]) -> None:
    """GMACs over the static baseline, counted here and published (papers count their baselines differently)."""
    row['baseline'] = baseline['model'] if baseline else ''
    row['overhead_gmacs'] = row['gmacs'] - baseline['gmacs'] if baseline else None
    published = [r.get('pub_gmacs') for r in (row, baseline or {})]
    row['pub_overhead_gmacs'] = published[0] - published[1] if None not in published else None
    row['overhead_diff_pct'] = _diff_pct(row['overhead_gmacs'], row['pub_overhead_gmacs'])


def published_overhead(model: str, kwargs: Dict[str, Any], reference: Path = DEFAULT_REFERENCE
                       ) -> Optional[Dict[str, Any]]:
    """The published row of `model` with these architecture kwargs, counted with its baseline (None if no such row
    or no baseline): the zoo row's fields, overhead_gmacs and pub_overhead_gmacs included."""
    rows = _published(reference) if reference.is_file() else []
    row = next((r for r in rows if r['kind'] == 'dynamic' and r['model'] == model
                and r['kwargs'] == _variant_kwargs(kwargs)), None)
    baseline = _baseline_of(row, rows) if row else None
    if baseline is None or row.get('pub_gmacs') is None or baseline.get('pub_gmacs') is None:
        return None
    for r in (row, baseline):
        r.update(count_model(r['model'], r['kwargs']))
    _add_overhead(row, baseline)
    return row


def _fmt(value: Any, spec: str = '') -> str:
    if value is None or value == '':
        return ''
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items())
    if not spec:
        return str(value)
    text = format(value, spec)
    return format(0., spec) if float(text) == 0 else text  # no '-0.0'


def to_csv(rows: List[Dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    specs = dict(params_m='.2f', gmacs='.3f', params_diff_pct='.1f', gmacs_diff_pct='.1f', overhead_gmacs='.4f',
                 pub_overhead_gmacs='.4f', overhead_diff_pct='.1f')
    for row in rows:
        writer.writerow({k: _fmt(row.get(k), specs.get(k, '')) for k in CSV_FIELDS})
    return out.getvalue()


_MD_HEADER = """# Model zoo

Generated by `python scripts/model_zoo.py` (do not edit; `tests/test_zoo.py` fails when this file is stale). Also
as CSV: [model_zoo.csv](model_zoo.csv).

- **params (M)** and **GMACs** are counted here at the model's default input size (`scripts/model_info.py`:
  `torch.utils.flop_counter.FlopCounterMode`, one multiply-add = 2 FLOPs, the dynamic-filter op counted by its
  registered formula; attention/filter-generating branches included, element-wise ops such as BN, activations and
  attention multiplications not counted). ODConv layers count as the ODConv paper does (`ODConv2d.count_macs`: the
  convolution, the attention fcs and every attention applied to every candidate kernel).
- **published** values are from the papers and READMEs (`paper_tables.yaml` of the reference facts; `source` in the
  CSV): FLOPs and Madds as reported, all in G multiply-adds. **Δ** = (ours - published) / published.
- ODConv's README counts Madds with a different tool (its ResNet-50 baseline is 3.858 G where FlopCounterMode counts
  4.089 G): compare the dynamic overhead over the static baseline of the same table (last table), not the
  absolute numbers.
- G-ResNeXt rows count the release's dense 3x3 weights (masked, stored densely): parameters and MACs of the dense
  model, not of the learned grouping.
- `kwargs` are entrypoint arguments (`--model-kwargs` of validate.py / `model_kwargs` in the configs).

Commands for a row (`MODEL`, `KWARGS`, `CONFIG` from the table):

```bash
./distributed_train.sh 8 --config CONFIG --data-dir /data/imagenet          # train (the config holds the recipe)
python validate.py /data/imagenet --model MODEL --model-kwargs KWARGS --checkpoint MODEL.pth.tar   # validate
python scripts/reproduce.py /data/imagenet /path/to/released/checkpoints    # every released checkpoint found
python scripts/model_info.py MODEL --model-kwargs KWARGS                    # params and GMACs
```
"""


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    lines = [_MD_HEADER]
    for kind, title in (('dynamic', 'Dynamic models'), ('baseline', 'Static baselines of the same tables')):
        lines += [f'## {title}', '',
                  '| family | model | kwargs | img | params (M) | published | Δ % | GMACs | published | Δ % '
                  '| pub. top-1 | pub. top-5 | config |',
                  '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
        for r in (r for r in rows if r['kind'] == kind):
            config = f'[{r["config"]}](../{r["config"]})' if r['config'] else ''
            lines.append(
                f'| {r["family"]} | `{r["model"]}` | {_fmt(r["kwargs"])} | {r["img_size"]} | {r["params_m"]:.2f} | '
                f'{_fmt(r.get("pub_params_m"))} | {_fmt(r["params_diff_pct"], "+.1f")} | {r["gmacs"]:.3f} | '
                f'{_fmt(r.get("pub_gmacs"))} | {_fmt(r["gmacs_diff_pct"], "+.1f")} | {_fmt(r.get("pub_top1"))} | '
                f'{_fmt(r.get("pub_top5"))} | {config} |')
        lines.append('')
    lines += ['## Dynamic overhead over the static baseline', '',
              'GMACs of the dynamic model minus those of its static baseline, each counted the same way (here: by '
              'model_info.py; published: by the paper\'s tool).', '',
              '| family | model | kwargs | baseline | overhead GMACs | published | Δ % |',
              '| --- | --- | --- | --- | ---: | ---: | ---: |']
    for r in (r for r in rows if r.get('pub_overhead_gmacs') is not None):
        lines.append(f'| {r["family"]} | `{r["model"]}` | {_fmt(r["kwargs"])} | `{r["baseline"]}` | '
                     f'{r["overhead_gmacs"]:+.4f} | {r["pub_overhead_gmacs"]:+.4f} | '
                     f'{_fmt(r["overhead_diff_pct"], "+.1f")} |')
    lines.append('')
    return '\n'.join(lines)
