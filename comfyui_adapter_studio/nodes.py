"""The pack's node classes, made from the installed families' contracts.

For every family whose `Family.comfy_nodes` names a loader and an apply node and that `families.BINDINGS` knows, two
classes are made from `adapter_studio.comfy_workflow.node_specs(family)` (the same specs the workflow export writes,
so exported workflows always match the nodes): `INPUT_TYPES`, `RETURN_TYPES`, `FUNCTION` and a function whose
signature lists exactly the declared inputs. Importing this module needs no ComfyUI: `folder_paths` and `comfy` are
imported when ComfyUI calls the nodes.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

from adapter_studio.comfy_workflow import CLIP_VISION_LOADER_SPEC, NodeSpec, Socket, node_specs
from adapter_studio.errors import CheckpointError, StudioError
from adapter_studio.registry import families

from . import families as bindings
from .glue import Weights


def _entry(s: Socket, combo_lists: bool) -> tuple:
    if s.type == "COMBO" and "folder" in s.options:
        files: list[str] = []
        if combo_lists:
            import folder_paths

            files = folder_paths.get_filename_list(s.options["folder"])
        return ((["None"] if s.options.get("optional") else []) + list(files),)
    if s.type == "COMBO":
        return (list(s.options["choices"]), {"default": s.options["default"]})
    if s.widget:
        opts = {k: v for k, v in s.options.items() if k in ("default", "min", "max", "step", "multiline")}
        return (s.type, opts)
    return (s.type,)


def input_types(spec: NodeSpec, combo_lists: bool = True) -> dict[str, dict[str, tuple]]:
    req = {s.name: _entry(s, combo_lists) for s in spec.inputs if s.required}
    opt = {s.name: _entry(s, combo_lists) for s in spec.inputs if not s.required}
    return {"required": req, **({"optional": opt} if opt else {})}


def _function(spec: NodeSpec, body: Callable[..., tuple]) -> Callable[..., tuple]:
    """A method taking exactly the spec's inputs by name (optional ones default to None)."""
    names = [s.name for s in spec.inputs]

    def method(self, **values: Any) -> tuple:
        unknown = set(values) - set(names)
        if unknown:
            raise TypeError(f"{spec.class_type} got unknown inputs {sorted(unknown)}")
        return body(**{n: values.get(n) for n in names})

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY,
                                 default=inspect.Parameter.empty if s.required else None) for s in spec.inputs]
    method.__signature__ = inspect.Signature(params)
    return method


def _node_class(spec: NodeSpec, function: str, body: Callable[..., tuple], output_node: bool = False) -> type:
    attrs = {
        "INPUT_TYPES": classmethod(lambda cls, _spec=spec: input_types(_spec)),
        "RETURN_TYPES": tuple(t for _, t in spec.outputs),
        "RETURN_NAMES": tuple(n for n, _ in spec.outputs),
        "FUNCTION": function,
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": output_node,
        function: _function(spec, body),
        "SPEC": spec,
    }
    return type(spec.class_type, (), attrs)


def _other_family(path: Path, family: Any) -> str:
    for fam in families():
        if fam.name != family.name and fam.inspect is not None:
            try:
                fam.inspect(path)
            except Exception:  # noqa: BLE001  not that family's either
                continue
            loader = fam.comfy_nodes[0] if fam.comfy_nodes else "its loader"
            return f"; it is {fam.label} weights: load it with {loader}"
    return ""


def _loader_body(family: Any, spec: NodeSpec) -> Callable[..., tuple]:
    def load(**values: Any) -> tuple:
        paths: dict[str, str | None] = {}
        for s in spec.inputs:
            name = values.get(s.name)
            paths[s.name] = None if name in (None, "", "None") else bindings.resolve_weights(s.options["folder"],
                                                                                                 name)
        missing = [w.label for w in family.weights if w.required and not paths.get(w.key)]
        if missing:
            raise StudioError(f"{spec.class_type}: choose {' and '.join(missing).lower()}")
        desc = ""
        if family.inspect is not None:
            for key, p in paths.items():
                if p is None:
                    continue
                try:
                    d = family.inspect(Path(p))
                except CheckpointError as e:
                    raise CheckpointError(f"{Path(p).name} is not {family.label} weights ({e})"
                                          f"{_other_family(Path(p), family)}") from None
                desc = f"{d.get('format')} {d.get('variant') or ''}".strip()
        handle = Weights(family, paths, desc)
        if spec.outputs[0][1] == "CONTROL_NET":
            return (bindings.control_net(handle),)
        return (handle,)

    return load


def _apply_body(family: Any, spec: NodeSpec) -> Callable[..., tuple]:
    bind = bindings.BINDINGS[family.name]

    def apply(**values: Any) -> tuple:
        handle = values[family.name]
        model = values["model"]
        return bind(family, model, handle, values)

    return apply


def _clip_vision_body(clip_name: str) -> tuple:
    import comfy.clip_vision
    import folder_paths

    path = folder_paths.get_full_path_or_raise("clip_vision", clip_name)
    cv = comfy.clip_vision.load(path)
    if cv is not None:
        return (cv,)
    return (load_clip_vision_with_config(path),)


def load_clip_vision_with_config(path: str) -> Any:
    """A CLIP vision file ComfyUI does not recognise, from the HF config in its safetensors metadata (`config`) or
    a `config.json` beside it, through ComfyUI's own ClipVisionModel."""
    import tempfile

    import comfy.clip_vision
    import comfy.utils

    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    config = None
    if meta and "config" in meta:
        config = json.loads(meta["config"])
    elif (Path(path).parent / "config.json").is_file():
        config = json.loads((Path(path).parent / "config.json").read_text())
    if config is None:
        raise CheckpointError(f"{Path(path).name} is not a CLIP vision model ComfyUI knows, and has no config (a "
                              f"'config' entry in its metadata or a config.json beside it)")
    config = {**config.get("vision_config", config), "model_type": "clip_vision_model"}
    config.setdefault("num_channels", 3)
    config.setdefault("hidden_act", "quick_gelu")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    cv = comfy.clip_vision.ClipVisionModel(f.name)
    Path(f.name).unlink()
    missing, _ = cv.load_sd(sd)
    if missing:
        raise CheckpointError(f"{Path(path).name}: missing CLIP vision weights {missing[:4]}")
    return cv


def build() -> tuple[dict[str, type], dict[str, str]]:
    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    for fam in families():
        if len(fam.comfy_nodes) < 2 or fam.name not in bindings.BINDINGS:
            continue
        loader, apply = node_specs(fam)
        classes[loader.class_type] = _node_class(loader, "load", _loader_body(fam, loader))
        classes[apply.class_type] = _node_class(apply, "apply", _apply_body(fam, apply))
        names[loader.class_type] = loader.display_name
        names[apply.class_type] = apply.display_name
    spec = CLIP_VISION_LOADER_SPEC
    classes[spec.class_type] = _node_class(spec, "load", _clip_vision_body)
    names[spec.class_type] = spec.display_name
    return classes, names


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build()
