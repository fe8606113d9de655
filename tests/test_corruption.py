"""Corruptions: published parameter ranges, reproducibility per example, PIL in and out."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from crystal_ext.data.corruption import CorruptionConfig, corrupt, example_rng, random_erase


def _image(w=64, h=48, seed=0):
    rgb = np.random.default_rng(seed).integers(30, 226, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.mark.parametrize("kind", ["blur", "erase", "jitter"])
def test_reproducible_per_example_and_varies_across_examples(kind):
    img, cfg = _image(), CorruptionConfig(kind=kind)
    a = np.asarray(corrupt(img, cfg, seed=1, key="ex-7"))
    b = np.asarray(corrupt(img, cfg, seed=1, key="ex-7"))
    c = np.asarray(corrupt(img, cfg, seed=1, key="ex-8"))
    d = np.asarray(corrupt(img, cfg, seed=2, key="ex-7"))
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert not np.array_equal(a, np.asarray(img))


def test_blur_radius_default_is_2_to_5():
    # Blur of a single bright pixel: its spread grows with the radius; compare with fixed radii.
    from PIL import ImageFilter

    img = Image.new("RGB", (41, 41))
    img.putpixel((20, 20), (255, 255, 255))
    peak = lambda im: np.asarray(im)[20, 20, 0]
    lo, hi = peak(img.filter(ImageFilter.GaussianBlur(5.0))), peak(img.filter(ImageFilter.GaussianBlur(2.0)))
    for key in range(20):
        p = peak(corrupt(img, CorruptionConfig(), seed=0, key=key))
        assert lo <= p <= hi


def test_erase_covers_10_to_30_percent_with_zeros():
    img = Image.new("RGB", (80, 60), (255, 255, 255))
    for key in range(40):
        out = np.asarray(corrupt(img, CorruptionConfig(kind="erase"), seed=3, key=key))
        zero = (out == 0).all(-1)
        frac = zero.mean()
        assert 0.085 <= frac <= 0.32, frac  # rounding of the rectangle's sides
        rows, cols = np.nonzero(zero)
        assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one rectangle


def test_erase_handles_extreme_aspect_on_small_images():
    img = Image.new("RGB", (7, 5), (9, 9, 9))
    for seed in range(30):
        out = np.asarray(random_erase(img, random.Random(seed), area=(0.3, 0.3), aspect=(0.01, 100)))
        assert (out == 0).all(-1).any()


def test_jitter_keeps_size_and_changes_colour_statistics():
    img = _image(seed=5)
    out = corrupt(img, CorruptionConfig(kind="jitter"), seed=0, key=0)
    assert out.size == img.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, dtype=float) - np.asarray(img, dtype=float)).mean() > 1.0


def test_grayscale_input_becomes_rgb():
    out = corrupt(Image.new("L", (20, 20), 128), CorruptionConfig(), seed=0, key="g")
    assert out.mode == "RGB"


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        CorruptionConfig(kind="noise")
    with pytest.raises(ValueError, match="erase_area"):
        CorruptionConfig(erase_area=(0.5, 0.1))
    with pytest.raises(TypeError, match="image must be a PIL"):
        corrupt(np.zeros((4, 4, 3)), CorruptionConfig(), seed=0, key=0)
    for radius in ((0.0, 0.0), (0.0, 3.0), (-1.0, 2.0), (4.0, 2.0)):  # radius 0 leaves the image intact
        with pytest.raises(ValueError, match="blur_radius must satisfy 0 < lo <= hi"):
            CorruptionConfig(blur_radius=radius)


def test_every_image_of_an_example_gets_its_own_draw():
    """Two identical images in one example are corrupted differently (each its own seeded draw,
    keyed by the example and the image's place); a single image is keyed by the example alone."""
    from crystal_ext.data.example import Example
    from crystal_ext.data.images import ExampleImages

    images = ExampleImages(56, CorruptionConfig(), seed=4)
    image = _image(56, 56)
    first, second = images.corrupted(Example("two", [image, image], "q", "a"), [image, image.copy()])
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    (alone,) = images.corrupted(Example("one", image, "q", "a"), [image])
    assert np.array_equal(np.asarray(alone), np.asarray(corrupt(image, CorruptionConfig(), 4, "one")))


def test_example_rng_is_stable():
    assert example_rng(0, "a").random() == example_rng(0, "a").random()
    assert example_rng(0, "a").random() != example_rng(0, "b").random()
