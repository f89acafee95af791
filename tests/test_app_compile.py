"""`python app.py --compile`: the studio says when a generation compiles the UNet, and the compiled path makes the
same pictures as the eager one.

Both engines run the tiny model on the CPU; the compiled one with `compile={"backend": ...}`: aot_eager (a tiny UNet
compiles in seconds), wrapped to count the graphs torch hands it, so each "compiling" message is checked against a
real compile. Generations go through the page's Generate handler and the `/generate` endpoint's, with a progress
object that records every message it is given (what the page's progress bar shows).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from app_fixtures import make_image, make_models_dir

PAGE = SimpleNamespace(session_hash="page-compile")


class Recorder:
    """A stand-in for `gr.Progress`: keeps each call's description."""

    def __init__(self) -> None:
        self.descs: list[str] = []

    def __call__(self, progress, desc=None, total=None, unit="steps"):
        self.descs.append(desc)


def _form_values(g, prompt="a fox", seed=1, height=64):
    """Every Generate-tab widget's value: a plain request, no unit enabled, 2 steps of DDIM at 64 x `height`."""
    v = {g.prompt: prompt, g.negative: "", g.seed: seed, g.steps: 2, g.width: 64, g.height: height, g.sampler: "DDIM",
         g.guidance: "auto", g.cfg_scale: 5.0, g.count: 1, g.n_units: 3, g.frames: 16, g.fps: 8}
    for u in g.units:
        v.update({u.enabled: False, u.family: "ip", u.weight: 1.0, u.start: 0.0, u.end: 1.0})
        v.update({c: None for c in [*u.weights, *u.fields.values()]})
    return v


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    names = make_models_dir(root / "models")
    return SimpleNamespace(root=root, names=names, ref=make_image(root / "ref.png", (64, 64), seed=3))


def _studio(setup, name, compile):
    from adapter_studio.webapp.api import Api
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import StudioApp

    engine = Engine(model="tiny-sd15", models_dir=setup.root / "models", outputs_dir=setup.root / name,
                    compile=compile)
    app = StudioApp(engine, TrainingRunner(runs_dir=setup.root / "runs"), mixes_dir=setup.root / "mixes")
    app.build()
    api = Api(engine, app.runner, app.presets)

    def page(**form):
        """The Generate button; returns (progress messages, run info, the first image's pixels)."""
        g, rec = app.generate, Recorder()
        out = g.generate_ui({**_form_values(g, **form), g.ticket: g.queue_job(PAGE)}, PAGE, progress=rec)
        return rec.descs, out[3], _pixels(out[0][0][0])

    def endpoint(units=(), height=64, seed=1):
        """The /generate endpoint; returns (progress messages, None, the first image's pixels)."""
        rec = Recorder()
        gallery, _ = api.generate("a fox", "", seed, 2, 64, height, "DDIM", "auto", 5.0, 1, json.dumps(list(units)),
                                  [str(setup.ref)], PAGE, rec)
        return rec.descs, None, _pixels(gallery[0][0])

    return SimpleNamespace(engine=engine, page=page, endpoint=endpoint)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _ip(setup, scale=0.8):
    return {"family": "ip", "weights": setup.names["ip"], "scale": scale, "inputs": {"image": ["ref.png"]}}


@pytest.fixture(scope="module")
def compiled_runs(setup):
    """The compiled studio's generations, in order, each with the graphs it compiled."""
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    studio = _studio(setup, "out-compiled", {"backend": counting_aot_eager})
    runs = {}
    for name, call in [
        ("first", lambda: studio.page()),
        ("same shape", lambda: studio.page(prompt="a red house", seed=7)),  # other prompt, seed: same graph
        ("other height", lambda: studio.page(height=72)),
        ("an IP unit", lambda: studio.endpoint([_ip(setup)])),
        ("IP, other scale", lambda: studio.endpoint([_ip(setup, scale=0.3)], seed=4)),  # a value: same graph
    ]:
        before = len(graphs)
        descs, info, pixels = call()
        runs[name] = SimpleNamespace(descs=descs, info=info, pixels=pixels, compiled=len(graphs) - before)
    return SimpleNamespace(studio=studio, runs=runs)


def test_the_first_call_of_each_mix_shape_says_it_compiles(compiled_runs):
    from adapter_studio.webapp.engine import COMPILING

    runs = compiled_runs.runs
    assert "first run of this shape" in COMPILING and "later runs reuse it" in COMPILING
    said = {name: COMPILING in r.descs for name, r in runs.items()}
    assert said == {"first": True, "same shape": False, "other height": True, "an IP unit": True,
                    "IP, other scale": False}, said
    # the message is true: torch compiled exactly on the calls that said so
    assert {name: r.compiled > 0 for name, r in runs.items()} == said, {n: r.compiled for n, r in runs.items()}
    # it comes before sampling, after the adapters are loaded; the page's run info says so once it is done
    first = runs["first"].descs
    assert first.index("Loading adapters") < first.index(COMPILING) < first.index("Sampling")
    assert "compiled the UNet for this mix shape" in runs["first"].info
    assert "compiled" not in runs["same shape"].info


def test_an_uncompiled_studio_never_says_it_and_makes_the_same_pictures(setup, compiled_runs):
    from adapter_studio.webapp.engine import COMPILING

    studio = _studio(setup, "out-eager", False)
    first = studio.page()
    ip = studio.endpoint([_ip(setup)])
    taller = studio.page(height=72)
    for descs, info, _ in (first, ip, taller):
        assert COMPILING not in descs and "Sampling" in descs
    assert "compiled" not in first[1]
    assert not studio.engine.pool._ran, "an eager pipeline records no shapes"
    # compiled (aot_eager, fp32) = eager up to float rounding: at most 2/255 per pixel channel (measured: 0)
    runs = compiled_runs.runs
    for eager, name in [(first, "first"), (ip, "an IP unit"), (taller, "other height")]:
        diff = np.abs(eager[2] - runs[name].pixels)
        assert diff.max() <= 2, (name, diff.max())
    assert np.abs(first[2] - ip[2]).mean() > 1.0, "the IP unit acts: the comparison is not of blank pictures"
