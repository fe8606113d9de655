#!/usr/bin/env bash
# The checks for a machine with a GPU, in one run (about 8 minutes on one H100/H200-class card):
# build the extension with its CUDA kernels, run the CUDA tests of the two fused ops, run them
# again under compute-sanitizer (memcheck, racecheck, synccheck, initcheck), then the two ops'
# benchmarks. Prints one summary table at the end; exits non-zero if any step failed.
#   bash benchmarks/gpu_check.sh            (from the repository root, in the project's venv)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LOG="${GPU_CHECK_LOG:-gpu_check_logs}"
mkdir -p "$LOG"
declare -a NAMES RESULTS SECONDS_TAKEN

step() {  # step NAME COMMAND...
  local name="$1"; shift
  local start=$SECONDS
  echo "=== $name"
  if "$@" >"$LOG/$name.log" 2>&1; then RESULTS+=("ok"); else RESULTS+=("FAILED (see $LOG/$name.log)"); fi
  NAMES+=("$name"); SECONDS_TAKEN+=($((SECONDS - start)))
  tail -n 3 "$LOG/$name.log"
}

TESTS="tests/test_lm_head_losses.py tests/test_attention_alignment_loss.py"
step build env CRYSTAL_EXT_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$PY" setup.py build_ext --inplace
step gpu_info "$PY" -c "import torch, crystal_ext; print(torch.cuda.get_device_name(0), torch.__version__, crystal_ext.build_info())"
step cuda_tests "$PY" -m pytest -q -m cuda $TESTS
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck synccheck initcheck; do
    # Device-side checks only: the host-side Python allocations are not ours to check.
    step "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PY" -m pytest -q -x -m cuda -k "not opcheck and not gradcheck" $TESTS
  done
else
  NAMES+=("sanitizer"); RESULTS+=("SKIPPED (no compute-sanitizer on PATH)"); SECONDS_TAKEN+=(0)
fi
step benchmarks "$PY" -m pytest -q benchmarks/test_lm_head_losses.py benchmarks/test_attention_alignment_loss.py \
  --benchmark-only --benchmark-columns=min,median,rounds

echo
echo "| step | result | seconds |"
echo "|---|---|---|"
status=0
for i in "${!NAMES[@]}"; do
  echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} |"
  [[ "${RESULTS[$i]}" == FAILED* ]] && status=1
done
echo
echo "benchmark summary:"; grep -E "^(Name|test_|-)" "$LOG/benchmarks.log" | head -40 || true
exit $status
