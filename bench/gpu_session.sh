#!/usr/bin/env bash
# Every GPU number of docs/performance.md and the CUDA tests in one short call on a borrowed GPU machine.
#
#   bash bench/gpu_session.sh            # from the repo root; logs and JSON under $OUT (default /tmp/gpu-session)
#   COMPILED_CONFIGS=bare:2,agd:1 SKIP_TESTS=1 SKIP_E2E=1 bash bench/gpu_session.sh   # a shorter lease
#   E2E_EXTRA=--compile-vae bash bench/gpu_session.sh     # extra arguments of bench_end_to_end.py
#   SKIP_COMPILED=1 / SKIP_E2E=1 / SKIP_TESTS=1 leave a part out; *_LIMIT (s) kill a part, *_BUDGET (s) stop it early
#
# The machine has torch but not diffusers: a diffusers wheel in .whl/ is installed to /tmp/site first. The package
# itself is put on the path as links to this checkout (adapter_studio -> studio/ and its subpackages, plus an
# entry-point record for the families), so nothing is built there. Each part has its own time limit and writes as it
# goes: a cut-off run still returns what it measured.
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
ROOT=$(pwd)
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }

stamp environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site
fi
PKG=/tmp/studio-pkg
rm -rf "$PKG" && mkdir -p "$PKG/adapter_studio" "$PKG/adapter_studio-0.1.0.dist-info"
for f in "$ROOT"/studio/*.py; do ln -s "$f" "$PKG/adapter_studio/"; done
for sub in adapters pipelines toyworld train webapp; do ln -s "$ROOT/$sub" "$PKG/adapter_studio/$sub"; done
printf 'Metadata-Version: 2.1\nName: adapter-studio\nVersion: 0.1.0\n' > "$PKG/adapter_studio-0.1.0.dist-info/METADATA"
{ echo '[adapter_studio.families]'; sed -n '/^\[project.entry-points."adapter_studio.families"\]/,/^$/p' pyproject.toml \
    | tail -n +2 | tr -d '"' ; } > "$PKG/adapter_studio-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'PY' || exit 4
import torch, diffusers, transformers
import adapter_studio
from adapter_studio.registry import families
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(), "families", [f.name for f in families()])
assert len(families()) == 4
PY

if [ -z "${SKIP_COMPILED:-}" ]; then
  stamp "bench_compiled (SD1.5 UNet, fp16, inductor + CUDA graphs)"
  timeout "${COMPILED_LIMIT:-300}" $PY bench/bench_compiled.py --device cuda --size sd15 --iters 20 \
    --budget-s "${COMPILED_BUDGET:-210}" --json "$OUT/compiled.json" ${COMPILED_CONFIGS:+--configs "$COMPILED_CONFIGS"}
fi
if [ -z "${SKIP_E2E:-}" ]; then
  stamp "bench_end_to_end (IP + AGD image, 512 px, 25 steps)"
  timeout "${E2E_LIMIT:-190}" $PY bench/bench_end_to_end.py --device cuda --size sd15 --iters 5 \
    --budget-s "${E2E_BUDGET:-140}" --skip-compiled-cfg --breakdown --json "$OUT/e2e.json" ${E2E_EXTRA:-}
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  stamp "CUDA tests"
  timeout "${TESTS_LIMIT:-240}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ip_adapter_cuda.py
fi
stamp done
