#!/usr/bin/env bash
# Wheels of the pure-Python dependencies that a bare GPU machine may lack (fvcore and what it
# imports: iopath, yacs, termcolor, tabulate, portalocker, tqdm), built here into .whl/ (ignored by
# git) for benchmarks/gpu_check.sh to install there. Torch, Triton, numpy, pandas, scikit-learn,
# matplotlib and pyyaml are expected on that machine already.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath yacs termcolor \
    tabulate portalocker tqdm
ls .whl
