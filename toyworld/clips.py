"""Short clips of the toy world: a shape moving, changing colour, or growing / shrinking.

A clip is a `Clip` (its first scene, what changes, and to what) rendered frame by frame; like scenes, clip `i` of a
split is a pure function of its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .scenes import COLORS, POSITIONS, SIZES, Scene, render, sample_scene

MOTIONS = ("move", "recolor", "grow", "shrink")


@dataclass(frozen=True)
class Clip:
    """`start` changes over the clip: `move` to position `target`, `recolor` to colour `target`, `grow` / `shrink`
    from its size to the other size (`target` unused)."""

    start: Scene
    motion: str
    target: str = ""

    @property
    def caption(self) -> str:
        s = self.start
        ground = s.ground if s.texture == "plain" else f"{s.texture} {s.ground}"
        thing = f"a {s.size} {s.color} {s.shape}"
        where = "in the center" if s.position == "center" else f"at the {s.position}"
        if self.motion == "move":
            to = "the center" if self.target == "center" else f"the {self.target}"
            frm = "the center" if s.position == "center" else f"the {s.position}"
            return f"{thing} moving from {frm} to {to} on a {ground} background"
        if self.motion == "recolor":
            return f"{thing} {where} turning {self.target} on a {ground} background"
        return f"{thing} {where} {self.motion}ing on a {ground} background"

    def scene_at(self, t: float) -> tuple[Scene, tuple[int, int, int]]:
        """The scene and shape RGB at time `t` in [0, 1]."""
        s = self.start
        rgb = np.array(COLORS[s.color], dtype=np.float32)
        if self.motion == "move":
            (x0, y0), (x1, y1) = POSITIONS[s.position], POSITIONS[self.target]
            dx, dy, ds = s.jitter
            s = replace(s, jitter=(dx + t * (x1 - x0), dy + t * (y1 - y0), ds))
        elif self.motion == "recolor":
            rgb = (1 - t) * rgb + t * np.array(COLORS[self.target], dtype=np.float32)
        else:
            small, large = SIZES["small"], SIZES["large"]
            r0 = SIZES[s.size]
            r1 = large if self.motion == "grow" else small
            dx, dy, ds = s.jitter
            s = replace(s, jitter=(dx, dy, ds * (r0 + t * (r1 - r0)) / r0))
        return s, tuple(int(round(v)) for v in rgb)

    def frames(self, num_frames: int = 8, size: int = 64) -> list[Image.Image]:
        """`num_frames` RGB pictures, the first showing `start` exactly."""
        out = []
        for k in range(num_frames):
            scene, rgb = self.scene_at(k / max(1, num_frames - 1))
            out.append(render(scene, size, color=rgb))
        return out


def sample_clip(rng: random.Random) -> Clip:
    """A random clip: the motion decides which fields of the first scene make sense (a shape that grows is small)."""
    start = sample_scene(rng)
    motion = rng.choice(MOTIONS)
    if motion == "move":
        return Clip(start, motion, rng.choice([p for p in POSITIONS if p != start.position]))
    if motion == "recolor":
        return Clip(start, motion, rng.choice([c for c in COLORS if c not in (start.color, start.ground)]))
    return Clip(replace(start, size="small" if motion == "grow" else "large"), motion)


def clip_for(split: str, index: int) -> Clip:
    """Clip `index` of a named split: the same clip on every machine."""
    return sample_clip(random.Random(f"clip:{split}:{index}"))
