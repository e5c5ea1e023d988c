"""Shared pytest fixtures: the tiny demo ImageFolder, the list of devices to test on, train.py in-process."""
import pytest
import torch

from tools.demo_data import make_demo_dataset

TINY_NUM_CLASSES = 10
TINY_TRAIN_PER_CLASS = 8
TINY_VAL_PER_CLASS = 4
TINY_IMAGE_SIZE = 32

# Devices for `@pytest.mark.parametrize('device', DEVICES)`: CUDA is listed but skipped on machines without a GPU.
DEVICES = [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')),
]


@pytest.fixture(scope='session')
def tiny_imagefolder(tmp_path_factory) -> str:
    """Root of a tiny demo ImageFolder (train/ and val/; 10 classes x 8 train / 4 val JPEGs of 32x32), built once.

    Tests must not modify it: copy it (`shutil.copytree`) to corrupt or remove files.
    """
    root = tmp_path_factory.mktemp('tiny_imagefolder')
    return make_demo_dataset(
        str(root),
        num_classes=TINY_NUM_CLASSES,
        train_per_class=TINY_TRAIN_PER_CLASS,
        val_per_class=TINY_VAL_PER_CLASS,
        image_size=TINY_IMAGE_SIZE,
        seed=0,
    )


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn (CPU, then CUDA when a GPU is present)."""
    return torch.device(request.param)


@pytest.fixture
def in_process(monkeypatch):
    """train.main, run in this process on one thread, with timm's root-logger setup left out (pytest captures)."""
    import train
    monkeypatch.setattr(train.utils, 'setup_default_logging', lambda *a, **k: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train.main
    torch.set_num_threads(threads)
