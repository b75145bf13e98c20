#!/usr/bin/env bash
# The GPU check: the GPU tests, then the epilogue, train-step and trial benchmarks, each writing
# its CSV under $OUT (or benchmarks/results/ when OUT is unset). Sized to finish in about 8
# minutes on one H100-class GPU; every step prints its progress.
#
#   bash benchmarks/gpu_check.sh
#
# On a machine that lacks some of the toolkit's pure-Python dependencies (fvcore and its needs),
# put their wheels in .whl/ first (benchmarks/gpu_wheels.sh does, on a machine with pip access).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
repo=$PWD
export PYTHONUNBUFFERED=1
python=python3

# The toolkit (and any carried wheels) go into a private folder, never over the machine's torch.
site=/tmp/resnet-ablate-site
$python -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir \
    --target "$site" . $(compgen -G ".whl/*.whl") || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" | tee -a "$out/gpu.txt"

status=0
step() {  # step NAME TIMEOUT COMMAND...: run with a time limit, log to $out/NAME.log, keep going
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

# From another folder, so that the installed package, not the source tree, is imported.
step tests 150 bash -c "cd /tmp && $python -m pytest -q -x -p no:cacheprovider -m gpu \
    --rootdir '$repo' -c '$repo/pyproject.toml' \
    '$repo/tests/test_kernels.py' '$repo/tests/test_train.py' '$repo/tests/test_models.py'"
# Each benchmark appends its rows as it goes, so a step cut short keeps what it measured.
step bench_trial 140 $python benchmarks/bench_trial.py --device cuda --repeats 1 \
    --variants plain project project+graphs --csv "$out/trial.csv"
step bench_trial_compile 60 $python benchmarks/bench_trial.py --device cuda --repeats 1 \
    --cases resnet56-cifar --variants plain project+compile --csv "$out/trial.csv"
step bench_batch_norm_act 80 $python benchmarks/bench_batch_norm_act.py --dtypes bf16,fp32 \
    --csv "$out/batch_norm_act.csv"
step bench_train_step 50 $python benchmarks/bench_train_step.py --dtype bf16 --channels-last \
    --providers unfused fused compile-fused --iters 20 --warmup 5 --csv "$out/train_step.csv"
step bench_loader 60 $python benchmarks/bench_loader.py --device cuda --image-size 224 \
    --batch-size 64 --batches 8 --workers 2 8 14 --depth 50 --csv "$out/loader.csv"
exit $status
