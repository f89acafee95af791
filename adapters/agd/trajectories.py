"""CFG trajectories for AGD training: record what the teacher (the frozen UNet under classifier-free guidance) does.

    python train/agd_trajectories.py --config configs/train/agd_tiny_trajectories.yaml [--field value ...]

Ordinary CFG sampling with the model's own diffusers pipeline, one guidance scale `w ~ U[w_min, w_max]` per prompt.
At every (or every k-th) step it records, per conditional sample:

    x_t      [C, H, W]  fp16   the UNet's (scheduler-scaled) input, conditional half
    eps_cfg  [C, H, W]  fp16   eps_uncond + w * (eps_cond - eps_uncond), the guided prediction the student learns
    timestep []         fp32   the UNet's timestep
and once per trajectory the prompt embeddings `[S, D]` (fp16), `w` and, for SDXL, the pooled text embeds and
time ids (the UNet's added conditioning).

On disk (`output_dir/`): safetensors shards `shard-00000.safetensors` (rows = records; per-trajectory tensors indexed
by `traj_index`) and `index.json`. The run's disk use is computed from the shapes before sampling starts, printed,
written into the index, and refused when above `max_disk_mb` (the error says how many trajectories would fit).

Streaming (`StreamingTrajectories`) runs the same sampler during training and keeps records only in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, IterableDataset

from adapter_studio.errors import CheckpointError, StudioError
from adapter_studio.train.config import ConfigError, parse_config

FORMAT = "adapter-studio/agd-trajectories"
VERSION = 1
#: per-record tensors (rows of a shard) and per-trajectory tensors (indexed by `traj_index`)
RECORD_KEYS = ("x_t", "eps_cfg", "timestep", "step_index", "traj_index")
TRAJ_KEYS = ("prompt_embeds", "w", "text_embeds", "time_ids")
SHARD_HEADER_ALLOWANCE = 8192  # bytes: safetensors JSON header + metadata, generous


@dataclass
class TrajectoryConfig:
    """How to sample teacher trajectories (also used by streaming training)."""

    output_dir: str = "runs/agd_trajectories"
    model: str = "tiny-sd15"
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    repeat: int = 1
    num_per_prompt: int = 1
    num_inference_steps: int = 20
    every_k: int = 1
    w_min: float = 1.0
    w_max: float = 8.0
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    seed: int = 0
    trajectories_per_shard: int = 64
    max_disk_mb: float = 2048.0
    device: str = "auto"
    dtype: str = "fp32"
    overwrite: bool = False

    def validate(self) -> None:
        if not self.prompts and not self.prompt_file:
            raise ConfigError("give prompts (a list) or prompt_file (one prompt per line)")
        if not 1.0 <= self.w_min <= self.w_max:
            raise ConfigError(f"need 1 <= w_min <= w_max (CFG scales; the pipeline skips guidance at w <= 1), "
                              f"got {self.w_min}..{self.w_max}")
        for key in ("repeat", "num_per_prompt", "num_inference_steps", "every_k", "trajectories_per_shard"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"dtype must be fp32, fp16 or bf16, got {self.dtype!r}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.max_disk_mb > 0:
            raise ConfigError(f"max_disk_mb must be > 0, got {self.max_disk_mb}")
        for key in ("height", "width"):
            if getattr(self, key) is not None and getattr(self, key) < 8:
                raise ConfigError(f"{key} must be >= 8 (or none: the model's resolution), got {getattr(self, key)}")

    def prompt_list(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise ConfigError(f"prompt_file {path} does not exist")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError("the prompt list is empty")
        return prompts

    def plan(self) -> list[tuple[str, float, int]]:
        """`(prompt, w, seed)` per pipeline call: w ~ U[w_min, w_max] per prompt, reproducible from `seed`."""
        rng = random.Random(self.seed)
        calls = []
        for r in range(self.repeat):
            for i, p in enumerate(self.prompt_list()):
                calls.append((p, rng.uniform(self.w_min, self.w_max), self.seed * 1_000_003 + len(calls)))
        return calls

    @property
    def num_trajectories(self) -> int:
        return len(self.plan()) * self.num_per_prompt

    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ----------------------------------------------------------------------------------------------------------
# sampling


@dataclass
class Layout:
    """Shapes of what one trajectory stores; `bytes_per_trajectory` is exact up to the shard headers."""

    latent: tuple[int, int, int]
    prompt: tuple[int, int]
    records: int
    text_embeds: int | None = None
    time_ids: int | None = None

    @property
    def bytes_per_trajectory(self) -> int:
        c, h, w = self.latent
        per_record = 2 * c * h * w * 2 + 4 + 4 + 4  # x_t, eps_cfg (fp16) + timestep, step_index, traj_index
        per_traj = self.prompt[0] * self.prompt[1] * 2 + 4  # prompt_embeds (fp16) + w
        if self.text_embeds:
            per_traj += self.text_embeds * 2 + self.time_ids * 4
        return self.records * per_record + per_traj


def trajectory_layout(pipe: Any, cfg: TrajectoryConfig) -> Layout:
    """What each trajectory of `cfg` stores for `pipe` (computed before sampling, for the disk estimate)."""
    h, w = _hw(pipe, cfg)
    f = pipe.vae_scale_factor
    unet = pipe.unet
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.num_inference_steps)
    calls = len(sched.timesteps)
    layout = Layout(latent=(unet.config.in_channels, h // f, w // f),
                    prompt=(pipe.tokenizer.model_max_length, unet.config.cross_attention_dim),
                    records=math.ceil(calls / cfg.every_k))
    if getattr(pipe, "text_encoder_2", None) is not None:
        layout.text_embeds = pipe.text_encoder_2.config.projection_dim
        layout.time_ids = 6  # SDXL: original size, crop top-left, target size
    return layout


def _hw(pipe: Any, cfg: TrajectoryConfig) -> tuple[int, int]:
    preset = getattr(pipe, "studio_preset", None)
    default = preset.resolution if preset is not None else pipe.unet.config.sample_size * pipe.vae_scale_factor
    return int(cfg.height or default), int(cfg.width or default)


class CFGRecorder:
    """Forward hook on the UNet: turns each CFG step of one pipeline call into records.

    The UNet batch under CFG is `[uncond B; cond B]`; at w == 1 diffusers skips guidance and the batch is `[cond B]`.
    """

    def __init__(self, w: float, batch: int, every_k: int = 1):
        self.w, self.batch, self.every_k = float(w), batch, every_k
        self.calls = 0
        self.x_t: list[torch.Tensor] = []
        self.eps: list[torch.Tensor] = []
        self.t: list[float] = []
        self.steps: list[int] = []
        self.cond: dict[str, torch.Tensor] = {}

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        step = self.calls
        self.calls += 1
        if step % self.every_k:
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        pred = output[0] if isinstance(output, (tuple, list)) else output.sample
        pred = pred[:, : sample.shape[1]]  # drop a learned-variance half if the model has one
        n = sample.shape[0]
        if n == 2 * self.batch:
            uncond, cond = pred.float().chunk(2)
            eps = uncond + self.w * (cond - uncond)  # exactly the pipelines' CFG combination
            take = slice(self.batch, None)
        elif n == self.batch:
            eps, take = pred.float(), slice(None)
        else:
            raise RuntimeError(f"UNet batch {n} is neither {self.batch} nor {2 * self.batch}")
        self.x_t.append(sample[take].detach().to("cpu", torch.float16))
        self.eps.append(eps.detach().to("cpu", torch.float16))
        self.t.append(float(torch.as_tensor(timestep).flatten()[0]))
        self.steps.append(step)
        if not self.cond:
            self.cond["prompt_embeds"] = ehs[take].detach().to("cpu", torch.float16)
            added = kwargs.get("added_cond_kwargs") or {}
            if "text_embeds" in added:
                self.cond["text_embeds"] = added["text_embeds"][take].detach().to("cpu", torch.float16)
                self.cond["time_ids"] = added["time_ids"][take].detach().to("cpu", torch.float32)

    def trajectories(self) -> list[dict[str, torch.Tensor]]:
        """One dict per conditional sample: x_t/eps_cfg `[R, C, H, W]`, timestep/step_index `[R]`, w, prompt embeds."""
        if not self.x_t:
            raise RuntimeError("the pipeline made no UNet call to record")
        x, e = torch.stack(self.x_t, 1), torch.stack(self.eps, 1)  # [B, R, C, H, W]
        out = []
        for b in range(x.shape[0]):
            traj = {"x_t": x[b], "eps_cfg": e[b], "timestep": torch.tensor(self.t, dtype=torch.float32),
                    "step_index": torch.tensor(self.steps, dtype=torch.int32), "w": torch.tensor(self.w),
                    **{k: v[b] for k, v in self.cond.items()}}
            out.append(traj)
        return out


@torch.no_grad()
def sample_trajectories(pipe: Any, cfg: TrajectoryConfig,
                        calls: list[tuple[str, float, int]] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Run CFG sampling for each `(prompt, w, seed)` (default: `cfg.plan()`); yields one trajectory per sample."""
    h, w_ = _hw(pipe, cfg)
    device = pipe.unet.device
    for prompt, w, seed in (calls if calls is not None else cfg.plan()):
        rec = CFGRecorder(w, cfg.num_per_prompt, cfg.every_k)
        handle = pipe.unet.register_forward_hook(rec, with_kwargs=True)
        try:
            pipe(prompt=prompt, negative_prompt=cfg.negative_prompt or None, guidance_scale=w,
                 num_inference_steps=cfg.num_inference_steps, num_images_per_prompt=cfg.num_per_prompt,
                 height=h, width=w_, generator=torch.Generator(device).manual_seed(seed), output_type="latent")
        finally:
            handle.remove()
        yield from rec.trajectories()


# ----------------------------------------------------------------------------------------------------------
# on disk


class ShardWriter:
    """Collects trajectories and writes a safetensors shard every `per_shard` of them (temp file + rename)."""

    def __init__(self, folder: Path, per_shard: int, meta: dict[str, Any], max_bytes: int):
        self.folder, self.per_shard, self.max_bytes = folder, per_shard, max_bytes
        self.pending: list[dict[str, torch.Tensor]] = []
        self.shards: list[dict[str, Any]] = []
        self.meta = meta
        self.bytes = 0

    def add(self, traj: dict[str, torch.Tensor]) -> None:
        self.pending.append(traj)
        if len(self.pending) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = pack_shard(self.pending)
        name = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(VERSION)})
        size = tmp.stat().st_size
        if self.bytes + size > self.max_bytes:
            tmp.unlink()
            raise ConfigError(f"trajectory shards would exceed max_disk_mb ({self.max_bytes / 2**20:.1f} MiB); "
                              f"stopped after {sum(s['trajectories'] for s in self.shards)} trajectories")
        os.replace(tmp, self.folder / name)
        self.bytes += size
        self.shards.append({"file": name, "trajectories": len(self.pending),
                            "records": int(tensors["x_t"].shape[0]), "bytes": size})
        self.pending = []
        self.write_index(complete=False)

    def write_index(self, complete: bool) -> None:
        index = {**self.meta, "complete": complete, "bytes": self.bytes, "shards": self.shards,
                 "num_trajectories": sum(s["trajectories"] for s in self.shards),
                 "num_records": sum(s["records"] for s in self.shards)}
        tmp = self.folder / ".index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.folder / "index.json")


def pack_shard(trajs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Trajectories -> one shard's tensors: records concatenated, per-trajectory tensors stacked."""
    out: dict[str, torch.Tensor] = {
        "x_t": torch.cat([t["x_t"] for t in trajs]).contiguous(),
        "eps_cfg": torch.cat([t["eps_cfg"] for t in trajs]).contiguous(),
        "timestep": torch.cat([t["timestep"] for t in trajs]),
        "step_index": torch.cat([t["step_index"] for t in trajs]),
        "traj_index": torch.cat([torch.full((t["x_t"].shape[0],), i, dtype=torch.int32) for i, t in enumerate(trajs)]),
        "prompt_embeds": torch.stack([t["prompt_embeds"] for t in trajs]).contiguous(),
        "w": torch.stack([t["w"].float() for t in trajs]),
    }
    if "text_embeds" in trajs[0]:
        out["text_embeds"] = torch.stack([t["text_embeds"] for t in trajs]).contiguous()
        out["time_ids"] = torch.stack([t["time_ids"] for t in trajs]).contiguous()
    return out


def disk_plan(pipe: Any, cfg: TrajectoryConfig) -> dict[str, Any]:
    """Disk use of a run, known before sampling: per trajectory, in all, and the bound."""
    layout = trajectory_layout(pipe, cfg)
    n = cfg.num_trajectories
    shards = math.ceil(n / cfg.trajectories_per_shard)
    total = n * layout.bytes_per_trajectory + shards * SHARD_HEADER_ALLOWANCE + 64 * 1024  # + index.json
    return {"layout": layout, "trajectories": n, "bytes_per_trajectory": layout.bytes_per_trajectory,
            "estimated_bytes": total, "max_bytes": int(cfg.max_disk_mb * 2**20)}


def generate_to_disk(cfg: TrajectoryConfig, pipe: Any | None = None, log: Any = print) -> Path:
    """Sample every planned trajectory of `cfg` and write shards + index to `cfg.output_dir`; returns the folder."""
    out = Path(cfg.output_dir)
    if (out / "index.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds trajectories (index.json); set overwrite: true or another output_dir")
    pipe = pipe if pipe is not None else load_teacher(cfg)
    plan = disk_plan(pipe, cfg)
    layout = plan["layout"]
    log(f"[agd-trajectories] {plan['trajectories']} trajectories x {layout.records} records "
        f"({cfg.num_inference_steps} steps, every {cfg.every_k}); {plan['bytes_per_trajectory'] / 2**10:.1f} KiB per "
        f"trajectory; disk: {plan['estimated_bytes'] / 2**20:.2f} MiB of at most {cfg.max_disk_mb:.0f} MiB")
    if plan["estimated_bytes"] > plan["max_bytes"]:
        fit = max(0, (plan["max_bytes"] - 64 * 1024) // (layout.bytes_per_trajectory + SHARD_HEADER_ALLOWANCE))
        raise ConfigError(f"the run needs {plan['estimated_bytes'] / 2**20:.1f} MiB, above max_disk_mb "
                          f"{cfg.max_disk_mb}: {fit} trajectories fit; lower repeat/num_per_prompt, raise every_k "
                          "or max_disk_mb")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("shard-*.safetensors")) + [out / "index.json"]:
        if old.exists():
            old.unlink()
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.model,
            "latent_shape": list(layout.latent), "prompt_shape": list(layout.prompt),
            "records_per_trajectory": layout.records, "bytes_per_trajectory": plan["bytes_per_trajectory"],
            "estimated_bytes": plan["estimated_bytes"], "added_cond": layout.text_embeds is not None,
            "scheduler": type(pipe.scheduler).__name__, "config": asdict(cfg),
            "prompts": [p for p, _, _ in cfg.plan() for _ in range(cfg.num_per_prompt)]}
    writer = ShardWriter(out, cfg.trajectories_per_shard, meta, plan["max_bytes"])
    t0 = time.time()
    for i, traj in enumerate(sample_trajectories(pipe, cfg)):
        writer.add(traj)
        if (i + 1) % max(1, plan["trajectories"] // 10) == 0:
            log(f"[agd-trajectories] {i + 1}/{plan['trajectories']} ({time.time() - t0:.1f}s)")
    writer.flush()
    writer.write_index(complete=True)
    log(f"[agd-trajectories] wrote {writer.bytes / 2**20:.2f} MiB in {len(writer.shards)} shards to {out}")
    return out


def load_teacher(cfg: TrajectoryConfig) -> Any:
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline(cfg.model, torch_dtype=cfg.torch_dtype())
    return pipe.to(cfg.torch_device())


class TrajectoryDataset(Dataset):
    """Records of an on-disk trajectory set; each item a dict of the tensors as stored.

    Item: `x_t`, `eps_cfg` `[C, H, W]` fp16, `timestep` fp32 scalar, `w` fp32 scalar, `prompt_embeds` `[S, D]` fp16,
    and for SDXL `text_embeds` `[D2]` fp16, `time_ids` `[6]` fp32. Shards are memory-mapped, read per record.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise CheckpointError(f"{self.folder} holds no trajectory set (no index.json); "
                                  "make one with `python train/agd_trajectories.py --config ...`")
        try:
            self.index = json.loads(index_path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{index_path} is not JSON ({e}): record the trajectories again") from None
        found = self.index if isinstance(self.index, dict) else {}
        if found.get("format") != FORMAT or found.get("version") != VERSION:
            raise CheckpointError(f"{index_path}: not a {FORMAT} v{VERSION} index "
                                  f"(format {found.get('format')!r}, version {found.get('version')!r})")
        self.rows: list[tuple[int, int]] = []
        for s, shard in enumerate(self.index["shards"]):
            if not (self.folder / shard["file"]).is_file():
                raise CheckpointError(f"trajectory shard {shard['file']} listed in {index_path} is missing")
            self.rows += [(s, r) for r in range(shard["records"])]
        self._handles: dict[int, Any] = {}
        self._traj_index: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self, s: int) -> Any:
        if s not in self._handles:
            f = safe_open(str(self.folder / self.index["shards"][s]["file"]), framework="pt")
            self._handles[s] = f
            self._traj_index[s] = f.get_tensor("traj_index")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, r = self.rows[i]
        f = self._open(s)
        j = int(self._traj_index[s][r])
        item = {"x_t": f.get_slice("x_t")[r], "eps_cfg": f.get_slice("eps_cfg")[r],
                "timestep": f.get_slice("timestep")[r], "w": f.get_slice("w")[j],
                "prompt_embeds": f.get_slice("prompt_embeds")[j]}
        if self.index.get("added_cond"):
            item["text_embeds"] = f.get_slice("text_embeds")[j]
            item["time_ids"] = f.get_slice("time_ids")[j]
        return {k: v.squeeze(0) if v.ndim and v.shape[0] == 1 and k in ("timestep", "w") else v
                for k, v in item.items()}

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}, "_traj_index": {}}


def trajectory_records(traj: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The per-record items of one in-memory trajectory (the same dicts `TrajectoryDataset` yields)."""
    out = []
    for r in range(traj["x_t"].shape[0]):
        item = {"x_t": traj["x_t"][r], "eps_cfg": traj["eps_cfg"][r], "timestep": traj["timestep"][r],
                "w": traj["w"].float(), "prompt_embeds": traj["prompt_embeds"]}
        if "text_embeds" in traj:
            item["text_embeds"], item["time_ids"] = traj["text_embeds"], traj["time_ids"]
        out.append(item)
    return out


# ----------------------------------------------------------------------------------------------------------
# streaming


class StreamingTrajectories(IterableDataset):
    """Trajectories sampled during training, records kept in a shuffled in-memory pool (no disk at all).

    Args:
        pipe: the teacher pipeline; its UNet may carry the student's adapter stack: the AGD slots are switched off
            while sampling (`pause` is a callable returning a context manager that does that).
        cfg: what to sample (prompts, w range, steps, every_k); the plan is cycled forever.
        epoch_records: records per "epoch" (what `len` reports, so the shared loop can count batches).
        pool_trajectories: trajectories held at once; records are drawn at random from the pool, which is
            topped up with a freshly sampled trajectory whenever one trajectory's worth of records was drawn.

    `state_dict` / `load_state_dict` carry the position in the plan, the pool and the draw RNG, so a run resumed
    from a checkpoint draws exactly the records the uninterrupted run would have (taken between two `__iter__`s).
    """

    def __init__(self, pipe: Any, cfg: TrajectoryConfig, epoch_records: int, pool_trajectories: int = 8,
                 pause: Any = None, seed: int = 0):
        self.pipe, self.cfg = pipe, cfg
        self.epoch_records = epoch_records
        self.pool_trajectories = pool_trajectories
        self.pause = pause
        self.rng = random.Random(seed)
        self.calls = cfg.plan()
        self.next_call = 0
        self.pool: list[dict[str, torch.Tensor]] = []
        self.drawn = 0
        self.generated = 0
        self.per_traj = 1

    def __len__(self) -> int:
        return self.epoch_records

    def _sample_more(self) -> None:
        """Sample the next planned call (its `num_per_prompt` trajectories) into the pool; drop the oldest records."""
        call = self.calls[self.next_call % len(self.calls)]
        self.next_call += 1
        with (self.pause() if self.pause else contextlib.nullcontext()):
            trajs = list(sample_trajectories(self.pipe, self.cfg, calls=[call]))
        for t in trajs:
            self.pool += trajectory_records(t)
        self.generated += len(trajs)
        self.per_traj = len(trajs[0]["timestep"])
        excess = len(self.pool) - self.pool_trajectories * self.per_traj
        if excess > 0:
            del self.pool[:excess]

    def state_dict(self) -> dict[str, Any]:
        """Position, pool and RNG (tensors, numbers and tuples only: read back with `weights_only=True`)."""
        return {"rng": self.rng.getstate(), "next_call": self.next_call, "pool": list(self.pool), "drawn": self.drawn,
                "generated": self.generated, "per_traj": self.per_traj}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.next_call, self.drawn = int(state["next_call"]), int(state["drawn"])
        self.generated, self.per_traj = int(state["generated"]), int(state["per_traj"])
        self.pool = list(state["pool"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.generated < self.pool_trajectories:
            self._sample_more()
        for _ in range(self.epoch_records):
            # one fresh call per call's worth of records drawn: every record is seen about once on average
            if self.drawn >= self.per_traj * self.cfg.num_per_prompt:
                self._sample_more()
                self.drawn = 0
            self.drawn += 1
            yield self.pool[self.rng.randrange(len(self.pool))]


def main(argv: list[str] | None = None) -> int:
    """`--config file.yaml [--field value ...]` -> trajectories on disk; returns the exit status (2 with one
    `error:` line for what the user can fix)."""
    try:
        generate_to_disk(parse_config(TrajectoryConfig, argv))
    except StudioError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    return 0
