"""`python -m adapter_studio.toyworld build | data | assemble` (see `build.py` and docs/quality.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .build import assemble, build, steps
from .data import write_clip_folder, write_image_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adapter_studio.toyworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train and install every toy model not built yet (about an hour on 2 cores)")
    b.add_argument("--only", nargs="+", choices=[s.name for s in steps()], help="run just these steps, done or not")
    d = sub.add_parser("data", help="write toy-world training data in the families' folder formats")
    d.add_argument("kind", choices=["images", "clips"])
    d.add_argument("folder", type=Path)
    d.add_argument("--count", type=int, default=1000)
    d.add_argument("--split", default="train")
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--num_frames", type=int, default=8)
    a = sub.add_parser("assemble", help="put trained vae / clip / unet runs together into a pipeline folder")
    a.add_argument("--vae", type=Path, required=True)
    a.add_argument("--clip", type=Path, required=True)
    a.add_argument("--unet", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.only)
    elif args.command == "data":
        if args.kind == "images":
            write_image_folder(args.folder, args.split, args.count, args.size)
        else:
            write_clip_folder(args.folder, args.split, args.count, args.num_frames, args.size)
        print(f"wrote {args.count} {args.kind} to {args.folder}")
    else:
        print(assemble(args.vae, args.clip, args.unet, args.out))


if __name__ == "__main__":
    main()
