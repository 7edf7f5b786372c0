#!/usr/bin/env bash
# The one prepared GPU run (docs/kernels.md): the kernel tests on CUDA with bf16 added, then the
# benchmark tables (benchmarks/results/DATE-DEVICE-kernels.md for RMSNorm/SwiGLU/RoPE and
# DATE-DEVICE-mla-moe.md for MLA attention, MLA decoding and the MoE layer), then whole training steps
# (DATE-DEVICE-train-e2e.md: ours beside transformers + SDPA and + Liger-Kernel). Each part has its own
# time limit; together they stay under the device tool's 10 minutes per command (the end-to-end table is
# written after every row, so a part cut short keeps what it measured).
#
#   bash benchmarks/gpu_suite.sh            # from the repository root, on the GPU machine
#
# The GPU image has torch, triton and transformers but no network: pure-Python wheels it may lack
# (pytest, liger-kernel for the baseline) are taken from .cache/wheels, filled here by `make gpu-wheels`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=.cache/wheels
OUT=${OUT:-benchmarks/results}

have() { "$PY" -c "import $1" 2>/dev/null; }
if ! have pytest; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" pytest; fi
if ! have liger_kernel && compgen -G "$WHEELS/liger_kernel-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-deps "$WHEELS"/liger_kernel-*.whl || echo "liger-kernel: not installable here"
fi
export TRITON_INTERPRET=0  # compiled kernels on the GPU (the tests' conftest only sets it when unset)
"$PY" - <<'PY'
import torch, triton
print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
PY
start=$(date +%s)
timeout 150 "$PY" -m pytest tests/kernels -q -p no:cacheprovider || echo "kernel tests: FAILED (see above)"
echo "kernel tests: $(( $(date +%s) - start )) s"
timeout 130 "$PY" -m benchmarks.kernels --out "$OUT" || echo "benchmarks.kernels: did not finish"
timeout 120 "$PY" -m benchmarks.kernels_mla_moe --out "$OUT" || echo "benchmarks.kernels_mla_moe: did not finish"
timeout 160 "$PY" -m benchmarks.train_e2e --warmup 2 --steps 5 --out "$OUT" || echo "benchmarks.train_e2e: did not finish"
echo "suite: $(( $(date +%s) - start )) s"
