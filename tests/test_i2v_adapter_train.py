"""I2V-Adapter training: clips from videos and frame folders with a stride, the recipe (frame 0 clean and out of the
loss, only the adapter trains), kill + exact resume, a 2-process accelerate run, corrupt clips skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loop_task import assert_same_run, finish, kill_all
from app_fixtures import free_port  # a 2-process launch on its own port: a killed run may hold 29500
from adapter_studio.adapters.i2v_adapter import I2VAdapter, encode_first_frame
from adapter_studio.adapters.i2v_adapter.data import (ClipDataset, make_windows, moving_shape, read_metadata,
                                                      write_demo_clips)
from adapter_studio.adapters.i2v_adapter.training import (MOTION_FOLDER, I2VAdapterTask, I2VAdapterTrainConfig,
                                                          I2VTrainingModel)
from adapter_studio.pipelines import ImageToVideoPipeline, StudioPipeline, export_video
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import get_family
from adapter_studio.train.config import DataError, parse_config
from adapter_studio.train.loop import list_checkpoints, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train" / "i2v_adapter.py"
CONFIG = ROOT / "configs" / "train" / "i2v_adapter_tiny.yaml"
BROKEN = "broken.mp4"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 moving-shape clips of 12 frames at 32 px (GIF, frame folder, MP4, WebM in turn) and one corrupt video: 8
    windows of 4 frames at stride 2."""
    folder = write_demo_clips(tmp_path_factory.mktemp("clips") / "data", 8, size=32, frames=12)
    (folder / BROKEN).write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not really a video" * 20)
    with open(folder / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": BROKEN, "text": "a broken clip"}) + "\n")
    return folder


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--output_dir", str(out), "--data_dir", str(data), "--make_demo_data", "0",
            "--resolution", "32", "--num_frames", "4", "--frame_stride", "2", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "1", "--report_to", "none", "--validation_steps", "0",
            "--checkpoints_total_limit", "none", *extra]


def test_windows_take_every_stride_th_frame_of_videos_and_frame_folders(tmp_path, capsys):
    clip = moving_shape(32, 9, "red", "blue", "circle", "right", 6, (10, 16))
    for fmt in ("gif", "mp4", "webm"):
        export_video(clip, tmp_path / f"clip.{fmt}", fps=10)
    (tmp_path / "clip").mkdir()
    for k, im in enumerate(clip):
        im.save(tmp_path / "clip" / f"{k:03d}.png")
    export_video(clip[:3], tmp_path / "short.gif", fps=10)
    names = ["clip.gif", "clip.mp4", "clip.webm", "clip", "short.gif"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"clip {n}"}) + "\n"
                                                     for n in names))
    windows = make_windows(read_metadata(tmp_path), num_frames=4, stride=2)  # span 7: one window of 9 frames each
    assert [(w.path.name, w.start) for w in windows] == [(n, 0) for n in names[:4]]
    err = capsys.readouterr().err
    assert "1 clip(s) have fewer than 7 frames (4 frames at stride 2) and are skipped: short.gif" in err
    ds = ClipDataset(windows, load_pipeline("tiny-video").tokenizer, num_frames=4, stride=2, resolution=32)
    want = torch.from_numpy(np.stack([np.asarray(clip[k], dtype=np.float32) for k in (0, 2, 4, 6)]) / 127.5 - 1)
    want = want.permute(0, 3, 1, 2)
    for i, name in enumerate(names[:4]):
        item = ds[i]
        assert item["pixel_values"].shape == (4, 3, 32, 32) and item["input_ids"].shape == (77,)
        err = (item["pixel_values"] - want).abs()
        if name in ("clip.gif", "clip"):  # two colours: GIF and PNG frames are exact, so the indices are right
            assert err.max() == 0, name
        else:  # H.264 / VP9 are lossy
            assert err.mean() < 0.05, (name, err.mean())
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "clip.gif"}\n{"file_name": 3}\n')
    with pytest.raises(DataError, match="metadata.jsonl line 2: needs 'file_name'"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "short.gif", "text": "x"}\n')
    with pytest.raises(DataError, match="no clip gives a window of 4 frames at stride 2"):
        make_windows(read_metadata(tmp_path), num_frames=4, stride=2)


def test_a_corrupt_video_is_skipped_with_one_line_naming_it(data, capsys):
    windows = make_windows(read_metadata(data), num_frames=4, stride=2)
    assert len(windows) == 8 and BROKEN not in {w.path.name for w in windows}
    err = [line for line in capsys.readouterr().err.splitlines() if BROKEN in line]
    assert len(err) == 1 and err[0].startswith("warning: skipping a clip: ") and "not a readable video" in err[0]


def test_steps_reduce_the_loss_on_a_fixed_batch_frame_0_clean_and_out_of_the_loss(data, tmp_path):
    cfg = parse_config(I2VAdapterTrainConfig, _args(tmp_path, data))
    task = I2VAdapterTask(cfg, accelerator=None)
    model, trainable = task.build()
    assert isinstance(model, I2VTrainingModel) and trainable.motion is None
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("trainable.")}
    assert any("motion_modules" in k for k in frozen)
    batch = next(iter(task.dataloader()))
    assert batch["pixel_values"].shape == (2, 4, 3, 32, 32)
    torch.manual_seed(0)
    x = model.noisy_inputs(batch)  # one fixed draw of noise and timesteps
    assert torch.equal(x["noisy"][:, :, 0], x["first"]), "frame 0 gets no noise"
    assert not torch.equal(x["noisy"][:, :, 1], x["latents"][:, :, 1])
    seen = {}
    hooks = [model.unet.register_forward_pre_hook(lambda m, a, k: seen.update(sample=k["sample"]), with_kwargs=True),
             model.unet.register_forward_hook(lambda m, a, out: seen.update(pred=out.sample))]
    loss = model.loss(x)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["sample"][:, :, 0], x["first"]), "the UNet sees the clean first frame"
    torch.testing.assert_close(loss, F.mse_loss(seen["pred"][:, :, 1:], x["noise"][:, :, 1:]))
    assert abs(loss.item() - F.mse_loss(seen["pred"], x["noise"]).item()) > 1e-6, "frame 0 is not in the loss"

    params = [p for p in trainable.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable.i2v.parameters()}, "only the adapter trains"
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        step_loss = model.loss(x)
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    with torch.no_grad():
        after = model.loss(x).item()
    assert after < 0.97 * losses[0], losses + [after]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen.items()), "base and motion modules unchanged"

    # with train_motion_modules the motion modules train too, and save beside the adapter as a MotionAdapter
    cfg = parse_config(I2VAdapterTrainConfig, _args(tmp_path, data, "--train_motion_modules", "true"))
    task = I2VAdapterTask(cfg, accelerator=None)
    model, trainable = task.build()
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert any(n.startswith("motion.") for n in names) and any(n.startswith("i2v.") for n in names)
    task.save_adapter(trainable, tmp_path / "saved")
    from diffusers import MotionAdapter

    motion = MotionAdapter.from_pretrained(tmp_path / "saved" / MOTION_FOLDER)
    assert sum(p.numel() for p in motion.parameters()) == sum(
        p.numel() for n, p in trainable.named_parameters() if n.startswith("motion."))
    assert isinstance(get_family("i2v").load(str(tmp_path / "saved"), task.pipe), I2VAdapter)


def _launch(out: Path, data: Path, processes: int, *extra: str) -> subprocess.Popen:
    """`train/i2v_adapter.py` in a session of its own: plain python with this process's thread count (so it computes
    bit for bit what an in-process `train` does), or `accelerate launch --multi_gpu` on the CPU (gloo)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads() if processes == 1 else 1)}
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(SCRIPT)]
    return subprocess.Popen([*cmd, *_args(out, data, *extra)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_killed_run_resumes_exactly_and_its_checkpoint_loads_into_the_pipeline(data, tmp_path):
    """8 windows, batch 2: 4 steps an epoch; the checkpoint at step 3 is mid-epoch."""
    extra = ("--max_steps", "7", "--checkpointing_steps", "3")
    reference = train(parse_config(I2VAdapterTrainConfig, _args(tmp_path / "ref", data, *extra)), I2VAdapterTask)
    assert reference["step"] == 7
    out = tmp_path / "run"
    first = _launch(out, data, 1, *extra)
    deadline = time.time() + 180
    while not list_checkpoints(out):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.02)
    kill_all(first.pid)
    first.wait()
    assert not (out / "final").exists(), "killed before the end"
    resumed = train(parse_config(I2VAdapterTrainConfig, _args(out, data, *extra)), I2VAdapterTask)
    assert resumed["step"] == 7 and len(resumed["losses"]) < 7
    assert_same_run(tmp_path / "ref", out, atol=1e-6)

    # the checkpoint's adapter loads straight into the pipeline, and it has learnt something
    pipe = load_pipeline("tiny-video")
    trained = get_family("i2v").load(str(out / "checkpoint-6" / "adapter"), pipe)
    fresh = I2VAdapter.from_unet(pipe.unet)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
    sp = StudioPipeline(pipe)
    sp.pipe.set_progress_bar_config(disable=True)
    sp.add(trained, name="i2v")
    with Image.open(sorted((data / "00001").glob("*.png"))[0]) as im:
        image = im.convert("RGB")
    out = ImageToVideoPipeline(sp)(image, "a red circle moving left", num_frames=4, num_inference_steps=2, height=32,
                                   width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 4, 4, 4, 4) and torch.equal(out[:, :, 0], encode_first_frame(pipe.vae, image, 32, 32))


def test_two_processes_complete_and_report_the_corrupt_video_once(data, tmp_path):
    out = tmp_path / "run"
    rc, log = finish(_launch(out, data, 2, "--max_steps", "3", "--checkpointing_steps", "3"), timeout=240)
    assert rc == 0, log[-3000:]
    assert [line for line in log.splitlines() if BROKEN in line] == [
        next(line for line in log.splitlines() if line.startswith("warning: skipping a clip:"))], "one line, one rank"
    state = json.loads((out / "checkpoint-3" / "training_state" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2, "two processes formed one group"
    rows = [json.loads(line) for line in (out / "logs" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert isinstance(get_family("i2v").load(str(out / "final"), load_pipeline("tiny-video")), I2VAdapter)
