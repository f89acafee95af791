"""A studio mix as a ComfyUI workflow: API format (`POST /prompt`) and UI format (nodes + links, laid out).

    export = export_comfy(Mix.load("mix.json"), base_dir="folder of the mix")
    export.api            # {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {...}}, ...}; links [id, output]
    export.ui             # the graph as the ComfyUI editor saves it (nodes, links, positions)
    export.write("out/")  # workflow_api.json, workflow.json, input/ (the mix's images), models/ (its weights), README
    export.zip_bytes()    # the same as one zip; export.write_zip(path) (the studio's "ComfyUI workflow" download)

The graph: core nodes (CheckpointLoaderSimple, CLIPTextEncode x2, EmptyLatentImage, KSampler, VAEDecode, SaveImage;
CreateVideo + SaveVideo for video) and, per enabled unit, its family's two nodes (`Family.comfy_nodes`: loader, then
apply), chained on the MODEL. This module names no family: each family's node sockets follow from its contract
(`node_specs`), the rules the node pack `comfyui_adapter_studio` builds its nodes from, so both always agree:

* loader `comfy_nodes[0]`: one file widget per `WeightsFile` (its ComfyUI models folder: `WeightsFile.folder` or the
  family's name; optional files accept "None"); one output, the adapter (`ADAPTER_STUDIO_<NAME>`; `CONTROL_NET` for a
  family that loads a ControlNet: one whose weights include a `controlnet`-folder file).
* apply `comfy_nodes[1]`: `model` (MODEL), the adapter, then one socket per field of the family's unit form whose
  target is the unit's inputs, guidance or scale, in form order: `images` / `image` fields are IMAGE inputs fed by
  LoadImage (several images: ImageBatch), a field keyed `mask` is a MASK (LoadImage + ImageToMask); number, int,
  choice, text and json fields are widgets holding the unit's value. Then `weight`, `start_at`, `end_at`. A family
  with `prompts_by_image` also takes `clip_vision` (its images are encoded by a CLIP vision model); a video family
  (`output == "video"`) also takes `vae`, `width`, `height`, `num_frames` and returns (MODEL, LATENT): the clip's
  latent batch, which the KSampler samples. A guidance family (`Family.guidance`, AGD) carries w in its guidance
  field and the KSampler runs with cfg 1.

A unit whose family has no ComfyUI nodes, or a setting ComfyUI cannot express (a per-sample switch, several samples
with different references), is a `MixError` naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import MixError
from .family import Family, Field
from .mix import Mix, UnitSpec
from .registry import get_family

# the studio's sampler name -> ComfyUI's (sampler_name, scheduler)
SAMPLERS = {
    "DDIM": ("ddim", "ddim_uniform"),
    "Euler": ("euler", "normal"),
    "Euler a": ("euler_ancestral", "normal"),
    "DPM++ 2M": ("dpmpp_2m", "normal"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "UniPC": ("uni_pc", "normal"),
    "PNDM": ("euler", "normal"),  # ComfyUI has no PNDM; its closest deterministic sampler
}
#: the node pack's loader of CLIP vision files (also those CLIPVisionLoader does not recognise)
CLIP_VISION_LOADER = "AdapterStudioCLIPVisionLoader"
FIELD_TARGETS = ("inputs", "guidance", "scale")
WEIGHT_RANGE = (-1.0, 5.0)


# ----------------------------------------------------------------------------------------------------------
# node specs: the sockets of a family's two nodes, derived from its contract


@dataclass(frozen=True)
class Socket:
    """One input of a node.

    Attributes:
        name: the input's name in ComfyUI (`INPUT_TYPES` key).
        type: ComfyUI type: "MODEL", "IMAGE", "MASK", "FLOAT", "INT", "STRING", "COMBO", "CLIP_VISION", ...
        widget: a value set on the node (number, text, choice, file), not a link.
        required: in `INPUT_TYPES["required"]` (else "optional").
        options: ComfyUI's widget options (default, min, max, step, multiline) and for COMBO `choices`; for a
            weights-file COMBO `folder` (the models folder it lists) instead.
        source: what fills it from a mix: "model", "adapter", "vae", "clip_vision", "weights:<key>", "field:<key>",
            "weight", "start", "end", "width", "height", "num_frames".
    """

    name: str
    type: str
    widget: bool
    required: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    display_name: str
    category: str
    inputs: tuple[Socket, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type)
    description: str = ""


def loads_controlnet(family: Family) -> bool:
    return any((w.folder or family.name) == "controlnet" for w in family.weights)


def adapter_type(family: Family) -> str:
    """The ComfyUI type the loader returns and the apply node takes."""
    return "CONTROL_NET" if loads_controlnet(family) else f"ADAPTER_STUDIO_{family.name.upper()}"


def exported_fields(family: Family) -> list[Field]:
    return [f for f in family.fields if f.target in FIELD_TARGETS]


def _field_socket(f: Field) -> Socket:
    src = f"field:{f.key}"
    if f.kind in ("images", "image"):
        typ = "MASK" if f.key == "mask" else "IMAGE"
        return Socket(f.key, typ, widget=False, required=f.required, source=src)
    default = f.default
    if f.kind in ("number", "int"):
        typ = "FLOAT" if f.kind == "number" else "INT"
        opts: dict[str, Any] = {"default": (float if typ == "FLOAT" else int)(default if default is not None else 0)}
        if f.minimum is not None:
            opts["min"] = f.minimum
        if f.maximum is not None:
            opts["max"] = f.maximum
        if f.step is not None:
            opts["step"] = f.step
        return Socket(f.key, typ, widget=True, options=opts, source=src)
    if f.kind == "choice":
        choices = list(f.choices)
        return Socket(f.key, "COMBO", widget=True,
                      options={"choices": choices, "default": default if default in choices else choices[0]},
                      source=src)
    # text, json
    return Socket(f.key, "STRING", widget=True,
                  options={"default": "" if default is None else str(default), "multiline": f.kind == "json"},
                  source=src)


def node_specs(family: Family) -> tuple[NodeSpec, NodeSpec]:
    """The loader and apply node of `family` (raises MixError when it has no ComfyUI nodes)."""
    if len(family.comfy_nodes) < 2:
        raise MixError(f"the {family.label} family ({family.name!r}) has no ComfyUI nodes (Family.comfy_nodes "
                       f"names none), so a mix with it cannot be exported to ComfyUI; disable its units to export "
                       f"the rest")
    loader_name, apply_name = family.comfy_nodes[:2]
    typ = adapter_type(family)
    loader_inputs = tuple(
        Socket(w.key, "COMBO", widget=True, required=True,
               options={"folder": w.folder or family.name, "optional": not w.required}, source=f"weights:{w.key}")
        for w in family.weights)
    loader = NodeSpec(loader_name, f"Load {family.label} (Adapter Studio)", "adapter_studio/loaders",
                      loader_inputs, ((family.name, typ),),
                      description=f"Loads {family.label} weights from models/" + ", models/".join(
                          dict.fromkeys(w.folder or family.name for w in family.weights)))
    inputs = [Socket("model", "MODEL", widget=False, source="model"),
              Socket(family.name, typ, widget=False, source="adapter")]
    if family.prompts_by_image:
        inputs.append(Socket("clip_vision", "CLIP_VISION", widget=False, source="clip_vision"))
    video = family.output == "video"
    if video:
        inputs.append(Socket("vae", "VAE", widget=False, source="vae"))
    fields = [_field_socket(f) for f in exported_fields(family)]
    inputs += [s for s in fields if s.required or s.widget]
    inputs += [
        Socket("weight", "FLOAT", widget=True, source="weight",
               options={"default": float(family.default_weight), "min": WEIGHT_RANGE[0], "max": WEIGHT_RANGE[1],
                        "step": 0.01}),
        Socket("start_at", "FLOAT", widget=True, source="start",
               options={"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        Socket("end_at", "FLOAT", widget=True, source="end",
               options={"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    ]
    if video:
        inputs += [Socket("width", "INT", widget=True, source="width",
                          options={"default": 512, "min": 16, "max": 8192, "step": 8}),
                   Socket("height", "INT", widget=True, source="height",
                          options={"default": 512, "min": 16, "max": 8192, "step": 8}),
                   Socket("num_frames", "INT", widget=True, source="num_frames",
                          options={"default": 16, "min": 1, "max": 4096, "step": 1})]
    inputs += [s for s in fields if not (s.required or s.widget)]  # optional links (a mask) last
    outputs: tuple[tuple[str, str], ...] = (("MODEL", "MODEL"),) + ((("LATENT", "LATENT"),) if video else ())
    apply = NodeSpec(apply_name, f"Apply {family.label} (Adapter Studio)", "adapter_studio", tuple(inputs), outputs,
                     description=family.help)
    return loader, apply


CLIP_VISION_LOADER_SPEC = NodeSpec(
    CLIP_VISION_LOADER, "Load CLIP Vision (Adapter Studio)", "adapter_studio/loaders",
    (Socket("clip_name", "COMBO", widget=True, options={"folder": "clip_vision"}, source="clip_vision_file"),),
    (("CLIP_VISION", "CLIP_VISION"),),
    description="A CLIP vision model: every file CLIPVisionLoader reads, and encoders it does not recognise "
                "(a config.json beside the file or in its safetensors metadata)")


# ----------------------------------------------------------------------------------------------------------
# the graph


@dataclass
class _Node:
    id: int
    class_type: str
    inputs: dict[str, Any]  # name -> value or ("link", node id, output index)
    title: str
    input_types: dict[str, str]  # linked input -> type
    outputs: list[tuple[str, str]]
    widgets: list[str]  # widget input names in order


@dataclass
class ComfyExport:
    """An exported workflow and the files it reads.

    Attributes:
        api: the API-format prompt (`{"id": {"class_type", "inputs", "_meta"}}`).
        ui: the UI-format workflow (what "Load" in ComfyUI's editor reads).
        files: destination inside a ComfyUI folder (`input/...`, `models/<folder>/...`) -> source path here.
        notes: what the export changed or could not carry over (shown in README.txt).
    """

    api: dict[str, Any]
    ui: dict[str, Any]
    files: dict[str, str]
    notes: list[str]

    def readme(self) -> str:
        lines = ["Adapter Studio -> ComfyUI export", "",
                 "workflow.json      drag onto the ComfyUI editor (or Workflow > Open)",
                 "workflow_api.json  POST to ComfyUI's /prompt as {\"prompt\": <this>}",
                 "input/, models/    copy into your ComfyUI folder (the images the workflow loads, the weights)",
                 "", "Needs the node pack comfyui_adapter_studio in ComfyUI/custom_nodes (see docs/comfyui.md).", ""]
        if self.files:
            lines.append("files:")
            lines += [f"  {dest}" for dest in sorted(self.files)]
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> Path:
        """Write workflow_api.json, workflow.json, README.txt and copy the files under `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "workflow_api.json").write_text(json.dumps(self.api, indent=2))
        (out / "workflow.json").write_text(json.dumps(self.ui, indent=2))
        (out / "README.txt").write_text(self.readme())
        for dest, src in self.files.items():
            target = out / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, target)
        return out

    def write_zip(self, path: str | Path, include_files: bool = True) -> Path:
        """`zip_bytes()` written to `path` (atomically); returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.zip_bytes(include_files))
        tmp.replace(path)
        return path

    def zip_bytes(self, include_files: bool = True) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("workflow_api.json", json.dumps(self.api, indent=2))
            z.writestr("workflow.json", json.dumps(self.ui, indent=2))
            z.writestr("README.txt", self.readme())
            if include_files:
                for dest, src in self.files.items():
                    p = Path(src)
                    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                        if f.is_file():
                            z.write(f, dest + ("/" + f.relative_to(p).as_posix() if p.is_dir() else ""))
        return buf.getvalue()


def _resolve(path: str, bases: list[Path]) -> Path:
    p = Path(path)
    if not p.is_absolute():
        for base in bases:
            if (base / p).exists():
                return base / p
    return p


def checkpoint_name(model: str) -> str:
    """The checkpoint file a mix's model is exported as: `<preset or folder name>.safetensors`; for a video preset
    (AnimateDiff) its image model's (ComfyUI core has no motion modules: they come from other node packs)."""
    try:
        from .presets import load_preset

        preset = load_preset(model)
        if preset.kind == "video":
            model = preset.config.get("base") or preset.config.get("pretrained") or model
    except Exception:  # noqa: BLE001  a hub id or folder that is not here: named as given
        pass
    name = Path(model.rstrip("/")).name or model
    return name if name.endswith((".safetensors", ".ckpt")) else f"{name}.safetensors"


class _Builder:
    def __init__(self, mix: Mix, base: list[Path], checkpoint: str, clip_vision: str, filename_prefix: str):
        self.mix, self.base = mix, base
        self.checkpoint, self.clip_vision, self.prefix = checkpoint, clip_vision, filename_prefix
        self.nodes: dict[int, _Node] = {}
        self.files: dict[str, str] = {}
        self.notes: list[str] = []
        self._images: dict[str, int] = {}
        self._clip_vision_node: int | None = None

    def add(self, class_type: str, inputs: dict[str, Any], outputs: list[tuple[str, str]], title: str,
            input_types: dict[str, str] | None = None, widgets: list[str] | None = None) -> int:
        nid = len(self.nodes) + 1
        self.nodes[nid] = _Node(nid, class_type, inputs, title, input_types or {}, outputs,
                                widgets if widgets is not None else [k for k, v in inputs.items()
                                                                     if not isinstance(v, tuple)])
        return nid

    # -- inputs from files
    def image(self, path: str, what: str) -> int:
        src = _resolve(path, self.base)
        if not src.is_file():
            raise MixError(f"{what}: the image {path!r} does not exist")
        key = str(src.resolve())
        if key not in self._images:
            digest = hashlib.sha256(key.encode()).hexdigest()[:8]
            name = f"adapter_studio_{digest}_{src.name}"
            self.files[f"input/{name}"] = str(src)
            self._images[key] = self.add("LoadImage", {"image": name}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                                         f"Load {src.name}", widgets=["image", "upload"])
        return self._images[key]

    def images(self, value: Any, what: str) -> tuple[int, int]:
        paths = value if isinstance(value, list) else [value]
        if not paths or not all(isinstance(p, str) for p in paths):
            raise MixError(f"{what}: ComfyUI export takes image paths (one or a list), got {value!r}")
        link = (self.image(paths[0], what), 0)
        for p in paths[1:]:
            nid = self.add("ImageBatch", {"image1": ("link",) + link, "image2": ("link", self.image(p, what), 0)},
                           [("IMAGE", "IMAGE")], "Batch images", {"image1": "IMAGE", "image2": "IMAGE"})
            link = (nid, 0)
        return link

    def weights_file(self, family: Family, key: str, path: str | None, optional: bool) -> str:
        if not path:
            if optional:
                return "None"
            raise MixError(f"a {family.label} unit needs its {key!r} weights to be exported")
        folder = next((w.folder or family.name for w in family.weights if w.key == key), family.name)
        src = _resolve(path, self.base)
        if src.is_dir():  # a save_pretrained folder: the loader is given its weights file
            inner = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin")) or sorted(src.glob("config.json"))
            if not inner:
                raise MixError(f"{family.label} weights folder {path!r} holds no weights file")
            self.files[f"models/{folder}/{src.name}"] = str(src)
            return f"{src.name}/{inner[0].name}"
        if src.is_file():
            self.files[f"models/{folder}/{src.name}"] = str(src)
            return src.name
        self.notes.append(f"{family.label} weights {path!r} is not a local file (a hub id?): put it in "
                          f"models/{folder}/ yourself and pick it in the loader")
        return Path(path).name

    def clip_vision_link(self) -> tuple[int, int]:
        if self._clip_vision_node is None:
            self._clip_vision_node = self.add(CLIP_VISION_LOADER, {"clip_name": self.clip_vision},
                                              [("CLIP_VISION", "CLIP_VISION")], "Load CLIP vision")
        return (self._clip_vision_node, 0)


def _scale_value(unit: UnitSpec, where: str) -> tuple[float, str | None]:
    """The unit's weight widget and, for a per-block scale, its JSON (carried by a scale field)."""
    if isinstance(unit.scale, dict):
        return 1.0, json.dumps(unit.scale)
    return float(unit.scale), None


def guidance_mode(mix: Mix) -> tuple[str, Family | None]:
    """The guidance the mix samples with: ("cfg", None) or (mode, the enabled family that provides it)."""
    providers = [(u, get_family(u.family)) for u in mix.units if u.enabled and get_family(u.family).guidance]
    if len(providers) > 1:
        raise MixError(f"units {[u.name or u.family for u, _ in providers]} each replace classifier-free guidance; "
                       f"enable one of them")
    g = mix.sampling.guidance
    if g == "auto":
        return (providers[0][1].guidance, providers[0][1]) if providers else ("cfg", None)
    if g == "cfg":
        if providers:
            raise MixError(f"the {providers[0][1].label} unit replaces classifier-free guidance: export with "
                           f"guidance {providers[0][1].guidance!r} (or 'auto'), or disable the unit")
        return "cfg", None
    match = [f for _, f in providers if f.guidance == g]
    if not match:
        raise MixError(f"guidance {g!r} needs an enabled unit providing it")
    return g, match[0]


def export_comfy(mix: Mix, base_dir: str | Path | Sequence[str | Path] | None = None, *,
                 checkpoint: str | None = None, clip_vision: str | None = None, filename_prefix: str = "adapter_studio",
                 default_size: int | None = None) -> ComfyExport:
    """The ComfyUI workflow of `mix` (see the module docstring); relative paths are looked up under `base_dir` (a
    folder, or several tried in order: e.g. the app's models folder and its inputs folder).

    Args:
        checkpoint: the checkpoint file name in ComfyUI's models/checkpoints (default `checkpoint_name(mix.model)`).
        clip_vision: the CLIP vision file in models/clip_vision for image-prompt units (default
            `<model>-image-encoder.safetensors`).
        default_size: width/height when the mix leaves them unset (default: the preset's resolution, else 512).
    """
    if base_dir is None:
        base = []
    elif isinstance(base_dir, (str, Path)):
        base = [Path(base_dir)]
    else:
        base = [Path(b) for b in base_dir]
    s = mix.sampling
    if s.seed < 0:
        raise MixError("the mix's seed is -1 (drawn at run time): export a mix that was run, or set a seed")
    ckpt = checkpoint or checkpoint_name(mix.model)
    model_stem = Path(ckpt).stem
    b = _Builder(mix, base, ckpt, clip_vision or f"{model_stem}-image-encoder.safetensors", filename_prefix)
    mode, guidance_family = guidance_mode(mix)
    units = [u for u in mix.units if u.enabled]
    fams = [get_family(u.family) for u in units]
    for fam in fams:
        node_specs(fam)  # every family must have nodes before anything is built
    video = [f for f in fams if f.output == "video"]
    if len(video) > 1:
        raise MixError("a ComfyUI export takes at most one video unit (it makes the clip's latents)")
    size = default_size or _default_size(mix.model)
    width, height = s.width or size, s.height or size

    ckpt_id = b.add("CheckpointLoaderSimple", {"ckpt_name": ckpt}, [("MODEL", "MODEL"), ("CLIP", "CLIP"),
                                                                   ("VAE", "VAE")], "Load checkpoint")
    pos = b.add("CLIPTextEncode", {"text": s.prompt, "clip": ("link", ckpt_id, 1)}, [("CONDITIONING", "CONDITIONING")],
                "Prompt", {"clip": "CLIP"})
    neg = b.add("CLIPTextEncode", {"text": s.negative_prompt, "clip": ("link", ckpt_id, 1)},
                [("CONDITIONING", "CONDITIONING")], "Negative prompt", {"clip": "CLIP"})
    model_link: tuple[int, int] = (ckpt_id, 0)
    latent_link: tuple[int, int] | None = None
    for i, (unit, fam) in enumerate(zip(units, fams)):
        where = f"unit {i} ({fam.label})"
        if unit.sample_mask is not None and not all(unit.sample_mask):
            raise MixError(f"{where}: a per-sample switch (sample_mask) has no ComfyUI equivalent; export a mix "
                           f"without it")
        loader_spec, apply_spec = node_specs(fam)
        known = {f.key for f in exported_fields(fam) if f.target in ("inputs", "guidance")}
        extra = sorted(set(unit.inputs) - known)
        if extra:
            raise MixError(f"{where}: the inputs {extra} have no socket on ComfyUI's {apply_spec.class_type} "
                           f"(it takes {', '.join(sorted(known)) or 'none'}); remove them to export")
        weights = fam.weights_dict(unit.weights)
        loader_inputs = {sock.name: b.weights_file(fam, sock.name, weights.get(sock.name),
                                                   sock.options.get("optional", False))
                         for sock in loader_spec.inputs}
        loader_id = b.add(loader_spec.class_type, loader_inputs, list(loader_spec.outputs),
                          f"{fam.label} weights")
        weight, block_json = _scale_value(unit, where)
        inputs: dict[str, Any] = {}
        types: dict[str, str] = {}
        for sock in apply_spec.inputs:
            src = sock.source
            if src == "model":
                inputs[sock.name] = ("link",) + model_link
            elif src == "adapter":
                inputs[sock.name] = ("link", loader_id, 0)
            elif src == "clip_vision":
                inputs[sock.name] = ("link",) + b.clip_vision_link()
            elif src == "vae":
                inputs[sock.name] = ("link", ckpt_id, 2)
            elif src == "weight":
                inputs[sock.name] = weight
            elif src == "start":
                inputs[sock.name] = float(unit.start)
            elif src == "end":
                inputs[sock.name] = float(unit.end)
            elif src == "width":
                inputs[sock.name] = int(width)
            elif src == "height":
                inputs[sock.name] = int(height)
            elif src == "num_frames":
                inputs[sock.name] = int(s.num_frames or 16)
            elif src.startswith("field:"):
                f = fam.field(src[6:])
                value = unit.inputs.get(f.key) if f.target in ("inputs", "guidance") else None
                if not sock.widget:
                    if value is None:
                        if sock.required:
                            raise MixError(f"{where}: {f.label!r} ({f.key}) is required and the unit has none")
                        continue
                    link = b.images(value, f"{where} {f.key}")
                    if sock.type == "MASK":
                        mid = b.add("ImageToMask", {"image": ("link",) + link, "channel": "red"},
                                    [("MASK", "MASK")], "Mask from image", {"image": "IMAGE"})
                        link = (mid, 0)
                    inputs[sock.name] = ("link",) + link
                    continue
                if f.target == "guidance" and value is None:
                    value = s.guidance_scale  # w: the unit's own, else the mix's guidance scale
                if f.target == "scale":
                    value = _scale_field_value(f, unit, block_json)
                inputs[sock.name] = _widget_value(sock, value, f"{where} {f.key}")
            else:
                raise MixError(f"{where}: the node socket {sock.name!r} has no source ({src!r})")
            if isinstance(inputs.get(sock.name), tuple):
                types[sock.name] = sock.type
        if block_json is not None and not any(f.target == "scale" for f in exported_fields(fam)):
            raise MixError(f"{where}: a per-block scale needs a scale field on the {fam.label} node; give one weight")
        apply_id = b.add(apply_spec.class_type, inputs, list(apply_spec.outputs), fam.label, types,
                         widgets=[sk.name for sk in apply_spec.inputs if sk.widget])
        model_link = (apply_id, 0)
        if fam.output == "video":
            latent_link = (apply_id, 1)
    if latent_link is None:
        latent_link = (b.add("EmptyLatentImage", {"width": int(width), "height": int(height),
                                                  "batch_size": int(s.num_images)},
                             [("LATENT", "LATENT")], "Empty latent"), 0)
    else:
        b.notes.append(f"the video is sampled by {ckpt} without motion modules (ComfyUI core has none): for motion, "
                       f"put AnimateDiff nodes (e.g. ComfyUI-AnimateDiff-Evolved) on the MODEL before the "
                       f"{video[0].label} node")
        if s.num_images > 1:
            b.notes.append("a video unit makes one clip: num_images > 1 is exported as one clip")
    sampler, scheduler = SAMPLERS.get(s.sampler, ("euler", "normal"))
    if s.sampler == "PNDM":
        b.notes.append("ComfyUI has no PNDM sampler: exported with euler / normal")
    cfg = 1.0 if mode != "cfg" else float(s.guidance_scale)
    if mode != "cfg":
        b.notes.append(f"guidance {mode!r} ({guidance_family.label}): one model pass per step, KSampler cfg 1.0")
    ks = b.add("KSampler", {"seed": int(s.seed), "steps": int(s.steps), "cfg": cfg, "sampler_name": sampler,
                            "scheduler": scheduler, "denoise": 1.0, "model": ("link",) + model_link,
                            "positive": ("link", pos, 0), "negative": ("link", neg, 0),
                            "latent_image": ("link",) + latent_link},
               [("LATENT", "LATENT")], "KSampler",
               {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
               widgets=["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"])
    dec = b.add("VAEDecode", {"samples": ("link", ks, 0), "vae": ("link", ckpt_id, 2)}, [("IMAGE", "IMAGE")],
                "VAE decode", {"samples": "LATENT", "vae": "VAE"})
    if video:
        vid = b.add("CreateVideo", {"images": ("link", dec, 0), "fps": float(s.fps or 8)}, [("VIDEO", "VIDEO")],
                    "Create video", {"images": "IMAGE"})
        b.add("SaveVideo", {"video": ("link", vid, 0), "filename_prefix": f"video/{filename_prefix}",
                            "format": "auto", "codec": "auto"}, [], "Save video", {"video": "VIDEO"})
    else:
        b.add("SaveImage", {"images": ("link", dec, 0), "filename_prefix": filename_prefix}, [], "Save image",
              {"images": "IMAGE"})
    return ComfyExport(api=_api(b.nodes), ui=_ui(b.nodes), files=b.files, notes=b.notes)


def _default_size(model: str) -> int:
    try:
        from .presets import load_preset

        return load_preset(model).resolution
    except Exception:  # noqa: BLE001  a hub id or folder that is not here: the SD1.5 default
        return 512


def _scale_field_value(f: Field, unit: UnitSpec, block_json: str | None) -> Any:
    """A scale-target field: a choice of block presets ("custom" when the unit's scale is per block), or the JSON."""
    if f.kind == "choice":
        if block_json is None:
            return f.default if f.default in f.choices else f.choices[0]
        return "custom" if "custom" in f.choices else f.default
    return block_json or (f.default if f.default is not None else "")


def _widget_value(sock: Socket, value: Any, what: str) -> Any:
    opts = sock.options
    if value is None:
        value = opts.get("default")
    if sock.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MixError(f"{what}: a number, got {value!r}")
        return float(value)
    if sock.type == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MixError(f"{what}: an integer, got {value!r}")
        return int(value)
    if sock.type == "COMBO":
        if isinstance(value, bool):
            value = "on" if value else "off"
        if value not in opts["choices"]:
            raise MixError(f"{what}: {value!r} is not one of {opts['choices']}")
        return value
    return value if isinstance(value, str) else json.dumps(value)


def _api(nodes: dict[int, _Node]) -> dict[str, Any]:
    out = {}
    for nid, n in nodes.items():
        inputs = {k: [str(v[1]), v[2]] if isinstance(v, tuple) else v for k, v in n.inputs.items()}
        out[str(nid)] = {"class_type": n.class_type, "inputs": inputs, "_meta": {"title": n.title}}
    return out


def _ui(nodes: dict[int, _Node]) -> dict[str, Any]:
    """UI format: nodes in columns by their depth in the graph, top to bottom in creation order."""
    depth: dict[int, int] = {}
    for nid, n in nodes.items():  # nodes are created after their inputs: one pass suffices
        srcs = [v[1] for v in n.inputs.values() if isinstance(v, tuple)]
        depth[nid] = 1 + max((depth[s] for s in srcs), default=-1)
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for nid, n in nodes.items():
        for name, v in n.inputs.items():
            if isinstance(v, tuple):
                lid = len(links) + 1
                typ = n.input_types.get(name) or nodes[v[1]].outputs[v[2]][1]
                links.append([lid, v[1], v[2], nid, list(k for k, x in n.inputs.items()
                                                         if isinstance(x, tuple)).index(name), typ])
                out_links.setdefault((v[1], v[2]), []).append(lid)
                in_links[(nid, name)] = lid
    col_y: dict[int, float] = {}
    ui_nodes = []
    for order, (nid, n) in enumerate(nodes.items()):
        linked = [k for k, v in n.inputs.items() if isinstance(v, tuple)]
        widgets = []
        for w in n.widgets:
            if w == "control_after_generate":
                widgets.append("fixed")
            elif w == "upload":
                widgets.append("image")
            else:
                widgets.append(n.inputs[w])
        height = 46 + 22 * max(len(linked), len(n.outputs)) + 26 * len(widgets)
        col = depth[nid]
        y = col_y.get(col, 60.0)
        col_y[col] = y + height + 50
        ui_nodes.append({
            "id": nid, "type": n.class_type, "pos": [60 + 360 * col, y], "size": [320, height],
            "flags": {}, "order": order, "mode": 0, "title": n.title,
            "inputs": [{"name": k, "type": n.input_types.get(k) or nodes[n.inputs[k][1]].outputs[n.inputs[k][2]][1],
                        "link": in_links[(nid, k)]} for k in linked],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((nid, i), []), "slot_index": i}
                        for i, (name, typ) in enumerate(n.outputs)],
            "properties": {"Node name for S&R": n.class_type},
            "widgets_values": widgets,
        })
    return {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"adapter_studio": {"exported_by": "adapter_studio.comfy_workflow"}},
            "version": 0.4}
