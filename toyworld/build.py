"""Building the toy world's shipped models, step by step: each step one ordinary command (printed as it runs), each
skipped when its result is already there, so an interrupted build goes on where it stopped (the training runs
themselves resume from their checkpoints).

    python -m adapter_studio.toyworld build            # everything, about an hour on 2 CPU cores (docs/quality.md)
    python -m adapter_studio.toyworld build --only unet

The results land in `models/toy/`: `toy-sd15/` (a diffusers pipeline folder: VAE, UNet, text encoder, tokenizer,
scheduler, image encoder), `controlnet-mask/`, `motion/` and one adapter folder per family, plus `examples/`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .data import replace_folder

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "toy"
RUNS = REPO / "runs" / "toy"
DATA = RUNS / "data"


def assemble(vae: Path, clip: Path, unet: Path, out: Path, architecture: str = "configs/toyworld/architecture.yaml") -> Path:
    """Put the trained parts together into a `StableDiffusionPipeline` folder at `out` (with the image encoder and
    its processor, and the architecture's DDIM scheduler), written beside and renamed."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from adapter_studio.presets import build_scheduler, load_preset

    arch = load_preset(str(REPO / architecture) if not Path(architecture).is_file() else architecture)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae), unet=UNet2DConditionModel.from_pretrained(unet / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(unet / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(unet / "tokenizer"),
        scheduler=build_scheduler(arch.config["scheduler"]), safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(clip / "feature_extractor"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(clip / "image_encoder"),
        requires_safety_checker=False)
    return replace_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def install(src: Path, dst: Path) -> Path:
    """Copy a run's `final/` folder to its place under `models/toy/` (replacing what was there)."""
    return replace_folder(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


@dataclass
class Step:
    """One build step: `run` does it, `done` (a path) says it is already done."""

    name: str
    done: Path
    run: Callable[[], Any]


def _command(*args: str) -> Callable[[], None]:
    def run() -> None:
        cmd = [sys.executable, *args]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)

    return run


def _train(script: str, config: str, *extra: str) -> Callable[[], None]:
    return _command(f"train/{script}.py", "--config", f"configs/toyworld/{config}.yaml", *extra)


def steps() -> list[Step]:
    """The build in order (each step's inputs come from the steps before it)."""
    from .data import write_clip_folder, write_image_folder

    return [
        Step("vae", RUNS / "vae" / "final", _train("toy_world", "vae")),
        Step("clip", RUNS / "clip" / "final", _train("toy_world", "clip")),
        Step("unet", RUNS / "unet" / "final", _train("toy_world", "unet")),
        Step("assemble", MODELS / "toy-sd15" / "model_index.json",
             lambda: assemble(RUNS / "vae" / "final", RUNS / "clip" / "final", RUNS / "unet" / "final",
                              MODELS / "toy-sd15")),
        Step("images", DATA / "prompts.txt", lambda: (write_image_folder(DATA / "images", "train", 2000),
                                                      write_prompts(DATA / "prompts.txt", 96))),
        Step("clips", DATA / "clips" / "metadata.jsonl", lambda: write_clip_folder(DATA / "clips", "train", 300)),
        Step("agd", MODELS / "agd" / "agd_config.json", lambda: (
            _command("train/agd_trajectories.py", "--config", "configs/toyworld/agd_trajectories.yaml")(),
            _train("agd", "agd")(), install(RUNS / "agd" / "final", MODELS / "agd"))),
        Step("ip-adapter", MODELS / "ip-adapter", lambda: (
            _train("ip_adapter", "ip_adapter")(), install(RUNS / "ip_adapter" / "final", MODELS / "ip-adapter"))),
        Step("controlnet", MODELS / "controlnet-mask" / "config.json", lambda: (
            _train("toy_world", "controlnet")(), install(RUNS / "controlnet" / "final", MODELS / "controlnet-mask"))),
        Step("ctrl-adapter", MODELS / "ctrl-adapter-mask", lambda: (
            _train("ctrl_adapter", "ctrl_adapter")(),
            install(RUNS / "ctrl_adapter" / "final", MODELS / "ctrl-adapter-mask"))),
        Step("motion", MODELS / "motion" / "config.json", lambda: (
            _train("toy_world", "motion")(), install(RUNS / "motion" / "final", MODELS / "motion"))),
        Step("i2v-adapter", MODELS / "i2v-adapter", lambda: (
            _train("i2v_adapter", "i2v_adapter")(), install(RUNS / "i2v_adapter" / "final", MODELS / "i2v-adapter"))),
        Step("examples", MODELS / "examples" / "examples.json", lambda: write_examples(MODELS / "examples")),
    ]


def write_prompts(path: Path, count: int) -> Path:
    """`count` captions of the `prompts` split, one per line (AGD's trajectory prompts)."""
    from .scenes import scene_for

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(scene_for("prompts", i).caption + "\n" for i in range(count)))
    return path


def write_examples(folder: Path) -> Path:
    """Held-out scenes the studio offers as reference images, control maps and first frames (`examples.json`
    lists them with their captions)."""
    import json

    from .data import CONDITIONS
    from .scenes import render, scene_for

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        scene = scene_for("examples", i)
        row = {"image": f"scene-{i}.png", "caption": scene.caption}
        render(scene, 64).save(folder / row["image"])
        for name, draw in CONDITIONS.items():
            row[name] = f"scene-{i}-{name}.png"
            draw(scene, 64).convert("RGB").save(folder / row[name])
        rows.append(row)
    (folder / "examples.json").write_text(json.dumps(rows, indent=1))
    return folder


def build(only: list[str] | None = None) -> None:
    """Run the steps not done yet (or exactly `only`, done or not), timing each."""
    for step in steps():
        if only is not None:
            if step.name not in only:
                continue
        elif step.done.exists():
            print(f"[{step.name}] done ({step.done.relative_to(REPO)})", flush=True)
            continue
        t0 = time.time()
        print(f"[{step.name}] ...", flush=True)
        step.run()
        print(f"[{step.name}] {time.time() - t0:.0f} s", flush=True)
