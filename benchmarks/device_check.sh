#!/usr/bin/env bash
# The GPU check, sized for a short device lease: run from the repository root on a CUDA machine.
#
#   benchmarks/device_check.sh verify
#       the standing check on HEAD, at most 9 minutes: records the commit, device and versions;
#       every CUDA test file (the four tests no GPU had run first, then the training-loop
#       patterns, then the rest); the baselines and the fast variants at batch 8, both terms and
#       semantic, in one process; the headline rows again in a second process; the 24 GiB
#       memory budget as NVML counts it; the training step of three restoration networks; a
#       20-step `train --amp` with ADM-256 (random weights); then
#       results/<date>-<card>-<short sha>.{json,md} and plots (benchmarks/verify.py)
#   benchmarks/device_check.sh verify-compile
#       at most 9 minutes: the accuracy grid at ADM-256 (check-precision: bf16 and fp16 against
#       fp32, two passes beside); reference-compiled, whole-graph and regional torch.compile of both
#       terms and semantic, beside reference-bf16 and the graphed step, each compilation cut at
#       COMPILE_BUDGET_S (default 75); results/<date>-<card>-<short sha>-compile.{json,md}
#   benchmarks/device_check.sh core     CUDA tests, eager bench, ops + loss suites
#   benchmarks/device_check.sh extra    regionally compiled bench, 24 GiB memory sweep, native CUDA
#                                       build + tests
#   benchmarks/device_check.sh all      core and extra
#   benchmarks/device_check.sh graph    whole-graph torch.compile of both terms, no budget
#   benchmarks/device_check.sh sweep    at most 9 minutes: conv-sweep, each fused norm + convolution
#                                       block of ADM-256 against the library path at batches 1, 4,
#                                       8, 16; the dispatch table goes to $OUT/conv_dispatch.json and
#                                       diffloss_fast/ops/conv_dispatch.json (commit it)
#   benchmarks/device_check.sh fused-precision
#                                       at most 3 minutes: the accuracy grid at ADM-256 with every
#                                       norm + convolution block fused (check-precision
#                                       --fuse-every-block, bf16 and fp8 against fp32)
#
# verify and verify-compile take --dry (or DRY=1): the same pipeline on the CPU with the tiny
# prior at 16x16, batch 1, two timed steps, a 2 s compile budget and one thread, for CI; without
# what needs CUDA: the tests, the memory budget, the fused kernels and CUDA graphs. COMMIT names
# the commit measured where the tree is not a git checkout.
#
# Needs the guided-diffusion-sdk wheel in .whl/ (pip wheel --no-deps guided-diffusion-sdk -w .whl)
# where the machine cannot reach a package index. Keeps logs and JSON in a scratch folder and packs
# them into $OUT/device_check.tar.gz after every step (default OUT: ./out), so that a run stopped
# from outside still returns what it measured; verify's result files go to $OUT/results (and, off
# the dry run, benchmarks/results). BUDGET_S (seconds, 0 for none; verify parts default to 540)
# shortens or skips the steps that would end past it, keeping time to write the results.
set -uo pipefail
part=${1:-all}
dry=0
[[ ${2:-} == --dry || ${DRY:-0} == 1 ]] && dry=1
# one thread on a shared CPU: OpenMP's threads otherwise wait whole time slices for each other
(( dry )) && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-$PWD/out}
py=${PYTHON:-python3}
verify=0
[[ $part == verify || $part == verify-compile ]] && verify=1
if (( verify && ! dry )) || [[ $part == sweep ]]; then budget=${BUDGET_S:-540}; else budget=${BUDGET_S:-0}; fi
reserve=$(( verify ? 40 : 10 ))  # seconds kept for writing the results
scratch=$(mktemp -d)
raw=$scratch/raw
mkdir -p "$OUT" "$raw"
export PYTHONUNBUFFERED=1

if (( ! dry )) && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

pack() { tar -czf "$OUT/device_check.tar.gz" -C "$scratch" raw; }

step() {  # step NAME TIMEOUT_S CMD...: run one step, log it, never stop the script
  local name=$1 limit=$2; shift 2
  if (( budget > 0 )); then
    local left=$((budget - SECONDS - reserve))
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

{ command -v nvidia-smi >/dev/null && nvidia-smi
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  $py -c "import triton; print('triton', triton.__version__)"; } >"$raw/env.txt" 2>&1
head -n 20 "$raw/env.txt"

quick=(--batch-sizes 8 --repeats 5 --warmup 2)
if [[ $part == core || $part == all ]]; then
  step tests_cuda 180 $py -m pytest tests/test_cuda.py tests/test_ops.py -q -x -p no:cacheprovider
  step bench_eager 180 $py -m diffloss_fast bench --batch-sizes 1 4 8 \
    --variants reference-fp32 reference-bf16 fast --terms both semantic --json "$raw/bench_eager.json"
  if ! grep -q "bench_eager rc=0" "$raw/steps.txt"; then  # keep a measurement if Triton fails
    step bench_eager_torch_ops 150 $py -m diffloss_fast bench --batch-sizes 8 \
      --variants reference-fp32 fast --terms both semantic --backend torch --json "$raw/bench_torchops.json"
  fi
  step suite_ops 50 $py -m pytest benchmarks/test_bench_ops.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$raw/suite_ops.json"
  step suite_loss 100 $py -m pytest benchmarks/test_bench_loss.py --benchmark-only -q \
    -p no:cacheprovider -k "not compiled and not regional" --benchmark-json "$raw/suite_loss.json"
fi

if [[ $part == extra || $part == all ]]; then
  # The native CUDA build runs on the CPU while the GPU is busy timing.
  ( timeout 300 $py -c "from diffloss_fast.ops.native import native_available as a; print('native built:', a())" \
      >"$raw/native_build.log" 2>&1 ) &
  build=$!
  step bench_compiled 300 $py -m diffloss_fast bench "${quick[@]}" \
    --variants reference-bf16 fast fast-regional --terms both semantic --json "$raw/bench_compiled.json"
  step memory 150 $py -m diffloss_fast memory --budget-gib 24 --json "$raw/memory.json" \
    --plot "$raw/memory.png"
  wait $build
  step tests_native 35 $py -m pytest tests/test_native.py tests/test_cuda.py::test_cuda_backends_match_torch \
    -q -p no:cacheprovider -k "cuda or backends"
fi

if [[ $part == graph ]]; then  # whole-graph compilation of both terms: minutes to compile
  step bench_graph 450 $py -m diffloss_fast bench "${quick[@]}" \
    --variants reference-bf16 fast-compiled --terms both --compile graph --json "$raw/bench_graph.json"
fi

if [[ $part == sweep ]]; then
  cp diffloss_fast/ops/conv_dispatch.json "$raw/conv_dispatch.json"  # other families' entries stay
  step conv_sweep 480 $py -m diffloss_fast conv-sweep --batches 1 4 8 16 --warmup 2 --repeats 5 \
    --table "$raw/conv_dispatch.json"
  if grep -q "conv_sweep rc=0" "$raw/steps.txt"; then
    cp "$raw/conv_dispatch.json" "$OUT/conv_dispatch.json"
    cp "$raw/conv_dispatch.json" diffloss_fast/ops/conv_dispatch.json
  fi
fi

if [[ $part == fused-precision ]]; then
  step check_precision_fused 170 $py -m diffloss_fast check-precision --prior adm-256-uncond \
    --batch 2 --precisions bf16 fp8 --fuse-every-block --json "$raw/precision_fused.json"
fi

if (( verify )); then
  commit=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
  tree=$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo "with uncommitted changes" || echo "as committed")
  git rev-parse HEAD >/dev/null 2>&1 || tree="not a git checkout"
  echo "commit $commit ($tree)" | tee -a "$raw/steps.txt"
  if (( dry )); then
    size=(--device cpu --prior tiny --resolution 16 --batch-sizes 1)
    timing=(--repeats 2 --warmup 0)
    fast=(fast)  # the fused kernels and CUDA graphs need CUDA
    graphed=fast
    compile_budget=2
    min_repeats=2
  else
    size=(--batch-sizes 8)
    timing=(--repeats 10 --warmup 3)
    fast=(fast fast-fused fast-graphed fast-two-pass fast-fp8)
    graphed=fast-graphed
    compile_budget=${COMPILE_BUDGET_S:-75}
    min_repeats=10
  fi
fi

if [[ $part == verify ]]; then
  weights=$scratch/adm256-random.pt  # outside raw/: 2.2 GB is not packed
  if (( dry )); then
    echo "tests skipped: CUDA (dry run)" | tee -a "$raw/steps.txt"
  else
    # ADM-256 with random weights for the training run, written on the CPU during the tests
    ( timeout 240 $py -c "import sys, torch, diffloss_fast as dl; torch.save(dl.build_prior('adm-256-uncond').state_dict(), sys.argv[1])" \
        "$weights" >"$raw/weights.log" 2>&1 ) &
    writer=$!
    first=(tests/test_fused_norm.py::test_auto_fuses_eager_cuda_steps_only
           tests/test_cuda.py::test_cuda_backends_match_torch
           tests/test_cuda.py::test_cuda_compiled_matches_eager
           tests/test_cuda.py::test_cuda_prior_left_on_the_cpu)
    loop=(tests/test_training_loop.py tests/test_cuda_graph.py)
    # every test file with CUDA tests, but the native extension's (its build is in `extra`)
    rest=()
    for f in $(grep -l -e 'cuda.is_available' -e 'mark.cuda' tests/test_*.py); do
      [[ $f == tests/test_native* || " ${loop[*]} " == *" $f "* ]] || rest+=("$f")
    done
    step tests_first 100 $py -m pytest "${first[@]}" -q -p no:cacheprovider
    step tests_training_loop 60 $py -m pytest "${loop[@]}" -q -p no:cacheprovider
    step tests_cuda_all 150 $py -m pytest "${rest[@]}" "${first[@]/#/--deselect=}" -q -p no:cacheprovider
  fi
  step bench 130 $py -m diffloss_fast bench "${size[@]}" "${timing[@]}" --terms both semantic \
    --variants reference-fp32 reference-tf32 reference-bf16 upstream-fp16 "${fast[@]}" --json "$raw/bench.json"
  headline=$([[ -f $raw/bench.json ]] && $py benchmarks/verify.py headline "$raw/bench.json")
  if [[ -n $headline ]]; then
    # shellcheck disable=SC2086 - one word per variant
    step bench_repeat 75 $py -m diffloss_fast bench "${size[@]}" "${timing[@]}" --terms both semantic \
      --variants $headline --json "$raw/bench_repeat.json"
  fi
  if (( dry )); then
    echo "memory skipped: NVML and the CUDA allocator (dry run)" | tee -a "$raw/steps.txt"
  else
    step memory 120 $py -m diffloss_fast memory --budget-gib 24 \
      --variants reference-bf16 upstream-fp16 fast-fused fast-ckpt --json "$raw/memory.json" --plot "$raw/memory.png"
  fi
  if (( dry )); then
    step train_bench 60 $py -m diffloss_fast bench --train --device cpu --prior tiny --patch 16 \
      --train-batch 1 --train-steps 2 --train-warmup 0 --json "$raw/train_bench.json"
    step train_amp 60 $py -m diffloss_fast train --synthetic lowlight --prior tiny --amp --device cpu \
      --max-steps 1 --batch-size 1 --patch-size 16 --val-size 16 --val-images 1 --workers 0 --out "$raw/train_amp"
  else
    step train_bench 90 $py -m diffloss_fast bench --train --json "$raw/train_bench.json"
    wait $writer
    step train_amp 75 $py -m diffloss_fast train --synthetic lowlight --prior "$weights" --amp \
      --max-steps 20 --batch-size 8 --patch-size 256 --workers 4 --out "$raw/train_amp"
  fi
fi

if [[ $part == verify-compile ]]; then
  # the accuracy grid at ADM-256 (bf16 and fp16 against fp32, the two-pass path beside)
  if (( dry )); then
    step check_precision 60 $py -m diffloss_fast check-precision --device cpu --prior tiny \
      --resolution 16 --batch 1 --precisions bf16 --json "$raw/precision.json"
  else
    step check_precision 150 $py -m diffloss_fast check-precision --prior adm-256-uncond \
      --batch 2 --two-pass --json "$raw/precision.json"
  fi
  step bench_compile 350 $py -m diffloss_fast bench "${size[@]}" "${timing[@]}" --terms both semantic \
    --variants reference-bf16 reference-compiled "$graphed" fast-compiled fast-regional \
    --compile-budget-s "$compile_budget" --json "$raw/bench_compile.json"
fi

if (( verify )); then
  results=$OUT/results
  timeout 120 $py benchmarks/verify.py assemble "$raw" --out "$results" --commit "$commit" \
    --part "$( [[ $part == verify ]] && echo verify || echo compile )" --min-repeats "$min_repeats" \
    >"$raw/assemble.log" 2>&1
  echo "assemble rc=$?" | tee -a "$raw/steps.txt"
  cat "$raw/assemble.log"
  (( dry )) || cp "$results"/* benchmarks/results/ 2>/dev/null
  pack
fi

pack
echo "=== steps"; cat "$raw/steps.txt"
for f in "$raw"/bench*.log "$raw"/train_bench.log; do [[ -f $f ]] && { echo "=== $(basename "$f")"; grep -v "bench:" "$f" | tail -n 26; }; done
for f in "$raw"/memory*.log; do [[ -f $f ]] && { echo "=== $(basename "$f")"; tail -n 12 "$f"; }; done
exit 0
