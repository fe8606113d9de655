"""Synthetic fine-grained visual question answering, drawn with Pillow, deterministic by seed.

Every example is one shape on a plain background; the question asks about a detail of it.
  - "stripes" (default): "which way do the stripes go ?" -> horizontal / vertical / diagonal.
    A large shape (72-100 px of the 112 px image, one colour) filled with thin lines: 3 px on,
    4 px off (period 7 px, a divisor of the 14 px patch, so every patch sees the same phase).
    The detail is the lines, not the shape: blur of radius 2-5 flattens them (their contrast
    falls to about 20% at radius 2 and to nothing from radius 3), so the corrupted path really
    lacks the answer. The embedded tiny model learns it within its 800-step budget; smaller
    shapes are learned late or not at all at that budget.
  - "stripes_faint": the same question and shapes, harder, so that a comparison of training
    objectives does not saturate: for half of the examples the lines have a contrast (fraction
    of the full blue-on-white step) drawn log-uniformly from 0.01-0.3 (full contrast for the
    other half), and Gaussian noise of std 8 grey levels, independent per channel, covers the
    whole image. Intact accuracy is then graded by contrast; blur of radius 3 cuts the lines'
    amplitude to under 1%.
  - "shape": "what shape is in the image ?" (24-40 px circle / square / triangle). Blur rounds
    the corners; the tiny model needs a few thousand steps for it, more than the default budget.
  - "colour": "what colour is the shape ?". Learned fast, but colour survives blur: a control
    task where the corrupted path loses nothing.

An example's image and answer depend only on (seed, split, index): any process, worker or
resumed run sees the same data. The held-out split draws from a disjoint key space
("test-*" vs "train-*"), so no held-out image is ever trained on.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from crystal_ext.data.corruption import example_rng
from crystal_ext.data.example import Example

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (225, 200, 30)}
STRIPES = ("horizontal", "vertical", "diagonal")
SIZES = {
    "stripes": (72, 100),
    "stripes_faint": (72, 100),
    "shape": (24, 40),
    "colour": (24, 40),
}  # px, side / diameter
TASKS = {
    "stripes": "which way do the stripes go ?",
    "stripes_faint": "which way do the stripes go ?",
    "shape": "what shape is in the image ?",
    "colour": "what colour is the shape ?",
}
VOCABULARY = ["shape", "colour", "way", "do", "stripes", "go", *SHAPES, *COLOURS, *STRIPES]
STRIPE_PERIOD = 7  # px: a divisor of the 14 px patch, so every patch sees the lines in the same phase
# "stripes_faint": the lines' contrast (fraction of the full blue-on-white step) is 1 for half of
# the examples and drawn log-uniformly from FAINT_CONTRAST for the other half; Gaussian pixel noise
# of std FAINT_NOISE (grey levels) covers the whole image, shape included, independently per
# channel (so no colour difference cancels it): the faintest lines are barely above the noise.
FAINT_CONTRAST = (0.01, 0.3)
FAINT_NOISE = 8.0


def draw_example(
    seed: int,
    key: str,
    task: str = "stripes",
    image_size: int = 112,
    size_range: tuple[int, int] | None = None,
    jitter: int | None = None,
) -> tuple[Image.Image, str]:
    """(image, answer) of the example `key`: one shape of side/diameter in `size_range` (default:
    the task's, scaled to `image_size`), a random position (within `jitter` px of the centre if
    given) and colour, on a light background with a little pixel noise (so the model cannot read
    the answer off a single constant pixel value)."""
    if task not in TASKS:
        raise ValueError(f"synthetic: task must be one of {sorted(TASKS)}, got {task!r}")
    if size_range is None:
        size_range = tuple(min(image_size - 6, round(v * image_size / 112)) for v in SIZES[task])
    rng = example_rng(seed, key)
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    size = rng.randint(*size_range)
    grey = rng.randint(200, 245)
    striped = task in ("stripes", "stripes_faint")
    if striped:
        # One colour and one background: the only thing that varies besides position and
        # outline is the orientation, so it dominates what a random-init vision tower sees.
        colour, grey = "blue", 225
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 3.0, (image_size, image_size, 1))
    image = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2), "RGB")
    if jitter is None:  # anywhere in the image
        x0 = rng.randint(2, image_size - size - 2)
        y0 = rng.randint(2, image_size - size - 2)
    else:  # within `jitter` px of the centre
        centre = (image_size - size) // 2
        x0 = min(max(2, centre + rng.randint(-jitter, jitter)), image_size - size - 2)
        y0 = min(max(2, centre + rng.randint(-jitter, jitter)), image_size - size - 2)
    stripes = rng.choice(STRIPES)
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=255)
    elif shape == "square":
        s = round(size * math.sqrt(math.pi) / 2)  # same area as the circle: area is no cue
        off = (size - s) // 2
        draw.rectangle((x0 + off, y0 + off, x0 + off + s, y0 + off + s), fill=255)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=255)
    if striped:
        # The shape is filled with lines of its colour on white (3 px on, 4 px off): a blur of
        # radius >= 3 leaves a flat, lighter fill whose orientation cannot be read any more.
        yy, xx = np.mgrid[0:image_size, 0:image_size]
        phase = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[stripes]
        on = (phase % STRIPE_PERIOD) < STRIPE_PERIOD // 2
        line = np.array(COLOURS[colour], np.uint8)
        if task == "stripes_faint":  # drawn after everything else: "stripes" keeps its exact images
            faint = rng.random() < 0.5
            contrast = math.exp(rng.uniform(*map(math.log, FAINT_CONTRAST))) if faint else 1.0
            line = np.round(255 - contrast * (255 - line.astype(np.float64))).astype(np.uint8)
        fill = np.where(on[..., None], line, np.uint8(255)).astype(np.uint8)
        image.paste(Image.fromarray(fill, "RGB"), (0, 0), mask)
        if task == "stripes_faint":
            noisy = np.asarray(image, np.float64) + np.random.default_rng(rng.getrandbits(64)).normal(
                0.0, FAINT_NOISE, (image_size, image_size, 3)
            )  # per channel: no colour difference cancels it
            image = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), "RGB")
    else:
        image.paste(COLOURS[colour], (0, 0), mask)
    return image, {"shape": shape, "colour": colour}.get(task, stripes)


class SyntheticVQA(Dataset):
    """`n` examples of one split, generated on access (a few hundred microseconds each)."""

    def __init__(
        self, n: int, split: str = "train", seed: int = 0, task: str = "stripes", image_size: int = 112
    ):
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
