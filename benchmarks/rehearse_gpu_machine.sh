#!/usr/bin/env bash
# The GPU check's rehearsal with the GPU machine's own PyTorch and Triton (CI runs it).
#
#   bash benchmarks/rehearse_gpu_machine.sh [VENV]
#   bash benchmarks/rehearse_gpu_machine.sh --setup-only [VENV]   # build VENV, rehearse nothing
#
# The GPU check runs on the machine's python3 as it is: Python 3.12, an older PyTorch and Triton
# than this project develops on, and none of Ray, Optuna or fvcore (benchmarks/gpu_machine.txt).
# A check that passes on the development versions can fail there on the first line of every step,
# and a lease is too short to find out. This builds a virtual environment with exactly those
# versions and packages in VENV (default .cache/gpu-machine-venv; later runs reuse it), on Python
# 3.12 where this machine has one (else on python3, saying so), then runs `gpu_check.sh
# --rehearse` in it; $OUT (and GPU_CHECK_SLOWDOWN) passed through. Exits as the rehearsal
# does. (CI runs it beside its tests, at the lowest priority: they mostly wait.)
set -euo pipefail
cd "$(dirname "$0")/.."
setup_only=false
if [ "${1:-}" = --setup-only ]; then setup_only=true; shift; fi
venv="${1:-.cache/gpu-machine-venv}"

python_3_12() {  # a Python 3.12 that runs: on the PATH, or one that pyenv keeps off it
    local candidate
    for candidate in python3.12 $(compgen -G "$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12"); do
        "$candidate" -c "" 2>/dev/null && { echo "$candidate"; return; }
    done
    echo "rehearse_gpu_machine: no Python 3.12 here; building on python3 instead" >&2
    echo python3
}
[ -x "$venv/bin/python" ] || "$(python_3_12)" -m venv "$venv"
# The file pins torch and Triton: an unpinned torch would pull the newest build. --no-compile:
# pip byte-compiles every file it installs (5 GB, CUDA libraries included), 105 s of CPU where the
# install takes 52 s without; the rehearsal imports a small part of it, compiled as imported.
"$venv/bin/python" -m pip install --quiet --no-compile -r benchmarks/gpu_machine.txt
"$venv/bin/python" -c "import sys, torch, triton; print('gpu-machine rehearsal: python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
$setup_only || PYTHON="$venv/bin/python" exec bash benchmarks/gpu_check.sh --rehearse
