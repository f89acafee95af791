"""The README's Python API block runs as written, on the shipped toy model and adapters (models/toy)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_api_block_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "num_inference_steps=25" in code
    code = code.replace("num_inference_steps=25", "num_inference_steps=4")
    monkeypatch.chdir(ROOT)  # the block's paths are the checkout's
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    image = scope["image"]
    assert image.size == (64, 64)  # the toy model's resolution: the preset, not a default of 512
    assert set(scope["pipe"].stack.slots) == {"style", "agd"}
    assert scope["pipe"].guidance_mode() == "agd"
