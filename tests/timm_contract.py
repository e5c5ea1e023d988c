"""timm's model contract on this project's models: runs timm's own tests/test_models.py over them.

    python -m tests.timm_contract PATH/TO/pytorch-image-models/tests/test_models.py [pytest args]

Nothing is fetched or copied: the file is read from the given timm checkout (the one the README's Testing section
names). Before it is collected, `import models` registers the project's models, and timm's `list_models` /
`list_pretrained` as that file sees them keep only the project's models; a call given a list of modules (the file's
list of modules whose models must have `forward_intermediates`) gets the project's modules added to it.
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith('test_models.py'):
        print('usage: python -m tests.timm_contract PATH/TO/timm/tests/test_models.py [pytest args]', file=sys.stderr)
        return 2
    ours = set(timm.list_models(module=list(models.MODULES)))
    timm.list_models, timm.list_pretrained = (_project_only(fn, ours) for fn in (timm.list_models, timm.list_pretrained))
    # importlib mode: timm's tests/ package must not meet this project's; no ini file: timm's pytest settings
    # (markers, timeouts) are not this project's.
    return pytest.main(['--import-mode=importlib', '-c', '/dev/null', '--rootdir', '.', '-p', 'no:cacheprovider',
                        '-W', 'ignore::pytest.PytestUnknownMarkWarning', *argv])


if __name__ == '__main__':
    sys.exit(main())
