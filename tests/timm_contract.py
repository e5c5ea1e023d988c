"""timm's model contract on this project's models: runs timm's own tests/test_models.py over them.

    python -m tests.timm_contract PATH/TO/pytorch-image-models/tests/test_models.py [pytest args]

Nothing is fetched or copied: the file is read from the given timm checkout (the one the README's Testing section
names). Before it is collected, `import models` registers the project's models, and timm's `list_models` /
`list_pretrained` as that file sees them keep only the project's models; a call given a list of modules (the file's
list of modules whose models must have `forward_intermediates`) gets the project's modules added to it. Only tests
of a project model run: those of timm's own models (a fixed model name) and those that download pretrained weights
are deselected.
"""
import functools
import sys

import pytest
import timm

import models


def _project_only(list_fn, ours: set):
    @functools.wraps(list_fn)
    def wrapper(*args, **kwargs):
        if isinstance(kwargs.get('module'), (list, tuple)):
            kwargs['module'] = [*kwargs['module'], *models.MODULES]
        return [name for name in list_fn(*args, **kwargs) if name.split('.')[0] in ours]
    return wrapper


# timm's tests that download each model's pretrained weights.
_DOWNLOADING_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')


class _ProjectModelTests:
    """Keeps the tests parametrized with one of the project's models, minus the downloading ones."""

    def __init__(self, ours: set):
        self.ours = ours

    def pytest_collection_modifyitems(self, config, items):
        def keep(item) -> bool:
            model_name = item.callspec.params.get('model_name') if hasattr(item, 'callspec') else None
            return isinstance(model_name, str) and model_name.split('.')[0] in self.ours and \
                item.originalname not in _DOWNLOADING_TESTS
        config.hook.pytest_deselected(items=[item for item in items if not keep(item)])
        items[:] = [item for item in items if keep(item)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith('test_models.py'):
        print('usage: python -m tests.timm_contract PATH/TO/timm/tests/test_models.py [pytest args]', file=sys.stderr)
        return 2
    ours = set(timm.list_models(module=list(models.MODULES)))
    timm.list_models = _project_only(timm.list_models, ours)
    timm.list_pretrained = _project_only(timm.list_pretrained, ours)
    # importlib mode: timm's tests/ package must not meet this project's; no ini file: timm's pytest settings
    # (markers, timeouts) are not this project's.
    return pytest.main(['--import-mode=importlib', '-c', '/dev/null', '--rootdir', '.', '-p', 'no:cacheprovider',
                        '-W', 'ignore::pytest.PytestUnknownMarkWarning', *argv], plugins=[_ProjectModelTests(ours)])


if __name__ == '__main__':
    sys.exit(main())
