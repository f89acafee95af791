"""Training data for the I2V-Adapter: captioned video clips, cut into windows of frames sampled with a stride.

A data folder holds `metadata.jsonl`, one JSON line per clip, `{"file_name": ..., "text": ...}` (the imagefolder
convention). `file_name` is a video (`.mp4`, `.webm`: decoded by imageio's ffmpeg; `.gif`: by Pillow) or a folder of
frames (`.png` / `.jpg` / `.jpeg` / `.webp`, in name order).

Each clip is probed once when the data is read (ffmpeg counts a video's frames by decoding it, Pillow a GIF's; a
frame folder's files are counted): a clip that cannot be read is skipped with one warning line naming it, and the
run goes on. A clip of `n` frames gives `n // span` non-overlapping windows, `span = (num_frames - 1) * stride + 1`:
window `k` is frames `k * span + i * stride`, `i < num_frames`. Windows are the dataset's items, so the shuffled
order (a seedable sampler) is all the randomness of the data, and a resumed run reads exactly what an uninterrupted
one would. Frame 0 of a window is the first frame the adapter is conditioned on.

`write_demo_clips` writes a folder of generated moving-shape clips (in every supported form) for plumbing-sized
runs and tests: no download.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adapter_studio.train.config import DataError
from adapter_studio.train.data import Captions, named_path, read_jsonl, short
from adapter_studio.train.loop import warn

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Window:
    """One training item: frames `start, start + stride, ...` (`num_frames` of them) of the clip at `path`."""

    path: Path
    caption: str
    start: int


def read_metadata(data_dir: str | Path, caption_column: str = "text") -> list[tuple[Path, str]]:
    """`(clip path, caption)` per line of `data_dir/metadata.jsonl`; a malformed line or a missing clip is a
    `DataError` naming the file and line. Lines without a caption train with the empty one (counted in a warning)."""
    folder = Path(data_dir)
    meta = folder / "metadata.jsonl"
    rows = read_jsonl(meta, f"data_dir {folder} has no metadata.jsonl (one JSON line per clip: "
                            '{"file_name": "clip.mp4", "text": "a caption"}; file_name may name a folder of frames)')
    captions = Captions(caption_column)
    records = [(named_path(folder, row, "file_name", at, "a video or a folder of frames", folders=True),
                captions.read(row, at)) for row, at in rows]
    captions.check(meta, "clips")
    return records


def frame_files(folder: Path) -> list[Path]:
    """The frames of a frame folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def count_frames(path: Path) -> int:
    """Frames in a clip; raises `DataError` (naming the file and why) when it cannot be read."""
    try:
        if path.is_dir():
            return len(frame_files(path))
        suffix = path.suffix.lower()
        if suffix == ".gif":
            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        if suffix in VIDEO_SUFFIXES:
            import imageio_ffmpeg

            return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except (OSError, RuntimeError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # ffmpeg reports a broken stream as a RuntimeError holding its whole log: its last line says why
        why = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise DataError(f"{path} is not a readable video ({short(why[-1], 100)})") from None
    raise DataError(f"{path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder of frames")


def make_windows(records: list[tuple[Path, str]], num_frames: int, stride: int) -> list[Window]:
    """Every clip's windows (see the module docstring). A clip that cannot be read is skipped with a warning naming
    it; clips shorter than one window are skipped and counted in one warning. Raises `DataError` when no window
    remains."""
    span = (num_frames - 1) * stride + 1
    windows, short = [], []
    for path, caption in records:
        try:
            n = count_frames(path)
        except DataError as e:
            warn(f"skipping a clip: {e}")
            continue
        if n < span:
            short.append(path.name)
            continue
        windows += [Window(path, caption, k * span) for k in range(n // span)]
    if short:
        warn(f"{len(short)} clip(s) have fewer than {span} frames ({num_frames} frames at stride {stride}) and are "
             f"skipped: {', '.join(short[:3])}{', ...' if len(short) > 3 else ''}")
    if not windows:
        raise DataError(f"no clip gives a window of {num_frames} frames at stride {stride} ({span} frames); lower "
                        "num_frames or frame_stride")
    return windows


def read_frames(path: Path, indices: list[int]) -> list[Image.Image]:
    """Frames `indices` (ascending) of a clip as RGB images; a clip that fails now is a `DataError` naming it."""
    try:
        if path.is_dir():
            files = frame_files(path)
            out = []
            for i in indices:
                with Image.open(files[i]) as im:
                    out.append(im.convert("RGB"))
            return out
        import imageio.v3 as iio

        kwargs = {"plugin": "pillow", "mode": "RGB"} if path.suffix.lower() == ".gif" else {"plugin": "FFMPEG"}
        wanted, out = set(indices), []
        for i, frame in enumerate(iio.imiter(path, **kwargs)):  # decoded in order: stop after the last one needed
            if i in wanted:
                out.append(Image.fromarray(frame[..., :3]))
                if len(out) == len(indices):
                    return out
    except (OSError, RuntimeError, SyntaxError, ValueError, IndexError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} cannot be read ({short(e, 100)}): fix it or remove its line") from None
    raise DataError(f"{path} ended after {len(out)} of the frames needed ({indices[-1] + 1}): it changed since the "
                    "run started")


def to_pixels(frames: list[Image.Image], resolution: int) -> torch.Tensor:
    """Frames -> `[F, 3, R, R]` in [-1, 1]: the shorter side resized to `R` (bilinear), then the centre crop (the
    same for every frame)."""
    w, h = frames[0].size
    s = resolution / min(w, h)
    size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    arr = np.stack([np.asarray(f.resize(size, Image.BILINEAR).crop(box), dtype=np.float32) for f in frames])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2)


class ClipDataset(Dataset):
    """Items: `pixel_values` `[F, 3, R, R]` in [-1, 1] (frame 0 the condition) and `input_ids` `[77]`."""

    def __init__(self, windows: list[Window], tokenizer: Any, num_frames: int, stride: int, resolution: int):
        self.windows, self.tokenizer = windows, tokenizer
        self.num_frames, self.stride, self.resolution = num_frames, stride, resolution

    def __len__(self) -> int:
        return len(self.windows)

    def frames(self, i: int) -> list[Image.Image]:
        w = self.windows[i]
        return read_frames(w.path, [w.start + k * self.stride for k in range(self.num_frames)])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(self.windows[i].caption, max_length=self.tokenizer.model_max_length,
                             padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": to_pixels(self.frames(i), self.resolution), "input_ids": ids}


# ------------------------------------------------------------------------------------------------ demo data
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "white": (240, 240, 240), "black": (20, 20, 20)}
MOTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
DEMO_FORMATS = ("gif", "frames", "mp4", "webm")


def moving_shape(size: int, frames: int, fg: str, bg: str, shape: str, motion: str, radius: int,
                 start: tuple[int, int]) -> list[Image.Image]:
    """A `shape` of colour `fg` on `bg` moving in direction `motion`, one pixel per frame per 32 px of `size`,
    bouncing off the borders."""
    from PIL import ImageDraw

    dx, dy = MOTIONS[motion]
    speed = max(1, size // 32)
    out = []
    for f in range(frames):
        cx, cy = (_bounce(start[0] + dx * speed * f, radius, size), _bounce(start[1] + dy * speed * f, radius, size))
        im = Image.new("RGB", (size, size), COLORS[bg])
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)((cx - radius, cy - radius, cx + radius, cy + radius),
                                                                fill=COLORS[fg])
        out.append(im)
    return out


def _bounce(x: int, r: int, size: int) -> int:
    """Position `x` reflected into `[r, size - r]`."""
    lo, hi = r, size - r
    period = 2 * (hi - lo)
    y = (x - lo) % period
    return lo + (y if y <= hi - lo else period - y)


def write_demo_clips(folder: str | Path, count: int, size: int = 64, frames: int = 16, seed: int = 0,
                     formats: tuple[str, ...] = DEMO_FORMATS) -> Path:
    """A data folder of `count` generated clips of a coloured circle or square moving across a plain ground, each
    captioned with what it shows ("a red circle moving left on a blue background"), written as GIF, frame folder,
    MP4 and WebM in turn (`formats`), with `metadata.jsonl`. Deterministic for `seed`; seconds for tens of clips."""
    from adapter_studio.pipelines.image_to_video import export_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        fg, bg = rng.sample(list(COLORS), 2)
        shape, motion = rng.choice(["circle", "square"]), rng.choice(list(MOTIONS))
        r = rng.randint(size // 8, size // 5)
        start = (rng.randint(r, size - r), rng.randint(r, size - r))
        clip = moving_shape(size, frames, fg, bg, shape, motion, r, start)
        fmt = formats[i % len(formats)]
        name = f"{i:05d}" if fmt == "frames" else f"{i:05d}.{fmt}"
        if fmt == "frames":
            (folder / name).mkdir(exist_ok=True)
            for k, im in enumerate(clip):
                im.save(folder / name / f"{k:04d}.png")
        else:
            export_video(clip, folder / name, fps=10)
        rows.append({"file_name": name, "text": f"a {fg} {shape} moving {motion} on a {bg} background"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
