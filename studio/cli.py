"""`python -m adapter_studio`: look inside adapter weights and convert them between formats.

    python -m adapter_studio families
    python -m adapter_studio inspect FILE_OR_FOLDER [--preset tiny-sd15] [--json]
    python -m adapter_studio convert SRC DEST --to FORMAT --preset sd15 [--family ip]
    python -m adapter_studio export-comfy MIX.json OUT_DIR [--checkpoint NAME] [--clip-vision NAME] [--zip]

`inspect` says which family a file belongs to, its format and variant, the base model it was made for (widths, layer
counts), its parameters, dtype and sha256, and with `--preset` whether it fits that model (by loading it the way the
studio does). `convert` loads SRC onto the preset's UNet (any format the family reads) and writes DEST in one of the
family's written formats. Every family answers through its `Family.inspect` / `Family.writers`; this module names none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CheckpointError, StudioError
from .family import Family
from .mix import file_sha256
from .registry import families, get_family


def identify(path: Path) -> list[tuple[Family, dict[str, Any]]]:
    """Every installed family that recognises `path`, with its description. Raises CheckpointError if none does."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    found, why = [], []
    for fam in families():
        if fam.inspect is None:
            continue
        try:
            found.append((fam, fam.inspect(path)))
        except StudioError as e:
            why.append(f"{fam.label}: {e}")
    if not found:
        raise CheckpointError(f"{path} is not adapter weights of any installed family ("
                              + "; ".join(why or ["no family can inspect files"]) + ")")
    return found


def _fits(fam: Family, path: Path, preset: str) -> str:
    from .presets import load_pipeline

    try:
        adapter = fam.load(str(path), load_pipeline(preset))
    except StudioError as e:
        return f"no: {e}"
    n = sum(p.numel() for p in adapter.parameters())
    return f"yes ({n:,} parameters loaded onto {preset})"


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    out = []
    for fam, desc in identify(path):
        desc = {"family": fam.name, "label": fam.label, **desc, "sha256": file_sha256(path)}
        if args.preset:
            desc["fits " + args.preset] = _fits(fam, path, args.preset)
        out.append(desc)
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2, default=str))
        return 0
    for desc in out:
        print(f"{path}: {desc['label']} ({desc['family']})")
        for key, val in desc.items():
            if key in ("family", "label"):
                continue
            if isinstance(val, dict):
                val = ", ".join(f"{k} {v}" for k, v in val.items())
            print(f"  {key:<18} {val}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .presets import load_pipeline

    src, dest = Path(args.src), Path(args.dest)
    fam = get_family(args.family) if args.family else identify(src)[0][0]
    if args.to not in fam.writers:
        raise StudioError(f"{fam.label} writes {', '.join(sorted(fam.writers)) or 'no format'}; got --to {args.to!r}")
    adapter = fam.load(str(src), load_pipeline(args.preset))
    written = fam.writers[args.to](adapter, dest)
    print(f"wrote {written} ({fam.label}, {args.to}, sha256 {file_sha256(written)})")
    return 0


def cmd_export_comfy(args: argparse.Namespace) -> int:
    from .comfy_workflow import export_comfy
    from .mix import Mix

    mix_path = Path(args.mix)
    if not mix_path.is_file():
        raise StudioError(f"{mix_path} does not exist")
    mix = Mix.load(mix_path)
    export = export_comfy(mix, base_dir=mix_path.parent, checkpoint=args.checkpoint, clip_vision=args.clip_vision)
    out = Path(args.out_dir)
    if args.zip:
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{mix_path.stem}-comfyui.zip"
        target.write_bytes(export.zip_bytes())
        print(f"wrote {target}")
    else:
        export.write(out)
        print(f"wrote {out / 'workflow.json'} (UI), {out / 'workflow_api.json'} (API), {len(export.files)} files "
              f"under {out} (input/, models/); see {out / 'README.txt'}")
    for note in export.notes:
        print(f"note: {note}")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    for fam in families():
        print(f"{fam.name:<6} {fam.label:<28} writes: {', '.join(sorted(fam.writers)) or '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapter_studio", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("families", help="the installed adapter families and the formats they write")
    q = sub.add_parser("inspect", help="which family, variant and base model a weights file or folder is for")
    q.add_argument("path")
    q.add_argument("--preset", help="also say whether it fits this model preset / hub id / diffusers folder")
    q.add_argument("--json", action="store_true", help="print JSON")
    c = sub.add_parser("convert", help="convert weights between the formats a family reads and writes")
    c.add_argument("src")
    c.add_argument("dest")
    c.add_argument("--to", required=True, help="the format to write (see `families`)")
    c.add_argument("--preset", required=True, help="the model the weights are for (the UNet fixes layer order)")
    c.add_argument("--family", help="the family (default: found by inspecting SRC)")
    e = sub.add_parser("export-comfy", help="a mix as a ComfyUI workflow (UI and API format) with its files")
    e.add_argument("mix", help="a mix JSON file (relative paths in it are looked up beside it)")
    e.add_argument("out_dir")
    e.add_argument("--checkpoint", help="checkpoint file name in ComfyUI (default: <model>.safetensors)")
    e.add_argument("--clip-vision", help="CLIP vision file name in ComfyUI for image-prompt units "
                                         "(default: <model>-image-encoder.safetensors)")
    e.add_argument("--zip", action="store_true", help="write one zip (as the studio's download) instead")
    args = p.parse_args(argv)
    try:
        return {"inspect": cmd_inspect, "convert": cmd_convert, "families": cmd_families,
                "export-comfy": cmd_export_comfy}[args.command](args)
    except StudioError as e:  # a user's file or argument: one line, no traceback
        print(f"python -m adapter_studio {args.command}: {e}", file=sys.stderr)
        return 2
