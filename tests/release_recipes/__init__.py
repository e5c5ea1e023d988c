"""Each config's recipe as its release's own code defines it, and the comparison with `train.py --plan`.

One module per family (`odconv.py`, `dwnet.py`, `ddf.py`, `dgconv.py`, `rednet.py`) exposes `RECIPES`: config path
(relative to the repository root) -> a function returning the expected plan, a dict with a subset of the plan's keys
(`training/plan.py`), each value derived from the release's code with its file and line cited beside the rule.
`param_groups` is compared as a partition of parameter names by (weight_decay, lr_scale); `lr` and `temperature`
value by value (rel 1e-9); every other key for equality.
"""
import math

__all__ = ['assert_plan_matches', 'merged_groups']


def merged_groups(param_groups):
    """{(weight_decay, lr_scale): set of names}: groups with equal settings merged, empty groups dropped."""
    merged = {}
    for group in param_groups:
        if group['params']:
            key = (float(group['weight_decay']), float(group.get('lr_scale', 1.0)))
            merged.setdefault(key, set()).update(group['params'])
    return merged


def _first_difference(got, want, rel):
    if len(got) != len(want):
        return f'length {len(got)}, release {len(want)}'
    for i, (g, w) in enumerate(zip(got, want)):
        if not math.isclose(g, w, rel_tol=rel, abs_tol=1e-300):
            return f'update {i}: {g!r}, release {w!r}'
    return None


def assert_plan_matches(plan, expected, rel=1e-9):
    """Asserts that every key of `expected` agrees with `plan`; the message names each key that differs."""
    problems = []
    for key, want in expected.items():
        if key not in plan:
            problems.append(f'{key}: missing from the plan')
            continue
        got = plan[key]
        if key in ('lr', 'temperature') and want is not None and got is not None:
            diff = _first_difference(got, want, rel)
            if diff:
                problems.append(f'{key}: {diff}')
        elif key == 'param_groups':
            got_groups, want_groups = merged_groups(got), merged_groups(want)
            if got_groups != want_groups:
                for k in sorted(set(got_groups) | set(want_groups)):
                    only_plan = sorted(got_groups.get(k, set()) - want_groups.get(k, set()))
                    only_release = sorted(want_groups.get(k, set()) - got_groups.get(k, set()))
                    if only_plan or only_release:
                        problems.append(f'param_groups (weight_decay, lr_scale)={k}: plan only {only_plan[:5]} '
                                        f'({len(only_plan)}), release only {only_release[:5]} ({len(only_release)})')
        elif got != want:
            problems.append(f'{key}: plan {got!r}, release {want!r}')
    assert not problems, 'plan differs from the release:\n  ' + '\n  '.join(problems)
