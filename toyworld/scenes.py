"""The toy world: simple shapes in named colours, sizes and positions on plain or striped grounds, with captions.

Everything is a pure function of an integer seed, so a dataset is a range of seeds and needs no files: scene `i` of
split `s` is `sample_scene(random.Random(f"{s}:{i}"))`. Pictures are drawn 4x larger and downsampled (anti-aliased
edges, as a camera would give) and come with their control maps (mask, edges, luminance).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: shape colours (RGB); names are caption words
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
#: ground colours; a shape is never drawn on a ground of its own name
GROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128),
    "blue": (60, 90, 200), "green": (50, 150, 70), "yellow": (230, 210, 60),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.16, "large": 0.28}  # radius as a fraction of the picture side
POSITIONS = {
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
TEXTURES = ("plain", "striped")
#: every caption word, for the tokenizer's merges (whole words become single tokens)
VOCABULARY = ("a an at the on in of to from and background moving growing shrinking changing turning into "
              + " ".join(COLORS) + " " + " ".join(GROUNDS) + " " + " ".join(SHAPES) + " " + " ".join(SIZES)
              + " top bottom left right center striped plain")


@dataclass(frozen=True)
class Scene:
    """One picture: a shape of `color` and `size` at `position` on a `ground` of `texture`.

    `jitter` (dx, dy, ds) moves the centre by fractions of the side and scales the radius, so two scenes with the
    same caption differ a little; `angle` turns squares, triangles and stars (degrees).
    """

    shape: str
    color: str
    size: str
    position: str
    ground: str
    texture: str = "plain"
    jitter: tuple[float, float, float] = (0.0, 0.0, 1.0)
    angle: float = 0.0

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        ground = self.ground if self.texture == "plain" else f"{self.texture} {self.ground}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {ground} background"

    def center_radius(self) -> tuple[float, float, float]:
        """Centre (x, y) and radius as fractions of the picture side."""
        x, y = POSITIONS[self.position]
        dx, dy, ds = self.jitter
        return x + dx, y + dy, SIZES[self.size] * ds


def sample_scene(rng: random.Random) -> Scene:
    """A random scene (every choice uniform; the ground never has the shape's colour name)."""
    color = rng.choice(list(COLORS))
    ground = rng.choice([g for g in GROUNDS if g != color])
    return Scene(shape=rng.choice(SHAPES), color=color, size=rng.choice(list(SIZES)),
                 position=rng.choice(list(POSITIONS)), ground=ground, texture=rng.choice(TEXTURES),
                 jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.9, 1.1)),
                 angle=rng.uniform(-12.0, 12.0))


def scene_for(split: str, index: int) -> Scene:
    """Scene `index` of a named split ("train", "val", "test", ...): the same scene on every machine."""
    return sample_scene(random.Random(f"{split}:{index}"))


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]] | None:
    """Vertices of `shape` centred at (cx, cy) with circumradius-like size r (None for a circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.85, y * r * 0.85) for x, y in corners]
    elif shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        pts = [(x * 1.1, y * 1.1 + r * 0.15) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r * (1.1 if k % 2 == 0 else 0.45)
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    else:
        raise ValueError(f"unknown shape {shape!r}; the toy world has {', '.join(SHAPES)}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, r, angle)
    if poly is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _ground(scene: Scene, side: int) -> Image.Image:
    base = np.array(GROUNDS[scene.ground], dtype=np.float32)
    img = np.empty((side, side, 3), dtype=np.float32)
    img[:] = base
    if scene.texture == "striped":
        period = max(2, side // 8)
        stripes = ((np.arange(side) // (period // 2)) % 2 == 1)
        shade = base * 0.78 if base.mean() > 60 else base + 45
        img[:, stripes] = shade
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def render(scene: Scene, size: int = 64, color: tuple[int, int, int] | None = None) -> Image.Image:
    """The scene as an RGB picture `size` x `size` (`color` overrides the shape's RGB, for clips)."""
    big = size * 4
    img = _ground(scene, big)
    cx, cy, r = scene.center_radius()
    _draw_shape(ImageDraw.Draw(img), scene.shape, cx * big, cy * big, r * big, scene.angle, color or COLORS[scene.color])
    return img.resize((size, size), Image.Resampling.LANCZOS)


def render_mask(scene: Scene, size: int = 64) -> Image.Image:
    """The shape's mask: white shape on black, mode `L`, anti-aliased like `render`."""
    big = size * 4
    img = Image.new("L", (big, big), 0)
    cx, cy, r = scene.center_radius()
    _draw_shape(ImageDraw.Draw(img), scene.shape, cx * big, cy * big, r * big, scene.angle, 255)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def render_edges(scene: Scene, size: int = 64) -> Image.Image:
    """The shape's outline, white on black (mode `L`): the mask's edge, one or two pixels wide."""
    mask = render_mask(scene, size)
    grown, shrunk = mask.filter(ImageFilter.MaxFilter(3)), mask.filter(ImageFilter.MinFilter(3))
    edge = np.asarray(grown, dtype=np.int16) - np.asarray(shrunk, dtype=np.int16)
    return Image.fromarray(((edge > 64) * 255).astype(np.uint8))


def render_luminance(scene: Scene, size: int = 64) -> Image.Image:
    """The picture's luminance (mode `L`)."""
    return render(scene, size).convert("L")


def with_changes(scene: Scene, **changes) -> Scene:
    """A copy of `scene` with some fields changed (`with_changes(s, color="blue")`)."""
    return replace(scene, **changes)
