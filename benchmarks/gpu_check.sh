#!/usr/bin/env bash
# The GPU check: one command that answers every speed question in one lease of one H100/H200,
# within 8 minutes including the install (the lease is 15 minutes of device time, its machine's
# start included: room for a rerun of broken steps with --steps), and its rehearsal on a CPU.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (its own python3, torch, Triton)
#   bash benchmarks/gpu_check.sh --rehearse   # the same steps on a CPU, tiny sizes (CI runs it)
#   bash benchmarks/gpu_check.sh --steps tests,kernels   # some steps only (a rerun of broken ones)
#
# On a GPU, the compile step (torch.compile's trial, measured twice on an H200: 0.63x and 0.70x),
# single trials packed, without MPS and through it (1.10x and 2.48x at 8 on an H200), and the
# host cost per layer (1.35x eager's on an H200, before kernels/_eager.py; bench_host.py
# measures it on any machine) run only when --steps names them: the check's minutes go to what
# is still open (stacks of seeds packed through MPS are what Table 6's projection takes), and a
# second call can take them (--steps host,packing).
#
# Steps, each under a time limit, each appending its rows to a CSV in $OUT as it goes (a step cut
# short keeps what it measured): the GPU tests; the trial loop against a plain and a hand-tuned
# loop, with the kernels and CUDA graphs (bench_trial.py; torch.compile in the compile step); the
# fused kernels alone on every ResNet-50 and ResNet-56 shape in bf16 channels_last
# (bench_batch_norm_act.py), and each of their kernels alone against a copy, with the split and
# warps varied (bench_kernel_passes.py); 5 seeds of ResNet-20 and -110 trained as one stacked
# model (grouped convolutions, and dense block-diagonal ones) against one (bench_seed_stack.py);
# 1 and 4 such stacks of 5 seeds packed on the device, through MPS where the driver has it (and
# opt-in, 1, 4 and 8 single trials: bench_packing.py); the loader against the step, and
# training fed by it (bench_loader.py); the host cost per layer (bench_host.py,
# optional: run when present); and in the rehearsal only, the kernels compiled for sm_90 by the
# machine's Triton, with no GPU. Every
# benchmark warms up (Triton's JIT, torch.compile, cuDNN) outside its timed region. Then
# benchmarks/gpu_summary.py writes $OUT/summary.md: every ratio against its goal and Table 6
# projected. Exits 1 when a step failed or wrote no rows. $OUT defaults to a new temporary folder.
# --pack-into FOLDER keeps FOLDER/gpu_check.tar.gz (all of $OUT) current after every step and
# copies summary.md there: two files, for a machine that hands back only a few (the device tool's
# limit is 8; $OUT holds more).
#
# The toolkit is copied afresh into a new folder each run and put first on PYTHONPATH: no build
# backend (setuptools) is involved, the machine's torch and Triton are used as they are, and no
# code from an earlier run can linger. Wheels in .whl/, for a package the machine lacks, go there too.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

rehearse=0 pack="" only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) rehearse=1; shift ;;
        --pack-into) [ $# -ge 2 ] || { echo "gpu_check: --pack-into needs a folder" >&2; exit 2; }
                     pack=$2; shift 2 ;;
        --steps) [ $# -ge 2 ] || { echo "gpu_check: --steps needs a comma list" >&2; exit 2; }
                 only=",$2,"; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--rehearse] [--pack-into FOLDER]" \
                "[--steps NAME,...]" \
                "(got: $1)" >&2; exit 2 ;;
    esac
done
out="${OUT:-$(mktemp -d -t gpu-check.XXXXXX)}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "$pack" ] && [ "$(mkdir -p "$pack" && cd "$pack" && pwd)" = "$out" ]; then
    echo "gpu_check: --pack-into $pack is \$OUT itself; name another folder" >&2; exit 2
fi
# A rehearsal that shares its CPUs (CI runs it beside the tests) may run
# several times slower without hanging: GPU_CHECK_SLOWDOWN=N gives the budget and every step's
# limit N times their seconds (only a rehearsal: a lease's limits are the device's).
slowdown=${GPU_CHECK_SLOWDOWN:-1}
if ! [[ "$slowdown" =~ ^[1-9][0-9]?$ ]] || { [ "$rehearse" = 0 ] && [ "$slowdown" != 1 ]; }; then
    echo "gpu_check: GPU_CHECK_SLOWDOWN=$slowdown: a whole number from 1 to 99, and only with" \
        "--rehearse" >&2; exit 2
fi
if [ "$rehearse" = 1 ]; then
    python="${PYTHON:-$( [ -x .venv/bin/python ] && echo "$repo/.venv/bin/python" || echo python3)}"
    # seconds for all steps: the rehearsal stays under 10 minutes on two idle cores
    budget=$((540 * slowdown))
else
    python="${PYTHON:-python3}"
    budget=460  # steps' seconds: with the copy, the summary and the machine check, 8 minutes
fi
export PYTHONUNBUFFERED=1
# The rows' commit: from git where the checkout has it, else as the caller set it (a copy of the
# working tree travels without .git): RESNET_ABLATE_COMMIT=abc1234 bash benchmarks/gpu_check.sh
commit=$(git rev-parse --short HEAD 2>/dev/null) && export RESNET_ABLATE_COMMIT=$commit
echo "gpu_check: writing to $out$([ "$rehearse" = 1 ] && echo ' (rehearsal on a CPU)')"

# A fresh copy of the toolkit, laid out as it installs (kernels/ becomes resnet_ablate.kernels).
site=$(mktemp -d -t resnet-ablate-site.XXXXXX)
trap 'rm -rf "$site"' EXIT
cp -r resnet_ablate "$site/resnet_ablate" && rm -rf "$site/resnet_ablate/kernels" \
    && cp -r kernels "$site/resnet_ablate/kernels" || exit 1
find "$site" -name __pycache__ -prune -exec rm -rf {} +
wheels=$(compgen -G ".whl/*.whl")
if [ -n "$wheels" ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        $wheels || exit 1
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

{
    if [ "$rehearse" = 0 ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    # From another folder: the source tree's own resnet_ablate/ would shadow the copy.
    cd /tmp && $python -c "import torch, triton, resnet_ablate, platform
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(gpu, '| cpu', platform.machine(), '|', __import__('os').cpu_count(), 'cores')
print('torch', torch.__version__, '| triton', triton.__version__, '| python', platform.python_version())
print('resnet_ablate from', resnet_ablate.__file__)"
    cd "$repo"
} >"$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; exit 1; }
cat "$out/machine.txt"
grep -q "^resnet_ablate from $site/" "$out/machine.txt" || {
    echo "gpu_check: resnet_ablate was not imported from the fresh copy in $site" >&2; exit 1; }

rows_in() {  # data rows of a CSV, test cases of a JUnit XML file, 0 when absent
    case "$1" in
        *.xml) [ -f "$1" ] && grep -o "<testcase " "$1" | wc -l || echo 0 ;;
        *.jsonl) [ -f "$1" ] && wc -l <"$1" || echo 0 ;;
        *) [ -f "$1" ] && echo $(( $(wc -l <"$1") - 1 )) || echo 0 ;;
    esac
}
echo "step,exit_code,seconds,rows,file" >"$out/steps.csv"
started_all=$SECONDS
step() {  # step NAME LIMIT FILE COMMAND...: time-limited, logged to $out/NAME.log, then recorded
    local name=$1 limit=$2 file=$3; shift 3
    if { [ -n "$only" ] && [[ "$only" != *",$name,"* ]]; } \
            || { [ -z "$only" ] && [[ "$opt_in" == *",$name,"* ]]; }; then
        echo "$name,not selected,0,0,$(basename "$file")" >>"$out/steps.csv"
        return
    fi
    local left=$((budget - (SECONDS - started_all)))
    limit=$((limit * slowdown))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: no time left in the ${budget}s budget"
        echo "$name,no time,0,0,$(basename "$file")" >>"$out/steps.csv"
        return
    fi
    echo "== $name (limit ${limit}s)"
    local before started=$SECONDS
    before=$(rows_in "$file")
    # (-k: a step stuck in a driver call or ignoring SIGTERM is killed 10 s later, not left to
    # hold the whole check until the device's own limit)
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    local rows=$(( $(rows_in "$file") - before ))
    echo "== $name: exit $rc after $((SECONDS - started)) s, $rows rows in $(basename "$file")"
    echo "$name,$rc,$((SECONDS - started)),$rows,$(basename "$file")" >>"$out/steps.csv"
    pack_results
}
pack_results() {  # with --pack-into: everything so far, in one file that a cut run leaves behind
    [ -z "$pack" ] || { mkdir -p "$pack" && tar czf "$pack/gpu_check.tar.gz" -C "$out" .; }
}

cd "$repo/benchmarks"  # the benchmarks import their shared _results.py from here
if [ "$rehearse" = 1 ]; then
    device=cpu
    trial_args=(--small --cases resnet20-8px resnet56-8px)
    compile_args=(--small --cases resnet20-8px --compile-backend aot_eager)
    kernel_args=(--small --layouts channels_last --compile-backend aot_eager --reps 2)
    passes_args=(--small)
    # The trial step's depths, and 110 for its stacked seeds' rate per seed (SeedSGD)
    stack_args=(--small --depths 20 56 110 --convolutions grouped dense)
    packing_args=(--small --depth 20 --trials 1 2)
    stacks_args=(--small --depth 20 --trials 1 2 --stack-seeds 2)
    loader_args=(--image-size 32 --batch-size 8 --batches 2 --workers 0 1 --depth 18)
    host_args=(--models resnet56 --layouts channels_last --launches stand-in --iterations 20
               --blocks 2)
    # A step's limit here only catches a hang (the budget bounds the whole): each about twice
    # what it takes on two idle cores, so that a loaded machine does not fail a working step
    # (seed_stack ran past 60 s on one).
    limits=(120 120 120 90 120 90 90 120 120 120)
else
    device=cuda
    # The hand-tuned loops' ratios from ResNet-20 and -56; ResNet-110 for Table 6's line
    trial_args=(--cases resnet20-cifar resnet56-cifar resnet110-cifar
                --tuned-cases resnet20-cifar resnet56-cifar)
    compile_args=(--cases resnet20-cifar)  # the smallest net: the shortest compile
    kernel_args=(--shape-set resnet --dtypes bf16 --layouts channels_last --reps 5)
    passes_args=()
    # ResNet-20 and -110, the ends of Table 6's depths (the projection draws the line between)
    stack_args=(--depths 20 110 --seeds 1 5 --convolutions grouped dense)
    # With CUDA graphs, as the Table 6 projection runs each trial (its fastest variant); 2 trials
    # at once were never the fastest packing (H200: 1.26x with MPS off, 1.60x on)
    # Two epochs each: a run is timed from the first's end (bench_packing.py)
    packing_args=(--depth 56 --epochs 2 --trials 1 4 8 --cuda-graphs)
    # Table 6 as a study with stack_seeds 5 runs it: a stack of 5 seeds per depth, 5 stacks
    # (4 at once measured).
    stacks_args=(--depth 56 --epochs 2 --train-images 5120 --trials 1 4 --cuda-graphs
                 --stack-seeds 5)
    # The specs' 6 workers per GPU and 12 of the machine's 16 cores, each timed over three
    # rounds of 12 batches after the workers' first
    loader_args=(--image-size 224 --batch-size 64 --batches 48 --workers 6 12 --depth 50
                 --decode-seconds 1)
    host_args=(--device cuda --layouts channels_last --iterations 50 --blocks 3)
    # Seconds per step: tests, trial, kernels, kernel_passes, packing (and packing_mps), loader,
    # host, trial_compile, seed_stack, packing_stacks. An H200 took 99 for 28 tests (now 32),
    # 125 for the trial at twice the images a case now trains (and ResNet-110's hand-tuned
    # loops), 69, 26, 60+ for 1, 2 and 4 single trials of one epoch, 31 for the loader (now two
    # passes a case, at more batches), 25 and 54 in the second lease; seed_stack and
    # packing_stacks not yet run. The default steps' limits add up to the budget; the host's
    # step (measured in the second lease, and by bench_host.py on any machine) and the
    # single-trial packings are opt-in.
    limits=(120 95 65 30 75 50 30 50 45 55)
fi
# The loader benchmark's decode figures (crops/s per core), where its version measures them.
if grep -q -- "--decode-csv" bench_loader.py; then
    loader_args+=(--decode-csv "$out/loader_decode.csv")
    [ "$rehearse" = 1 ] && loader_args+=(--decode-seconds 0.2)
fi
# Steps a GPU run takes only when --steps names them (the rehearsal takes every step).
opt_in=""
[ "$device" = cuda ] && opt_in=",trial_compile,packing,packing_mps,host,"
eager_variants=(plain tuned tuned+kernels project)
[ "$device" = cuda ] && eager_variants+=(project+graphs)

# From another folder, so that the fresh copy, not the source tree, is imported. Every test runs
# (no -x): one lease should name every failure, not the first. Each test's verdict is logged as
# it ends (-v): the JUnit file is written only at the end, which a cut step never reaches; and
# each test's time (--durations). Four test processes where pytest-xdist is installed (the GPU
# machine has it): most of the step is Triton compiling the kernels of a cold cache (an audit
# counted ~150 binaries, a second or so each), which a process at a time did in series (the
# first lease's step ran past 90 s, and the tests are more now). The files never run on a GPU
# first.
xdist=()
$python -c "import xdist" 2>/dev/null && xdist=(-n 4 --dist load)
step tests "${limits[0]}" "$out/tests.xml" bash -c "cd /tmp && '$python' -m pytest -v \
    ${xdist[*]-} --durations=0 -p no:cacheprovider -m gpu --junitxml='$out/tests.xml' \
    --rootdir '$repo' -c '$repo/pyproject.toml' '$repo/tests/test_seed_stack.py' \
    '$repo/tests/test_device_decode.py' '$repo/tests/test_train.py' \
    '$repo/tests/test_kernels.py' '$repo/tests/test_kernel_tuning.py' \
    '$repo/tests/test_models.py'"
step trial "${limits[1]}" "$out/trial.csv" $python bench_trial.py --device $device --repeats 1 \
    "${trial_args[@]}" --variants "${eager_variants[@]}" --csv "$out/trial.csv"
step kernels "${limits[2]}" "$out/batch_norm_act.csv" $python bench_batch_norm_act.py \
    "${kernel_args[@]}" --csv "$out/batch_norm_act.csv"
step kernel_passes "${limits[3]}" "$out/kernel_passes.csv" $python bench_kernel_passes.py \
    "${passes_args[@]}" --csv "$out/kernel_passes.csv"
step seed_stack "${limits[8]}" "$out/seed_stack.csv" $python bench_seed_stack.py \
    --device $device "${stack_args[@]}" --csv "$out/seed_stack.csv"
step packing "${limits[4]}" "$out/packing.csv" $python bench_packing.py --device $device \
    "${packing_args[@]}" --csv "$out/packing.csv"
# On a GPU whose driver has CUDA's Multi-Process Service, packings go through it (processes
# otherwise time-slice the GPU, which held 8 graph-replayed trials to 1.10x one): stacks of seeds
# packed side by side, and (opt-in, measured before) single trials. Where a process cannot start
# CUDA through it, bench_packing.py measures without it and its rows say so.
mps=()
[ "$device" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null && mps=(--mps)
step packing_stacks "${limits[9]}" "$out/packing.csv" $python bench_packing.py --device $device \
    "${stacks_args[@]}" ${mps[@]+"${mps[@]}"} --csv "$out/packing.csv"
step loader "${limits[5]}" "$out/loader.csv" $python bench_loader.py --device $device \
    "${loader_args[@]}" --csv "$out/loader.csv"
if [ ${#mps[@]} -gt 0 ]; then
    step packing_mps "${limits[4]}" "$out/packing.csv" $python bench_packing.py --device cuda \
        "${packing_args[@]}" --mps --csv "$out/packing.csv"
else
    echo "packing_mps,skipped,0,0,packing.csv" >>"$out/steps.csv"
fi
# Optional: the host cost per layer of the kernels' Python path, when its benchmark exists.
if [ -f bench_host.py ]; then
    step host "${limits[6]}" "$out/host.csv" $python bench_host.py "${host_args[@]}" \
        --csv "$out/host.csv"
else
    echo "host,skipped,0,0,host.csv" >>"$out/steps.csv"
fi
# torch.compile against the eager project loop, side by side in one run (its compile time,
# reported apart, falls outside the timed region).
step trial_compile "${limits[7]}" "$out/trial.csv" $python bench_trial.py --device $device \
    --repeats 1 "${compile_args[@]}" --variants plain project project+compile \
    --csv "$out/trial.csv"

# Rehearsal only (on a GPU every step compiles the kernels for real): this Triton compiles them
# for sm_90 with no GPU, one launch a line, for a seventh of the (ResNet epilogue, layout) pairs
# that tests/compile_kernels_for_hopper.py knows (a shard of an odd count takes both layouts: row
# and span kernels, with a residual and without).
if [ "$rehearse" = 1 ]; then
    step compile_sm90 60 "$out/sm90_launches.jsonl" bash -c "cd /tmp && env -u TRITON_INTERPRET \
        '$python' '$repo/tests/compile_kernels_for_hopper.py' 0 7 >>'$out/sm90_launches.jsonl'"
fi

echo "== all steps: $((SECONDS - started_all)) s"
$python gpu_summary.py "$out" --check
status=$?
pack_results
[ -z "$pack" ] || cp "$out/summary.md" "$pack/"
exit $status
