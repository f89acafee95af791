"""The README's run command: `python app.py` (what `make run` starts) serves the studio over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]


def test_python_app_py_serves_the_studio(tmp_path):
    port = free_port()
    log = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port),
                             "--models-dir", str(tmp_path / "models"), "--outputs-dir", str(tmp_path / "outputs")],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        status, body, deadline = None, "", time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    status, body = resp.status, resp.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.5)
        assert status == 200, (tmp_path / "app.log").read_text()[-3000:]
        assert "Adapter Studio" in body  # the page (title + config) is the studio, not an error page
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_an_unknown_model_is_a_one_line_error_not_a_trace(tmp_path):
    proc = subprocess.run([sys.executable, "app.py", "--model", "no-such-model", "--models-dir", str(tmp_path / "m"),
                           "--outputs-dir", str(tmp_path / "o"), "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown model 'no-such-model'" in proc.stderr and "Traceback" not in proc.stderr
