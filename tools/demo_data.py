"""Write the embedded demo dataset: a small, deterministic ImageFolder of synthetic shapes.

Each class is one shape (circle, square, triangle, cross, ring, star, stripes, checker, ...). Everything else is drawn
independently of the class: position, scale, rotation, the shape's colour, the background (flat colour, linear gradient
or smooth texture), pixel noise. Foreground and background colours come from the same distribution, so the expected
mean colour and brightness of an image are the same for every class: only shape and structure tell classes apart.

Images are JPEG files written with Pillow; nothing is downloaded. The same arguments always give the same files.
Command line: scripts/make_demo_data.py.
"""
import json
import logging
import math
import os
import shutil
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['SHAPES', 'make_demo_dataset', 'render_image']

_logger = logging.getLogger(__name__)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased
_MIN_CONTRAST = 110.  # minimum RGB distance between shape colour and each background colour (0..441)
_JPEG_QUALITY = 90
_META_FILE = 'demo_meta.json'


def _rotated(points: Sequence[Tuple[float, float]], cx: float, cy: float, r: float, angle: float):
    """Scale unit-square coordinates by r, rotate by angle (radians) and move them to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _regular(n: int, inner: float = 0.):
    """Unit polygon with n corners (or a 2n-corner star when inner > 0)."""
    if inner <= 0:
        return [(math.cos(2 * math.pi * k / n - math.pi / 2), math.sin(2 * math.pi * k / n - math.pi / 2))
                for k in range(n)]
    pts = []
    for k in range(2 * n):
        rad = 1. if k % 2 == 0 else inner
        a = math.pi * k / n - math.pi / 2
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _rect(x0: float, y0: float, x1: float, y1: float):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _circle(d: ImageDraw.ImageDraw, cx, cy, r, angle):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _square(d, cx, cy, r, angle):
    d.polygon(_rotated(_rect(-.8, -.8, .8, .8), cx, cy, r, angle), fill=255)


def _triangle(d, cx, cy, r, angle):
    d.polygon(_rotated(_regular(3), cx, cy, r, angle), fill=255)


def _cross(d, cx, cy, r, angle):
    w = .3
    d.polygon(_rotated(_rect(-1, -w, 1, w), cx, cy, r, angle), fill=255)
    d.polygon(_rotated(_rect(-w, -1, w, 1), cx, cy, r, angle), fill=255)


def _ring(d, cx, cy, r, angle):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    ri = .55 * r
    d.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)


def _star(d, cx, cy, r, angle):
    d.polygon(_rotated(_regular(5, inner=.42), cx, cy, r, angle), fill=255)


def _stripes(d, cx, cy, r, angle):
    # three parallel bars in a square: same outline as `square`, different inner structure
    for k in (0, 2, 4):
        y0 = -.85 + k * 1.7 / 5
        d.polygon(_rotated(_rect(-.85, y0, .85, y0 + 1.7 / 5), cx, cy, r, angle), fill=255)


def _checker(d, cx, cy, r, angle):
    cell = 1.7 / 3
    for i in range(3):
        for j in range(3):
            if (i + j) % 2 == 0:
                x0, y0 = -.85 + i * cell, -.85 + j * cell
                d.polygon(_rotated(_rect(x0, y0, x0 + cell, y0 + cell), cx, cy, r, angle), fill=255)


def _crescent(d, cx, cy, r, angle):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    ox, oy = cx + .5 * r * math.cos(angle), cy + .5 * r * math.sin(angle)
    ri = .85 * r
    d.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)


def _arrow(d, cx, cy, r, angle):
    shaft = [(-1, -.2), (.15, -.2), (.15, -.6), (1, 0), (.15, .6), (.15, .2), (-1, .2)]
    d.polygon(_rotated(shaft, cx, cy, r, angle), fill=255)


def _frame(d, cx, cy, r, angle):
    d.polygon(_rotated(_rect(-.85, -.85, .85, .85), cx, cy, r, angle), fill=255)
    d.polygon(_rotated(_rect(-.5, -.5, .5, .5), cx, cy, r, angle), fill=0)


def _half_disc(d, cx, cy, r, angle):
    start = math.degrees(angle)
    d.pieslice((cx - r, cy - r, cx + r, cy + r), start, start + 180, fill=255)


# Class name -> drawing function (draws the shape as 255 on an 'L' mask). The first ten are the default classes.
SHAPES: Dict[str, Callable] = {
    'circle': _circle,
    'square': _square,
    'triangle': _triangle,
    'cross': _cross,
    'ring': _ring,
    'star': _star,
    'stripes': _stripes,
    'checker': _checker,
    'crescent': _crescent,
    'arrow': _arrow,
    'frame': _frame,
    'half_disc': _half_disc,
}


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _background(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Random flat, gradient or smooth-texture background (H, W, 3) float and the colours it mixes."""
    c1, c2 = _colour(rng), _colour(rng)
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(c1, (size, size, 3)).copy(), [c1]
    if kind == 1:
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - .5
        t = np.clip(xx * math.cos(a) + yy * math.sin(a) + .5, 0, 1)[..., None]
    else:
        grid = rng.uniform(0, 255, size=(int(rng.integers(3, 7)),) * 2).astype(np.uint8)
        t = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float64)[..., None] / 255.
    return (1 - t) * c1 + t * c2, [c1, c2]


def render_image(shape: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw one RGB image of a shape with random placement, colours, background and noise.

    Args:
        shape: Key of `SHAPES`.
        rng: Source of all randomness for this image.
        image_size: Output width and height in pixels.
    """
    background, bg_colours = _background(rng, image_size)
    fg = _colour(rng)
    while min(np.linalg.norm(fg - c) for c in bg_colours) < _MIN_CONTRAST:
        fg = _colour(rng)

    big = image_size * _SUPERSAMPLE
    r = rng.uniform(.2, .38) * big
    margin = 1.05 * r
    cx, cy = rng.uniform(margin, big - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = Image.new('L', (big, big), 0)
    SHAPES[shape](ImageDraw.Draw(mask), cx, cy, r, angle)
    mask = mask.resize((image_size, image_size), Image.BOX)
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.

    img = (1 - m) * background + m * fg
    img += rng.normal(0, rng.uniform(2, 14), size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), 'RGB')


def make_demo_dataset(
        root: str,
        num_classes: int = 10,
        train_per_class: int = 200,
        val_per_class: int = 50,
        image_size: int = 64,
        seed: int = 0,
        force: bool = False,
) -> str:
    """Write `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`.

    Every image has its own random stream seeded by (seed, split, class, index), so the files depend only on the
    arguments. If `root` already holds a dataset written with the same arguments, nothing is rewritten.

    Args:
        root: Output folder.
        num_classes: Number of classes, the first `num_classes` keys of `SHAPES`.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        image_size: Image width and height in pixels.
        seed: Base seed; train and val never share a stream.
        force: Rewrite even if an identical dataset is already there.

    Returns:
        root
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be between 2 and {len(SHAPES)}, got {num_classes}')
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError('train_per_class and val_per_class must be at least 1')
    if image_size < 16:
        raise ValueError(f'image_size must be at least 16 pixels, got {image_size}')

    meta = dict(
        num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
        image_size=image_size, seed=seed, jpeg_quality=_JPEG_QUALITY, version=1,
    )
    meta_path = os.path.join(root, _META_FILE)
    if not force and os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                _logger.info(f'Demo data already in {root}')
                return root

    classes = list(SHAPES)[:num_classes]
    for split_id, (split, count) in enumerate((('train', train_per_class), ('val', val_per_class))):
        split_dir = os.path.join(root, split)
        if os.path.isdir(split_dir):
            shutil.rmtree(split_dir)
        for class_id, name in enumerate(classes):
            class_dir = os.path.join(split_dir, name)
            os.makedirs(class_dir)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                img = render_image(name, rng, image_size)
                img.save(os.path.join(class_dir, f'{name}_{i:05d}.jpg'), quality=_JPEG_QUALITY, subsampling=0)
    with open(meta_path, 'w') as f:
        json.dump(meta, f, indent=2)
    _logger.info(
        f'Wrote {num_classes} classes x ({train_per_class} train + {val_per_class} val) images of '
        f'{image_size}x{image_size} to {root}')
    return root
