#!/usr/bin/env bash
# The GPU check's rehearsal with the GPU machine's own PyTorch and Triton (CI runs it).
#
#   bash benchmarks/rehearse_gpu_machine.sh [VENV]
#
# The GPU check runs on the machine's python3 as it is: an older PyTorch and Triton than this
# project develops on, and none of Ray, Optuna or fvcore (benchmarks/gpu_machine.txt). A check
# that passes on the development versions can fail there on the first line of every step, and a
# lease is too short to find out. This builds a virtual environment with exactly those versions
# and packages in VENV (default .cache/gpu-machine-venv; later runs reuse it), then runs
# `gpu_check.sh --rehearse` in it; $OUT is passed through. Exits as the rehearsal does.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.cache/gpu-machine-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# Pinned torch first, from the requirements file: an unpinned one would pull the newest build.
"$venv/bin/python" -m pip install --quiet -r benchmarks/gpu_machine.txt
"$venv/bin/python" -c "import torch, triton; print('gpu-machine rehearsal: torch', torch.__version__, '| triton', triton.__version__)"
PYTHON="$venv/bin/python" exec bash benchmarks/gpu_check.sh --rehearse
