#!/usr/bin/env python3
"""Mutation check of the Python around the kernels: the weight loader, the option resolution and scheduling of
training/, and the layers' attention code. Development only (mutmut from requirements-dev.txt), not in `make test`.

mutmut (configured in pyproject.toml's ``[tool.mutmut]``) copies the tree into ``mutants/``, runs the fast tests once
to learn which tests call each function, then runs, for every mutant of a function named in TARGETS, only those
tests (``pytest -x``, slow end-to-end runs excluded). This script runs it, then prints the score over TARGETS and
every survivor with its diff.

Usage (from the repository root, with the project's venv):
    python scripts/mutation_check.py                 # all targets; ``rm -rf mutants`` first for a fresh run
    python scripts/mutation_check.py --report-only   # the last run's score and survivors
"""
import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = 'ǁ'  # mutmut's class-name separator in mangled names

# Globs over mutmut's names: <module>.x_<function>__mutmut_N, <module>.xǁ<Class>ǁ<method>__mutmut_N (the
# bare function name must match too: mutmut picks the clean tests by it).
TARGETS = [
    # the loader every weight flag goes through; its message builders and the download are left out
    *[f'models._helpers.x_{n}*' for n in (
        '_strip_prefixes', 'unwrap_state_dict', '_misshaped_keys', 'state_dict_mismatch', '_model_filter_fn',
        '_cfg_names', '_classifier_names', '_is_classifier_key', '_adapt_for_fine_tuning', 'load_weights',
        'load_checkpoint_file')],
    # option resolution (create_parser, the option table, is left out: its strings are help text)
    *[f'training.options.{n}*' for n in (
        f'x{S}MergeKwargs{S}__call__', 'x_load_config', 'x_parse_args', 'x_args_for_yaml', 'x_global_batch_size',
        'x_resolve_lr')],
    # the schedule and batch arithmetic that the loop and --plan share, and where a resume puts the schedule
    f'training.plan.x{S}TrainingSchedule{S}*',
    *[f'training.plan.x_{n}*' for n in (
        'samples_per_process', 'loader_batches', 'updates_per_epoch', '_replay', 'model_create_kwargs')],
    f'training.resume.x{S}ExactResume{S}start*',
    'training.hooks.*',
    # attention: ODConv's four attentions and temperature, DDF's filter branches, DGConv's gates, DWNet's filters
    *[f'models.layers.odconv.x{S}ODAttention{S}{n}*' for n in ('reset_parameters', '_head', 'forward')],
    'models.layers.odconv.x_odconv_temperature*',
    f'models.layers.odconv.x{S}ODConvTrainingHooks{S}*',
    f'models.layers.ddf.x{S}FilterNorm{S}forward*',
    *[f'models.layers.ddf.x_{n}*' for n in ('_standardize', '_spatial_branch', '_channel_branch')],
    *[f'models.layers.dgconv.x{S}DGConv2d{S}{n}*' for n in (
        'reset_gates', 'binary_gates', 'mask', 'regularizer', 'num_groups')],
    f'models.layers.dynamic_dw.x{S}DynamicDWConv{S}forward*',
    f'models.layers.dynamic_dw.x{S}IDynamicDWConv{S}forward*',
]


KILLED = ('killed', 'timeout', 'segfault', 'caught by type check')


def _results():
    """{mutant name: (status, source file)} over TARGETS, from mutmut's meta files."""
    from mutmut.stats import status_by_exit_code
    found = {}
    for meta in (ROOT / 'mutants').rglob('*.py.meta'):
        source = meta.relative_to(ROOT / 'mutants').with_suffix('')
        with open(meta) as f:
            for name, code in json.load(f)['exit_code_by_key'].items():
                if any(fnmatch.fnmatchcase(name, t) for t in TARGETS):
                    found[name] = (status_by_exit_code[code], source)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--max-children', type=int, default=2, help='mutants tested at once')
    parser.add_argument('--report-only', action='store_true', help="print the last run's results")
    parser.add_argument('--survivors-only', action='store_true',
                        help='rerun only the survivors of the last run (after adding tests for them)')
    args = parser.parse_args()
    start = time.time()
    if not args.report_only:
        # one thread per test process: the children run side by side
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
        # a tree with results reruns the mutants not killed yet (--survivors-only: only those the last run let
        # live); `rm -rf mutants` for a fresh run. mutmut forgets a kill when the tests change.
        names = []
        if (ROOT / 'mutants').is_dir():
            skip = KILLED + (('not checked',) if args.survivors_only else ())
            names = sorted(n for n, (s, _) in _results().items() if s not in skip)
        run = subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(args.max_children),
                              *(names or TARGETS)], cwd=ROOT, env=env, check=False)
        if run.returncode:
            sys.exit(f'mutmut run failed (exit status {run.returncode}); see its output above')
    results = _results()
    counts = {}
    for status, _ in results.values():
        counts[status] = counts.get(status, 0) + 1
    killed = sum(counts.get(s, 0) for s in KILLED)
    # 'no tests': no selected test calls the function, so nothing can kill its mutants
    survivors = sorted(n for n, (s, _) in results.items() if s not in KILLED and s != 'not checked')
    if survivors:
        os.chdir(ROOT)  # mutmut reads its files relative to the working folder
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        for name in survivors:
            status, source = results[name]
            print(f'--- {status}: {name}')
            print('\n'.join(get_diff_for_mutant(name, path=source).splitlines()[2:]))
    print(f'mutants {len(results)}: ' + ', '.join(f'{s} {c}' for s, c in sorted(counts.items())))
    if counts.get('not checked'):
        print("'not checked': the run stopped before these mutants; run the command again to continue it")
    print(f'score {killed}/{len(results)} killed ({100 * killed / max(len(results), 1):.1f}%)'
          + ('' if args.report_only else f'; wall time {time.time() - start:.0f} s'))
    return 1 if survivors else 0


if __name__ == '__main__':
    sys.exit(main())
