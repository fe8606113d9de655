"""Synthetic fine-grained visual question answering, drawn with Pillow, deterministic by seed.

Every example is one small shape on a plain background; the question asks about a detail of
it. Which task is the default follows DESIGN.md's measurements on a 1.5 M-parameter model
(2 CPU cores, minutes of training):
  - "shape": "what shape is in the image ?" with a 24-40 px circle / square / triangle on a
    112 px image. Learnable in minutes, and blur of radius 2-5 rounds the corners and edges
    the answer depends on, so the corrupted path really lacks the detail. The default.
  - "colour": "what colour is the shape ?". Learnable, but colour survives blur, so it is a
    control task: the corrupted path loses nothing there.
(Binding a property to one of several shapes is not learnable at this size; it is left out.)

An example's image and answer depend only on (seed, split, index): any process, worker or
resumed run sees the same data. The held-out split draws from a disjoint key space
("test-*" vs "train-*"), so no held-out image is ever trained on.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from crystal_ext.corruption import example_rng
from crystal_ext.packing import Example

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (225, 200, 30)}
TASKS = {
    "shape": "what shape is in the image ?",
    "colour": "what colour is the shape ?",
}
VOCABULARY = ["shape", "colour", *SHAPES, *COLOURS]


def draw_example(seed: int, key: str, task: str = "shape", image_size: int = 112,
                 size_range: tuple[int, int] = (24, 40), jitter: int | None = None) -> tuple[Image.Image, str]:
    """(image, answer) of the example `key`: one shape of side/diameter in `size_range`, a random
    colour and position, on a light background with a little pixel noise (so the model cannot
    read the answer off a single constant pixel value)."""
    if task not in TASKS:
        raise ValueError(f"synthetic: task must be one of {sorted(TASKS)}, got {task!r}")
    rng = example_rng(seed, key)
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    size = rng.randint(*size_range)
    grey = rng.randint(200, 245)
    image = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    noise = Image.effect_noise((image_size, image_size), 8).convert("RGB")
    image = Image.blend(image, noise, 0.06)
    if jitter is None:  # anywhere in the image
        x0 = rng.randint(2, image_size - size - 2)
        y0 = rng.randint(2, image_size - size - 2)
    else:  # within `jitter` px of the centre
        centre = (image_size - size) // 2
        x0 = min(max(2, centre + rng.randint(-jitter, jitter)), image_size - size - 2)
        y0 = min(max(2, centre + rng.randint(-jitter, jitter)), image_size - size - 2)
    fill = COLOURS[colour]
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=fill)
    elif shape == "square":
        s = round(size * math.sqrt(math.pi) / 2)  # same area as the circle: area is no cue
        off = (size - s) // 2
        draw.rectangle((x0 + off, y0 + off, x0 + off + s, y0 + off + s), fill=fill)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image, shape if task == "shape" else colour


class SyntheticVQA(Dataset):
    """`n` examples of one split, generated on access (a few hundred microseconds each)."""

    def __init__(self, n: int, split: str = "train", seed: int = 0, task: str = "shape", image_size: int = 112):
        if task not in TASKS:
            raise ValueError(f"SyntheticVQA: task must be one of {sorted(TASKS)}, got {task!r}")
        if split not in ("train", "test"):
            raise ValueError(f"SyntheticVQA: split must be 'train' or 'test', got {split!r}")
        self.n, self.split, self.seed, self.task, self.image_size = n, split, seed, task, image_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.n:
            raise IndexError(index)
        key = f"{self.split}-{index}"
        image, answer = draw_example(self.seed, key, self.task, self.image_size)
        return Example(key, image, TASKS[self.task], answer)
