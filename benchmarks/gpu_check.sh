#!/usr/bin/env bash
# The CUDA path in one call of a lent GPU machine, for a session that has one: the test suite
# with CUDA present (so every "auto" device is the GPU), the faces hierarchy end to end from the
# command line (train in bf16, eval, levels, extract, a prior per level, sample, compress and
# decompress), and the quantizer and sampling benchmarks on the device.
#
#   bash benchmarks/gpu_check.sh [tests] [e2e] [bench] [batch32]   # default: the first three
#
# batch32 trains the same model for the same time at batch 32 and evaluates it: the README's
# batch 8 is the CPU's best, and a GPU at batch 8 waits on kernel launches.
#
# Settings (environment): OUT, where the logs and pictures go (default /tmp/gpu-check; at most
# eight files, so that a device call brings them all back); WHEELS, a folder of wheels installed
# first into /tmp/site (the machine has no registry: constriction, pytorch-msssim and, for the
# quantizer benchmark's peer, vector-quantize-pytorch with its needs); FACES, a folder of face
# photos (a copy of ../shared/data/faces: the machine does not see ../shared); BUDGET, the
# seconds of stage-1 training (default 60) and PRIOR_BUDGET each prior's (default 15).
set -u
OUT=${OUT:-/tmp/gpu-check}
FACES=${FACES:-.gpudata/faces}
BUDGET=${BUDGET:-60}
PRIOR_BUDGET=${PRIOR_BUDGET:-15}
RUNS=/tmp/gpu-check-runs
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rm -rf "$RUNS" && mkdir -p "$RUNS"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
LOG=$OUT/log.txt
: >"$LOG"
SECTIONS=${*:-tests e2e bench}

# step NAME LIMIT CMD...: run CMD under a time limit, its output into the log, one summary line.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    printf '%-16s rc %3d %4d s  %s\n' "$name" "$rc" $((SECONDS - start)) \
        "$(grep -v '^\s*$' "$LOG" | tail -1 | cut -c1-160)"
}

VQKIT="python3 -m vqkit"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if [[ " $SECTIONS " == *" tests "* ]]; then
    start=$SECONDS
    timeout 150 python3 -m pytest -q -p no:cacheprovider -n 16 -rfE tests >"$OUT/pytest.txt" 2>&1
    echo "tests: rc $? in $((SECONDS - start)) s"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -40
fi

if [[ " $SECTIONS " == *" e2e "* ]]; then
    R=$RUNS/faces
    step train $((BUDGET + 90)) $VQKIT train --preset faces-3level --data "folder:$FACES" --image-size 128 \
        --lr 1e-3 --batch-size 8 --time-budget "$BUDGET" --no-tensorboard -o $R
    step eval 120 $VQKIT eval $R
    step levels 60 $VQKIT levels $R -o "$OUT/levels.png"
    step extract 120 $VQKIT extract $R --split train -o $RUNS/codes
    step prior-top $((PRIOR_BUDGET + 60)) $VQKIT train-prior $RUNS/codes/top --time-budget "$PRIOR_BUDGET" \
        --no-tensorboard -o $RUNS/p-top
    step prior-middle $((PRIOR_BUDGET + 60)) $VQKIT train-prior $RUNS/codes/middle --cond $RUNS/codes/top \
        --time-budget "$PRIOR_BUDGET" --no-tensorboard -o $RUNS/p-middle
    step prior-bottom $((PRIOR_BUDGET + 60)) $VQKIT train-prior $RUNS/codes/bottom --cond $RUNS/codes/top \
        --cond $RUNS/codes/middle --time-budget "$PRIOR_BUDGET" --no-tensorboard -o $RUNS/p-bottom
    step sample 120 $VQKIT sample $RUNS/p-top $RUNS/p-middle $RUNS/p-bottom -n 16 --compare-uniform \
        -o "$OUT/samples.png"
    photo=$(ls "$FACES" | head -1)
    step compress 120 $VQKIT compress $R "$FACES/$photo" --prior $RUNS/p-top --prior $RUNS/p-middle \
        --prior $RUNS/p-bottom -o $RUNS/face.vq
    step decompress 120 $VQKIT decompress $R $RUNS/face.vq --prior $RUNS/p-top --prior $RUNS/p-middle \
        --prior $RUNS/p-bottom -o $RUNS/face.png
    ls -l $RUNS/face.vq $RUNS/face.png >>"$LOG" 2>&1
fi

if [[ " $SECTIONS " == *" batch32 "* ]]; then
    step train-b32 $((BUDGET + 90)) $VQKIT train --preset faces-3level --data "folder:$FACES" --image-size 128 \
        --lr 1e-3 --batch-size 32 --time-budget "$BUDGET" --no-tensorboard -o $RUNS/faces-b32
    step eval-b32 120 $VQKIT eval $RUNS/faces-b32
    sed -n '/^=== eval-b32/,$p' "$LOG" | tr '\r' '\n' | grep -E "used, perplexity" | cut -c1-200
fi

if [[ " $SECTIONS " == *" bench "* ]]; then
    step quantizers 300 python3 benchmarks/bench_quantizers.py --device cuda --repeats 10 --vq-ks 1024 8192
    sed -n '/^=== quantizers/,$p' "$LOG" | grep "^|"
    # vqkit's distance block was sized for a CPU's cache; on the H200 (2026-12-04) VQ ran 3-5x
    # slower than vector-quantize-pytorch's one full matrix, in many small launches.
    step chunks 200 python3 benchmarks/bench_quantizers.py --device cuda --repeats 10 --vq-ks 1024 8192 \
        --variants vq vq-rotation --chunk-elements 20 22 24 26
    sed -n '/^=== chunks/,$p' "$LOG" | grep "^|"
    step sampling 90 python3 benchmarks/bench_sampling.py --device cuda --sizes 8 16 32 --naive-positions 16
    sed -n '/^=== sampling/,$p' "$LOG" | tail -12
fi
