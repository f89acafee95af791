"""The README's run command: `python app.py` (what `make run` starts) serves the studio over HTTP, and its log
stays readable (no trace for a user error, no 20k-character prompt)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from app_fixtures import free_port, stop_server

REPO = Path(__file__).resolve().parents[1]


def test_python_app_py_serves_the_studio_and_keeps_its_log_short(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

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
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        long_prompt = "a small red fox asleep in the snow " * 600  # 21k characters, far over CLIP's 77 tokens
        client.predict(long_prompt, "", 1, 1, 64, 64, "DDIM", "auto", 7.5, 1, "[]", [], api_name="/generate")
        with pytest.raises(AppError, match="whole number"):
            client.predict("a fox", "", 1, 2.5, 64, 64, "DDIM", "auto", 7.5, 1, "[]", [], api_name="/generate")
    finally:
        stop_server(proc, log)
    lines = (tmp_path / "app.log").read_text().splitlines()
    assert not [line for line in lines if "Traceback" in line], "a user error is no trace"
    assert len([line for line in lines if "whole number" in line]) == 1, "a user error is one log line"
    assert max(map(len, lines)) < 1000, "long messages (diffusers quoting the cut prompt) are shortened"
    assert any("prompt 'a small red fox" in line and "21000 chars" in line for line in lines)


def test_an_unknown_model_is_a_one_line_error_not_a_trace(tmp_path):
    proc = subprocess.run([sys.executable, "app.py", "--model", "no-such-model", "--models-dir", str(tmp_path / "m"),
                           "--outputs-dir", str(tmp_path / "o"), "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown model 'no-such-model'" in proc.stderr and "Traceback" not in proc.stderr


def test_compile_flag_reaches_every_pooled_pipeline(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # app.py is the entry point in the checkout's root
    import app
    from adapter_studio.webapp.pool import PipelinePool

    assert app.parse_args(["--compile"]).compile and not app.parse_args([]).compile
    pool = PipelinePool("tiny-sd15", "cpu", torch.float32, compile=True)
    sp, _ = pool._build()
    assert sp.stack.static and sp.stack._compiled is not None, "the UNet runs compiled with its stack"
    sp, _ = PipelinePool("tiny-sd15", "cpu", torch.float32)._build()
    assert not sp.stack.static
