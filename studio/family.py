"""The family contract: everything the studio, its app and its exports know about one adapter family.

A family (IP-Adapter, AGD, Ctrl-Adapter, I2V-Adapter, or one of your own) is one package that builds a `Family`
and names it in an entry point of the group `adapter_studio.families` (see `adapter_studio.registry`). The core,
the pipelines, the web app and the exports read only this object; none of them names a family.

    FAMILY = Family(
        name="ip", label="IP-Adapter",
        loader=lambda weights, pipe: load_ip_adapter(weights["weights"], pipe.unet, pipe.image_encoder),
        fields=(Field("image", "images", "Reference images", required=True),),
        training=(TrainingScript("train/ip_adapter.py", "ip_adapter_*.yaml", data_key="data_dir"),),
    )

Nothing here imports Gradio: `Field` is a declarative form spec the app turns into widgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from torch import nn

from .errors import MixError

FieldKind = Literal["images", "image", "number", "int", "choice", "text", "json"]
Target = Literal["inputs", "scale", "guidance", "sampling"]
Weights = Mapping[str, "str | None"]


@dataclass(frozen=True)
class Field:
    """One input of a family's unit, as the app shows it and the mix stores it.

    Attributes:
        key: the key in the target dict (`UnitSpec.inputs`, the sampling settings, ...).
        kind: `images` (several uploads), `image` (one upload: a mask, a control image, a first frame),
            `number` / `int` (sliders), `choice` (dropdown), `text` (a line), `json` (free-form object).
        label, info: what the app shows.
        target: where the value goes:
            `"inputs"`   the unit's mix inputs (`UnitSpec.inputs[key]`), read by the family's `inputs_from_json`;
            `"scale"`    a `choice` of block presets (`adapter_studio.block_scale.BLOCK_PRESETS`) or a `json`
                         per-block scale: turns the unit's weight into a per-block scale dict;
            `"guidance"` the call's guidance scale (a family that replaces CFG reads it, e.g. AGD's w); also kept
                         in the unit's inputs under `key`, so the unit alone says which value it ran with;
            `"sampling"` a sampling setting of the mix (`adapter_studio.mix.Sampling`), e.g. a frame count.
        required: the unit cannot run without it (the app says so, naming the unit and the field).
        preview: `fn(values of the unit's fields by key) -> image | None`, shown next to an image field and
            refreshed when any of the unit's fields changes (a control image's preprocessed preview).
        visible_when: `(other field's key, value)`: shown only while that field has that value.
    """

    key: str
    kind: FieldKind
    label: str
    target: Target = "inputs"
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    info: str = ""
    preview: Callable[[dict[str, Any]], Any] | None = None
    visible_when: tuple[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "label": self.label, "target": self.target,
                "default": self.default, "minimum": self.minimum, "maximum": self.maximum, "step": self.step,
                "choices": list(self.choices), "required": self.required, "info": self.info,
                "preview": self.preview is not None,
                "visible_when": list(self.visible_when) if self.visible_when else None}


@dataclass(frozen=True)
class WeightsFile:
    """One weights file (or folder) a unit loads; a unit may need several (Ctrl: a ControlNet and an adapter).

    Attributes:
        key: the key in `UnitSpec.weights` / `UnitSpec.sha256` and in the dict handed to `Family.load`.
        label: what the app's dropdown says.
        required: the unit cannot run without it.
        folder: the models-folder subfolder listed for it (default: the family's name).
        config_classes: the `_class_name`s of the diffusers-style folders (`config.json`) it loads; a folder naming
            another class is not listed for it (empty: every folder is).
    """

    key: str = "weights"
    label: str = "Weights"
    required: bool = True
    folder: str | None = None
    config_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingScript:
    """A training entry point of a family, as the app's Train tab starts it.

    Attributes:
        script: path relative to the checkout, run with `accelerate launch` (`train/ip_adapter.py`).
        configs: glob of its configs under `configs/train/` (`ip_adapter_*.yaml`).
        data_key: the config field the Train tab's data folder fills (None: the script takes no data folder).
        produces_adapter: the run's `final/` folder is a loadable adapter of the family (a trajectory recorder's is not).
        weights: the `WeightsFile.key` that `final/` fills (Ctrl trains its adapter, not its ControlNet); None = the
            family's first weights file.
    """

    script: str
    configs: str
    data_key: str | None = "data_dir"
    produces_adapter: bool = True
    weights: str | None = None


def _identity_inputs(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    return dict(inputs)


@dataclass(frozen=True)
class Family:
    """One adapter family.

    Attributes:
        name: short id used in mixes ("ip", "agd", ...).
        label: what the app shows.
        loader: `(weights, pipe) -> adapter`: `weights` maps each `WeightsFile.key` to a file, folder or hub id
            (None where an optional one is not given); `pipe` is the diffusers pipeline. Raises a `StudioError`
            (`CheckpointError`, `IncompatibleAdapterError`) naming what is wrong, leaving `pipe` untouched.
        inputs_from_json: `(inputs, base_dir) -> call inputs`: a mix unit's JSON inputs (paths, numbers) as the
            adapter takes them; raises `MixError`. Relative paths are looked up under `base_dir` first.
        weights: the weights files a unit loads, in order.
        fields: the unit's form, in display order.
        help: one line the app shows under the family's name.
        output: what a call with this unit produces: `image` or `video`.
        guidance: the guidance mode this family provides in place of classifier-free guidance (AGD: "agd"), or
            None. Its adapters carry the same name as `guidance_mode`.
        prompts_by_image: key of an images field; an enabled unit with it filled may stand in for the text prompt.
        model_kinds: model kinds (`adapter_studio.presets.ModelPreset.kind`) the family runs on; None = any.
        default_weight: the app's weight slider start value.
        order: position in the app's family list (smaller first).
        training: its training scripts.
        comfy_nodes: class names of its ComfyUI nodes (loader first, then apply), for the workflow export.
        inspect: `path -> description` of a weights file or folder of this family without loading a model: a dict
            with `format`, `variant`, `base` (the widths and layer counts it was made for), `parameters`, `dtype`;
            raises `CheckpointError` when the file is not this family's. Read by `python -m adapter_studio inspect`.
        writers: format name -> `(adapter, path) -> written path`: the formats `python -m adapter_studio convert`
            writes (an adapter loaded with `load`, so every readable format converts to every written one).
    """

    name: str
    label: str
    loader: Callable[[Weights, Any], nn.Module]
    inputs_from_json: Callable[[dict[str, Any], Path | None], dict[str, Any]] = _identity_inputs
    weights: tuple[WeightsFile, ...] = (WeightsFile(),)
    fields: tuple[Field, ...] = ()
    help: str = ""
    output: Literal["image", "video"] = "image"
    guidance: str | None = None
    prompts_by_image: str | None = None
    model_kinds: tuple[str, ...] | None = None
    default_weight: float = 1.0
    order: int = 100
    training: tuple[TrainingScript, ...] = ()
    comfy_nodes: tuple[str, ...] = ()
    inspect: Callable[[Path], dict[str, Any]] | None = None
    writers: Mapping[str, Callable[[nn.Module, Path], Path]] = dataclass_field(default_factory=dict)

    def field(self, key: str) -> Field | None:
        return next((f for f in self.fields if f.key == key), None)

    def weights_dict(self, weights: str | Weights | None) -> dict[str, str | None]:
        """`weights` as `{WeightsFile.key: path}`: a plain string names the first weights file."""
        keys = [w.key for w in self.weights]
        if weights is None or isinstance(weights, str):
            weights = {keys[0]: weights} if keys else {}
        if not isinstance(weights, Mapping):
            raise MixError(f"{self.label}: weights must be a path or an object {{{', '.join(keys)}}}, "
                           f"got {type(weights).__name__}")
        unknown = set(weights) - set(keys)
        if unknown:
            raise MixError(f"{self.label}: unknown weights {sorted(unknown)}; this family loads {', '.join(keys)}")
        return {k: weights.get(k) or None for k in keys}

    def load(self, weights: str | Weights | None, pipe: Any) -> nn.Module:
        """Load one unit's adapter: `weights` is a path (the first weights file) or a dict by `WeightsFile.key`."""
        w = self.weights_dict(weights)
        missing = [f.label for f in self.weights if f.required and not w.get(f.key)]
        if missing:
            raise MixError(f"a {self.label} unit needs {' and '.join(missing).lower()}")
        return self.loader(w, pipe)

    def to_json(self) -> dict[str, Any]:
        """What the app's `/families` endpoint serves."""
        return {"family": self.name, "label": self.label, "help": self.help, "output": self.output,
                "guidance": self.guidance, "prompts_by_image": self.prompts_by_image,
                "model_kinds": list(self.model_kinds) if self.model_kinds else None,
                "default_weight": self.default_weight,
                "weights": [{"key": w.key, "label": w.label, "required": w.required, "folder": w.folder or self.name}
                            for w in self.weights],
                "fields": [f.to_json() for f in self.fields],
                "training": [{"script": t.script, "configs": t.configs, "data_key": t.data_key, "weights": t.weights}
                             for t in self.training],
                "comfy_nodes": list(self.comfy_nodes), "formats_written": sorted(self.writers)}
