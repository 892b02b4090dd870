#!/usr/bin/env bash
# The GPU check, sized for a short device lease: run from the repository root on a CUDA machine.
#
#   benchmarks/device_check.sh core     CUDA tests, eager bench (reference vs fast), ops + loss suites
#   benchmarks/device_check.sh extra    regionally compiled bench (reference, eager and compiled in
#                                       one run), 24 GiB memory sweep,
#                                       native CUDA build + tests
#   benchmarks/device_check.sh all      core and extra
#   benchmarks/device_check.sh graph    whole-graph torch.compile of both terms (its compilation
#                                       outran 190 s on an H200)
#   benchmarks/device_check.sh verify   the standing check on HEAD (records the commit): first the
#                                       CUDA tests of the training-loop patterns (autocast +
#                                       GradScaler, CUDA graphs by default with several forwards
#                                       before one backward), then every CUDA test file, then
#                                       reference / fast / fast-fused / fast-graphed at batch 8
#
# Needs the guided-diffusion-sdk wheel in .whl/ (pip wheel --no-deps guided-diffusion-sdk -w .whl)
# where the machine cannot reach a package index. Keeps logs and JSON in a scratch folder and packs
# them into $OUT/device_check.tar.gz after every step (default OUT: ./out), so that a run stopped
# from outside still returns what it measured; prints a short table last. BUDGET_S (seconds, 0 for
# none) shortens or skips the steps that would end past it, so the script ends inside the lease.
set -uo pipefail
part=${1:-all}
OUT=${OUT:-$PWD/out}
budget=${BUDGET_S:-0}
raw=$(mktemp -d)/raw
mkdir -p "$OUT" "$raw"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

pack() { tar -czf "$OUT/device_check.tar.gz" -C "$(dirname "$raw")" raw; }

step() {  # step NAME TIMEOUT_S CMD...: run one step, log it, never stop the script
  local name=$1 limit=$2; shift 2
  if (( budget > 0 )); then
    local left=$((budget - SECONDS - 10))
    if (( left < 15 )); then echo "$name skipped: ${left}s left" | tee -a "$raw/steps.txt"; return; fi
    (( limit > left )) && limit=$left
  fi
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$raw/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$raw/steps.txt"
  tail -n 4 "$raw/$name.log" | sed -e '$a\'
  pack
}

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$raw/env.txt" 2>&1
head -n 20 "$raw/env.txt"

quick=(--batch-sizes 8 --repeats 5 --warmup 2)
if [[ $part == core || $part == all ]]; then
  step tests_cuda 180 python3 -m pytest tests/test_cuda.py tests/test_ops.py -q -x -p no:cacheprovider
  step bench_eager 180 python3 -m diffloss_fast bench --batch-sizes 1 4 8 \
    --variants reference fast --terms both semantic --json "$raw/bench_eager.json"
  if ! grep -q "bench_eager rc=0" "$raw/steps.txt"; then  # keep a measurement if Triton fails
    step bench_eager_torch_ops 150 python3 -m diffloss_fast bench --batch-sizes 8 \
      --variants reference fast --terms both semantic --backend torch --json "$raw/bench_torchops.json"
  fi
  step suite_ops 50 python3 -m pytest benchmarks/test_bench_ops.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$raw/suite_ops.json"
  step suite_loss 100 python3 -m pytest benchmarks/test_bench_loss.py --benchmark-only -q \
    -p no:cacheprovider -k "not compiled" --benchmark-json "$raw/suite_loss.json"
fi

if [[ $part == extra || $part == all ]]; then
  # The native CUDA build runs on the CPU while the GPU is busy timing.
  ( timeout 300 python3 -c "from diffloss_fast.ops.native import native_available as a; print('native built:', a())" \
      >"$raw/native_build.log" 2>&1 ) &
  build=$!
  step bench_compiled 300 python3 -m diffloss_fast bench "${quick[@]}" --compile regional \
    --variants reference fast fast-compiled --terms both semantic --json "$raw/bench_compiled.json"
  step memory 150 python3 -m diffloss_fast memory --cap-gib 24 --json "$raw/memory.json" \
    --plot "$raw/memory.png"
  wait $build
  step tests_native 35 python3 -m pytest tests/test_native.py tests/test_cuda.py::test_cuda_backends_match_torch \
    -q -p no:cacheprovider -k "cuda or backends"
fi

if [[ $part == verify ]]; then
  git rev-parse HEAD >"$raw/commit.txt" 2>/dev/null || echo "${COMMIT:-unknown}" >"$raw/commit.txt"
  step tests_training_loop 120 python3 -m pytest tests/test_training_loop.py tests/test_cuda_graph.py \
    -q -p no:cacheprovider
  step tests_cuda_all 240 python3 -m pytest tests/test_cuda.py tests/test_fused_norm.py \
    tests/test_group_norm_silu.py tests/test_memory.py tests/test_ops.py tests/test_resample_2x.py \
    tests/test_residual_bias_add.py -q -p no:cacheprovider
  step bench 150 python3 -m diffloss_fast bench "${quick[@]}" \
    --variants reference fast fast-fused fast-graphed --terms both semantic \
    --json "$raw/bench_b8.json"
fi

if [[ $part == graph ]]; then  # whole-graph compilation of both terms: minutes to compile
  step bench_graph 450 python3 -m diffloss_fast bench "${quick[@]}" \
    --variants reference fast-compiled --terms both --compile graph --json "$raw/bench_graph.json"
fi

pack
echo "=== steps"; cat "$raw/steps.txt"
for f in "$raw"/bench*.log; do [[ -f $f ]] && { echo "=== $(basename "$f")"; grep -v "bench:" "$f" | tail -n 22; }; done
for f in "$raw"/profile*.log; do [[ -f $f ]] && { echo "=== $(basename "$f")"; grep -A 12 "device busy" "$f"; grep -A 5 "launched from" "$f" | cut -c1-200; }; done
for f in "$raw"/convs*.log; do [[ -f $f ]] && { echo "=== $(basename "$f")"; grep -A 8 "convolutions alone" "$f"; }; done
for f in "$raw"/memory*.log; do [[ -f $f ]] && { echo "=== $(basename "$f")"; tail -n 12 "$f"; }; done
exit 0
