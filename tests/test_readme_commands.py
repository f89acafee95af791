"""The README's two commands are what the Makefile and CI really run."""

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_commands_match_makefile_and_ci():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands\s*```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run calls exactly the README's test command"
    dry = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip install -q torch==2.13.0" in dry and "pytest" in dry
    dry_run = subprocess.run(["make", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    [line] = [x for x in dry_run.splitlines() if " app.py " in x]
    assert "app.py --host 127.0.0.1 --port 7860" in line
    # ... on the trained toy model: app.py's default, which the command does not override (served for real in
    # tests/test_toy_studio.py)
    spec = importlib.util.spec_from_file_location("studio_app", ROOT / "app.py")
    app_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_py)
    assert app_py.parse_args(shlex.split(line.split(" app.py ", 1)[1])).model == "toy-sd15"
