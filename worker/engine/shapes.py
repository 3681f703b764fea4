"""The built-in `shapes`: 32x32 RGB images of one rendered shape each; an image's class is the shape it shows.

Drawn with PIL from a fixed seed, so nothing is downloaded and the set is the same bytes everywhere. Each image
gets its own colour, size, position and rotation of the shape, over a textured background (a gradient between two
dark colours crossed by a few thin dark lines, then pixel noise), so that neither colour nor place nor background
tells the class: only the outline does. Shapes are drawn at 4x and downsampled, so edges are anti-aliased as in a
photograph; at 32 pixels a pentagon, a hexagon and a circle are close, so small models learn the set well but not
perfectly (small_cnn width 16: 82% after 20 epochs, see README). Every shape means the same mirrored: augmentation
may flip it.
Torch-free: the API summarizes built-ins in its own process.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# Fixed: the set is the same everywhere, so results on it compare across jobs and machines.
SEED = 0
SIDE = 32
SUPERSAMPLE = 4  # drawn at 128x128, then downsampled: anti-aliased edges
PER_CLASS = 200
CLASS_NAMES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "arrow")
# The shape's circumradius, in output pixels.
MIN_RADIUS, MAX_RADIUS = 6.0, 11.0
BACKGROUND_LINES = 3
NOISE_STD = 12.0  # per pixel and channel, on 0..255
# Backgrounds are dark and shapes light, each of a random hue: a shape always shows, whatever its colours.
BACKGROUND_MAX = 120
SHAPE_MIN = 136


def shapes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x uint8 Nx32x32x3, y int64 N, class names), class by class; read-only arrays, built once per process."""
    x, y = _built()
    return x, y, list(CLASS_NAMES)


@lru_cache(maxsize=1)
def _built() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    y = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), PER_CLASS)
    x = np.stack([render(CLASS_NAMES[label], rng) for label in y])
    # Shared by every caller in the process: nobody may change them in place.
    x.flags.writeable = y.flags.writeable = False
    return x, y


def render(shape: str, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 RGB image of `shape` at a random colour, size, place and rotation on a random background."""
    size = SIDE * SUPERSAMPLE
    background = _background(rng, size)
    colour = tuple(int(value) for value in rng.integers(SHAPE_MIN, 256, 3))
    image = Image.fromarray(background)
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS) * SUPERSAMPLE
    margin = radius * 0.8  # the centre stays far enough inside that most of the shape shows
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    _draw(ImageDraw.Draw(image), shape, centre, radius, rng.uniform(0, 2 * math.pi), colour)
    small = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0, NOISE_STD, small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random dark colours, in a random direction, crossed by a few thin lines."""
    start, end = rng.integers(0, BACKGROUND_MAX + 1, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size)
    along = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None] + 1.5) / 3  # 0..1 across
    gradient = start + (end - start) * along[..., None]
    image = Image.fromarray(gradient.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(BACKGROUND_LINES):
        points = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, BACKGROUND_MAX + 1, 3)), width=SUPERSAMPLE)
    return np.asarray(image)


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, angle: float,
          colour: tuple[int, int, int]) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "ring":
        width = max(SUPERSAMPLE, round(radius * 0.35))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=colour, width=width)
    elif shape == "crescent":
        draw.polygon(_crescent(centre, radius, angle), fill=colour)
    else:
        draw.polygon(_polygon(shape, centre, radius, angle), fill=colour)


# Outlines as (radius fraction, angle in turns) around the centre, before rotation.
_REGULAR = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}


def _outline(shape: str) -> list[tuple[float, float]]:
    if shape in _REGULAR:
        corners = _REGULAR[shape]
        return [(1.0, k / corners) for k in range(corners)]
    if shape == "star":
        return [(1.0 if k % 2 == 0 else 0.42, k / 10) for k in range(10)]
    if shape == "cross":  # a plus sign of arms 0.36 wide: corners at (±0.18, ±1) and (±1, ±0.18)
        arm, reach = 0.18, 1.0
        corners = [(arm, reach), (arm, arm), (reach, arm), (reach, -arm), (arm, -arm), (arm, -reach),
                   (-arm, -reach), (-arm, -arm), (-reach, -arm), (-reach, arm), (-arm, arm), (-arm, reach)]
        return [(math.hypot(x, y), math.atan2(y, x) / (2 * math.pi)) for x, y in corners]
    if shape == "arrow":  # pointing along angle 0: a head and a shaft
        corners = [(1.0, 0.0), (0.2, 0.7), (0.2, 0.25), (-1.0, 0.25), (-1.0, -0.25), (0.2, -0.25), (0.2, -0.7)]
        return [(math.hypot(x, y), math.atan2(y, x) / (2 * math.pi)) for x, y in corners]
    raise ValueError(f"unknown shape {shape}")


def _polygon(shape: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    cx, cy = centre
    turns = [(r, angle + 2 * math.pi * turn) for r, turn in _outline(shape)]
    return [(cx + radius * r * math.cos(theta), cy + radius * r * math.sin(theta)) for r, theta in turns]


def _crescent(centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """A disc minus an offset disc of the same radius: the outer arc, then the inner arc back."""
    cx, cy = centre
    offset = 0.55 * radius
    # The two circles meet where |p - c| = |p - (c + offset)| = radius: at angle ±acos(offset / (2 radius)).
    meet = math.acos(offset / (2 * radius))
    outer = np.linspace(meet, 2 * math.pi - meet, 24)
    inner = np.linspace(2 * math.pi - (math.pi - meet), math.pi - meet, 24)
    points = [(radius * math.cos(t), radius * math.sin(t)) for t in outer]
    points += [(offset + radius * math.cos(t), radius * math.sin(t)) for t in inner]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]
