"""What an adapter unit asks the user for, per family: a small declarative input spec the UI and engine share.

The UI builds one group of widgets per family from its `UnitUI` and shows the group of the unit's chosen family;
the engine turns the widget values into a mix unit with the same spec. A new family (Ctrl-Adapter: control image +
preprocessor with a preview; I2V-Adapter: first frame + frames + fps, video output) is one more `UnitUI`, not a
new layout. A registered family without a `UnitUI` still works: it gets a JSON box for its mix inputs.

Where a field's value goes (`Field.target`):

* `"inputs"`   the unit's mix inputs (`UnitSpec.inputs[key]`), handed to the family's `inputs_from_json`;
* `"scale"`    turns the unit's weight into a per-block scale dict (IP-Adapter's InstantStyle presets);
* `"guidance"` the call's guidance scale (AGD's w: the adapter reads the pipeline's guidance scale as w); it is
  also kept in the unit's inputs under `key`, so the unit alone says which w it ran with;
* `"sampling"` a pipeline call argument (I2V's `num_frames`, `fps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

FieldKind = Literal["images", "image", "number", "int", "choice", "json"]
Target = Literal["inputs", "scale", "guidance", "sampling"]


@dataclass(frozen=True)
class Field:
    """One input of a unit.

    Attributes:
        key: the key in the target dict (`UnitSpec.inputs`, the sampling dict, ...).
        kind: widget kind: `images` (several image uploads), `image` (one upload, e.g. a mask or a first frame),
            `number` / `int` (sliders), `choice` (dropdown), `json` (free-form mix inputs).
        label, info: what the UI shows.
        required: the unit cannot run without it (the engine says so, naming the unit).
        preview: for a control image: the name of a preprocessor preview the UI shows next to it (Ctrl-Adapter).
        visible_when: `(key, value)`: the widget shows only while the unit's field `key` has `value`.
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
    preview: str | None = None
    visible_when: tuple[str, Any] | None = None  # (other field's key, value): shown only while that field has it


@dataclass(frozen=True)
class UnitUI:
    """The unit form of one adapter family.

    Attributes:
        family: the family's registry name (`studio.registry.FAMILIES`).
        label: shown in the family dropdown.
        fields: the family inputs, in display order.
        output: what a call with this unit enabled produces: `image` or `video` (I2V: video player + GIF/MP4).
        guidance: `agd` when the unit replaces classifier-free guidance (one UNet pass per step).
        prompts_by_image: key of an images field; an enabled unit with it filled can stand in for the text prompt.
        model_kinds: model kinds (`studio.presets.ModelPreset.kind`) the family runs on; None = any.
        default_weight: the weight slider's start value.
        help: one line under the family dropdown.
    """

    family: str
    label: str
    fields: tuple[Field, ...] = ()
    output: Literal["image", "video"] = "image"
    guidance: Literal["cfg", "agd"] = "cfg"
    prompts_by_image: str | None = None
    model_kinds: tuple[str, ...] | None = None
    default_weight: float = 1.0
    help: str = ""

    def field(self, key: str) -> Field | None:
        return next((f for f in self.fields if f.key == key), None)


#: preview name -> fn(values of the unit's fields by key) -> image (PIL / path / None). A family whose control
#: image needs a preprocessor preview (Ctrl-Adapter: canny, depth, ...) registers it here and names it in
#: `Field.preview`; the UI then shows the preview next to the image and refreshes it when any field changes.
PREVIEWS: dict[str, Callable[[dict[str, Any]], Any]] = {}


# ----------------------------------------------------------------------------------------------------------
# per-block presets (IP-Adapter, InstantStyle)

BLOCK_PRESETS = ("all blocks", "style only", "layout only", "style + layout", "custom")


def _attention_counts(unet_config: Any) -> tuple[list[int], list[int]]:
    """Attention layers per down block and per up block, from a UNet config (0 for blocks without attention)."""
    cfg = dict(unet_config)
    layers = cfg.get("layers_per_block", 1)
    n = len(cfg.get("down_block_types", ()))
    per_block = layers if isinstance(layers, int) else None
    down = [(per_block if per_block is not None else layers[i]) if "CrossAttn" in t else 0
            for i, t in enumerate(cfg.get("down_block_types", ()))]
    up = [((per_block if per_block is not None else layers[n - 1 - i]) + 1) if "CrossAttn" in t else 0
          for i, t in enumerate(cfg.get("up_block_types", ()))]
    return down, up


def block_preset_scale(preset: str, weight: float, unet_config: Any) -> float | dict[str, Any]:
    """The per-block scale dict of an InstantStyle-style preset for this UNet, times `weight`.

    InstantStyle (SDXL) injects style through `up_blocks.0.attentions.1` (the first up block with attention) and
    layout through `down_blocks.2.attentions.1` (the last down block with attention). The same relative positions
    are taken on any UNet: on SD1.5 style = `up_blocks.1.attentions.1`, layout = `down_blocks.2.attentions.1`.
    Keys follow diffusers' `set_ip_adapter_scale` convention (`studio.stack.layer_scale`).
    """
    if preset in ("all blocks", "", None):
        return float(weight)
    down, up = _attention_counts(unet_config)
    scale: dict[str, Any] = {}
    if preset in ("style only", "style + layout"):
        i = next((i for i, c in enumerate(up) if c), None)
        if i is not None:
            vals = [0.0] * up[i]
            vals[min(1, up[i] - 1)] = float(weight)
            scale["up"] = {f"block_{i}": vals}
    if preset in ("layout only", "style + layout"):
        i = next((i for i in reversed(range(len(down))) if down[i]), None)
        if i is not None:
            vals = [0.0] * down[i]
            vals[min(1, down[i] - 1)] = float(weight)
            scale["down"] = {f"block_{i}": vals}
    if not scale:
        raise ValueError(f"block preset {preset!r} is not one of {', '.join(BLOCK_PRESETS[:-1])}")
    return scale


def preset_of_scale(scale: Any, unet_config: Any) -> tuple[str, float]:
    """Inverse of `block_preset_scale`: `(preset, weight)`, or `("custom", max value)` when no preset matches."""
    if isinstance(scale, (int, float)):
        return "all blocks", float(scale)
    leaves = _leaves(scale)
    weight = max(leaves) if leaves else 0.0
    for name in BLOCK_PRESETS[1:-1]:
        if block_preset_scale(name, weight, unet_config) == scale:
            return name, weight
    return "custom", weight


def _leaves(d: Any) -> list[float]:
    if isinstance(d, dict):
        return [x for v in d.values() for x in _leaves(v)]
    if isinstance(d, (list, tuple)):
        return [float(x) for x in d]
    return [float(d)]


# ----------------------------------------------------------------------------------------------------------
# the families' unit forms

UNIT_UIS: dict[str, UnitUI] = {}


def register_unit_ui(ui: UnitUI) -> UnitUI:
    """Add (or replace) a family's unit form; families that land later call this next to `register_family`."""
    UNIT_UIS[ui.family] = ui
    return ui


def unit_ui(family: str, label: str | None = None) -> UnitUI:
    """The form of `family`; a registered family without one gets a JSON box for its mix inputs."""
    if family in UNIT_UIS:
        return UNIT_UIS[family]
    return UnitUI(family=family, label=label or family,
                  fields=(Field("inputs", "json", "Inputs (JSON)", default="{}",
                                info="the unit's mix inputs as the family reads them"),),
                  help="This family has no form yet: its inputs are given as JSON.")


register_unit_ui(UnitUI(
    family="ip", label="IP-Adapter", prompts_by_image="image", default_weight=0.8,
    help="Image prompt: the reference images steer content or style through every cross-attention.",
    fields=(
        Field("image", "images", "Reference images", required=True,
              info="one or more; several images are combined as set below"),
        Field("mask", "image", "Region mask (optional)",
              info="white = where the image prompt acts; resized to the output"),
        Field("combine", "choice", "Several images", default="concat", choices=("concat", "average"),
              info="concat: every image's tokens (diffusers); average: one mean image embedding"),
        Field("blocks", "choice", "Blocks", target="scale", default="all blocks", choices=BLOCK_PRESETS,
              info="InstantStyle: style-only / layout-only inject into one block each"),
        Field("custom_scale", "json", "Per-block scale (JSON)", target="scale", default="",
              info='e.g. {"up": {"block_1": [0.0, 1.0]}} (diffusers set_ip_adapter_scale keys)',
              visible_when=("blocks", "custom")),
    ),
))

register_unit_ui(UnitUI(
    family="agd", label="AGD guidance", guidance="agd", model_kinds=("sd15", "sdxl"),
    help="Replaces classifier-free guidance: one UNet pass per step; w is the guidance scale it was distilled for.",
    fields=(
        Field("guidance_scale", "number", "Guidance w", target="guidance", default=5.0, minimum=1.0, maximum=20.0,
              step=0.5, info="the AGD adapter's guidance scale (replaces the CFG scale)"),
    ),
))


def families_for_ui() -> list[tuple[str, str]]:
    """`(label, name)` for every registered family, for the family dropdown (image prompts first)."""
    from studio.registry import FAMILIES, _load_builtin_families

    _load_builtin_families()
    order = {name: i for i, name in enumerate(FAMILY_ORDER)}
    names = sorted(FAMILIES, key=lambda n: (order.get(n, len(order)), n))
    return [(unit_ui(name, FAMILIES[name].label).label, name) for name in names]


FAMILY_ORDER = ("ip", "ctrl", "i2v", "agd")


def input_spec_json() -> list[dict[str, Any]]:
    """Every registered family's unit form as JSON (served by the `/families` endpoint)."""
    from studio.registry import FAMILIES, _load_builtin_families

    _load_builtin_families()
    out = []
    for name, fam in FAMILIES.items():
        ui = unit_ui(name, fam.label)
        out.append({
            "family": name, "label": ui.label, "output": ui.output, "guidance": ui.guidance,
            "model_kinds": list(ui.model_kinds) if ui.model_kinds else None, "help": ui.help,
            "fields": [{"key": f.key, "kind": f.kind, "label": f.label, "target": f.target, "default": f.default,
                        "minimum": f.minimum, "maximum": f.maximum, "choices": list(f.choices),
                        "required": f.required, "info": f.info} for f in ui.fields],
        })
    return out


