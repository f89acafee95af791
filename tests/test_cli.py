"""`python -m adapter_studio inspect / convert`: which family, variant and base model a file is for; format conversion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.ip_adapter import IPAdapter, load_ip_adapter, original_state_dict, save_original
from adapter_studio.cli import main
from adapter_studio.presets import load_pipeline


@pytest.fixture(scope="module")
def sd15():
    return load_pipeline("tiny-sd15")


def _json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_names_family_variant_base_and_fit(sd15, tmp_path, capsys):
    ip = IPAdapter.from_unet(sd15.unet, 32, projection="plus")  # plus reads the encoder's hidden states (32 wide)
    save_original(ip, tmp_path / "ip.safetensors")
    d = _json(capsys, "inspect", str(tmp_path / "ip.safetensors"), "--json", "--preset", "tiny-sd15")
    assert d["family"] == "ip" and d["variant"] == "plus"
    assert d["base"] == {"cross_attention_dim": 32, "cross-attention layers": 7, "image encoder width": 32}
    assert d["parameters"] == sum(p.numel() for p in ip.parameters())
    assert d["dtype"] == "float32" and len(d["sha256"]) == 64
    assert d["fits tiny-sd15"].startswith("yes")
    d = _json(capsys, "inspect", str(tmp_path / "ip.safetensors"), "--json", "--preset", "tiny-sdxl")
    assert d["fits tiny-sdxl"].startswith("no: ") and "cross_attention_dim" in d["fits tiny-sdxl"]

    ip.save_pretrained(tmp_path / "ip_folder")
    d = _json(capsys, "inspect", str(tmp_path / "ip_folder"), "--json")
    assert (d["format"], d["variant"], d["base"]["cross-attention layers"]) == ("folder (save_pretrained)", "plus", 7)
    assert d["parameters"] == sum(p.numel() for p in ip.parameters())

    agd = AGDAdapter.from_unet(sd15.unet, hidden_dim=16)
    agd.save_pretrained(tmp_path / "agd")
    d = _json(capsys, "inspect", str(tmp_path / "agd"), "--json")
    assert d["family"] == "agd" and d["base"]["cross-attention layers"] == 7 and d["hidden width"] == 16
    assert d["parameters"] == sum(t.numel() for t in agd.state_dict().values()), "stored values, buffers included"


def test_inspect_and_convert_refuse_clearly(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not adapter weights of any installed family" in err
    assert main(["inspect", str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err


def test_convert_between_ip_formats_round_trips(sd15, tmp_path, capsys):
    ip = IPAdapter.from_unet(sd15.unet, 24)
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    torch.save(original_state_dict(ip), tmp_path / "ip.bin")
    assert main(["convert", str(tmp_path / "ip.bin"), str(tmp_path / "folder"), "--to", "folder",
                 "--preset", "tiny-sd15"]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--to", "original",
                 "--preset", "tiny-sd15"]) == 0
    back = load_ip_adapter(tmp_path / "back.safetensors", sd15.unet)
    assert all(torch.equal(a, b) for a, b in zip(ip.state_dict().values(), back.state_dict().values()))
    assert main(["convert", str(tmp_path / "ip.bin"), str(tmp_path / "o"), "--to", "upstream",
                 "--preset", "tiny-sd15"]) == 2
    assert "IP-Adapter writes folder, original" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "adapter_studio", "families"], capture_output=True, text=True,
                         check=True).stdout
    assert "ip " in out and "agd " in out
