"""Quality of the shipped toy models: each family against the same model without it (docs/quality.md).

    python bench/quality.py                      # every family, the sizes docs/quality.md reports
    python bench/quality.py --only ip agd --n 16 # a quick look
    python bench/quality.py --grids docs/quality # also write one picture grid per family there

Prints one markdown table per family (the scores `adapter_studio.toyworld.quality` returns) with the machine named.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adapter_studio.toyworld import quality  # noqa: E402

MODELS = REPO / "models" / "toy"
FAMILIES = ("base", "ip", "ctrl", "i2v", "agd")


def _grid(rows: list[list], path: Path) -> None:
    from diffusers.utils import make_image_grid

    cols = max(len(r) for r in rows)
    tiles = [im for r in rows for im in (list(r) + [r[-1].copy()] * (cols - len(r)))]
    make_image_grid([t.resize((128, 128), 0) for t in tiles], rows=len(rows), cols=cols).save(path)


def run(only: list[str], n: int, steps: int, grids: Path | None) -> dict[str, quality.Result]:
    from adapter_studio.pipelines import StudioPipeline

    results: dict[str, quality.Result] = {}
    sp = StudioPipeline.from_preset("toy-sd15")
    for fam in only:
        t0 = time.time()
        if fam == "base":
            res = quality.base_model(sp, n=n, steps=steps)
        elif fam == "ip":
            from adapter_studio.adapters.ip_adapter import load_ip_adapter

            ip = load_ip_adapter(str(MODELS / "ip-adapter"), sp.pipe.unet, sp.pipe.image_encoder)
            res = quality.ip_adapter(sp, ip, n=n, steps=steps)
        elif fam == "ctrl":
            from adapter_studio.adapters.ctrl_adapter import CtrlAdapter, load_controlnet, load_ctrl_adapter

            ctrl = load_ctrl_adapter(str(MODELS / "controlnet-mask"), adapter=str(MODELS / "ctrl-adapter-mask"),
                                     unet=sp.pipe.unet)
            plain = CtrlAdapter(load_controlnet(str(MODELS / "controlnet-mask")))
            res = quality.ctrl_adapter(sp, ctrl, n=n, steps=steps, controlnet=plain)
        elif fam == "agd":
            from adapter_studio.adapters.agd import AGDAdapter

            res = quality.agd(sp, AGDAdapter.from_pretrained(str(MODELS / "agd")), n=n, steps=steps)
        else:
            from adapter_studio.adapters.i2v_adapter import load_i2v_adapter

            video = StudioPipeline.from_preset("toy-video")
            res = quality.i2v_adapter(video, load_i2v_adapter(str(MODELS / "i2v-adapter"), video.pipe.unet),
                                      n=max(4, n // 6), steps=steps)
        results[fam] = res
        print(f"\n### {fam} ({time.time() - t0:.0f} s) — {res.setup}\n")
        print("| score | value |\n|---|---|")
        for k, v in res.scores.items():
            print(f"| {k} | {v:.3f} |")
        if grids is not None:
            grids.mkdir(parents=True, exist_ok=True)
            _grid(res.images, grids / f"{fam}.png")
    print(f"\nchance: {quality.CHANCE}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--n", type=int, default=96, help="held-out samples per family (I2V: n / 6 clips)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grids", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    run(args.only, args.n, args.steps, args.grids)


if __name__ == "__main__":
    main()
