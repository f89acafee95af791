"""IP-Adapter training: data formats, the reference recipe, 2-process accelerate runs, exact resume after a kill,
loadable output."""

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loop_task import assert_same_run, finish, kill_all, launch
from adapter_studio.adapters.ip_adapter import IPAdapter, load_ip_adapter
from adapter_studio.adapters.ip_adapter.training import (IPAdapterTask, IPAdapterTrainConfig, load_records, main,
                                                         write_demo_data)
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import get_family
from adapter_studio.train.config import ConfigError, parse_config
from adapter_studio.train.loop import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train" / "ip_adapter_tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("ipdata"), 12, size=48)


def test_both_data_formats_read_the_same_records(data):
    folder = parse_config(IPAdapterTrainConfig, ["--config", str(CONFIG), "--data_dir", str(data)])
    original = parse_config(IPAdapterTrainConfig, ["--config", str(CONFIG), "--data_dir", "null",
                                                   "--data_json", str(data / "data.json"), "--data_root", str(data)])
    recs = load_records(folder)
    assert recs == load_records(original) and len(recs) == 12
    assert recs[0][1].startswith("a ") and recs[0][0].is_file()
    with pytest.raises(ConfigError, match="exactly one of data_json"):
        parse_config(IPAdapterTrainConfig, ["--config", str(CONFIG), "--data_json", str(data / "data.json")])
    bad = data.parent / "bad.json"
    bad.write_text(json.dumps([{"image_file": "missing.png", "text": "x"}]))
    with pytest.raises(ConfigError, match=r"bad.json entry 0: image_file .*missing.png does not exist"):
        load_records(parse_config(IPAdapterTrainConfig, ["--config", str(CONFIG), "--data_dir", "null",
                                                         "--data_json", str(bad), "--data_root", str(data)]))


def test_recipe_init_drops_and_frozen_base(data, tmp_path):
    cfg = parse_config(IPAdapterTrainConfig, ["--config", str(CONFIG), "--data_dir", str(data), "--output_dir",
                                              str(tmp_path), "--train_batch_size", "4", "--make_demo_data", "0"])
    task = IPAdapterTask(cfg, accelerator=None)
    model, adapter = task.build()
    unet = model.unet
    for name in adapter.layer_names():  # to_k_ip / to_v_ip start as copies of to_k / to_v
        attn = unet.get_submodule(name[: -len(".processor")])
        w = adapter.ip_adapter[adapter._key_of[name]]
        assert torch.equal(w.to_k_ip.weight, attn.to_k.weight) and torch.equal(w.to_v_ip.weight, attn.to_v.weight)
    batch = next(iter(task.dataloader()))
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    loss = model(batch)
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in unet_before.items())
    # every image dropped: the adapter sees the zero embedding (base), i.e. what sampling uses as the negative
    model.cfg.i_drop_rate, model.cfg.t_drop_rate, model.cfg.ti_drop_rate = 1.0, 0.0, 0.0
    with torch.no_grad():
        model(batch)
    assert torch.count_nonzero(model.slot.inputs["image_embeds"]) == 0
    model.cfg.i_drop_rate = 0.0
    with torch.no_grad():
        model(batch)
    assert torch.count_nonzero(model.slot.inputs["image_embeds"]) > 0


def _args(out: Path, data: Path) -> list[str]:
    return ["--config", str(CONFIG), "--output_dir", str(out), "--data_dir", str(data), "--train_batch_size", "2",
            "--report_to", "none", "--validation_steps", "0", "--max_steps", "14", "--checkpointing_steps", "5",
            "--checkpoints_total_limit", "2"]


def test_two_process_run_killed_mid_epoch_resumes_exactly_and_writes_a_loadable_adapter(data, tmp_path):
    """2 gloo processes, 12 images, batch 2: 3 batches per process an epoch, so checkpoints 5 and 10 are mid-epoch.
    SIGKILL of the launcher and both workers at a random step; the resumed run equals an uninterrupted one to 1e-6."""
    items = tmp_path / "items"
    items.mkdir()
    rc, log = finish(launch("ip", 2, _args(tmp_path / "ref", data), STUDIO_TEST_RECORD_ITEMS=str(items)))
    assert rc == 0, log[-3000:]
    # one shuffle for both processes (the loop's data_seed): each epoch the two shards cover every image once
    ranks = [[int(i) for i in (items / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    for epoch in range(4):
        assert sorted(ranks[0][6 * epoch: 6 * epoch + 6] + ranks[1][6 * epoch: 6 * epoch + 6]) == list(range(12))

    out = tmp_path / "run"
    kill_after = random.Random(1).randint(6, 12)
    first = launch("ip", 2, _args(out, data))
    deadline = time.time() + 180
    while not (list_checkpoints(out) and (out / "logs" / "loss.jsonl").is_file()
               and len((out / "logs" / "loss.jsonl").read_text().splitlines()) >= kill_after):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, f"no step {kill_after} within 180 s"
        time.sleep(0.02)
    kill_all(first.pid)  # the launcher and both workers at once, like a power cut
    first.wait()
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    assert saved[-1] in (5, 10) and not (out / "final").exists(), "killed before the end"

    rc, log = finish(launch("ip", 2, _args(out, data)))
    assert rc == 0, log[-3000:]
    assert f"resumed from {out / f'checkpoint-{saved[-1]}'} at step {saved[-1]}" in log
    assert_same_run(tmp_path / "ref", out)
    state = json.loads((out / "checkpoint-14" / "training_state" / "trainer_state.json").read_text())
    assert state["step"] == 14 and state["num_processes"] == 2, "two processes formed one group"

    # the output loads straight into the studio pipeline and into diffusers' own loader
    pipe = load_pipeline("tiny-sd15")
    trained = get_family("ip").load(str(out / "final"), pipe)
    init = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim)
    assert not torch.equal(trained.image_proj.proj.weight, init.image_proj.proj.weight)
    same = load_ip_adapter(out / "checkpoint-14" / "adapter" / "ip_adapter.safetensors", pipe.unet)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in trained.state_dict().items())
    studio = StudioPipeline(pipe)
    ref_img = data / "00000.png"
    from PIL import Image

    studio.add(trained, "ip", image=Image.open(ref_img).convert("RGB"))
    img = studio("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    dpipe = load_pipeline("tiny-sd15")
    dpipe.load_ip_adapter(str(out / "final"), subfolder="", weight_name="ip_adapter.safetensors",
                          image_encoder_folder=None)


def test_single_process_with_validation_grid_and_embedding_cache(data, tmp_path):
    out = tmp_path / "run"
    result = main(["--config", str(CONFIG), "--output_dir", str(out), "--data_dir", "null", "--data_json",
                   str(data / "data.json"), "--data_root", str(data), "--make_demo_data", "0", "--max_steps", "2",
                   "--train_batch_size", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
                   "--validation_num_inference_steps", "2", "--report_to", "none", "--projection", "plus"])
    assert result["step"] == 2
    from PIL import Image

    grid = Image.open(out / "validation" / "latest.png")
    assert grid.size == (128, 128), "two rows of [reference | sample] at 64 px"
    assert len(list((out / "cache").glob("image_embeds-*.safetensors"))) == 1
    ad = load_ip_adapter(out / "final", load_pipeline("tiny-sd15").unet)
    assert ad.config.projection == "plus" and ad.config.num_tokens == 16
