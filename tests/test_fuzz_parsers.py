"""Seeded fuzz of the parsers a user's files reach: mixes (JSON and inside PNGs) and weights files (headers, bytes).

Whatever comes in, only the studio's own error types come out (`StudioError` and its subclasses): never a KeyError,
TypeError, JSONDecodeError, OSError or a safetensors / pickle exception.
"""

from __future__ import annotations

import copy
import json
import random
import struct

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from adapter_studio import Mix, StudioError
from adapter_studio.cli import identify
from adapter_studio.files import read_state_dict
from adapter_studio.registry import families
from adapter_studio.webapp.metadata import MIX_CHUNK, read_mix

VALID = {
    "format": "adapter-studio/mix", "version": 2, "model": "tiny-sd15",
    "sampling": {"prompt": "a cat", "seed": 3, "steps": 4, "width": 64, "height": 64, "sampler": "DDIM",
                 "guidance": "cfg", "guidance_scale": 5.0, "num_images": 2},
    "units": [{"family": "ip", "weights": {"weights": "ip/x.safetensors"}, "name": "ref", "scale": 0.7,
               "start": 0.0, "end": 1.0, "inputs": {"image": ["a.png"]}, "sample_mask": [True, False],
               "sha256": {"weights": "ab" * 32}},
              {"family": "agd", "weights": "agd/x", "scale": {"up": {"block_1": [0.0, 1.0]}, "motion": 0.5}}],
}
ODD = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 10**40, "", "x" * 5000, "é", [], [None], {},
       {"a": 1}, [1, "a", None], {"down": {"block_0": "x"}}, {"up": {"blk": 1}}, {"mid": {"block_0": 1}}, [True] * 3]


def _mutate(rng: random.Random, d: dict) -> dict:
    """One to four random edits: a value replaced, a key dropped or added, anywhere in the nested mix."""
    d = copy.deepcopy(d)
    for _ in range(rng.randint(1, 4)):
        node, path = d, []
        while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            if not isinstance(node[key], (dict, list)):
                break
            path.append(key)
            node = node[key]
        if isinstance(node, dict):
            action = rng.random()
            if node and action < 0.4:
                node[rng.choice(list(node))] = copy.deepcopy(rng.choice(ODD))
            elif node and action < 0.7:
                node.pop(rng.choice(list(node)))
            else:
                node[rng.choice(["extra", "seed", "weights", "family", "version", "units", "1"])] = copy.deepcopy(rng.choice(ODD))
        elif isinstance(node, list) and node:
            node[rng.randrange(len(node))] = copy.deepcopy(rng.choice(ODD))
    return d


def test_fuzzed_mixes_raise_only_studio_errors():
    rng = random.Random(0)
    parsed = refused = 0
    for _ in range(600):
        d = _mutate(rng, VALID)
        try:
            text = json.dumps(d)
        except ValueError:
            continue
        if rng.random() < 0.1:  # broken JSON text as well
            text = text[: rng.randrange(len(text))]
        try:
            mix = Mix.from_json(text)
        except StudioError:
            refused += 1
            continue
        parsed += 1
        assert Mix.from_json(mix.to_json()) == mix, "whatever parses writes back to the same mix"
    assert parsed > 50 and refused > 200, (parsed, refused)  # the fuzz reached both sides


def test_fuzzed_png_metadata_raises_only_studio_errors(tmp_path):
    rng = random.Random(1)
    for i in range(60):
        info = PngImagePlugin.PngInfo()
        chunk = rng.choice([json.dumps(_mutate(rng, VALID)), "{", "", "null", "[1, 2]", "\x00" * 5, "x" * 10000])
        info.add_text(rng.choice([MIX_CHUNK, MIX_CHUNK, "parameters"]), chunk)
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
        if rng.random() < 0.3:  # a truncated PNG
            path.write_bytes(path.read_bytes()[: rng.randrange(8, 80)])
        try:
            read_mix(path)
        except StudioError:
            pass


def _safetensors_bytes(tmp_path) -> bytes:
    save_file({"image_proj.proj.weight": torch.zeros(4, 3), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)},
              str(tmp_path / "ok.safetensors"))
    return (tmp_path / "ok.safetensors").read_bytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_fuzzed_weights_files_raise_only_studio_errors(tmp_path, suffix):
    rng = random.Random(2)
    good = _safetensors_bytes(tmp_path)
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 3)}}, tmp_path / "ok.bin")
    good_bin = (tmp_path / "ok.bin").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = good[8: 8 + n]
    for i in range(80):
        data = bytearray(good if suffix == ".safetensors" else good_bin)
        kind = rng.randrange(4)
        if kind == 0:  # truncated
            data = data[: rng.randrange(len(data))]
        elif kind == 1:  # random bytes flipped
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2 and suffix == ".safetensors":  # a header that lies about its size or shapes
            h = json.loads(header)
            key = rng.choice([k for k in h if k != "__metadata__"])
            h[key][rng.choice(["shape", "dtype", "data_offsets"])] = copy.deepcopy(rng.choice(ODD))
            blob = json.dumps(h).encode()
            data = bytearray(struct.pack("<Q", len(blob)) + blob + good[8 + n:])
        else:  # a wrong length prefix
            data[:8] = struct.pack("<Q", rng.choice([0, 1, 2**63, len(data) * 4]))
        path = tmp_path / f"f{i}{suffix}"
        path.write_bytes(bytes(data))
        try:
            read_state_dict(path, "fuzzed weights")
        except StudioError:
            pass
        try:  # every installed family's inspect: only our errors
            identify(path)
        except StudioError:
            pass
    assert len(families()) >= 4
