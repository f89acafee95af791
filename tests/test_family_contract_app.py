"""The family contract, seen from the app: a family defined entirely in this file, registered at run time with no
core or app edit, shows in the Generate tab and the `/families` endpoint, takes uploads, runs through `/generate` on
a served app, and round-trips through mix files, the output PNG and the Python export."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from app_fixtures import free_port

from adapter_studio.adapter import AttentionAdapter
from adapter_studio.errors import IncompatibleAdapterError, MixError
from adapter_studio.family import Family, Field

W, H = 64, 64


class NudgeAdapter(AttentionAdapter):
    """Adds `strength * W_l @ hidden_states` to every cross-attention output l."""

    family = "nudge"
    target = "attn2"

    def __init__(self, layers: dict[str, tuple[int, int]], seed: int = 0):
        super().__init__()
        self.names = list(layers)
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.ModuleList()
        for n_in, n_out in layers.values():
            lin = nn.Linear(n_in, n_out, bias=False)
            nn.init.normal_(lin.weight, std=0.2, generator=g)
            self.proj.append(lin)

    @staticmethod
    def layers_of(unet: nn.Module) -> dict[str, tuple[int, int]]:
        """`{processor name: (input width, output width)}` of the UNet's spatial cross-attentions."""
        out = {}
        for name in unet.attn_processors:
            if name.endswith("attn2.processor") and "motion_modules" not in name:
                attn = unet.get_submodule(name[: -len(".processor")])
                out[name] = (attn.to_q.in_features, attn.to_out[0].out_features)
        return out

    def layer_names(self) -> list[str]:
        return self.names

    def contribution(self, layer, attn, hidden_states, encoder_hidden_states, state, ctx):
        return state["strength"] * self.proj[self.names.index(layer)](hidden_states)

    def save(self, path: Path) -> None:
        shapes = {n: list(lin.weight.shape[::-1]) for n, lin in zip(self.names, self.proj)}
        save_file({f"proj.{i}": lin.weight.detach().contiguous() for i, lin in enumerate(self.proj)}, str(path),
                  metadata={"layers": json.dumps(shapes)})


def load_nudge(weights: dict[str, str | None], pipe: Any) -> NudgeAdapter:
    from safetensors import safe_open

    with safe_open(weights["weights"], framework="pt") as f:
        saved = {n: tuple(s) for n, s in json.loads(f.metadata()["layers"]).items()}
    want = NudgeAdapter.layers_of(pipe.unet)
    if saved != want:
        raise IncompatibleAdapterError(f"nudge weights were made for {len(saved)} layers of widths "
                                       f"{sorted(set(saved.values()))}, this UNet has {len(want)} of "
                                       f"{sorted(set(want.values()))}: another base model")
    adapter = NudgeAdapter(saved)
    adapter.load_state_dict({f"{k}.weight": v for k, v in load_file(weights["weights"]).items()})
    return adapter


def nudge_inputs(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    unknown = set(inputs) - {"strength"}
    if unknown:
        raise MixError(f"nudge unit inputs: unknown keys {sorted(unknown)}; allowed: strength")
    s = inputs.get("strength", 1.0)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise MixError(f"nudge unit inputs: strength must be a number, got {s!r}")
    return {"strength": float(s)}


NUDGE = Family(name="nudge", label="Nudge test", loader=load_nudge, inputs_from_json=nudge_inputs, order=5,
               help="A test family: a random linear nudge on every cross-attention.",
               fields=(Field("strength", "number", "Strength", default=1.0, minimum=0.0, maximum=5.0, step=0.5,
                             info="how hard it nudges"),))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from adapter_studio.presets import load_pipeline
    from adapter_studio.registry import discover_families, register_family, unregister_family
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, StudioApp, theme

    discover_families()
    register_family(NUDGE)
    root = tmp_path_factory.mktemp("contract")
    pipe = load_pipeline("tiny-sd15")
    (root / "models" / "nudge").mkdir(parents=True)
    NudgeAdapter(NudgeAdapter.layers_of(pipe.unet), seed=3).save(root / "models" / "nudge" / "nudge.safetensors")
    NudgeAdapter(NudgeAdapter.layers_of(pipe.unet), seed=4).save(root / "nudge-upload.safetensors")
    xl = load_pipeline("tiny-sdxl")
    NudgeAdapter(NudgeAdapter.layers_of(xl.unet)).save(root / "nudge-sdxl.safetensors")
    engine = Engine(model="tiny-sd15", models_dir=root / "models", outputs_dir=root / "outputs")
    app = StudioApp(engine, TrainingRunner(runs_dir=root / "runs"), mixes_dir=root / "mixes")
    demo = app.build()
    demo.queue(max_size=16, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(),
                css=CSS, allowed_paths=[str(engine.outputs_dir)])
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", engine=engine, app=app, root=root)
    finally:
        demo.close()
        unregister_family("nudge")


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    from gradio_client import Client

    return Client(served.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _pixels(path: Any) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _generate(client, units, seed=5, n=1):
    gallery, mix_json = client.predict("a small house", "", seed, 3, W, H, "Euler", "auto", 6.0, n, json.dumps(units),
                                       [], api_name="/generate")
    return [Path(g["image"]) for g in gallery], mix_json


def test_the_family_shows_in_the_generate_tab_and_in_families(served, client):
    fams = {f["family"]: f for f in json.loads(client.predict(api_name="/families"))}
    assert fams["nudge"]["label"] == "Nudge test" and [f["key"] for f in fams["nudge"]["fields"]] == ["strength"]
    assert fams["nudge"]["weights"] == [{"key": "weights", "label": "Weights", "required": True, "folder": "nudge"}]
    unit = served.app.generate.units[0]
    assert ("Nudge test", "nudge") in unit.family.choices
    assert unit.family.value == "nudge", "order=5 puts it first in the family list"
    assert ("nudge", "strength") in unit.fields and unit.fields[("nudge", "strength")].maximum == 5.0


def test_upload_generate_mix_file_png_and_python_export_round_trip(served, client, tmp_path, monkeypatch):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from adapter_studio.mix import Mix, file_sha256
    from adapter_studio.registry import get_family
    from adapter_studio.webapp.metadata import read_mix

    # upload: checked with the family's loader against the served model, stored in its folder, listed for it
    name = client.predict(handle_file(str(served.root / "nudge-upload.safetensors")), "nudge",
                          api_name="/upload_weights")
    assert name == "nudge/nudge-upload.safetensors"
    assert json.loads(client.predict("nudge", api_name="/list_weights")) == [name, "nudge/nudge.safetensors"]
    assert name not in json.loads(client.predict("ip", api_name="/list_weights"))
    with pytest.raises(AppError, match="another base model"):
        client.predict(handle_file(str(served.root / "nudge-sdxl.safetensors")), "nudge", api_name="/upload_weights")

    # /generate: the unit acts, and the output's mix records it in full
    plain, _ = _generate(client, [])
    unit = {"family": "nudge", "weights": name, "scale": 0.8, "inputs": {"strength": 2.0}}
    paths, mix_json = _generate(client, [unit])
    assert np.abs(_pixels(paths[0]) - _pixels(plain[0])).mean() > 1.0
    mix = Mix.from_json(mix_json)
    assert mix.units[0].family == "nudge" and mix.units[0].inputs == {"strength": 2.0}
    assert mix.units[0].weights == {"weights": name}
    assert mix.units[0].sha256 == {"weights": file_sha256(served.engine.models_dir / name)}

    # mix file and PNG round trips; the PNG's mix regenerates the same pixels
    saved = Mix.load(mix.save(tmp_path / "nudge.json"))
    assert saved.to_dict() == mix.to_dict()
    from_png = read_mix(paths[0])
    assert from_png.to_dict() == mix.to_dict()
    again, _ = client.predict(from_png.to_json(), [], api_name="/generate_mix")
    assert np.array_equal(_pixels(again[0]["image"]), _pixels(paths[0]))

    # the Python export, run with the family registered (as a package naming it in an entry point would be)
    script = client.predict(from_png.to_json(), api_name="/export_python")
    assert "nudge" in script and "pipe.set_sampler('Euler')" in script
    assert get_family("nudge") is NUDGE
    monkeypatch.chdir(tmp_path)
    exec(compile(script, str(tmp_path / "reproduce.py"), "exec"), {"__name__": "__main__"})
    assert np.array_equal(_pixels(tmp_path / f"mix-{mix.sampling.seed}.png"), _pixels(paths[0]))


def test_the_ui_form_of_the_family_makes_and_restores_its_unit(served):
    from adapter_studio.mix import Mix, UnitSpec

    g = served.app.generate
    u = g.units[0]
    v = {g.prompt: "a fox", g.negative: "", g.seed: 3, g.steps: 2, g.width: W, g.height: H, g.sampler: "DDIM",
         g.guidance: "auto", g.cfg_scale: 5.0, g.count: 1, g.n_units: 1, g.frames: 16, g.fps: 8,
         u.enabled: True, u.family: "nudge", u.weights[0]: "nudge/nudge.safetensors", u.weight: 0.6,
         u.start: 0.0, u.end: 0.5, u.fields[("nudge", "strength")]: 3.0}
    mix = g.forms_to_mix(v, 1)
    assert mix.units == [UnitSpec("nudge", {"weights": "nudge/nudge.safetensors"}, scale=0.6, end=0.5,
                                  inputs={"strength": 3.0})]
    upd, warnings = g.mix_to_updates(Mix.from_json(mix.to_json()))
    assert warnings == [] and upd[u.family] == "nudge" and upd[u.fields[("nudge", "strength")]] == 3.0
    assert upd[u.weight] == 0.6 and upd[u.weights[0]]["value"] == "nudge/nudge.safetensors"


def test_a_family_loading_two_weights_files_gets_two_dropdowns_and_records_both(tmp_path):
    """`Family.weights` with two entries: one dropdown each (listing each one's folder), both resolved, hashed and
    recorded by key; an upload for such a family is only checked to be readable."""
    from adapter_studio.errors import CheckpointError
    from adapter_studio.family import WeightsFile
    from adapter_studio.mix import Mix, UnitSpec, file_sha256
    from adapter_studio.presets import load_pipeline
    from adapter_studio.registry import discover_families, register_family, unregister_family
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.ui import StudioApp

    def load_pair(weights: dict[str, str | None], pipe: Any) -> NudgeAdapter:
        adapter = load_nudge({"weights": weights["base"]}, pipe)
        if weights["extra"]:  # the optional second file adds its projections
            extra = load_nudge({"weights": weights["extra"]}, pipe)
            with torch.no_grad():
                for a, b in zip(adapter.proj, extra.proj):
                    a.weight += b.weight
        return adapter

    pair = Family(name="nudgepair", label="Nudge pair", loader=load_pair, inputs_from_json=nudge_inputs, order=6,
                  weights=(WeightsFile("base", "Base weights", folder="nudge-base"),
                           WeightsFile("extra", "Extra weights", required=False, folder="nudge-extra")),
                  fields=NUDGE.fields)
    discover_families()
    register_family(pair)
    try:
        models = tmp_path / "models"
        layers = NudgeAdapter.layers_of(load_pipeline("tiny-sd15").unet)
        for folder, seed in (("nudge-base", 1), ("nudge-extra", 2)):
            (models / folder).mkdir(parents=True)
            NudgeAdapter(layers, seed=seed).save(models / folder / "n.safetensors")
        engine = Engine(model="tiny-sd15", models_dir=models, outputs_dir=tmp_path / "outputs")
        assert engine.list_weights("nudgepair", 0) == ["nudge-base/n.safetensors"]
        assert engine.list_weights("nudgepair", 1) == ["nudge-extra/n.safetensors"]

        app = StudioApp(engine, mixes_dir=tmp_path / "mixes")
        app.build()
        u = app.generate.units[0]
        assert len(u.weights) >= 2 and u.weights[1].elem_id == "unit-0-weights-1"  # as many as any family loads

        sampling = {"prompt": "a fox", "steps": 2, "seed": 1, "width": W, "height": H}
        both = engine.generate(Mix(units=[UnitSpec("nudgepair", {"base": "nudge-base/n.safetensors",
                                                                 "extra": "nudge-extra/n.safetensors"})],
                                   sampling=sampling))
        base = engine.generate(Mix(units=[UnitSpec("nudgepair", {"base": "nudge-base/n.safetensors"})],
                                   sampling=sampling))
        assert np.abs(_pixels(both.images[0]) - _pixels(base.images[0])).mean() > 1.0
        assert both.mix.units[0].sha256 == {k: file_sha256(models / f"nudge-{k}" / "n.safetensors")
                                            for k in ("base", "extra")}
        assert base.mix.units[0].weights == {"base": "nudge-base/n.safetensors", "extra": None}
        with pytest.raises(MixError, match=r"unit 1 \(Nudge pair\): choose base weights"):
            engine.complete_mix(Mix(units=[UnitSpec("nudgepair", {"extra": "nudge-extra/n.safetensors"})],
                                    sampling=sampling))
        with pytest.raises(MixError, match="unknown weights"):
            engine.complete_mix(Mix(units=[UnitSpec("nudgepair", {"bse": "nudge-base/n.safetensors"})],
                                    sampling=sampling))

        upd, warnings = app.generate.mix_to_updates(both.mix)
        assert warnings == [] and upd[u.weights[1]]["value"] == "nudge-extra/n.safetensors"
        assert upd[u.weights[1]]["label"] == "Extra weights (models folder)" and upd[u.weights[1]]["visible"]
        assert all(upd[w]["visible"] is False for w in u.weights[2:]), "slots this family does not load are hidden"

        # uploads: to the first weights file's folder, checked only as a readable file (no lone-file load)
        NudgeAdapter(layers, seed=3).save(tmp_path / "up.safetensors")
        assert engine.add_weights(tmp_path / "up.safetensors", "nudgepair") == "nudge-base/up.safetensors"
        assert engine.add_weights(tmp_path / "up.safetensors", "nudgepair", key="extra") == "nudge-extra/up.safetensors"
        (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(CheckpointError, match="not a readable weights file"):
            engine.add_weights(tmp_path / "junk.safetensors", "nudgepair")
    finally:
        unregister_family("nudgepair")
