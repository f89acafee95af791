"""Train an IP-Adapter on a frozen text-to-image model.

    accelerate launch train/ip_adapter.py --config configs/train/ip_adapter_tiny.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/ip_adapter.py --config ...   # several processes

The recipe is the paper's reference script: frozen UNet, VAE, text and image encoders; `to_k_ip` / `to_v_ip`
start as copies of each layer's `to_k` / `to_v`; per sample 5% image dropped, 5% text dropped, 5% both (the
dropped image is the zero embedding for `base`, the encoder's output on a zero image for `plus`/`full` — what
sampling uses as the negative); MSE between predicted and true noise (or v). The shared loop
(`adapter_studio.train.loop`) adds warmup + cosine, clipping, mixed precision, gradient checkpointing, validation
grids, trackers, atomic checkpoints and resume; this module adds the optional cache of image embeddings (the image
encoder then never runs during training and is not kept on the device).

Data, either:

* `data_json`: the original JSON list `[{"image_file": "1.png", "text": "a dog"}, ...]`, files under `data_root`;
* `data_dir`: a Hugging Face imagefolder: `metadata.jsonl` lines `{"file_name": ..., "text": ...}`.

Every checkpoint's `adapter/` folder (and `final/`) loads directly: `load_ip_adapter(folder, unet)` or a mix unit
`{"family": "ip", "weights": folder}`; with `export_original` it also holds `ip_adapter.safetensors`, the original
single-file format for diffusers' `pipe.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors")`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adapter_studio.stack import AdapterStack
from adapter_studio.train.config import ConfigError, DataError, TrainConfig
from adapter_studio.train.data import Captions, named_path, read_jsonl, short
from adapter_studio.train.demo_data import ensure_data_dir
from adapter_studio.train.loop import TrainingTask, run_cli, run_on_main

from .adapter import IPAdapter
from .formats import load_ip_adapter, save_original
from .inputs import encode_pixels
from .projection import PROJECTIONS, uses_hidden_states


@dataclass
class IPAdapterTrainConfig(TrainConfig):
    """IP-Adapter training: data, variant, drop rates, embedding cache, validation."""

    data_json: str | None = None
    data_root: str = ""
    data_dir: str | None = None
    caption_column: str = "text"
    resolution: int = 0  # 0: the model preset's resolution
    projection: str = "base"
    num_tokens: int = 0  # 0: the variant's default (base 4, plus 16)
    init_weights: str | None = None  # continue from an IP-Adapter in any supported format
    i_drop_rate: float = 0.05
    t_drop_rate: float = 0.05
    ti_drop_rate: float = 0.05
    cache_image_embeds: bool = False
    export_original: bool = True
    validation_images: list[str] | None = None  # paths; default: the first two training images
    validation_prompts: list[str] | None = None  # one per image; default: their captions
    validation_num_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    # > 0: generate that many demo images into data_dir when that folder does not exist yet and data_dir was given
    # where make_demo_data was (both in the YAML file, or both on the command line): a typo'd --data_dir is an error,
    # not a new folder of demo images
    make_demo_data: int = 0

    RESUMABLE: ClassVar[frozenset[str]] = TrainConfig.RESUMABLE | {
        "validation_images", "validation_prompts", "validation_num_inference_steps", "validation_guidance_scale",
        "cache_image_embeds", "export_original", "make_demo_data"}

    def validate(self) -> None:
        super().validate()
        if bool(self.data_json) == bool(self.data_dir):
            raise ConfigError("give exactly one of data_json (the original JSON list + data_root) or data_dir "
                              "(an imagefolder with metadata.jsonl)")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        rates = (self.i_drop_rate, self.t_drop_rate, self.ti_drop_rate)
        if not min(rates) >= 0 or not sum(rates) <= 1:
            raise ConfigError(f"drop rates must be >= 0 and sum to <= 1, got {rates}")
        for key in ("resolution", "num_tokens", "make_demo_data", "validation_num_inference_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.caption_column:
            raise ConfigError("caption_column is empty")


# ------------------------------------------------------------------------------------------------ data
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "white": (240, 240, 240), "black": (20, 20, 20)}


def write_demo_data(folder: str | Path, count: int, size: int = 96, seed: int = 0) -> Path:
    """A small imagefolder of generated pictures (a coloured circle or square on a coloured ground, with a caption
    saying so) plus the same list in the original JSON format (`data.json`): data for plumbing-sized runs."""
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    rows = []
    for i in range(count):
        fg, bg = rng.sample(names, 2)
        shape = rng.choice(["circle", "square"])
        im = Image.new("RGB", (size, size), COLORS[bg])
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
        name = f"{i:05d}.png"
        im.save(folder / name)
        rows.append({"file_name": name, "text": f"a {fg} {shape} on a {bg} background"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "data.json").write_text(json.dumps([{"image_file": r["file_name"], "text": r["text"]} for r in rows]))
    return folder


def load_records(cfg: IPAdapterTrainConfig) -> list[tuple[Path, str]]:
    """`(image path, caption)` pairs from the original JSON list or an imagefolder's metadata.jsonl.

    Every malformed entry is a `DataError` naming the file and line (metadata.jsonl) or entry (data_json). Captions
    missing under the caption key are counted: all missing is refused (the key is probably another one), some
    missing is a warning (those images train with the empty caption).
    """
    if cfg.data_json:
        path = Path(cfg.data_json)
        if not path.is_file():
            raise ConfigError(f"data_json {path} does not exist")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"data_json {path} is not a JSON file: {short(e)}") from None
        if not isinstance(rows, list):
            raise DataError(f"data_json {path} must hold a list of {{'image_file', 'text'}} objects")
        root, key_img, key_txt = Path(cfg.data_root), "image_file", "text"
        entries = [(row, f"{path} entry {i}") for i, row in enumerate(rows)]
    else:
        path = Path(cfg.data_dir) / "metadata.jsonl"
        entries = read_jsonl(path, f"data_dir {cfg.data_dir} has no metadata.jsonl (the imagefolder convention: one "
                                   "JSON line per image, {\"file_name\": ..., \"text\": ...})")
        root, key_img, key_txt = Path(cfg.data_dir), "file_name", cfg.caption_column
    captions = Captions(key_txt, key_img)
    records = [(named_path(root, row, key_img, at, "a file name"), captions.read(row, at)) for row, at in entries]
    captions.check(path, "entries", "; set --caption_column to the right key" if cfg.data_dir else "")
    return records


def read_image(path: Path) -> Any:
    """The image at `path` as RGB, fully decoded; a file that is not a readable image is a `DataError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    # PIL reports broken files as OSError (truncated, unidentified), SyntaxError (broken PNG chunks), ValueError or
    # its decompression-bomb guard
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read ({short(e)}): fix it or remove its entry") from None


def verify_images(records: list[tuple[Path, str]]) -> None:
    """Decode every training image once (JPEGs at 1/8 scale: still the whole file); refuse if any is unreadable,
    naming the first few. Runs before training when the embedding cache (which reads every image) is off."""
    from PIL import Image

    bad = []
    for path, _ in records:
        try:
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (im.width // 8 or 1, im.height // 8 or 1))
                im.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            bad.append(f"{path} ({short(e, 60)})")
    if bad:
        raise DataError(f"{len(bad)} of {len(records)} training images cannot be read: {'; '.join(bad[:3])}"
                        f"{'; ...' if len(bad) > 3 else ''}: fix them or remove their entries")


class IPAdapterDataset(Dataset):
    """Items: `pixel_values [3, R, R]` in [-1, 1] (resize + center crop), `input_ids [77]`, and either
    `clip_pixels [3, h, w]` (the image encoder's input) or, with the cache, `image_embeds [D]` / `[S, D]`."""

    def __init__(self, records: list[tuple[Path, str]], tokenizer: Any, feature_extractor: Any, resolution: int,
                 embeds: torch.Tensor | None = None):
        self.records, self.tokenizer, self.fe, self.res, self.embeds = records, tokenizer, feature_extractor, resolution, embeds

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int):
        return read_image(self.records[i][0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import numpy as np
        from PIL import Image

        raw = self.image(i)
        w, h = raw.size
        s = self.res / min(w, h)
        im = raw.resize((max(self.res, round(w * s)), max(self.res, round(h * s))), Image.BILINEAR)
        left, top = (im.width - self.res) // 2, (im.height - self.res) // 2
        im = im.crop((left, top, left + self.res, top + self.res))
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        ids = self.tokenizer(self.records[i][1], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        item = {"pixel_values": pixels, "input_ids": ids}
        if self.embeds is not None:
            item["image_embeds"] = self.embeds[i]
        else:
            item["clip_pixels"] = self.fe(raw, return_tensors="pt").pixel_values[0]
        return item


@torch.no_grad()
def compute_embeds(dataset: IPAdapterDataset, image_encoder: nn.Module, hidden: bool, device: torch.device,
                   batch_size: int = 16) -> torch.Tensor:
    """Image-encoder outputs of every training image `[M, D]` / `[M, S, D]` (for the cache)."""
    out = []
    dtype = next(image_encoder.parameters()).dtype
    for start in range(0, len(dataset), batch_size):
        imgs = [dataset.image(i) for i in range(start, min(len(dataset), start + batch_size))]
        pixels = dataset.fe(imgs, return_tensors="pt").pixel_values.to(device, dtype)
        out.append(encode_pixels(image_encoder, pixels, hidden).float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ model
class IPAdapterTrainingModel(nn.Module):
    """Frozen UNet (with the adapter stack), VAE, text encoder and (unless cached) image encoder; `forward(batch)`
    returns the noise-prediction MSE."""

    def __init__(self, pipe: Any, adapter: IPAdapter, noise_scheduler: Any, cfg: IPAdapterTrainConfig,
                 negative_embed: torch.Tensor, empty_ids: torch.Tensor, keep_image_encoder: bool):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.adapter = pipe.unet, pipe.vae, pipe.text_encoder, adapter
        self.image_encoder = pipe.image_encoder if keep_image_encoder else None
        self.noise_scheduler, self.cfg = noise_scheduler, cfg
        self.hidden = uses_hidden_states(adapter.config.projection)
        self.register_buffer("negative_embed", negative_embed, persistent=False)  # [D] / [S, D]
        self.register_buffer("empty_ids", empty_ids, persistent=False)  # [77]
        self.stack = AdapterStack().attach(self.unet)
        self.slot = self.stack.add(adapter, name="ip")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg, dtype = self.cfg, self.vae.dtype
        with torch.no_grad():
            latents = self.vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            b = latents.shape[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=latents.device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            # the reference's drops: [0, i) image, [i, i+t) text, [i+t, i+t+ti) both
            r = torch.rand(b, device=latents.device)
            i_, t_, ti_ = cfg.i_drop_rate, cfg.t_drop_rate, cfg.ti_drop_rate
            drop_image = (r < i_) | ((r >= i_ + t_) & (r < i_ + t_ + ti_))
            drop_text = (r >= i_) & (r < i_ + t_ + ti_)
            ids = torch.where(drop_text[:, None], self.empty_ids[None], batch["input_ids"])
            text = self.text_encoder(ids)[0]
            if "image_embeds" in batch:
                embeds = batch["image_embeds"]
            else:
                embeds = encode_pixels(self.image_encoder, batch["clip_pixels"].to(self.image_encoder.dtype), self.hidden)
            keep = (~drop_image).view(-1, *[1] * (embeds.ndim - 1))
            embeds = torch.where(keep, embeds.to(self.negative_embed.dtype), self.negative_embed[None])
        self.slot.inputs = {"image_embeds": embeds[:, None]}  # [B, 1, ...]: one reference per sample
        pred = self.unet(noisy, t, text.to(self.unet.dtype)).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float(), reduction="mean")


# ------------------------------------------------------------------------------------------------ task
class IPAdapterTask(TrainingTask):
    cfg: IPAdapterTrainConfig

    def build(self) -> tuple[nn.Module, nn.Module]:
        from diffusers import DDPMScheduler

        from adapter_studio.presets import load_pipeline

        cfg, acc = self.cfg, self.accelerator
        if cfg.data_dir:  # every process calls in (it waits for the main one), whatever it sees on the disk
            run_on_main(acc, self._demo_data)
        # the data is read (and, without the embedding cache, every image decoded) before the model loads: a data
        # error costs seconds, not a model load; the main process reports it once for all
        records = run_on_main(acc, lambda: load_records(cfg))
        self.records = records if records is not None else load_records(cfg)
        if not cfg.cache_image_embeds:
            run_on_main(acc, lambda: verify_images(self.records))
        pipe = load_pipeline(cfg.model)
        if pipe.image_encoder is None or pipe.feature_extractor is None:
            raise ConfigError(f"model {cfg.model!r} has no image encoder; IP-Adapter training needs one "
                              "(give a preset with image_encoder)")
        self.pipe = pipe
        self.resolution = cfg.resolution or getattr(getattr(pipe, "studio_preset", None), "resolution", 512)
        hidden = uses_hidden_states(cfg.projection)
        enc_cfg = pipe.image_encoder.config
        embed_dim = enc_cfg.hidden_size if hidden else enc_cfg.projection_dim
        if cfg.init_weights:
            adapter = load_ip_adapter(cfg.init_weights, pipe.unet, pipe.image_encoder)
            if adapter.config.projection != cfg.projection:
                raise ConfigError(f"init_weights is a {adapter.config.projection} IP-Adapter, the config asks for "
                                  f"{cfg.projection}")
        else:
            adapter = IPAdapter.from_unet(pipe.unet, embed_dim, projection=cfg.projection,
                                         num_tokens=cfg.num_tokens or None)
        adapter.float().train()
        device = acc.device if acc is not None else torch.device("cpu")
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
            m.requires_grad_(False).eval().to(device=device)
            if self.weight_dtype != torch.float32:
                m.to(dtype=self.weight_dtype)

        tmp_ds = IPAdapterDataset(self.records, pipe.tokenizer, pipe.feature_extractor, self.resolution)
        with torch.no_grad():  # the dropped image: zero embedding (base) or the encoder on a zero image
            if hidden:
                size = enc_cfg.image_size
                zero = torch.zeros(1, 3, size, size, device=device, dtype=self.weight_dtype)
                negative = encode_pixels(pipe.image_encoder, zero, True)[0].float()
            else:
                negative = torch.zeros(embed_dim, device=device)
        self.embeds = self._cached_embeds(tmp_ds, hidden, device) if cfg.cache_image_embeds else None
        empty_ids = pipe.tokenizer("", max_length=pipe.tokenizer.model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids[0]
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        model = IPAdapterTrainingModel(pipe, adapter, noise_scheduler, cfg, negative, empty_ids,
                                       keep_image_encoder=not cfg.cache_image_embeds)
        self.model = model
        if cfg.cache_image_embeds:
            pipe.image_encoder.to("cpu")  # not needed on the device any more (validation encodes on the CPU)
        return model, adapter

    def _demo_data(self) -> None:
        ensure_data_dir(self.cfg, lambda folder: write_demo_data(folder, self.cfg.make_demo_data, seed=self.cfg.seed),
                        "demo images")

    def _cached_embeds(self, dataset: IPAdapterDataset, hidden: bool, device: torch.device) -> torch.Tensor:
        """Image embeddings of the whole dataset, computed once by the main process and shared through a file."""
        from safetensors.torch import load_file, save_file

        acc = self.accelerator
        key = hashlib.sha256(json.dumps([[str(p), p.stat().st_mtime_ns] for p, _ in self.records]
                                        + [self.cfg.model, hidden]).encode()).hexdigest()[:16]
        path = Path(self.cfg.output_dir) / "cache" / f"image_embeds-{key}.safetensors"

        def compute() -> None:  # every image is decoded here: an unreadable one is a DataError naming it
            if not path.is_file():
                embeds = compute_embeds(dataset, self.pipe.image_encoder, hidden, device)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                save_file({"image_embeds": embeds.contiguous()}, str(tmp))
                tmp.replace(path)

        run_on_main(acc, compute)
        return load_file(str(path))["image_embeds"]

    def dataloader(self) -> DataLoader:
        ds = IPAdapterDataset(self.records, self.pipe.tokenizer, self.pipe.feature_extractor, self.resolution,
                              embeds=self.embeds)
        return DataLoader(ds, batch_size=self.cfg.train_batch_size, shuffle=True,
                          num_workers=self.cfg.dataloader_num_workers, drop_last=len(ds) >= self.cfg.train_batch_size)

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        folder = Path(folder)
        adapter.save_pretrained(folder)
        if self.cfg.export_original:
            save_original(adapter, folder / "ip_adapter.safetensors")

    @torch.no_grad()
    def validate(self, adapter: nn.Module, step: int) -> Any:
        """Grid: one row per validation image, columns reference | sample (`2 * R` wide, `rows * R` high)."""
        from diffusers.utils import make_image_grid
        from PIL import Image

        from adapter_studio.pipelines.studio_pipeline import StudioPipeline

        cfg = self.cfg
        paths = cfg.validation_images or [str(p) for p, _ in self.records[:2]]
        prompts = cfg.validation_prompts or [t for _, t in self.records[:2]][: len(paths)]
        if len(prompts) < len(paths):
            prompts = list(prompts) + [prompts[-1] if prompts else ""] * (len(paths) - len(prompts))
        slot, model = self.model.slot, self.model
        saved_inputs = slot.inputs
        encoder_device = self.pipe.image_encoder.device
        self.pipe.image_encoder.to(self.pipe.unet.device)
        model.unet.eval()
        try:
            slot.inputs = {}
            studio = StudioPipeline(self.pipe, stack=model.stack)
            res = self.resolution
            tiles = []
            for i, (path, prompt) in enumerate(zip(paths, prompts)):
                with Image.open(path) as im:
                    ref = im.convert("RGB")
                gen = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
                out = studio(prompt, num_inference_steps=cfg.validation_num_inference_steps,
                             guidance_scale=cfg.validation_guidance_scale, generator=gen, height=res, width=res,
                             adapter_inputs={"ip": {"image": ref}}).images[0]
                tiles += [ref, out]
        finally:
            slot.inputs = saved_inputs
            model.unet.train()
            self.pipe.image_encoder.to(encoder_device)
        return make_image_grid(tiles, rows=len(tiles) // 2, cols=2, resize=res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`--config file.yaml [--field value ...]` -> one training run; returns `train`'s summary dict. What the user
    can fix ends the process with one `error:` line and exit status 2 (`adapter_studio.train.loop.run_cli`)."""
    return run_cli(IPAdapterTrainConfig, IPAdapterTask, argv)
