"""The widgets of one adapter unit: enable, family, one weights dropdown per `WeightsFile`, weight, start/end, and
every family's form (one group per family, the chosen family's shown), with the unit's own events wired.

The family list, the weights dropdowns and the form fields all come from the installed `Family` objects; nothing
here names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from adapter_studio.errors import MixError, StudioError
from adapter_studio.family import Family, Field
from adapter_studio.registry import FAMILIES

from .engine import Engine
from .forms import field_visible
from .handlers import toast_errors
from .stores import InputImageError

UPLOAD_TYPES = [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".zip"]


@dataclass
class UnitWidgets:
    """The components of one adapter unit. `weights[j]` is the dropdown of the chosen family's `j`-th weights file;
    `fields[(family, key)]` is a form field of that family."""

    index: int
    tab: Any
    enabled: Any
    family: Any
    weights: list[Any]
    refresh: Any
    upload: Any
    help: Any
    weight: Any
    start: Any
    end: Any
    groups: dict[str, Any] = field(default_factory=dict)
    fields: dict[tuple[str, str], Any] = field(default_factory=dict)
    previews: dict[tuple[str, str], Any] = field(default_factory=dict)

    def components(self) -> list[Any]:
        return [self.enabled, self.family, *self.weights, self.weight, self.start, self.end, *self.fields.values()]


def tab_label(i: int, family: str | None, enabled: bool) -> str:
    """The unit's tab title: "● Unit 1 · <first word of the family's label>" (● enabled, ○ not)."""
    label = FAMILIES[family].label.split(" ")[0] if family in FAMILIES else (family or "—")
    return f"{'●' if enabled else '○'} Unit {i + 1} · {label}"


def field_component(f: Field, visible: bool = True) -> Any:
    """The Gradio component of one form field."""
    if f.kind == "images":
        return gr.Gallery(label=f.label, type="filepath", interactive=True, columns=4, height=150,
                          object_fit="contain", file_types=["image"], show_label=True, elem_classes=["unit-images"],
                          visible=visible)
    if f.kind == "image":
        return gr.Image(label=f.label, type="filepath", sources=["upload", "clipboard"], height=150, image_mode=None,
                        visible=visible)
    if f.kind in ("number", "int"):
        return gr.Slider(f.minimum if f.minimum is not None else 0, f.maximum if f.maximum is not None else 1,
                         value=f.default, step=f.step or (1 if f.kind == "int" else 0.05), label=f.label, info=f.info,
                         visible=visible)
    if f.kind == "choice":
        return gr.Dropdown(choices=list(f.choices), value=f.default, label=f.label, info=f.info, visible=visible)
    if f.kind == "text":
        return gr.Textbox(value=f.default or "", label=f.label, info=f.info, visible=visible)
    return gr.Code(value=f.default or "", language="json", label=f.label, lines=2, visible=visible)


def gallery_paths(value: Any) -> list[str]:
    """Gallery input values (tuples / dicts / paths, depending on the Gradio version) -> file paths."""
    out = []
    for item in value or []:
        if isinstance(item, (list, tuple)):
            item = item[0]
        if isinstance(item, dict):
            item = item.get("path") or (item.get("image") or {}).get("path")
        if hasattr(item, "path"):
            item = item.path
        if item:
            out.append(str(item))
    return out


def weights_updates(engine: Engine, fam: Family | None, slots: int,
                    chosen: dict[str, str | None] | None = None) -> tuple[list[Any], list[str]]:
    """Updates of a unit's `slots` weights dropdowns for `fam`, plus warnings.

    `chosen` maps `WeightsFile.key` to the value to show (a loaded mix); None picks the first listed entry of each
    required weights file. A chosen name missing from the models folder is kept as a choice, with a warning.
    """
    ups, warnings = [], []
    for j in range(slots):
        if fam is None or j >= len(fam.weights):
            ups.append(gr.update(visible=False, choices=[], value=None))
            continue
        wf = fam.weights[j]
        names = engine.list_weights(fam.name, j)
        choices: list[Any] = list(names) if wf.required else [("— none —", ""), *names]
        if chosen is None:
            value = names[0] if names and wf.required else None
        else:
            value = chosen.get(wf.key)
            if value and value not in names:
                warnings.append(f"{wf.label.lower()} {value!r} are not in the models folder")
                choices.insert(0, value)
        ups.append(gr.update(visible=True, label=f"{wf.label} (models folder)", choices=choices, value=value))
    return ups, warnings


def _weights_dropdown(update: dict[str, Any], elem_id: str) -> Any:
    return gr.Dropdown(update.get("choices", []), value=update.get("value"), label=update.get("label", "Weights"),
                       visible=update.get("visible", True), scale=4, allow_custom_value=False, elem_id=elem_id)


def build_unit(i: int, fams: list[Family], engine: Engine, slots: int, visible: bool) -> UnitWidgets:
    """Lay out unit `i` (inside a `gr.Tabs`) and wire its events; `slots` = most weights files of any family."""
    default = fams[0] if fams else None
    with gr.Tab(tab_label(i, default.name if default else None, False), visible=visible, id=f"unit-{i}") as tab:
        with gr.Row(elem_classes=["tight-row"], equal_height=True):
            enabled = gr.Checkbox(label="Enable", value=False, scale=0, min_width=110, elem_id=f"unit-{i}-enable")
            help_md = gr.Markdown(default.help if default else "No adapter family is installed.",
                                  elem_classes=["unit-help"])
        with gr.Row(elem_classes=["tight-row"], equal_height=True):
            family = gr.Dropdown([(f.label, f.name) for f in fams], value=default.name if default else None,
                                 label="Family", scale=3, min_width=160, elem_id=f"unit-{i}-family")
            first, *more = weights_updates(engine, default, slots)[0]
            weights = [_weights_dropdown(first, f"unit-{i}-weights")]
            refresh = gr.Button("↻", elem_classes=["icon-btn"], scale=0, min_width=46)
            upload = gr.UploadButton("Upload", file_types=UPLOAD_TYPES, scale=0, min_width=90)
        if more:  # a family loading several files: their dropdowns on a row of their own
            with gr.Row(elem_classes=["tight-row"]):
                weights += [_weights_dropdown(up, f"unit-{i}-weights-{j}") for j, up in enumerate(more, 1)]
        with gr.Row(elem_classes=["tight-row"]):
            weight = gr.Slider(0.0, 2.0, value=default.default_weight if default else 1.0, step=0.05, label="Weight",
                               elem_id=f"unit-{i}-weight")
            start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Start")
            end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="End")
        u = UnitWidgets(index=i, tab=tab, enabled=enabled, family=family, weights=weights, refresh=refresh,
                        upload=upload, help=help_md, weight=weight, start=start, end=end)
        for fam in fams:
            defaults = {f.key: f.default for f in fam.fields}
            with gr.Group(visible=fam is default) as grp:
                with gr.Row():  # uploads first, then sliders and choices, then text and JSON boxes
                    for f in fam.fields:
                        if f.kind in ("images", "image"):
                            u.fields[(fam.name, f.key)] = field_component(f, field_visible(f, defaults))
                            if f.preview:
                                u.previews[(fam.name, f.key)] = gr.Image(label=f"{f.label} — preview", height=150,
                                                                         interactive=False,
                                                                         elem_classes=["unit-preview"])
                with gr.Row():
                    for f in fam.fields:
                        if f.kind in ("choice", "number", "int"):
                            u.fields[(fam.name, f.key)] = field_component(f, field_visible(f, defaults))
                for f in fam.fields:
                    if f.kind in ("text", "json"):
                        u.fields[(fam.name, f.key)] = field_component(f, field_visible(f, defaults))
            u.groups[fam.name] = grp
    _wire_unit(u, fams, engine, slots)
    return u


def _wire_unit(u: UnitWidgets, fams: list[Family], engine: Engine, slots: int) -> None:
    by_name = {f.name: f for f in fams}

    def on_family(name: str, on: bool) -> list[Any]:
        fam = by_name.get(name)
        weight_ups, _ = weights_updates(engine, fam, slots)
        return [*[gr.update(visible=n == name) for n in u.groups], *weight_ups, fam.help if fam else "",
                gr.update(value=fam.default_weight if fam else 1.0), gr.update(label=tab_label(u.index, name, on))]

    def on_refresh(name: str, *current: Any) -> list[Any]:
        ups, _ = weights_updates(engine, by_name.get(name), slots, {
            w.key: current[j] for j, w in enumerate(by_name[name].weights)} if name in by_name else None)
        return ups

    def on_upload(name: str, file: Any) -> Any:
        if name not in by_name:
            raise StudioError("choose the unit's adapter family before uploading its weights")
        path = file if isinstance(file, str) else getattr(file, "name", None)
        if not path:
            raise MixError("no file uploaded")
        stored = engine.add_weights(path, name, Path(path).name)
        gr.Info(f"Weights checked and added: {stored}")
        return gr.update(choices=engine.list_weights(name, 0), value=stored)

    def images_check(label: str) -> Callable[[Any], Any]:
        def check_images(value: Any) -> Any:
            """Refuse a dropped file that is no image when it is dropped (the gallery takes any file named like an
            image, and Generate would refuse it much later): a toast naming it, and the gallery without it."""
            paths, kept = gallery_paths(value), []
            for path in paths:
                try:
                    engine.inputs.check(path, f"unit {u.index + 1} {label.lower()}")
                    kept.append(path)
                except InputImageError as e:
                    gr.Warning(f"{e}; removed from the gallery", title="Not an image")
            return gr.skip() if len(kept) == len(paths) else kept

        return check_images

    # .input (the user's action), not .change: loading a mix sets the family, its weights and the tab label together;
    # a .change fired by that load can read the family of a unit not yet shown before its new value arrives.
    # Events that may show a toast go through the queue: Gradio shows no toast from an event outside it.
    quiet = dict(show_progress="hidden", api_visibility="private")
    u.family.input(toast_errors(on_family), [u.family, u.enabled],
                   [*u.groups.values(), *u.weights, u.help, u.weight, u.tab], **quiet)
    u.enabled.input(lambda on, name: gr.update(label=tab_label(u.index, name, on)), [u.enabled, u.family], u.tab,
                    queue=False, api_visibility="private")
    u.refresh.click(toast_errors(on_refresh), [u.family, *u.weights], u.weights, **quiet)
    u.upload.upload(toast_errors(on_upload), [u.family, u.upload], u.weights[0], api_visibility="private")
    for fam in fams:
        for f in fam.fields:
            comp = u.fields[(fam.name, f.key)]
            if f.kind == "images":
                comp.upload(toast_errors(images_check(f.label)), comp, comp, **quiet)
            if f.visible_when and (fam.name, f.visible_when[0]) in u.fields:  # shown only for some value of another
                u.fields[(fam.name, f.visible_when[0])].change(
                    lambda val, _want=f.visible_when[1]: gr.update(visible=val == _want),
                    u.fields[(fam.name, f.visible_when[0])], comp, queue=False, api_visibility="private")
            if f.preview is not None:  # e.g. a control image's preprocessed preview, refreshed on any field change
                keys = [g.key for g in fam.fields]
                deps = [u.fields[(fam.name, k)] for k in keys]

                def run_preview(*vals: Any, _fn: Any = f.preview, _keys: list[str] = keys,
                                _fields: tuple[Field, ...] = fam.fields) -> Any:
                    return _fn({k: gallery_paths(v) if g.kind == "images" else v
                                for k, v, g in zip(_keys, vals, _fields)})

                for dep in deps:
                    dep.change(toast_errors(run_preview), deps, u.previews[(fam.name, f.key)],
                               api_visibility="private")
