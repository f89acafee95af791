"""Every benchmark in one go (`make bench`): each script prints its own tables, ratios against a baseline of its run.

    python bench/run_all.py                      # the CPU sizes the docs report for this machine class
    python bench/run_all.py --device cuda        # SD1.5 sizes on a GPU (bench/gpu_session.sh is the short-lease form)
    python bench/run_all.py --only compiled e2e  # some of them

A script that fails is reported and the rest still run; the exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (arguments on a CPU, arguments on a GPU)
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "stack": (["bench_stack.py", "--size", "tiny"], ["bench_stack.py", "--size", "sd15"]),
    "ip": (["bench_ip_adapter.py", "--size", "tiny"], ["bench_ip_adapter.py", "--size", "sd15"]),
    "agd": (["bench_agd.py", "--size", "tiny", "--part", "speed,disk"], ["bench_agd.py", "--size", "sd15",
                                                                          "--part", "speed,train,disk"]),
    "ctrl": (["bench_ctrl_adapter.py", "--size", "tiny"], ["bench_ctrl_adapter.py", "--size", "sd15"]),
    "i2v": (["bench_i2v_adapter.py", "--size", "tiny"], ["bench_i2v_adapter.py", "--size", "mid"]),
    "compiled": (["bench_compiled.py", "--size", "tiny", "--latent", "8", "--iters", "3"],
                 ["bench_compiled.py", "--size", "sd15"]),
    "e2e": (["bench_end_to_end.py", "--size", "tiny", "--steps", "4", "--iters", "2"],
            ["bench_end_to_end.py", "--size", "sd15"]),
    "quality": (["quality.py", "--n", "16"], ["quality.py"]),
    "host": (["bench_host.py", "--size", "sd15"], ["bench_host.py", "--size", "sd15"]),
}
ON_THEIR_OWN = ("quality", "host")  # the shipped toy models on the CPU; the meta device (no --device argument)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="run these (default: all)")
    args = ap.parse_args(argv)
    failed = []
    for name in args.only or list(RUNS):
        script, *rest = RUNS[name][args.device == "cuda"]
        cmd = [sys.executable, str(BENCH / script), *rest]
        if name not in ON_THEIR_OWN:
            cmd += ["--device", args.device]
        print(f"\n## {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, cwd=BENCH.parent)
        print(f"## {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"\n{len(failed)} failed: {', '.join(failed)}" if failed else "\nall benchmarks ran", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
