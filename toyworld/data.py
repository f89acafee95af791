"""The toy world as training data: torch datasets drawn on the fly (for the base models) and folders in the formats
the adapter families' training scripts read (an imagefolder with `metadata.jsonl`, clips as folders of frames).

Item `i` of a split is the same on every machine and every run (scenes are functions of their seed), so a run
resumed mid-epoch reads exactly the items the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .clips import clip_for
from .scenes import COLORS, POSITIONS, SHAPES, SIZES, Scene, render, render_edges, render_mask, scene_for

CONDITIONS = {"mask": render_mask, "edges": render_edges}


def to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB -> float tensor `(3, H, W)` in [-1, 1]; mode `L` -> `(1, H, W)` in [0, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        return torch.from_numpy(arr)[None]
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


class SceneImages(Dataset):
    """`count` scenes of `split` as `{"pixel_values": (3, S, S) in [-1, 1], "caption": str, "input_ids": (L,),
    "condition": (3, S, S) in [0, 1]}` (`input_ids` with a tokenizer, `condition` with a condition name).

    `group > 1`: items `k * group ... (k + 1) * group - 1` share colour, size and ground and differ in shape and
    place, so a contrastive batch read in order must tell shapes and places apart (random batches are told apart by
    colour and ground alone)."""

    def __init__(self, split: str, count: int, size: int = 64, tokenizer: Any = None, condition: str | None = None,
                 group: int = 1):
        if condition is not None and condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r} is not one of {', '.join(CONDITIONS)}")
        self.split, self.count, self.size, self.tokenizer, self.condition = split, count, size, tokenizer, condition
        self.group = group

    def __len__(self) -> int:
        return self.count

    def scene(self, i: int) -> Scene:
        scene = scene_for(self.split, i)
        if self.group > 1:
            shared = scene_for(f"{self.split}-group", i // self.group)
            scene = replace(scene, color=shared.color, size=shared.size, ground=shared.ground, texture=shared.texture)
        return scene

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.scene(i)
        item: dict[str, Any] = {"pixel_values": to_tensor(render(scene, self.size)), "caption": scene.caption,
                                "labels": labels(scene)}
        if self.tokenizer is not None:
            item["input_ids"] = tokenize(self.tokenizer, scene.caption)
        if self.condition is not None:
            item["condition"] = to_tensor(CONDITIONS[self.condition](scene, self.size)).expand(3, -1, -1).clone()
        return item


class SceneClips(Dataset):
    """`count` clips of `split` as `{"frames": (F, 3, S, S) in [-1, 1], "caption": str, "input_ids": (L,)}`."""

    def __init__(self, split: str, count: int, num_frames: int = 8, size: int = 64, tokenizer: Any = None):
        self.split, self.count, self.num_frames, self.size, self.tokenizer = split, count, num_frames, size, tokenizer

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        clip = clip_for(self.split, i)
        frames = torch.stack([to_tensor(f) for f in clip.frames(self.num_frames, self.size)])
        item: dict[str, Any] = {"frames": frames, "caption": clip.caption}
        if self.tokenizer is not None:
            item["input_ids"] = tokenize(self.tokenizer, clip.caption)
        return item


#: the attributes `labels` gives, in order, with their values
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS)}


def labels(scene: Scene) -> torch.Tensor:
    """`(4,)` long: the index of the scene's shape, colour, size and position in `ATTRIBUTES`."""
    return torch.tensor([values.index(getattr(scene, name)) for name, values in ATTRIBUTES.items()])


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids `(model_max_length,)` padded as the pipelines pad them."""
    return tokenizer(text, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids[0]


def replace_folder(folder: Path, write: Callable[[Path], Any]) -> Path:
    """Fill `folder` whole or not at all: `write(tmp)` fills a new folder beside it, which then replaces it."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def write_image_folder(folder: str | os.PathLike, split: str, count: int, size: int = 64,
                       conditions: tuple[str, ...] = ("mask", "edges")) -> Path:
    """An imagefolder of `count` scenes: `00000.png` ..., each condition map as `00000_<name>.png`, and
    `metadata.jsonl` lines `{"file_name", "text", "<name>": map file}` (what IP-Adapter and Ctrl-Adapter training
    read: `--data_dir folder --conditioning_columns [mask]`). Written beside and renamed whole."""

    def write(tmp: Path) -> None:
        rows = []
        for i in range(count):
            scene = scene_for(split, i)
            row = {"file_name": f"{i:05d}.png", "text": scene.caption}
            render(scene, size).save(tmp / row["file_name"])
            for name in conditions:
                row[name] = f"{i:05d}_{name}.png"
                CONDITIONS[name](scene, size).convert("RGB").save(tmp / row[name])
            rows.append(row)
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return replace_folder(Path(folder), write)


def write_clip_folder(folder: str | os.PathLike, split: str, count: int, num_frames: int = 8, size: int = 64) -> Path:
    """`count` clips as folders of frames (`00000/000.png` ...) with `metadata.jsonl` lines `{"file_name": "00000",
    "text"}` (what I2V-Adapter training reads). Written beside and renamed whole."""

    def write(tmp: Path) -> None:
        rows = []
        for i in range(count):
            clip = clip_for(split, i)
            sub = tmp / f"{i:05d}"
            sub.mkdir()
            for k, frame in enumerate(clip.frames(num_frames, size)):
                frame.save(sub / f"{k:03d}.png")
            rows.append({"file_name": sub.name, "text": clip.caption})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return replace_folder(Path(folder), write)
