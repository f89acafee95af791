"""Adapter Studio: `python app.py` serves the Gradio studio on 127.0.0.1:7860 with the embedded toy model.

    python app.py [--host 127.0.0.1] [--port 7860] [--model toy-sd15 | tiny-sd15 | sd15 | owner/name | /path/to/folder]
                  [--models-dir models] [--outputs-dir outputs] [--max-concurrency 1] [--max-pixel-steps 8M]
                  [--adapter-cache-mb 2048] [--share]

No download happens by default: `toy-sd15` is the tiny model trained on the toy world of shapes, shipped as
safetensors in models/toy (`tiny-*` presets are random-weight test models built from configs). See docs/app.md for
the API endpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_count(text: str) -> int:
    """A count with an optional K / M / G suffix (powers of 1000): "8M" = 8000000."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 8000000 or 8M") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Adapter Studio: mix adapters on a frozen diffusion model in the browser")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (7860)")
    p.add_argument("--model", default="toy-sd15",
                   help="model preset (toy-sd15: the trained toy model; tiny-sd15: random weights, for tests; sd15, "
                        "sdxl, ...), hub id or local diffusers folder (toy-sd15)")
    p.add_argument("--models-dir", default="models", help="folder of adapter weights for the unit dropdowns (models)")
    p.add_argument("--outputs-dir", default="outputs", help="where images, sidecar JSONs and inputs go (outputs)")
    p.add_argument("--mixes-dir", default=None, help="folder of mix presets (configs/mixes)")
    p.add_argument("--runs-dir", default="runs", help="default parent folder of training runs (runs)")
    p.add_argument("--max-concurrency", type=int, default=1,
                   help="generations running at once; each holds its own copy of the model (1)")
    p.add_argument("--queue-size", type=int, default=64, help="most requests waiting in the queue (64)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--max-pixel-steps", type=parse_count, default=None,
                   help="most work one request may ask for, width x height x steps x images (x frames), e.g. 8M; "
                        "0 = no budget (default by device: 7.9M on cpu = 512x512 at 30 steps, 210M on cuda)")
    p.add_argument("--adapter-cache-mb", type=int, default=2048,
                   help="memory for loaded adapters kept between calls, in MiB of parameters (2048; 0 = none)")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet compiled (torch.compile fullgraph, CUDA graphs on CUDA); the first call of each "
                        "mix structure, batch size or resolution compiles (off)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from adapter_studio.errors import StudioError
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.limits import Limits
    from adapter_studio.webapp.logs import limit_log_lines
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, build_app, theme

    limit_log_lines()  # after the imports: diffusers and transformers set up their own log handlers on import
    try:
        engine = Engine(model=args.model, models_dir=args.models_dir, outputs_dir=args.outputs_dir,
                        max_concurrency=args.max_concurrency, device=args.device,
                        limits=Limits(max_pixel_steps=args.max_pixel_steps),
                        adapter_cache_bytes=args.adapter_cache_mb * 2**20, compile=args.compile)
        engine.warmup()
    except StudioError as e:
        sys.exit(f"app.py: {e}")
    demo = build_app(engine, TrainingRunner(runs_dir=args.runs_dir), mixes_dir=args.mixes_dir)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.max_concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme(), css=CSS,
                allowed_paths=[str(engine.outputs_dir)], max_file_size="64mb", footer_links=["api", "gradio"],
                show_error=True)


if __name__ == "__main__":
    main()
