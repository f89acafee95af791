"""The shared training loop: base frozen, adapter trained, atomic checkpoints, exact resume, config parsing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loop_task import DummyTask
from adapter_studio.train.config import ConfigError, TrainConfig, parse_config
from adapter_studio.train.loop import list_checkpoints, train


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=4, train_batch_size=2, checkpointing_steps=2,
                lr_warmup_steps=1, learning_rate=1e-3, report_to="none", checkpoints_total_limit=2)
    base.update(kw)
    return TrainConfig(**base)


def test_training_changes_only_the_adapter(tmp_path):
    cfg = _cfg(tmp_path, max_steps=2)
    task = DummyTask(cfg, accelerator=None)
    model, adapter = task.build()
    base_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    opt = torch.optim.AdamW([p for p in adapter.parameters()], lr=1e-3)
    model.unet.requires_grad_(False)
    batch = next(iter(task.dataloader()))
    loss = model(batch)
    loss.backward()
    opt.step()
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in base_before.items())
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert len(changed) == len(adapter_before), "every adapter tensor gets a gradient step"
    assert all(p.grad is None for p in model.unet.parameters())


def test_loop_checkpoints_and_resumes_exactly(tmp_path):
    straight = train(_cfg(tmp_path / "a"), DummyTask)
    assert straight["step"] == 4 and len(straight["losses"]) == 4

    # run b: the same job, then cut back to what a run killed after step 2 leaves on disk
    train(_cfg(tmp_path / "b"), DummyTask)
    run_b = tmp_path / "b" / "run"
    assert [p.name for p in list_checkpoints(run_b)] == ["checkpoint-2", "checkpoint-4"]
    assert not list(run_b.glob(".*.tmp")), "no temp folder survives a finished checkpoint"
    shutil.rmtree(run_b / "checkpoint-4")
    shutil.rmtree(run_b / "final")
    log = run_b / "logs" / "loss.jsonl"  # keeps steps 3 and 4, as a run killed during step 4's checkpoint does

    resumed = train(_cfg(tmp_path / "b"), DummyTask)
    assert resumed["step"] == 4 and len(resumed["losses"]) == 2, "the resumed run does only the missing steps"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "the killed run's steps after its checkpoint are dropped, each step logged once"
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    a = load_file(tmp_path / "a" / "run" / "final" / "adapter.safetensors")
    b = load_file(run_b / "final" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_half_written_checkpoint_is_ignored(tmp_path):
    cfg = _cfg(tmp_path, max_steps=2)
    train(cfg, DummyTask)
    run = tmp_path / "run"
    broken = run / ".checkpoint-4.tmp" / "training_state"
    broken.mkdir(parents=True)
    (run / "checkpoint-9").mkdir()  # no trainer_state.json: not a complete checkpoint
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]


def test_config_parsing_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 7\nlearning_rate: 2.0e-4\n")
    cfg = parse_config(TrainConfig, ["--config", str(y), "--learning_rate", "3e-4", "--gradient_checkpointing", "true",
                                     "--mixed_precision", "no", "--checkpoints_total_limit", "none"])
    assert cfg.max_steps == 7 and cfg.learning_rate == 3e-4 and cfg.gradient_checkpointing is True
    assert cfg.mixed_precision == "no" and cfg.checkpoints_total_limit is None
    y.write_text("max_stepz: 7\n")
    with pytest.raises(ConfigError, match="unknown config keys.*max_stepz.*valid keys"):
        parse_config(TrainConfig, ["--config", str(y)])
    with pytest.raises(ConfigError, match="max_steps.*integer"):
        parse_config(TrainConfig, ["--max_steps", "many"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        parse_config(TrainConfig, ["--mixed_precision", "fp8"])
    y.write_text("mixed_precision: no\n")  # YAML reads an unquoted no as false
    with pytest.raises(ConfigError, match=r"mixed_precision.*takes a string, got the boolean False: quote it"):
        parse_config(TrainConfig, ["--config", str(y)])
    y.write_text("max_steps: 3\n  bad: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml line 2: not valid YAML \(mapping values are not allowed here\)"):
        parse_config(TrainConfig, ["--config", str(y)])


def test_a_list_field_takes_yaml_on_the_command_line():
    from adapter_studio.adapters.agd.training import AGDTrainConfig

    cfg = parse_config(AGDTrainConfig, ["--trajectories", "x", "--validation_prompts", "[a cat, a red dog]",
                                        "--validation_guidance_scales", "[2, 4.5]"])
    assert cfg.validation_prompts == ["a cat", "a red dog"] and cfg.validation_guidance_scales == [2.0, 4.5]
    with pytest.raises(ConfigError, match="validation_prompts.*takes a list"):
        parse_config(AGDTrainConfig, ["--trajectories", "x", "--validation_prompts", "a cat"])
