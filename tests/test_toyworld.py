"""The toy world (adapter_studio.toyworld): deterministic scenes and clips, their captions and whole-word tokenizer,
control maps that agree with the pictures, the `metrics` judge reading rendered scenes back, the training folders
and datasets, the base-model parts on the shared loop, and the `python -m adapter_studio.toyworld` command."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapter_studio.tokenizer import tiny_clip_tokenizer
from adapter_studio.toyworld import metrics
from adapter_studio.toyworld.clips import MOTIONS, clip_for
from adapter_studio.toyworld.data import SceneClips, SceneImages, write_clip_folder, write_image_folder
from adapter_studio.toyworld.scenes import (COLORS, GROUNDS, POSITIONS, SHAPES, SIZES, TEXTURES, VOCABULARY, render,
                                            render_edges, render_luminance, render_mask, scene_for, with_changes)

ROOT = Path(__file__).resolve().parent.parent
WORDS = set(VOCABULARY.split())


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation (outside the picture counts as empty)."""
    p, (h, w) = np.pad(m, 1), m.shape
    return np.any([p[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def _erode(m: np.ndarray) -> np.ndarray:
    """3 x 3 binary erosion (outside the picture counts as full: a shape cut by the border has no edge there)."""
    return ~_dilate(~m)


def _clips_with(motion: str, count: int, split: str = "test") -> list:
    found = []
    for i in range(400):
        clip = clip_for(split, i)
        if clip.motion == motion:
            found.append(clip)
            if len(found) == count:
                return found
    raise AssertionError(f"only {len(found)} {motion} clips among 400")


# ------------------------------------------------------------------------------------------ 1. scenes, captions
_FINGERPRINT = """
import hashlib
from adapter_studio.toyworld.scenes import render, scene_for
from adapter_studio.toyworld.clips import clip_for
for i in range(12):
    s = scene_for("train", i)
    print(repr(s), hashlib.sha256(render(s).tobytes()).hexdigest())
    print(repr(clip_for("train", i)))
"""


def _fingerprint_here() -> str:
    lines = []
    for i in range(12):
        s = scene_for("train", i)
        lines.append(f"{s!r} {hashlib.sha256(render(s).tobytes()).hexdigest()}")
        lines.append(repr(clip_for("train", i)))
    return "\n".join(lines) + "\n"


def test_scenes_and_clips_are_functions_of_split_and_index():
    a, b = scene_for("train", 3), scene_for("train", 3)
    assert a == b and _pixels(render(a)).tobytes() == _pixels(render(b)).tobytes()
    assert clip_for("val", 5) == clip_for("val", 5)
    # another process with another hash seed draws the same scenes, clips and pixels ("on every machine")
    proc = subprocess.run([sys.executable, "-c", _FINGERPRINT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONHASHSEED": "4242"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == _fingerprint_here()

    scenes = [scene_for("train", i) for i in range(200)]
    assert len(set(scenes)) == 200  # the jitter makes every scene its own, even with the same caption
    assert scene_for("train", 0) != scene_for("val", 0)
    assert _pixels(render(scenes[0])).tobytes() != _pixels(render(scenes[1])).tobytes()
    clips = [clip_for("train", i) for i in range(50)]
    assert len(set(clips)) == 50 and clip_for("train", 0) != clip_for("val", 0)


def test_captions_name_the_scene_in_the_vocabulary():
    scenes = [scene_for("train", i) for i in range(500)]
    for s in scenes:
        words = s.caption.split()
        assert words[:4] == ["a", s.size, s.color, s.shape], s.caption
        assert words[-2:] == [s.ground, "background"], s.caption
        assert (words[-3] == "striped") == (s.texture == "striped"), s.caption
        where = "in the center" if s.position == "center" else f"at the {s.position}"
        assert f" {s.shape} {where} on a " in s.caption, s.caption
        assert set(words) <= WORDS, set(words) - WORDS
        # a shape is never on a ground of its own colour name (caption and picture would be ambiguous)
        assert s.ground != s.color, s
    # every choice is drawn: a sampler that lost one would show here
    assert {s.shape for s in scenes} == set(SHAPES) and {s.color for s in scenes} == set(COLORS)
    assert {s.ground for s in scenes} == set(GROUNDS) and {s.size for s in scenes} == set(SIZES)
    assert {s.position for s in scenes} == set(POSITIONS) and {s.texture for s in scenes} == set(TEXTURES)

    clips = [clip_for("train", i) for i in range(300)]
    assert set(Counter(c.motion for c in clips)) == set(MOTIONS)
    for c in clips:
        assert set(c.caption.split()) <= WORDS, c.caption
        assert c.caption.startswith(f"a {c.start.size} {c.start.color} {c.start.shape} "), c.caption
        assert c.start.ground != c.start.color
        if c.motion == "recolor":  # nor does it turn into the ground's colour
            assert c.target in COLORS and c.target not in (c.start.color, c.start.ground) and c.target in c.caption
        elif c.motion == "move":
            assert c.target in POSITIONS and c.target != c.start.position and f"to the {c.target} " in c.caption
        else:  # a growing shape starts small, a shrinking one large
            assert c.start.size == ("small" if c.motion == "grow" else "large") and f"{c.motion}ing" in c.caption


# ------------------------------------------------------------------------------------------ 2. tokenizer
def test_tokenizer_with_the_vocabulary_has_one_token_per_caption_word(tmp_path):
    tok = tiny_clip_tokenizer(folder=tmp_path / "toy", model_max_length=24, extra_words=VOCABULARY)
    ids = {}
    for word in WORDS:
        got = tok(word).input_ids
        assert len(got) == 3 and got[0] == tok.bos_token_id and got[-1] == tok.eos_token_id, (word, got)
        ids[word] = got[1]
    assert len(set(ids.values())) == len(WORDS)  # distinct words, distinct tokens
    captions = [scene_for("test", i).caption for i in range(200)] + [clip_for("test", i).caption for i in range(200)]
    for caption in captions:
        got = tok(caption).input_ids
        assert got == [tok.bos_token_id] + [ids[w] for w in caption.split()] + [tok.eos_token_id], caption
        assert len(got) <= 24
    assert max(len(tok(c).input_ids) for c in captions) >= 15  # the long clip captions are among them

    # without the vocabulary the same words fall apart into pieces: the option is what makes them whole
    plain = tiny_clip_tokenizer(folder=tmp_path / "plain", model_max_length=24)
    assert len(plain("triangle").input_ids) > 3 and len(plain("purple").input_ids) > 3
    longest = max(captions, key=len)
    assert len(plain(longest).input_ids) > 24

    # and the toy world's training builds its models with that vocabulary
    from adapter_studio.toyworld.training import ToyTrainConfig, architecture

    preset = architecture(ToyTrainConfig(output_dir=str(tmp_path / "run")))
    assert preset.config["tokenizer"] == {"model_max_length": 24, "extra_words": VOCABULARY}


# ------------------------------------------------------------------------------------------ 3. control maps
def test_mask_agrees_with_the_picture_and_edges_outline_it():
    ious, compact_ratio = [], []
    for i in range(300):
        s = scene_for("val", i)
        picture, raw = render(s), _pixels(render_mask(s))
        assert render_mask(s).mode == "L" and raw.shape == (64, 64)
        m = raw > 127
        ious.append(metrics.iou(m, metrics.foreground(picture)))
        assert ious[-1] > 0.8, (i, s, ious[-1])  # small stars' thin points are the worst: ~0.82

        e = _pixels(render_edges(s))
        assert set(np.unique(e)) <= {0, 255}
        e = e > 0
        assert e.any(), s
        # the boundary: where the thresholded mask changes, and the anti-aliased pixels the shape half covers
        # (a side of the shape running along the picture's border is only seen there)
        boundary = (m & ~_erode(m)) | (_dilate(m) & ~m) | ((raw >= 48) & (raw <= 207))
        assert not (e & ~_dilate(boundary)).any(), f"edge pixels off the mask's boundary in {s}"
        assert not ((m & ~_erode(m)) & ~_dilate(e)).any(), f"the outline of {s} has gaps"
        # one or two pixels either side of the boundary: 2.3 to 2.9 times the boundary's pixels today
        assert e.sum() < 3.5 * (m & ~_erode(m)).sum(), s
        if s.size == "large" and s.shape in ("circle", "square"):
            compact_ratio.append(e.sum() / m.sum())
    assert np.mean(ious) > 0.94  # 0.96 today
    assert 0 < max(compact_ratio) < 0.5  # a thin outline, far smaller than the shape: 0.23 to 0.41 today

    lum = render_luminance(scene_for("val", 0))
    assert lum.mode == "L" and _pixels(lum).tobytes() == _pixels(render(scene_for("val", 0)).convert("L")).tobytes()


# ------------------------------------------------------------------------------------------ 4. metrics
def test_analyze_reads_rendered_scenes_back():
    n, shape_ok, color_ok, over_the_edge = 300, 0, 0, 0
    for i in range(n):
        s = scene_for("test", i)
        r = metrics.analyze(render(s))
        shape_ok += r.shape == s.shape
        color_ok += r.color == s.color
        if r.center is not None:
            x, y, _ = s.center_radius()
            assert abs(r.center[0] - x) < 0.12 and abs(r.center[1] - y) < 0.12, (i, s, r.center)
        m = _pixels(render_mask(s)) > 127
        if np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]]).mean() > 0.12:
            # a large circle over a corner covers an eighth of the border or more: still a shape, not a ground
            # colour (read as "no shape" before ground colours had to run along three sides)
            over_the_edge += 1
            assert (r.shape, r.color) == (s.shape, s.color), (i, s)
    assert shape_ok / n >= 0.95 and color_ok / n >= 0.95, (shape_ok / n, color_ok / n)  # ~0.997 / 1.0 today
    assert over_the_edge >= 2

    # grounds alone: no shape (the striped ground's two colours are both ground)
    for ground, texture in (("gray", "plain"), ("white", "striped"), ("black", "striped")):
        empty = with_changes(scene_for("test", 0), ground=ground, texture=texture, jitter=(2.0, 2.0, 1.0))
        picture = render(empty)
        assert len(metrics.ground_colors(picture)) == (1 if texture == "plain" else 2)
        r = metrics.analyze(picture)
        assert r.shape is None and r.color is None and r.center is None and not r.mask.any(), (ground, texture)
    assert metrics.analyze(Image.new("RGB", (64, 64), GROUNDS["yellow"])).shape is None

    for name, rgb in COLORS.items():
        assert metrics.name_color(np.array(rgb) + 12) == name


def test_psnr_and_iou():
    a = render(scene_for("test", 1))
    assert metrics.psnr(a, a.copy()) == float("inf")
    rng = np.random.default_rng(0)
    base, last = np.asarray(a, dtype=np.float32), float("inf")
    for sigma in (2, 8, 32):
        noisy = (base + rng.normal(0, sigma, base.shape)).clip(0, 255).astype(np.uint8)
        value = metrics.psnr(a, noisy)
        assert value < last
        last = value
    assert 15 < last < 25  # sigma 32 of 255: about 18 dB

    m = np.zeros((8, 8), bool)
    m[:4] = True
    assert metrics.iou(m, m) == 1.0 and metrics.iou(m, ~m) == 0.0
    half = np.zeros((8, 8), bool)
    half[:2] = True
    assert metrics.iou(m, half) == pytest.approx(0.5)
    assert metrics.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    with pytest.raises(ValueError, match="RGB"):
        metrics.psnr(np.zeros((8, 8)), np.zeros((8, 8)))


# ------------------------------------------------------------------------------------------ 5. clips
def test_clips_start_at_their_scene_and_do_what_they_say():
    for i in range(40):
        clip = clip_for("test", i)
        frames = clip.frames(6)
        assert len(frames) == 6 and all(f.size == (64, 64) and f.mode == "RGB" for f in frames)
        assert _pixels(frames[0]).tobytes() == _pixels(render(clip.start)).tobytes(), clip

    for clip in _clips_with("move", 4):
        reads = [metrics.analyze(f) for f in clip.frames(6)]
        centers = np.array([r.center for r in reads])
        (x0, y0), (x1, y1) = POSITIONS[clip.start.position], POSITIONS[clip.target]
        # the centre travels the way between the two positions, frame by frame
        np.testing.assert_allclose(centers[-1] - centers[0], [x1 - x0, y1 - y0], atol=0.04, err_msg=str(clip))
        dists = np.linalg.norm(centers - (centers[0] + [x1 - x0, y1 - y0]), axis=1)
        assert np.all(np.diff(dists) < 0), (clip, dists)
        assert {r.shape for r in reads} == {clip.start.shape} and {r.color for r in reads} == {clip.start.color}

    for clip in _clips_with("recolor", 4):
        frames = clip.frames(5)
        first, last = metrics.analyze(frames[0]), metrics.analyze(frames[-1])
        assert (first.color, last.color) == (clip.start.color, clip.target), clip
        assert last.shape == clip.start.shape

    for motion in ("grow", "shrink"):
        for clip in _clips_with(motion, 3):
            areas = np.array([metrics.analyze(f).mask.sum() for f in clip.frames(5)])
            steps = np.diff(areas)
            assert np.all(steps > 0) if motion == "grow" else np.all(steps < 0), (clip, areas)
            ratio = areas[-1] / areas[0]
            assert ratio > 2 if motion == "grow" else ratio < 0.5, (clip, areas)  # radius 0.16 <-> 0.28


# ------------------------------------------------------------------------------------------ 6. data
def test_image_folder(tmp_path):
    folder = tmp_path / "images"
    assert write_image_folder(folder, "train", 6, conditions=("mask", "edges")) == folder
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for i, row in enumerate(rows):
        scene = scene_for("train", i)
        assert set(row) == {"file_name", "text", "mask", "edges"} and row["text"] == scene.caption
        with Image.open(folder / row["file_name"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            assert _pixels(im).tobytes() == _pixels(render(scene)).tobytes()
        with Image.open(folder / row["mask"]) as im:
            assert im.size == (64, 64)
            assert np.array_equal(_pixels(im.convert("L")), _pixels(render_mask(scene)))
        with Image.open(folder / row["edges"]) as im:
            assert np.array_equal(_pixels(im.convert("L")), _pixels(render_edges(scene)))
    assert len(list(folder.iterdir())) == 1 + 6 * 3

    # a rewrite replaces the folder whole: nothing of the old one stays, nothing is left beside it
    (folder / "stray.txt").write_text("old")
    write_image_folder(folder, "val", 2, size=32, conditions=("mask",))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [scene_for("val", i).caption for i in range(2)]
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00000_mask.png", "00001.png",
                                                        "00001_mask.png", "metadata.jsonl"]
    with Image.open(folder / "00001.png") as im:
        assert im.size == (32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["images"]


def test_clip_folder(tmp_path):
    folder = tmp_path / "clips"
    write_clip_folder(folder, "train", 3, num_frames=4, size=32)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": f"{i:05d}", "text": clip_for("train", i).caption} for i in range(3)]
    for i, row in enumerate(rows):
        frames = sorted((folder / row["file_name"]).iterdir())
        assert [p.name for p in frames] == ["000.png", "001.png", "002.png", "003.png"]
        expected = clip_for("train", i).frames(4, 32)
        for path, want in zip(frames, expected):
            with Image.open(path) as im:
                assert im.size == (32, 32) and _pixels(im).tobytes() == _pixels(want).tobytes()

    write_clip_folder(folder, "train", 1, num_frames=2, size=32)
    assert sorted(p.name for p in folder.iterdir()) == ["00000", "metadata.jsonl"]
    assert len(list((folder / "00000").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["clips"]


def test_datasets(tmp_path):
    tok = tiny_clip_tokenizer(folder=tmp_path / "tok", model_max_length=24, extra_words=VOCABULARY)
    ds = SceneImages("val", 5, size=32, tokenizer=tok, condition="mask")
    assert len(ds) == 5
    item = ds[3]
    scene = scene_for("val", 3)
    assert item["caption"] == scene.caption
    px = item["pixel_values"]
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32 and px.min() >= -1 and px.max() <= 1
    assert px.min() < -0.5 and px.max() > 0.5  # the full range is used, not [0, 1]
    back = ((px.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert np.array_equal(back, _pixels(render(scene, 32)))
    cond = item["condition"]
    assert cond.shape == (3, 32, 32) and cond.min() >= 0 and cond.max() <= 1 and cond.max() == 1
    assert torch.equal(cond[0], cond[2])
    assert torch.equal(cond[0], torch.from_numpy(_pixels(render_mask(scene, 32)) / np.float32(255)))
    ids = item["input_ids"]
    assert ids.shape == (24,) and ids[0] == tok.bos_token_id
    assert ids[:len(scene.caption.split()) + 2].tolist() == tok(scene.caption).input_ids

    plain = SceneImages("val", 2)[0]
    assert set(plain) == {"pixel_values", "caption", "labels"} and plain["pixel_values"].shape == (3, 64, 64)
    from adapter_studio.toyworld.data import ATTRIBUTES, labels

    shown = SceneImages("val", 2).scene(0)
    assert [values[k] for values, k in zip(ATTRIBUTES.values(), labels(shown).tolist())] == [
        shown.shape, shown.color, shown.size, shown.position]
    grouped = SceneImages("val", 16, group=8)
    first, other = [grouped.scene(i) for i in range(8)], grouped.scene(8)
    assert len({(s.color, s.size, s.ground, s.texture) for s in first}) == 1  # a group shares these ...
    assert len({(s.shape, s.position) for s in first}) > 1  # ... and differs in shape and place
    assert (other.color, other.ground) != (first[0].color, first[0].ground) or other.size != first[0].size
    with pytest.raises(ValueError, match="luminance"):
        SceneImages("val", 2, condition="luminance")

    clips = SceneClips("val", 4, num_frames=3, size=32, tokenizer=tok)
    item = clips[1]
    frames = item["frames"]
    assert frames.shape == (3, 3, 32, 32) and frames.min() >= -1 and frames.max() <= 1
    assert item["caption"] == clip_for("val", 1).caption and item["input_ids"].shape == (24,)
    first = ((frames[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert np.array_equal(first, _pixels(render(clip_for("val", 1).start, 32)))
    assert not torch.equal(frames[0], frames[-1])


# ------------------------------------------------------------------------------------------ 7. training
def _train_args(part: str, out: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "toyworld" / f"{part}.yaml"), "--output_dir", str(out),
            "--max_steps", "2", "--train_batch_size", "2", "--dataset_size", "8", "--checkpointing_steps", "1",
            "--report_to", "none", "--validation_steps", "0"]


def test_train_vae_part(tmp_path):
    from diffusers import AutoencoderKL

    from adapter_studio.toyworld.training import main

    result = main(_train_args("vae", tmp_path / "vae"))
    assert result["step"] == 2 and len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "final").eval()
    assert list(vae.config.block_out_channels) == [16, 32, 64]  # the toy architecture, not tiny-sd15's
    sf = vae.config.scaling_factor
    assert sf != pytest.approx(0.18215)
    # measured: 1 / std of the latents of the training pictures, for the weights that were saved
    x = torch.stack([SceneImages("train", 256)[i]["pixel_values"] for i in range(256)])
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
    assert lat.shape == (256, 4, 16, 16)  # 64 px -> 16 x 16: latent factor 4
    assert sf == pytest.approx(1.0 / lat.std().item(), rel=1e-3)


def test_train_clip_part(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from adapter_studio.toyworld.training import main

    result = main(_train_args("clip", tmp_path / "clip"))
    assert result["step"] == 2 and all(np.isfinite(result["losses"]))
    final = tmp_path / "clip" / "final"
    encoder = CLIPVisionModelWithProjection.from_pretrained(final / "image_encoder").eval()
    processor = CLIPImageProcessor.from_pretrained(final / "feature_extractor")
    assert encoder.config.image_size == 64 and encoder.config.projection_dim == 64
    pics = [render(scene_for("test", i)) for i in range(2)]
    px = processor(pics, return_tensors="pt").pixel_values
    assert px.shape == (2, 3, 64, 64)
    with torch.no_grad():
        emb = encoder(pixel_values=px).image_embeds
    assert emb.shape == (2, 64) and not torch.allclose(emb[0], emb[1])
    # the text tower is kept too: the UNet part's frozen text encoder, with the toy tokenizer beside it
    from transformers import CLIPTextModel, CLIPTokenizer

    text = CLIPTextModel.from_pretrained(final / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(final / "tokenizer")
    ids = tok(["a red circle", "a blue star"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text(ids)[0]
    assert hidden.shape == (2, 24, 64) and not torch.allclose(hidden[0], hidden[1])


@pytest.mark.parametrize("extra, needs", [(["--part", "unet"], "--vae"), (["--part", "controlnet"], "--base"),
                                          (["--part", "vea"], "part 'vea' is not one of")])
def test_train_config_errors_are_one_line(tmp_path, extra, needs):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train/toy_world.py", *_train_args("vae", out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needs in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ------------------------------------------------------------------------------------------ 8. command
def test_data_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adapter_studio.toyworld", "data", "images", str(tmp_path / "img"),
                           "--count", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 3 images" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "img" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [scene_for("train", i).caption for i in range(3)]
    assert all((tmp_path / "img" / r[k]).is_file() for r in rows for k in ("file_name", "mask", "edges"))

    proc = subprocess.run([sys.executable, "-m", "adapter_studio.toyworld", "data", "clips", str(tmp_path / "clp"),
                           "--count", "2", "--num_frames", "3", "--size", "32", "--split", "val"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "clp" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [clip_for("val", i).caption for i in range(2)]
    assert all(len(list((tmp_path / "clp" / r["file_name"]).iterdir())) == 3 for r in rows)
