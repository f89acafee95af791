"""Hardening of the shared training loop (docs/training.md): gradient checkpointing, exact resume after SIGKILL /
SIGTERM on 1 and 2 processes, the loss log, the output folder (config hash, lock), one-line user errors, mixed
precision, accumulation, and a fuzz of the config and metadata parsers."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from loop_task import ROOT, DummyTask, assert_same_run, finish, kill_all, launch, loss_log
from adapter_studio.adapters.agd.training import AGDTask, AGDTrainConfig
from adapter_studio.adapters.agd.trajectories import TrajectoryConfig, generate_to_disk
from adapter_studio.adapters.ip_adapter.training import (IPAdapterTask, IPAdapterTrainConfig, load_records, main,
                                                         verify_images, write_demo_data)
from adapter_studio.errors import StudioError
from adapter_studio.presets import load_pipeline
from adapter_studio.train import loop
from adapter_studio.train.config import ConfigError, DataError, TrainConfig, TrainingError, parse_config
from adapter_studio.train.demo_data import wants_demo_data
from adapter_studio.train.loop import TrainingStopped, list_checkpoints, run_cli, train

IP_CONFIG = ROOT / "configs" / "train" / "ip_adapter_tiny.yaml"


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_steps=4, train_batch_size=2, checkpointing_steps=2,
                lr_warmup_steps=1, learning_rate=1e-3, report_to="none", checkpoints_total_limit=None)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("ipdata"), 12, size=48)


def _ip_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(IP_CONFIG), "--output_dir", str(out), "--data_dir", str(data), "--train_batch_size", "2",
            "--report_to", "none", "--validation_steps", "0", *extra]


# ------------------------------------------------------------------------------------------------ 1. checkpointing
@pytest.mark.parametrize("projection", ["base", "plus"])
def test_ip_adapter_gradient_checkpointing_gives_the_same_gradients(data, tmp_path, projection):
    cfg = parse_config(IPAdapterTrainConfig, _ip_args(tmp_path, data, "--projection", projection,
                                                      "--cache_image_embeds", "false"))
    task = IPAdapterTask(cfg, accelerator=None)
    model, adapter = task.build()
    batch = next(iter(task.dataloader()))

    def grads() -> dict[str, torch.Tensor]:
        adapter.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model(batch).backward()
        return {n: p.grad.clone() for n, p in adapter.named_parameters()}

    plain = grads()
    model.unet.enable_gradient_checkpointing()
    model.unet.train()
    checkpointed = grads()  # raised "A different number of tensors was saved ... 47 vs 43" before the fix
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ 2. exact resume
def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def _logged(out: Path) -> int:
    path = out / "logs" / "loss.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_ip_one_process_sigkilled_at_a_random_step_then_in_a_checkpoint_write_resumes_exactly(data, tmp_path):
    """12 images, batch 2: 6 batches an epoch; checkpoints at 5 and 10 are both mid-epoch."""
    extra = ("--max_steps", "14", "--checkpointing_steps", "5", "--checkpoints_total_limit", "2")
    reference = train(parse_config(IPAdapterTrainConfig, _ip_args(tmp_path / "ref", data, *extra)), IPAdapterTask)
    out = tmp_path / "run"
    kill_after = random.Random(2).randint(6, 12)  # logged steps; the kill lands in the step after (or its checkpoint)
    first = launch("ip", 1, _ip_args(out, data, *extra))
    _wait_for(lambda: _logged(out) >= kill_after and list_checkpoints(out), first, f"step {kill_after}")
    kill_all(first.pid)
    first.wait()
    resumed_at = loop._checkpoint_step(list_checkpoints(out)[-1])
    assert resumed_at in (5, 10) and not (out / "final").exists()

    next_checkpoint = min(resumed_at + 5, 14)  # the last step is always checkpointed
    second = launch("ip", 1, _ip_args(out, data, *extra), STUDIO_TEST_KILL_IN_CHECKPOINT=str(next_checkpoint))
    rc, log = finish(second)
    assert rc == -signal.SIGKILL, log[-2000:]
    assert f"resumed from {out / f'checkpoint-{resumed_at}'} at step {resumed_at}" in log
    assert (out / f".checkpoint-{next_checkpoint}.tmp").is_dir(), "killed with the checkpoint written, not renamed"
    assert _logged(out) >= next_checkpoint, "the killed run logged steps after its last checkpoint"

    last = train(parse_config(IPAdapterTrainConfig, _ip_args(out, data, *extra)), IPAdapterTask)
    assert last["step"] == 14 and not list(out.glob(".*.tmp"))
    assert reference["step"] == 14
    assert_same_run(tmp_path / "ref", out)


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """5 trajectories x 2 records (10 records: 5 batches of 2 an epoch)."""
    folder = tmp_path_factory.mktemp("traj") / "set"
    cfg = TrajectoryConfig(output_dir=str(folder), prompts=["a cat", "a red car", "a house", "a dog", "a tree"],
                           num_inference_steps=4, every_k=2, w_min=2.0, w_max=8.0, trajectories_per_shard=8,
                           max_disk_mb=4)
    generate_to_disk(cfg, pipe=load_pipeline("tiny-sd15"), log=lambda *a: None)
    (folder.parent / "stream.yaml").write_text(json.dumps({k: v for k, v in cfg.__dict__.items()
                                                           if k not in ("model", "output_dir")}))
    return folder


def _agd_args(out: Path, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--hidden_dim", "16", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--weight_decay", "0", "--lr_warmup_steps", "1", "--report_to", "none", "--checkpoints_total_limit", "none",
            *extra]


def test_agd_from_disk_with_accumulation_killed_in_a_checkpoint_write_resumes_exactly(trajectories, tmp_path):
    """5 batches an epoch, 2 per step: epochs of 3 steps (2 + 2 + the 1 accelerate ends the epoch with)."""
    extra = ("--trajectories", str(trajectories), "--gradient_accumulation_steps", "2", "--max_steps", "10",
             "--checkpointing_steps", "4")
    train(parse_config(AGDTrainConfig, _agd_args(tmp_path / "ref", *extra)), AGDTask)
    out = tmp_path / "run"
    rc, log = finish(launch("agd", 1, _agd_args(out, *extra), STUDIO_TEST_KILL_IN_CHECKPOINT="8"))
    assert rc == -signal.SIGKILL, log[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]  # step 4: epoch 1, one step in
    train(parse_config(AGDTrainConfig, _agd_args(out, *extra)), AGDTask)
    assert_same_run(tmp_path / "ref", out)


def test_agd_streaming_stopped_by_ctrl_c_resumes_exactly(trajectories, tmp_path):
    """The stream's plan position, pool and draw RNG travel in the checkpoint (task_state_0.pt)."""
    extra = ("--trajectory_config", str(trajectories.parent / "stream.yaml"), "--stream_pool_trajectories", "2",
             "--max_steps", "7", "--checkpointing_steps", "100")
    train(parse_config(AGDTrainConfig, _agd_args(tmp_path / "ref", *extra)), AGDTask)

    class Interrupted(AGDTask):
        def build(self):
            model, adapter = super().build()
            forward, calls = model.forward, [0]

            def forward_and_interrupt(batch):
                calls[0] += 1
                if calls[0] == 3:
                    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step finishes, is checkpointed, then stop
                return forward(batch)

            model.forward = forward_and_interrupt
            return model, adapter

    Interrupted.__name__ = "AGDTask"
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped) as stopped:
        train(parse_config(AGDTrainConfig, _agd_args(out, *extra)), Interrupted)
    assert stopped.value.step == 3 and stopped.value.signum == signal.SIGINT
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    state = torch.load(out / "checkpoint-3" / "training_state" / "task_state_0.pt", weights_only=True)
    assert set(state["stream"]) == {"rng", "next_call", "pool", "drawn", "generated", "per_traj"}
    assert signal.getsignal(signal.SIGINT) is handler and _logged(out) == 3, "the handler is restored after the run"
    train(parse_config(AGDTrainConfig, _agd_args(out, *extra)), AGDTask)
    assert_same_run(tmp_path / "ref", out)


def test_agd_streaming_on_two_processes_stopped_by_sigterm_resumes_exactly(trajectories, tmp_path):
    """SIGTERM to the process group (launcher and workers) during step 3: both workers agree to stop after it,
    checkpoint-3 is written (each process its own stream state), and the resumed run equals an uninterrupted one."""
    extra = ("--trajectory_config", str(trajectories.parent / "stream.yaml"), "--stream_pool_trajectories", "2",
             "--max_steps", "6", "--checkpointing_steps", "100")
    rc, log = finish(launch("agd", 2, _agd_args(tmp_path / "ref", *extra)))
    assert rc == 0, log[-3000:]
    out = tmp_path / "run"
    rc, log = finish(launch("agd", 2, _agd_args(out, *extra), STUDIO_TEST_SIGNAL_AT_STEP="3:SIGTERM"))
    assert rc != 0 and "stopped by SIGTERM at step 3" in log, log[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"] and not (out / "final").exists()
    assert {p.name for p in (out / "checkpoint-3" / "training_state").glob("task_state_*.pt")} == {
        "task_state_0.pt", "task_state_1.pt"}
    rc, log = finish(launch("agd", 2, _agd_args(out, *extra)))
    assert rc == 0 and "resumed from" in log, log[-3000:]
    assert_same_run(tmp_path / "ref", out)


# ------------------------------------------------------------------------------------------------ 3. loss log
def test_resume_drops_the_loss_records_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    train(_cfg(tmp_path, max_steps=3), DummyTask)
    run = tmp_path / "run"
    log = run / "logs" / "loss.jsonl"
    # what a run killed in step 4 leaves: steps 3-4 logged after checkpoint-2, half a line of step 5
    for name in ("checkpoint-3", "final"):
        loop.shutil.rmtree(run / name)
    log.write_text(log.read_text() + json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    train(_cfg(tmp_path, max_steps=4), DummyTask)
    assert [r["step"] for r in loss_log(run)] == [1, 2, 3, 4] and loss_log(run)[-1]["loss"] != 9.0


# ------------------------------------------------------------------------------------------------ 4. output folder
def test_output_dir_of_another_run_is_refused_and_overwrite_starts_over(tmp_path):
    train(_cfg(tmp_path, max_steps=6, checkpointing_steps=2), DummyTask)
    run = tmp_path / "run"
    recorded = json.loads((run / "config.json").read_text())
    assert len(recorded["config_hash"]) == 16 and recorded["task"] == "DummyTask"

    with pytest.raises(TrainingError, match=r"output_dir .*run holds another run \(config differs: learning_rate "
                                            r"0.001 -> 0.0003\): give a new --output_dir, or --overwrite_output_dir"):
        train(_cfg(tmp_path, max_steps=6, learning_rate=3e-4), DummyTask)
    with pytest.raises(TrainingError, match=r"holds checkpoints \(latest checkpoint-6\) and resume_from_checkpoint is "
                                            r"none: resume .*--overwrite_output_dir"):
        train(_cfg(tmp_path, max_steps=6, resume_from_checkpoint=None), DummyTask)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # a longer run (max_steps is not part of the identity) resumes; a new run over it replaces everything
    assert len(train(_cfg(tmp_path, max_steps=8), DummyTask)["losses"]) == 2
    train(_cfg(tmp_path, max_steps=2, learning_rate=3e-4, resume_from_checkpoint=None, overwrite_output_dir=True,
               checkpoints_total_limit=1), DummyTask)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"] and [r["step"] for r in loss_log(run)] == [1, 2]
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 3e-4


def test_checkpoint_rotation_never_deletes_the_new_runs_checkpoints(tmp_path):
    train(_cfg(tmp_path, max_steps=6), DummyTask)  # checkpoints 2, 4, 6
    run = tmp_path / "run"
    # resume from checkpoint-2 with a limit of 1: the rewritten checkpoint-4 must survive until checkpoint-6
    # replaces the old one (before: [2, 4, 6][:-1] deleted the new checkpoint-4 at once)
    result = train(_cfg(tmp_path, max_steps=6, resume_from_checkpoint=str(run / "checkpoint-2"),
                        checkpoints_total_limit=1), DummyTask)
    assert result["step"] == 6 and [p.name for p in list_checkpoints(run)] == ["checkpoint-6"]
    assert [r["step"] for r in loss_log(run)] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ 5. startup
class BrokenData(DummyTask):
    """The same task (and run identity) as DummyTask, whose data has gone bad since."""

    def dataloader(self):
        raise DataError("data/x/metadata.jsonl line 3: not a JSON object")


BrokenData.__name__ = "DummyTask"


def test_a_failed_start_leaves_the_runs_config_and_nothing_else_behind(tmp_path):
    train(_cfg(tmp_path, max_steps=2), DummyTask)
    run = tmp_path / "run"
    before = (run / "config.json").read_text()
    with pytest.raises(DataError):
        train(_cfg(tmp_path, max_steps=9), BrokenData)  # max_steps may change on resume: the same run
    assert (run / "config.json").read_text() == before
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError):
        train(_cfg(tmp_path, output_dir=str(fresh)), BrokenData)
    assert not (fresh / "config.json").exists()


def test_checkpointing_steps_zero_and_bad_values_are_refused_up_front():
    for argv, match in [(["--checkpointing_steps", "0"], r"checkpointing_steps must be >= 1, got 0; to checkpoint "
                                                         r"only at the last step give a value >= max_steps"),
                        (["--checkpoints_total_limit", "-1"], "checkpoints_total_limit must be >= 1"),
                        (["--learning_rate", "nan"], "learning_rate must be a finite number"),
                        (["--seed", str(2**40)], r"seed must be in \[0, 2\*\*32\)"),
                        (["--mixed_precision", "no", "--max_stepz", "3"], "unrecognized arguments: --max_stepz"),
                        (["--learning", "3"], "unrecognized arguments: --learning")]:
        with pytest.raises(ConfigError, match=match):
            parse_config(TrainConfig, argv)


def test_demo_data_only_where_asked_and_a_typo_is_an_error(data, tmp_path, capsys):
    typo = tmp_path / "dat_typo"
    with pytest.raises(SystemExit) as exit_:
        main(_ip_args(tmp_path / "run", typo, "--max_steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"error: data_dir {typo} does not exist (make_demo_data in the config file writes")
    assert "add --make_demo_data N" in err[0] and not typo.exists()

    # asked for: on the command line together with data_dir, or both in the YAML file (the tiny config's way)
    wanted = tmp_path / "demo"
    main(_ip_args(tmp_path / "run", wanted, "--max_steps", "1", "--make_demo_data", "4"))
    assert len(load_records(parse_config(IPAdapterTrainConfig, _ip_args(tmp_path, wanted)))) == 4
    yaml_cfg = tmp_path / "own.yaml"
    yaml_cfg.write_text(IP_CONFIG.read_text().replace("data/ip_adapter_tiny", str(tmp_path / "own_data")))
    cfg = parse_config(IPAdapterTrainConfig, ["--config", str(yaml_cfg)])
    assert wants_demo_data(cfg)
    assert not wants_demo_data(parse_config(IPAdapterTrainConfig, ["--config", str(yaml_cfg), "--data_dir", "x"]))


def test_captions_under_another_key_are_refused_and_some_missing_are_counted(data, tmp_path, capsys):
    folder = tmp_path / "other_key"
    folder.mkdir()
    rows = [{"file_name": str(data / f"{i:05d}.png"), "caption": "a dog"} for i in range(4)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config(IPAdapterTrainConfig, _ip_args(tmp_path, folder))
    with pytest.raises(DataError, match=r"no entry has a caption under 'text' \(other keys: caption\); set "
                                        r"--caption_column"):
        load_records(cfg)
    assert len(load_records(parse_config(IPAdapterTrainConfig, _ip_args(tmp_path, folder, "--caption_column",
                                                                        "caption")))) == 4
    rows[1]["text"] = rows[3]["text"] = "a cat"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    load_records(cfg)
    assert capsys.readouterr().err.strip() == (f"warning: 2 of 4 entries in {folder / 'metadata.jsonl'} have no "
                                               "caption under 'text': they train with the empty caption")


# ------------------------------------------------------------------------------------------------ 6. errors
def test_user_errors_are_one_line_without_traceback_from_the_real_script():
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ip_adapter.py"), "--config", str(IP_CONFIG),
                           "--checkpointing_steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: checkpointing_steps must be >= 1, got 0; to checkpoint only at the last step give a value >= max_steps"]


def test_bad_metadata_lines_and_unreadable_images_name_the_file(data, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    meta = folder / "metadata.jsonl"
    good = json.dumps({"file_name": str(data / "00000.png"), "text": "x"})
    meta.write_text(f"{good}\n\n{{'file_name': 1}}\n")
    with pytest.raises(DataError, match=rf"{meta} line 3: not a JSON object \(Expecting property name"):
        load_records(parse_config(IPAdapterTrainConfig, _ip_args(tmp_path, folder)))
    meta.write_text(f'{good}\n{{"file_name": 7}}\n')
    with pytest.raises(DataError, match=rf"{meta} line 2: needs 'file_name' \(a file name\), got {{'file_name': 7}}"):
        load_records(parse_config(IPAdapterTrainConfig, _ip_args(tmp_path, folder)))

    # a truncated PNG: refused before training (cache off: the verify pass) or while caching the embeddings
    truncated = folder / "cut.png"
    whole = (data / "00001.png").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    rows = [{"file_name": str(data / f"{i:05d}.png"), "text": "x"} for i in range(3)] + [{"file_name": "cut.png",
                                                                                         "text": "y"}]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jpeg = folder / "cut.jpg"  # verified at 1/8 scale, which still reads the whole file
    Image.open(data / "00002.png").convert("RGB").resize((256, 256)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"1 of 1 training images cannot be read: {jpeg} \(image file is truncated"):
        verify_images([(jpeg, "")])
    for cache in ("false", "true"):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(_ip_args(tmp_path / f"run_{cache}", folder, "--cache_image_embeds", cache, "--max_steps", "1"))
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert str(truncated) in line and line.startswith("error: ") and "fix" in line, line


def test_full_disk_while_checkpointing_is_one_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    real = loop.save_file
    calls = []

    def save_file(tensors, path, *a, **k):  # the adapter state, written inside accelerate's save_state
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(loop, "save_file", save_file)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"writing {run / 'checkpoint-4'} failed: no space left on the device: "
                                            r"free some .* run again to resume \(No space left on device\)"):
        train(_cfg(tmp_path), DummyTask)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"] and not list(run.glob(".*.tmp"))
    monkeypatch.setattr(loop, "save_file", real)
    assert train(_cfg(tmp_path), DummyTask)["step"] == 4, "the lock was released, the run resumes"


# ------------------------------------------------------------------------------------------------ 7. stop and lock
def test_ctrl_c_checkpoints_the_current_step_and_exits_130(tmp_path, capsys):
    class CtrlC(DummyTask):
        def build(self):
            model, adapter = super().build()
            forward = model.forward
            model.forward = lambda batch: (os.kill(os.getpid(), signal.SIGINT), forward(batch))[1]
            return model, adapter

    CtrlC.__name__ = "DummyTask"
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_cli(TrainConfig, CtrlC, ["--output_dir", str(run), "--max_steps", "5", "--checkpointing_steps", "4",
                                     "--report_to", "none", "--train_batch_size", "2"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "warning: SIGINT: checkpointing at the end of this step, then stopping" in err
    assert f"stopped by SIGINT at step 1; {run / 'checkpoint-1'} saved: run the same command again to resume" in err
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"] and not (run / "final").exists()


def test_a_second_run_into_a_locked_folder_refuses_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        held.write(f"process {os.getpid()} on this-host")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match=rf"output_dir {run} is in use by process {os.getpid()} on this-host: "
                                                r"wait for that run, stop it"):
            train(_cfg(tmp_path, max_steps=1), DummyTask)
    assert not (run / "config.json").exists()
    # what a SIGKILLed run leaves: its pid in the file, no flock (the kernel dropped it with the process)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"process {dead.pid} on this-host")
    capsys.readouterr()
    assert train(_cfg(tmp_path, max_steps=1), DummyTask)["step"] == 1
    assert f"took over the lock of process {dead.pid} on this-host" in capsys.readouterr().err
    assert (run / ".lock").read_text() == "", "released at the end"


# ------------------------------------------------------------------------------------------------ 8. precision etc.
@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it: these tests
    change it in-process (a real run is one process per run)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_mixed_precision_launcher_setting_fp16_on_cpu_and_trackers(tmp_path, monkeypatch, capsys,
                                                                   fresh_accelerator_state):
    import importlib.util

    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = _cfg(tmp_path, max_steps=1)
    train(cfg, DummyTask)
    AcceleratorState._reset_state()
    assert cfg.mixed_precision == "bf16", "the launcher's --mixed_precision is used when the config has none"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "bf16"
    capsys.readouterr()
    train(_cfg(tmp_path, output_dir=str(tmp_path / "fp16"), max_steps=2, mixed_precision="fp16"), DummyTask)
    err = capsys.readouterr().err
    assert "warning: mixed_precision: the config says fp16, accelerate launch says bf16; using the config's" in err
    assert err.count("mixed_precision fp16 on a CPU is slow") == 1 and "use --mixed_precision bf16 or no" in err

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"report_to wandb: the wandb package is not installed \(pip install wandb\), "
                                          r"or use --report_to tensorboard / none"):
        parse_config(TrainConfig, ["--report_to", "wandb"])


def test_accumulation_logs_the_mean_loss_of_the_micro_batches(tmp_path):
    seen = []

    class Spy(DummyTask):
        def build(self):
            model, adapter = super().build()
            forward = model.forward
            model.forward = lambda batch: (lambda loss: (seen.append(loss.item()), loss)[1])(forward(batch))
            return model, adapter

    result = train(_cfg(tmp_path, max_steps=3, gradient_accumulation_steps=2), Spy)
    # 8 samples, batch 2: 4 batches an epoch, 2 per step
    assert len(seen) == 6
    assert result["losses"] == pytest.approx([(seen[i] + seen[i + 1]) / 2 for i in (0, 2, 4)], abs=1e-6)


def test_resuming_with_another_number_of_processes_warns(tmp_path, capsys):
    train(_cfg(tmp_path, max_steps=2), DummyTask)
    state = tmp_path / "run" / "checkpoint-2" / "training_state" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "num_processes": 2}))
    capsys.readouterr()
    train(_cfg(tmp_path, max_steps=3), DummyTask)
    assert "was written by 2 processes, this run has 1: it continues, but the data order" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ fuzz
FIELD_VALUES = ["", "0", "-1", "1e3", "3.5", "nan", "inf", "-inf", "true", "no", "null", "~", "[]", "[1, 2]", "{a: 1}",
                "[", "{", "'", '"', "!!python/object:os.system", "*alias", "&a x", "9" * 30, "x" * 300, "\x00",
                "a: b: c", "- 1\n- 2", "\t", "latest", "fp16", "tensorboard", "cosine", "..", "/dev/null", "é"]


def _random_yaml(rng: random.Random, fields: list[str]) -> str:
    lines = []
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(fields + ["unknown_key", "1", "- x", "? a", ""])
        lines.append(f"{key}: {rng.choice(FIELD_VALUES)}")
    text = "\n".join(lines)
    return rng.choice([text, text, "[1, 2]", "just a string", "{{{", "\x00\x01", "a:\n  - b\n c: d", "[" * 200])


@pytest.mark.parametrize("config_cls", [TrainConfig, IPAdapterTrainConfig, AGDTrainConfig, TrajectoryConfig])
def test_fuzzed_configs_raise_only_config_errors(tmp_path, config_cls):
    import dataclasses

    rng = random.Random(f"fuzz-{config_cls.__name__}")
    fields = [f.name for f in dataclasses.fields(config_cls)]
    path = tmp_path / "c.yaml"
    for _ in range(300):
        if rng.random() < 0.1:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
        else:
            path.write_text(_random_yaml(rng, fields), encoding="utf-8")
        argv = ["--config", str(path)] if rng.random() < 0.8 else []
        for _ in range(rng.randint(0, 3)):
            argv += [f"--{rng.choice(fields + ['bogus'])}", rng.choice(FIELD_VALUES)]
        if rng.random() < 0.1:
            argv.append(rng.choice(["--max_steps", "--config", "-x", "--", "--learning_rate=1", "--seed=="]))
        try:
            cfg = parse_config(config_cls, argv)
        except StudioError:
            continue
        cfg.validate()


def test_fuzzed_metadata_lines_raise_only_data_errors(data, tmp_path):
    rng = random.Random("fuzz-metadata")
    folder = tmp_path / "fuzz"
    folder.mkdir()
    good = {"file_name": str(data / "00000.png"), "text": "a cat"}
    pieces = [json.dumps(good), "{}", "[]", "null", "1", '"x"', "{", '{"file_name": null}', '{"file_name": 3}',
              '{"file_name": ""}', '{"file_name": "a\\u0000b"}', '{"file_name": "' + "x" * 5000 + '"}',
              json.dumps({**good, "text": None}), json.dumps({**good, "text": [1]}), json.dumps({**good, "text": 3}),
              json.dumps({**good, "text": {"a": 1}}), "[" * 100000, "\ufeff" + json.dumps(good), "NaN",
              json.dumps({"file_name": "../" * 30 + "etc/passwd"}), "\x00", "   "]
    for _ in range(200):
        lines = [rng.choice(pieces) for _ in range(rng.randint(0, 5))]
        raw = "\n".join(lines).encode()
        if rng.random() < 0.1:
            raw += bytes([rng.randrange(128, 256)])
        (folder / "metadata.jsonl").write_bytes(raw)
        for key in ("data_dir", "data_json"):
            argv = _ip_args(tmp_path, folder) if key == "data_dir" else _ip_args(
                tmp_path, folder, "--data_dir", "null", "--data_json", str(folder / "metadata.jsonl"),
                "--data_root", str(folder))
            try:
                load_records(parse_config(IPAdapterTrainConfig, argv))
            except StudioError:
                pass
