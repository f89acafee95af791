"""Train a Ctrl-Adapter: frozen ControlNets of a source backbone, their residuals carried to a frozen target model.

    accelerate launch train/ctrl_adapter.py --config configs/train/ctrl_adapter_tiny.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/ctrl_adapter.py --config ...   # several processes

The recipe (Ctrl-Adapter, sec. 3): the target model (UNet, VAE, text encoders) and every ControlNet stay frozen; the
adapter (`CtrlAdapterModel`) and, with several ControlNets and `fusion: router`, the router learn the target's
denoising loss (MSE on the noise, or on v) with the ControlNets' residuals fed through the adapter into the target
UNet. The residuals go through exactly the path sampling uses (`CtrlAdapter.residuals` as a slot of the UNet's adapter
stack), so what is trained is what runs. With several ControlNets each step trains a random non-empty subset of the
conditions (`condition_subsets`), as the paper does, so the unit works with any subset at sampling. A fraction
`t_drop_rate` of the captions is dropped (the adapter's transformers then learn the empty prompt CFG samples with).
The shared loop (`adapter_studio.train.loop`) adds warmup + cosine, clipping, mixed precision, gradient
checkpointing, validation grids (condition images | output per row), trackers, atomic checkpoints and resume.

Data: `data_dir`, a Hugging Face imagefolder (`metadata.jsonl` lines `{"file_name": ..., "text": ...}`). Condition
k is extracted from the (resized, centre-cropped) image on the fly by `preprocessors[k]` (the studio's canny,
depth-like, mask, ...), or read from the file named in the column `conditioning_columns[k]` (precomputed condition
images, resized and cropped like the image). `make_demo_data` writes a small folder of shapes with captions, masks
(column `mask`) and a tiny random ControlNet (`controlnet/`) for plumbing-sized runs.

Every checkpoint's `adapter/` folder (and `final/`) is our adapter folder (`config.json` + safetensors, the router in
`router/`): it loads with its ControlNets through the family, `get_family("ctrl").load({"controlnet": ...,
"adapter": folder}, pipe)`, or `load_ctrl_adapter(controlnets, adapter=folder, unet=pipe.unet)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adapter_studio.stack import AdapterStack
from adapter_studio.train.config import ConfigError, DataError, TrainConfig
from adapter_studio.train.data import Captions, named_path, read_jsonl
from adapter_studio.train.demo_data import ensure_data_dir
from adapter_studio.train.loop import TrainingTask, run_cli, run_on_main

from .adapter import CtrlAdapter
from .conditions import suffix
from .family import MAX_CONDITIONS
from .formats import load_adapter_model, load_controlnet, load_router
from .modeling_ctrl_adapter import CtrlAdapterModel, is_video_unet
from .preprocessors import PREPROCESSORS, preprocess
from .residuals import LOCATION_NAMES, ResidualLayout
from .router import CtrlRouter

SLOT = "ctrl"
TRAINED_FUSIONS = ("router", "equal")


@dataclass
class CtrlAdapterTrainConfig(TrainConfig):
    """Ctrl-Adapter training: data and conditions, the frozen ControlNets, the adapter's shape, validation."""

    data_dir: str | None = None
    caption_column: str = "text"
    controlnets: list[str] | None = None  # one per condition: diffusers folders, hub ids or single files
    preprocessors: list[str] | None = None  # per condition (default canny), for conditions made from the image
    conditioning_columns: list[str] | None = None  # per condition: a metadata column naming its image, "" = preprocess
    resolution: int = 0  # 0: the model preset's resolution
    locations: str | None = None  # the paper's letters (A, B, ... levels, M mid); default every level + M
    per_location: int = 3
    num_blocks: int = 2
    num_attention_heads: int = 8
    attention_head_dim: int = 64
    source_scale: float = 1.0  # 0.5: the ControlNet at half the target's latent size (an SD1.5 ControlNet on SDXL)
    fusion: str = "router"  # several ControlNets: a learned router, or equal weights
    condition_subsets: bool = True
    t_drop_rate: float = 0.05
    init_weights: str | None = None  # continue from a Ctrl-Adapter folder (ours or released), its router included
    validation_images: list[str] | None = None  # source images (conditions made by the preprocessors); default:
    validation_prompts: list[str] | None = None  # the first two training items and their captions
    validation_num_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    # > 0: generate that many demo images into data_dir when that folder does not exist yet and data_dir was given
    # where make_demo_data was (both in the YAML file, or both on the command line): a typo'd --data_dir is an error,
    # not a new folder of demo images
    make_demo_data: int = 0

    RESUMABLE: ClassVar[frozenset[str]] = TrainConfig.RESUMABLE | {
        "validation_images", "validation_prompts", "validation_num_inference_steps", "validation_guidance_scale",
        "make_demo_data"}

    def validate(self) -> None:
        super().validate()
        if not self.data_dir:
            raise ConfigError("data_dir is required: an imagefolder with metadata.jsonl (file_name, text and any "
                              "conditioning columns)")
        if not self.controlnets:
            raise ConfigError("controlnets is required: a list with one frozen ControlNet per condition (diffusers "
                              "folder, hub id or single file)")
        k = len(self.controlnets)
        if k > MAX_CONDITIONS:
            raise ConfigError(f"a Ctrl unit takes at most {MAX_CONDITIONS} ControlNets, got {k}")
        for key in ("preprocessors", "conditioning_columns"):
            value = getattr(self, key)
            if value is not None and len(value) != k:
                raise ConfigError(f"{key} lists {len(value)} entries for {k} ControlNet(s): give one per ControlNet")
        unknown = [p for p in self.preprocessors or () if p not in PREPROCESSORS]
        if unknown:
            raise ConfigError(f"unknown preprocessors {unknown}; known: {', '.join(PREPROCESSORS)}")
        if self.fusion not in TRAINED_FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(TRAINED_FUSIONS)}, got {self.fusion!r}")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(f"resolution must be 0 (the model's) or a positive multiple of 8, got {self.resolution}")
        if self.locations is not None and (not self.locations or set(self.locations) - set(LOCATION_NAMES + "M")):
            raise ConfigError(f"locations takes the letters {LOCATION_NAMES[:4]}... (resolution levels) and M (mid), "
                              f"got {self.locations!r}")
        for key in ("per_location", "num_blocks", "num_attention_heads", "attention_head_dim",
                    "validation_num_inference_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.source_scale <= 1.0:
            raise ConfigError(f"source_scale must be in (0, 1], got {self.source_scale}")
        if not 0.0 <= self.t_drop_rate <= 1.0:
            raise ConfigError(f"t_drop_rate must be in [0, 1], got {self.t_drop_rate}")
        if self.make_demo_data < 0:
            raise ConfigError(f"make_demo_data must be >= 0, got {self.make_demo_data}")
        if not self.caption_column:
            raise ConfigError("caption_column is empty")

    @property
    def condition_preprocessors(self) -> list[str]:
        return list(self.preprocessors or ["canny"] * len(self.controlnets))


# ------------------------------------------------------------------------------------------------ demo data
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "white": (240, 240, 240), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")


def demo_controlnet(seed: int = 0) -> nn.Module:
    """The tiny SD1.5-shaped ControlNet (`tiny-controlnet`) with random weights in its zero-initialised output
    convolutions (a trained ControlNet has learned them; at zero it would give zero residuals)."""
    from adapter_studio.presets import build_tiny_controlnet

    cn = build_tiny_controlnet(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            if not p.any():
                p.normal_(0.0, 0.1, generator=g)
    return cn.eval()


def write_demo_data(folder: str | Path, count: int, size: int = 96, seed: int = 0) -> Path:
    """A small imagefolder for plumbing-sized runs: one or two filled shapes (circle, square, triangle) on a plain
    ground, so edges and masks are meaningful; `metadata.jsonl` with the caption (`text`) and the exact shape mask
    (`mask`, white on black: a precomputed condition); and a tiny random ControlNet in `controlnet/`."""
    import random

    from PIL import ImageDraw

    folder = Path(folder)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        bg, *fgs = rng.sample(list(COLORS), 3)
        fgs = fgs[: rng.randint(1, 2)]
        im = Image.new("RGB", (size, size), COLORS[bg])
        mask = Image.new("L", (size, size), 0)
        words = []
        for fg in fgs:
            shape = rng.choice(SHAPES)
            r = rng.randint(size // 8, size // 4)
            cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            for draw, fill in ((ImageDraw.Draw(im), COLORS[fg]), (ImageDraw.Draw(mask), 255)):
                if shape == "circle":
                    draw.ellipse(box, fill=fill)
                elif shape == "square":
                    draw.rectangle(box, fill=fill)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            words.append(f"a {fg} {shape}")
        name = f"{i:05d}.png"
        im.save(folder / name)
        mask.save(folder / "mask" / name)
        rows.append({"file_name": name, "text": f"{' and '.join(words)} on a {bg} background",
                     "mask": f"mask/{name}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo_controlnet(seed).save_pretrained(folder / "controlnet")
    return folder


# ------------------------------------------------------------------------------------------------ data
class Record(NamedTuple):
    image: Path
    caption: str
    conditions: tuple[Path | None, ...]  # per condition: its precomputed image, None = made by the preprocessor


def load_records(cfg: CtrlAdapterTrainConfig) -> list[Record]:
    """The training items of `data_dir/metadata.jsonl`; every malformed line or missing file is a `DataError`
    naming the line."""
    path = Path(cfg.data_dir) / "metadata.jsonl"
    rows = read_jsonl(path, f"data_dir {cfg.data_dir} has no metadata.jsonl (the imagefolder convention: one JSON "
                            "line per image, {\"file_name\": ..., \"text\": ...} and any conditioning columns)")
    columns = cfg.conditioning_columns or [""] * len(cfg.controlnets)
    root = Path(cfg.data_dir)
    captions = Captions(cfg.caption_column)
    records = []
    for row, at in rows:
        image = named_path(root, row, "file_name", at, "a file name relative to data_dir")
        conditions = tuple(named_path(root, row, key, at, "a file name relative to data_dir") if key else None
                           for key in columns)
        records.append(Record(image, captions.read(row, at), conditions))
    captions.check(path, "images")
    return records


def read_image(path: Path) -> Image.Image:
    """The image at `path` as RGB, fully decoded; an unreadable file is a `DataError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read ({e}): fix it or remove its entry") from None


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bilinear), then crop the centre square."""
    w, h = image.size
    s = size / min(w, h)
    image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class CtrlAdapterDataset(Dataset):
    """Items: `pixel_values [3, R, R]` in [-1, 1], `conditions [K, 3, R, R]` in 0..1 (one control image per
    ControlNet) and `caption` (a string). Deterministic: the randomness of a step lives in the model's forward."""

    def __init__(self, records: list[Record], resolution: int, preprocessors: list[str]):
        self.records, self.res, self.preprocessors = records, resolution, preprocessors

    def __len__(self) -> int:
        return len(self.records)

    def item(self, i: int) -> tuple[Image.Image, list[Image.Image]]:
        """The cropped image and its control images (PIL), as training sees them."""
        rec = self.records[i]
        image = center_crop(read_image(rec.image), self.res)
        conds = [center_crop(read_image(path), self.res) if path is not None else
                 preprocess(image, name, f"condition {k + 1} of {rec.image}")
                 for k, (path, name) in enumerate(zip(rec.conditions, self.preprocessors))]
        return image, conds

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, conds = self.item(i)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        control = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32) / 255.0).permute(2, 0, 1)
                               for c in conds])
        return {"pixel_values": pixels, "conditions": control, "caption": self.records[i].caption}


def verify_images(records: list[Record]) -> None:
    """Decode every image and condition image once; refuse if any is unreadable, naming the first few."""
    bad = []
    for rec in records:
        for path in (rec.image, *(p for p in rec.conditions if p is not None)):
            try:
                with Image.open(path) as im:
                    im.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                bad.append(f"{path} ({e})")
    if bad:
        raise DataError(f"{len(bad)} training images cannot be read: {'; '.join(bad[:3])}"
                        f"{'; ...' if len(bad) > 3 else ''}: fix them or remove their entries")


# ------------------------------------------------------------------------------------------------ model
class CtrlAdapterTrainingModel(nn.Module):
    """The frozen target (UNet with the Ctrl unit in its adapter stack, VAE, text encoders) and the unit's frozen
    ControlNets; `forward(batch)` returns the target's denoising MSE with the adapted control residuals."""

    def __init__(self, pipe: Any, ctrl: CtrlAdapter, noise_scheduler: Any, cfg: CtrlAdapterTrainConfig,
                 resolution: int):
        super().__init__()
        self.unet, self.vae, self.ctrl = pipe.unet, pipe.vae, ctrl
        self.text_encoders = nn.ModuleList(
            [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.pipe, self.noise_scheduler, self.cfg, self.resolution = pipe, noise_scheduler, cfg, resolution
        self.stack = AdapterStack().attach(self.unet)
        self.slot = self.stack.add(ctrl, name=SLOT)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Prompt tokens `[B, S, D]` and, on SDXL, the added conditions (pooled text `[B, P]`, time ids `[B, 6]`
        for an uncropped image of the training resolution, as sampling passes by default)."""
        pipe, device = self.pipe, self.unet.device
        if getattr(pipe, "text_encoder_2", None) is None:
            return pipe.encode_prompt(captions, device, 1, False)[0], None
        tokens, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        r = self.resolution
        time_ids = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=tokens.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return tokens, {"text_embeds": pooled, "time_ids": time_ids.to(device).expand(len(captions), -1)}

    def draw_conditions(self) -> list[int]:
        """The conditions this step trains: all, or a random non-empty subset (global RNG: resumes exactly)."""
        k = len(self.ctrl.controlnets)
        if k == 1 or not self.cfg.condition_subsets:
            return list(range(k))
        size = int(torch.randint(1, k + 1, ()))
        return sorted(torch.randperm(k)[:size].tolist())

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """`batch`: `pixel_values [B, 3, R, R]`, `conditions [B, K, 3, R, R]`, `caption` (B strings)."""
        cfg = self.cfg
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.vae.device, self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            b = latents.shape[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=latents.device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            drop = (torch.rand(b) < cfg.t_drop_rate).tolist()
            text, added = self.encode_text(["" if d else c for c, d in zip(batch["caption"], drop)])
            present = self.draw_conditions()
        conds = batch["conditions"]
        inputs: dict[str, Any] = {f"image{suffix(k)}": conds[:, k] for k in present}
        if len(self.ctrl.controlnets) > 1:
            inputs["fusion"] = cfg.fusion
        self.slot.inputs = inputs
        dtype = self.unet.dtype
        pred = self.unet(noisy.to(dtype), t, text.to(dtype), added_cond_kwargs=added).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        if self.ctrl.router is not None:
            # a step with one condition leaves the router out of the graph (one condition weighs exactly 1); several
            # processes (DDP) need every trained parameter in it on every process
            loss = loss + 0.0 * sum(p.sum() for p in self.ctrl.router.parameters())
        return loss


# ------------------------------------------------------------------------------------------------ task
class CtrlAdapterTask(TrainingTask):
    """The Ctrl-Adapter family's task for the shared loop; `build` returns the trained part as
    `nn.ModuleDict({"adapter": CtrlAdapterModel[, "router": CtrlRouter]})` (checkpoints hold only those)."""

    cfg: CtrlAdapterTrainConfig

    def build(self) -> tuple[nn.Module, nn.Module]:
        from diffusers import DDPMScheduler

        from adapter_studio.presets import load_pipeline

        cfg, acc = self.cfg, self.accelerator
        if not Path(cfg.data_dir).exists():
            run_on_main(acc, self._demo_data)
        # the data is read (every image decoded) before the models load: a data error costs seconds
        self.records = load_records(cfg)
        run_on_main(acc, lambda: verify_images(self.records))
        pipe = load_pipeline(cfg.model)
        if is_video_unet(pipe.unet):
            raise ConfigError(f"model {cfg.model!r} makes videos; Ctrl-Adapter training reads images (give an SD1.5- "
                              "or SDXL-type model)")
        self.pipe = pipe
        self.resolution = cfg.resolution or getattr(getattr(pipe, "studio_preset", None), "resolution", 512)
        controlnets = [load_controlnet(c) for c in cfg.controlnets]
        device = acc.device if acc is not None else torch.device("cpu")
        # frozen parts in the training dtype (SDXL's VAE overflows in fp16: it stays float32, as diffusers upcasts it)
        for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae, *controlnets):
            if m is None:
                continue
            m.requires_grad_(False).eval().to(device=device)
            if self.weight_dtype != torch.float32 and not (m is pipe.vae and pipe.vae.config.force_upcast):
                m.to(dtype=self.weight_dtype)
        adapter, router = self._trained_modules(controlnets[0], pipe.unet, len(controlnets))
        # the trained part keeps float32 master weights whatever the frozen parts run in
        adapter.float().to(device).train()
        if router is not None:
            router.float().to(device).train()
        ctrl = CtrlAdapter(controlnets, adapter, router)
        ctrl.check_compatible(pipe.unet)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.model = CtrlAdapterTrainingModel(pipe, ctrl, noise_scheduler, cfg, self.resolution)
        trained = nn.ModuleDict({"adapter": adapter, **({"router": router} if router is not None else {})})
        return self.model, trained

    def _trained_modules(self, controlnet: nn.Module, unet: nn.Module,
                         k: int) -> tuple[CtrlAdapterModel, CtrlRouter | None]:
        """A new adapter (and router, for several ControlNets fused by one), or those of `init_weights`."""
        cfg = self.cfg
        wants_router = k > 1 and cfg.fusion == "router"
        num_routers = len(ResidualLayout.from_config(controlnet.config))
        if cfg.init_weights:
            adapter = load_adapter_model(cfg.init_weights, controlnet.config, unet.config)
            folder = Path(cfg.init_weights, "router")
            router = load_router(folder) if wants_router and folder.is_dir() else None
            if router is not None and router.config.num_experts != k:
                raise ConfigError(f"init_weights' router weighs {router.config.num_experts} conditions; this run "
                                  f"has {k} ControlNets")
        else:
            adapter = CtrlAdapterModel.for_models(
                controlnet, unet, locations=cfg.locations, per_location=cfg.per_location, num_blocks=cfg.num_blocks,
                num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
                source_scale=cfg.source_scale)
            router = None
        if wants_router and router is None:
            router = CtrlRouter(num_experts=k, num_routers=num_routers)
        return adapter, router

    def _demo_data(self) -> None:
        ensure_data_dir(self.cfg, lambda folder: write_demo_data(folder, self.cfg.make_demo_data, seed=self.cfg.seed),
                        "demo images (and a tiny random ControlNet)")

    def dataset(self) -> CtrlAdapterDataset:
        return CtrlAdapterDataset(self.records, self.resolution, self.cfg.condition_preprocessors)

    def dataloader(self) -> DataLoader:
        ds = self.dataset()
        return DataLoader(ds, batch_size=self.cfg.train_batch_size, shuffle=True,
                          num_workers=self.cfg.dataloader_num_workers, drop_last=len(ds) >= self.cfg.train_batch_size)

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        """Our adapter folder: `config.json` + `diffusion_pytorch_model.safetensors`, the router in `router/`."""
        folder = Path(folder)
        adapter["adapter"].save_pretrained(folder)
        if "router" in adapter:
            adapter["router"].save_pretrained(folder / "router")

    def _validation_items(self) -> list[tuple[list[Image.Image], str]]:
        """`(control images, prompt)` per grid row: `validation_images` through the preprocessors, else the first
        two training items as training sees them."""
        cfg, res = self.cfg, self.resolution
        if cfg.validation_images:
            items = []
            for path in cfg.validation_images:
                image = center_crop(read_image(Path(path)), res)
                items.append([preprocess(image, name) for name in cfg.condition_preprocessors])
            captions = [""] * len(items)
        else:
            ds = self.dataset()
            n = min(2, len(ds))
            items = [ds.item(i)[1] for i in range(n)]
            captions = [ds.records[i].caption for i in range(n)]
        prompts = list(cfg.validation_prompts or captions)
        prompts += [prompts[-1] if prompts else ""] * (len(items) - len(prompts))
        return list(zip(items, prompts))

    @torch.no_grad()
    def validate(self, adapter: nn.Module, step: int) -> Any:
        """Grid: one row per validation item, columns control image(s) | sample (`(K + 1) * R` wide)."""
        from diffusers.utils import make_image_grid

        from adapter_studio.pipelines.studio_pipeline import StudioPipeline

        cfg, model = self.cfg, self.model
        k = len(model.ctrl.controlnets)
        items = self._validation_items()
        saved = model.slot.inputs
        tiles = []
        try:
            model.slot.inputs = {}
            studio = StudioPipeline(self.pipe, stack=model.stack)
            for i, (conds, prompt) in enumerate(items):
                inputs: dict[str, Any] = {f"image{suffix(j)}": c for j, c in enumerate(conds)}
                if k > 1:
                    inputs["fusion"] = cfg.fusion
                out = studio(prompt, num_inference_steps=cfg.validation_num_inference_steps,
                             guidance_scale=cfg.validation_guidance_scale,
                             generator=torch.Generator("cpu").manual_seed(cfg.seed + i), height=self.resolution,
                             width=self.resolution, adapter_inputs={SLOT: inputs}).images[0]
                tiles += [*conds, out]
        finally:
            model.slot.inputs = saved
        return make_image_grid(tiles, rows=len(items), cols=k + 1, resize=self.resolution)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`--config file.yaml [--field value ...]` -> one training run; returns `train`'s summary dict. What the user
    can fix ends the process with one `error:` line and exit status 2 (`adapter_studio.train.loop.run_cli`)."""
    return run_cli(CtrlAdapterTrainConfig, CtrlAdapterTask, argv)
