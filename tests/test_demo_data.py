"""Tests for tools/demo_data.py and scripts/make_demo_data.py: layout, real JPEGs, determinism, and that only shape
tells classes apart."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tools.demo_data import SHAPES, make_demo_dataset

from conftest import TINY_IMAGE_SIZE, TINY_NUM_CLASSES, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _read(root, rel_path):
    with open(os.path.join(root, rel_path), 'rb') as f:
        return f.read()


def _load(root, split):
    """All images of a split as float arrays (N, H, W, 3) with labels in ImageFolder order (sorted class names)."""
    images, labels = [], []
    for label, name in enumerate(sorted(os.listdir(os.path.join(root, split)))):
        class_dir = os.path.join(root, split, name)
        for f in sorted(os.listdir(class_dir)):
            with Image.open(os.path.join(class_dir, f)) as img:
                images.append(np.asarray(img.convert('RGB'), dtype=np.float64))
            labels.append(label)
    return np.stack(images), np.array(labels)


def _nearest_centroid(f_train, y_train, f_val, y_val):
    centroids = np.stack([f_train[y_train == c].mean(0) for c in np.unique(y_train)])
    pred = ((f_val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return (pred == y_val).mean()


def _knn(f_train, y_train, f_val, y_val, k=5):
    nearest = np.argsort(((f_val[:, None] - f_train[None]) ** 2).sum(-1), axis=1)[:, :k]
    pred = np.array([np.bincount(y_train[i]).argmax() for i in nearest])
    return (pred == y_val).mean()


def _mean_colour(x):
    return x.mean((1, 2))


def _radial_spectrum(x):
    """Position- and rotation-invariant structure feature: log power of the grey image per spatial frequency."""
    grey = x.mean(-1)
    grey = (grey - grey.mean((1, 2), keepdims=True)) / (grey.std((1, 2), keepdims=True) + 1e-6)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))) ** 2
    n = x.shape[1]
    yy, xx = np.mgrid[:n, :n] - n // 2
    radius = np.hypot(yy, xx).astype(int).ravel()
    counts = np.bincount(radius)
    f = np.stack([np.bincount(radius, weights=p.ravel()) / counts for p in power])[:, 1:n // 2]
    f = np.log(f + 1e-6)
    return (f - f.mean(0)) / f.std(0)


@pytest.fixture(scope='module')
def separability_data(tmp_path_factory):
    root = make_demo_dataset(
        str(tmp_path_factory.mktemp('demo_sep')), num_classes=10, train_per_class=40, val_per_class=20,
        image_size=32, seed=0)
    return _load(root, 'train') + _load(root, 'val')


def test_layout_and_real_jpegs(tiny_imagefolder):
    for split, count in (('train', TINY_TRAIN_PER_CLASS), ('val', TINY_VAL_PER_CLASS)):
        classes = sorted(os.listdir(os.path.join(tiny_imagefolder, split)))
        assert classes == sorted(list(SHAPES)[:TINY_NUM_CLASSES])
        for name in classes:
            files = sorted(os.listdir(os.path.join(tiny_imagefolder, split, name)))
            assert len(files) == count
            for f in files:
                path = os.path.join(tiny_imagefolder, split, name, f)
                with open(path, 'rb') as fh:
                    assert fh.read(3) == b'\xff\xd8\xff'  # JPEG SOI marker, not a renamed PNG
                with Image.open(path) as img:
                    assert img.format == 'JPEG'
                    assert img.mode == 'RGB'
                    assert img.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
                    img.verify()


def test_deterministic(tmp_path):
    kwargs = dict(num_classes=10, train_per_class=3, val_per_class=2, image_size=24, seed=7)
    a = make_demo_dataset(str(tmp_path / 'a'), **kwargs)
    b = make_demo_dataset(str(tmp_path / 'b'), **kwargs)
    c = make_demo_dataset(str(tmp_path / 'c'), **dict(kwargs, seed=8))
    assert _files(a) == _files(b) == _files(c)
    image_files = [f for f in _files(a) if f.endswith('.jpg')]
    assert len(image_files) == 10 * (3 + 2)
    assert all(_read(a, f) == _read(b, f) for f in image_files)
    assert all(_read(a, f) != _read(c, f) for f in image_files)


def test_train_and_val_images_differ(tiny_imagefolder):
    x_train, _ = _load(tiny_imagefolder, 'train')
    x_val, _ = _load(tiny_imagefolder, 'val')
    dist = np.abs(x_val[:, None] - x_train[None]).mean((2, 3, 4))
    assert dist.min() > 5.


def test_images_vary_within_class(tiny_imagefolder):
    x, y = _load(tiny_imagefolder, 'train')
    for c in np.unique(y):
        colours = _mean_colour(x[y == c])
        assert colours.std(0).min() > 10.  # colours and backgrounds are not fixed per class


def test_mean_colour_does_not_tell_classes_apart(separability_data):
    x_train, y_train, x_val, y_val = separability_data
    f_train, f_val = _mean_colour(x_train), _mean_colour(x_val)
    # chance is 0.1; a class-dependent colour or brightness would push both far above it
    assert _nearest_centroid(f_train, y_train, f_val, y_val) < 0.2
    assert _knn(f_train, y_train, f_val, y_val) < 0.2
    brightness_train, brightness_val = f_train.mean(1, keepdims=True), f_val.mean(1, keepdims=True)
    assert _nearest_centroid(brightness_train, y_train, brightness_val, y_val) < 0.2


def test_structure_tells_classes_apart(separability_data):
    x_train, y_train, x_val, y_val = separability_data
    # even a crude shape feature with k-NN is far above chance (0.1); a CNN gets much further (see configs/demo.yaml)
    assert _knn(_radial_spectrum(x_train), y_train, _radial_spectrum(x_val), y_val) > 0.35


def test_existing_dataset_is_reused(tmp_path):
    kwargs = dict(num_classes=10, train_per_class=1, val_per_class=1, image_size=16)
    root = make_demo_dataset(str(tmp_path), **kwargs)
    probe = os.path.join(root, 'train', 'circle', 'circle_00000.jpg')
    os.utime(probe, (0, 0))
    make_demo_dataset(root, **kwargs)
    assert os.path.getmtime(probe) == 0
    make_demo_dataset(root, **dict(kwargs, train_per_class=2))
    assert os.path.getmtime(probe) != 0
    assert len(os.listdir(os.path.join(root, 'train', 'circle'))) == 2


@pytest.mark.parametrize('kwargs', [dict(num_classes=1), dict(num_classes=len(SHAPES) + 1), dict(train_per_class=0),
                                    dict(image_size=8)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_demo_dataset(str(tmp_path), **kwargs)


def test_cli(tmp_path):
    script = os.path.join(REPO, 'scripts', 'make_demo_data.py')
    out = tmp_path / 'demo'
    ok = subprocess.run(
        [sys.executable, script, '-o', str(out), '--num-classes', '10', '--train-per-class', '1',
         '--val-per-class', '1', '--image-size', '16'], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(os.listdir(out / 'train')) == 10

    bad = subprocess.run(
        [sys.executable, script, '-o', str(tmp_path / 'bad'), '--num-classes', '99'], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().count('\n') == 0 and 'num_classes' in bad.stderr
    assert 'Traceback' not in bad.stderr
