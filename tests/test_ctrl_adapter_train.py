"""Ctrl-Adapter training: data (conditions made on the fly or precomputed), the recipe (only the adapter and the
router learn), checkpoints the pipeline loads, and a 2-process run killed and resumed exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from app_fixtures import free_port  # a 2-process launch on its own port: a killed run may hold 29500
from loop_task import kill_all
from adapter_studio.adapters.ctrl_adapter import CtrlAdapter
from adapter_studio.adapters.ctrl_adapter.training import (CtrlAdapterTask, CtrlAdapterTrainConfig, center_crop,
                                                           demo_controlnet, load_records, main, write_demo_data)
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import get_family
from adapter_studio.train.config import ConfigError, DataError, parse_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train" / "ctrl_adapter.py"
CONFIG = ROOT / "configs" / "train" / "ctrl_adapter_tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = write_demo_data(tmp_path_factory.mktemp("ctrldata") / "data", 8, size=48)
    demo_controlnet(1).save_pretrained(folder.parent / "controlnet_b")  # a second, different ControlNet
    return folder


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--data_dir", str(data), "--output_dir", str(out), "--make_demo_data", "0",
            "--controlnets", f"[{data / 'controlnet'}]", "--train_batch_size", "2", "--report_to", "none", *extra]


TWO_CONDITIONS = ("--controlnets", "[{a}, {b}]", "--preprocessors", "[canny, mask]",
                  "--conditioning_columns", "['', mask]")


def _two(data: Path) -> list[str]:
    """Two conditions: edges made on the fly by the first ControlNet, the precomputed masks by the second."""
    return [a.format(a=data / "controlnet", b=data.parent / "controlnet_b") for a in TWO_CONDITIONS]


def test_records_and_conditions_made_on_the_fly_or_precomputed(data, tmp_path):
    cfg = parse_config(CtrlAdapterTrainConfig, _args(data, tmp_path, *_two(data)))
    records = load_records(cfg)
    assert len(records) == 8 and records[0].caption.startswith("a ") and records[0].conditions[0] is None
    assert records[0].conditions[1] == data / "mask" / "00000.png"
    task = CtrlAdapterTask(cfg, accelerator=None)
    task.records, task.resolution = records, 64
    item = task.dataset()[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["conditions"].shape == (2, 3, 64, 64)
    image = center_crop(Image.open(records[0].image).convert("RGB"), 64)
    edges = cv2.Canny(np.asarray(image), 100, 200)  # the studio's canny preprocessor, on the cropped image
    assert torch.equal(item["conditions"][0, 0], torch.from_numpy(edges.astype(np.float32) / 255))
    mask = center_crop(Image.open(records[0].conditions[1]).convert("RGB"), 64)
    mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(item["conditions"][1], mask)
    assert set(item["conditions"][1].unique().tolist()) > {0.0, 1.0}, "bilinear resizing blends the mask's edge"

    with pytest.raises(ConfigError, match="preprocessors lists 1 entries for 2 ControlNet"):
        parse_config(CtrlAdapterTrainConfig, _args(data, tmp_path, *_two(data), "--preprocessors", "[canny]"))
    with pytest.raises(ConfigError, match="unknown preprocessors \\['hed'\\]"):
        parse_config(CtrlAdapterTrainConfig, _args(data, tmp_path, "--preprocessors", "[hed]"))
    bad = parse_config(CtrlAdapterTrainConfig, _args(data, tmp_path, "--conditioning_columns", "[depth]"))
    with pytest.raises(DataError, match="metadata.jsonl line 1: needs 'depth'"):
        load_records(bad)


def test_captions_under_another_key_are_refused_and_some_missing_are_counted(data, tmp_path, capsys):
    """As for IP-Adapter and I2V-Adapter (train/data.py): before, a wrong --caption_column trained every image with
    the empty caption, silently."""
    wrong = parse_config(CtrlAdapterTrainConfig, _args(data, tmp_path, "--caption_column", "prompt"))
    with pytest.raises(DataError, match=r"no entry has a caption under 'prompt' \(other keys: mask, text\); set "
                                        r"--caption_column"):
        load_records(wrong)
    folder = tmp_path / "some"
    shutil.copytree(data, folder)
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    del rows[2]["text"]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    records = load_records(parse_config(CtrlAdapterTrainConfig, _args(folder, tmp_path)))
    assert [r.caption == "" for r in records] == [i == 2 for i in range(8)]
    assert capsys.readouterr().err.strip() == (f"warning: 1 of 8 images in {meta} have no caption under 'text': "
                                               "they train with the empty caption")


def test_a_few_steps_reduce_the_loss_and_change_only_adapter_and_router(data, tmp_path):
    cfg = parse_config(CtrlAdapterTrainConfig, _args(data, tmp_path, *_two(data), "--condition_subsets", "false",
                                                     "--t_drop_rate", "0"))
    task = CtrlAdapterTask(cfg, accelerator=None)
    model, trained = task.build()
    assert set(trained) == {"adapter", "router"} and model.ctrl.router is trained["router"]
    frozen = {f"{name}.{k}": v.clone() for name, m in (("unet", model.unet), ("vae", model.vae),
                                                       ("text", model.text_encoders), ("cn", model.ctrl.controlnets))
              for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    batch = next(iter(task.dataloader()))
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same noise, timesteps and VAE sample: a fixed batch
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    after = {f"{name}.{k}": v for name, m in (("unet", model.unet), ("vae", model.vae), ("text", model.text_encoders),
                                              ("cn", model.ctrl.controlnets)) for k, v in m.state_dict().items()}
    assert all(torch.equal(v, after[k]) for k, v in frozen.items()), "UNet, VAE, text encoders, ControlNets frozen"
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("router.") for k in changed) and any(k.startswith("adapter.") for k in changed)

    # several ControlNets: each step trains a random non-empty subset of the conditions
    model.cfg.condition_subsets = True
    draws = {tuple(model.draw_conditions()) for _ in range(40)}
    assert draws == {(0,), (1,), (0, 1)}


def test_single_process_run_writes_checkpoints_the_pipeline_loads(data, tmp_path):
    out = tmp_path / "run"
    result = main(_args(data, out, "--conditioning_columns", "[mask]", "--max_steps", "2", "--checkpointing_steps",
                        "2", "--validation_steps", "2", "--validation_num_inference_steps", "2"))
    assert result["step"] == 2
    grid = Image.open(out / "validation" / "latest.png")
    assert grid.size == (128, 128), "two rows of [control image | sample] at 64 px"
    pipe = load_pipeline("tiny-sdxl")
    ctrl = get_family("ctrl").load({"controlnet": str(data / "controlnet"),
                                    "adapter": str(out / "checkpoint-2" / "adapter")}, pipe)
    assert isinstance(ctrl, CtrlAdapter) and ctrl.adapter.config.source_scale == 0.5
    final = load_file(str(out / "final" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, final[k]) for k, v in ctrl.adapter.state_dict().items())
    studio = StudioPipeline(pipe)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    bare = studio("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    studio.add(ctrl, "ctrl", image=Image.open(data / "mask" / "00000.png").convert("RGB").resize((64, 64)))
    img = studio("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all() and np.abs(img - bare).max() > 1e-3


def _launch(out: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT),
           *_args(data, out, *_two(data), "--max_steps", "8", "--checkpointing_steps", "2", "--validation_steps", "0",
                  *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "logs" / "loss.jsonl").read_text().splitlines())]


def test_two_processes_killed_and_resumed_continue_exactly(data, tmp_path):
    """Two conditions with a router and random condition subsets, 2 processes (CPU gloo): an uninterrupted run, and
    one SIGKILLed after its first checkpoint and resumed, agree step for step (losses and weights to 1e-6)."""
    ref = _launch(tmp_path / "ref", data)  # runs beside the other: the two share the cores, not the results
    killed_out = tmp_path / "killed"
    first = _launch(killed_out, data)
    deadline = time.time() + 120
    while not list(killed_out.glob("checkpoint-*/training_state/trainer_state.json")):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    kill_all(first.pid)  # the launcher and both workers (own sessions), by id
    first.wait()
    assert not (killed_out / "final").exists(), "killed before the end"
    saved = max(int(p.name.split("-")[1]) for p in killed_out.glob("checkpoint-*")
                if (p / "training_state" / "trainer_state.json").is_file())

    second = _launch(killed_out, data)
    log, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, log[-3000:]
    state = json.loads((tmp_path / "ref" / "checkpoint-8" / "training_state" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2, "two processes formed one group"
    log, _ = second.communicate(timeout=240)
    assert second.returncode == 0, log[-3000:]
    assert f"resumed from {killed_out / f'checkpoint-{saved}'} at step {saved}" in log
    want, got = _losses(tmp_path / "ref"), _losses(killed_out)
    assert [s for s, _ in got] == list(range(1, 9)) == [s for s, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(want, got)) < 1e-6
    for name in ("diffusion_pytorch_model.safetensors", "router/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / "final" / name)), load_file(str(killed_out / "final" / name))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
