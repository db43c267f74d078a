#!/usr/bin/env bash
# One-command GPU check: on a machine with one CUDA GPU, build the extension with its CUDA
# kernels, run the `gpu` tests (Triton and CUDA backends on CUDA tensors) and the GPU kernel
# benchmark, and print the bar table, each phase bounded in time and reported.
#
# It runs on the machine's own Python with its CUDA build of torch, Triton, nvcc and ninja (a
# lent GPU machine reaches no package registry, so nothing is installed: `bash .ci/run`
# is the CPU path, with a venv made from scratch). The build goes in place (no install).
#
#   bash python/tools/gpu_check.sh            # writes under $OUT (or out/gpu_check)
#
#   PYTHON=python3        the interpreter with torch (CUDA), triton, pytest, rich
#   GPU_CHECK_BUILD_S     time bound of the build (default 200 s)
#   GPU_CHECK_OPTIMIZER_S of the optimizer step benchmark, Triton compilation included (120 s;
#                         24 s on an H200 after the tests had compiled its kernels)
#   GPU_CHECK_TESTS_S     of the gpu tests, Triton compilation included (170 s)
#   GPU_CHECK_BENCH_S     of the benchmark, Triton compilation and tuning included (80 s)
#   GPU_CHECK_OUT         where it writes (default $OUT, else out/gpu_check); at the end it packs
#                         its logs and tables into <out>/gpu_check.tgz, one file to send
# The defaults add up to 570 s: the whole check fits one call of a lent machine (600 s), and the
# phases run cheapest and most telling first, so that a bound cuts the kernel table, not the
# optimizer's.
# Triton's compiled kernels are cached in out/gpu_check_triton_cache: a second run reuses them,
# and the difference between the two runs' test times is the compilation time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python="${PYTHON:-python3}"
out="${GPU_CHECK_OUT:-${OUT:-out/gpu_check}}"
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the phases run from the repository root
export TRITON_CACHE_DIR="$PWD/out/gpu_check_triton_cache"
summary="$out/summary.md"
: > "$summary"

phase() {  # phase NAME SECONDS COMMAND...: run it bounded, log it, record its time and status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  local state="ok"
  [ $rc -eq 124 ] && state="TIMED OUT after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && state="FAILED (exit $rc)"
  echo "| $name | $took s | $state |" >> "$summary"
  echo "gpu_check: $name: $state in $took s (log: $out/$name.log)"
  tail -n 3 "$out/$name.log"
  return $rc
}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $python's torch; nothing to check here" >&2
  exit 2
fi
"$python" -c 'import torch, triton; print("gpu_check:", torch.cuda.get_device_name(),
      "torch", torch.__version__, "triton", triton.__version__)' | tee "$out/device.txt"
echo "| phase | wall time | status |" >> "$summary"
echo "|---|---|---|" >> "$summary"

arch=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
phase build "${GPU_CHECK_BUILD_S:-200}" env MBF_CUDA=1 MBF_CUDA_ARCHS="$arch" \
  MAX_JOBS="$(nproc)" "$python" setup.py build_ext --inplace || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A whole optimizer step against AdamW(fused=True) on the GPU: ResNet-32, the CIFAR VGG16 and
# one Linear(4096, 4096), its shared blocks' GEMMs in float32 and on TF32 tensor cores; and
# torch.profiler's table of five cached steps of each (profile_*.txt). The step kernels keep
# their first tile config (tuning compiles each kernel once per config: the benchmark's job).
phase optimizer "${GPU_CHECK_OPTIMIZER_S:-120}" env MBF_TRITON_AUTOTUNE=0 \
  "$python" bench/bench_optimizer.py --device cuda \
  --models resnet32 vgg16 linear4096 --large-linear auto --shared-matmul float32 tf32 \
  --repeats 9 --profile --out "$out"
optimizer_rc=$?
# Correctness needs no tile tuning, which compiles every kernel once per config (minutes):
# the tests run each kernel with its first config; the benchmark tunes.
# pytest-xdist, where installed, spreads the tests (and so Triton's compilations) over 8
# processes; they share the kernel cache.
# Each failure's report goes to failures.log as it happens (tests/conftest.py), so a phase cut
# short by its bound still says what failed; pytest-timeout, where installed, stops a hung test.
pytest_opts=()
"$python" -c 'import xdist' 2>/dev/null && pytest_opts=(-n 8)
"$python" -c 'import pytest_timeout' 2>/dev/null && pytest_opts+=(--timeout 120)
: > "$out/failures.log"
phase tests "${GPU_CHECK_TESTS_S:-170}" env MBF_TRITON_AUTOTUNE=0 \
  MBF_TEST_FAILURE_LOG="$out/failures.log" "$python" -m pytest -m gpu -p no:cacheprovider \
  -rfE --durations=8 "${pytest_opts[@]}" tests
tests_rc=$?
phase bench "${GPU_CHECK_BENCH_S:-80}" "$python" bench/bench_kernels.py --device cuda \
  --quick --budget 0.2 --out "$out"
bench_rc=$?

echo
echo "== phases (Triton compilation and tuning are inside tests and bench; the slowest tests"
echo "   are listed in $out/tests.log)"
cat "$summary"
echo
echo "== failed tests ($(grep -c '^== ' "$out/failures.log") in $out/failures.log; first lines of each)"
grep -A4 '^== ' "$out/failures.log" | cut -c1-200 | head -80
echo
echo "== the bar (bench_kernels.py, $out/cuda_kernels.md)"
sed -n '/bar/,$p' "$out/cuda_kernels.md" 2>/dev/null || echo "(no benchmark table: see $out/bench.log)"
echo
echo "== the optimizer step against AdamW(fused=True) ($out/optimizer_step.md)"
grep -E "^\| model |amortised|cached|GPU" "$out/optimizer_step.md" 2>/dev/null \
  || echo "(no optimizer table: see $out/optimizer.log)"
tar czf "$out/gpu_check.tgz" -C "$out" --exclude=gpu_check.tgz . 2>/dev/null
exit $(( tests_rc != 0 || bench_rc != 0 || optimizer_rc != 0 ))
