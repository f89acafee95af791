"""The README's two commands are what the Makefile and CI really run."""

import re
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
    assert "app.py --host 127.0.0.1 --port 7860" in dry_run
