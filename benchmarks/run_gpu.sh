#!/usr/bin/env bash
# One device session: install, GPU tests, then the whole-model and write benchmarks; results in $OUT
# (default ./gpu-out), at most 7 files (the device tool returns 8 at most):
#   log.txt (environment, install, test summary, benchmark tables), tests.txt (pytest, -rf),
#   bench_model.{md,json,png}, bench_write.{md,json}
#   bash benchmarks/run_gpu.sh [tests|bench|all|layouts]   (default all)
# layouts: the whole-model benchmark in the layouts that hold quality (per-token K4V4; KIVI K2V2), into
#   $OUT/k4v4/ and $OUT/kivi/ (3 files each), instead of the fast K2V2 per-token layout of "bench"
# The GPU machine has torch, triton, transformers, pytest, pytest-xdist and hypothesis but no network:
# the package is installed without dependencies or build isolation, with the pip of the python that runs
# the tests (a bare `pip` there may belong to another interpreter, and then the "kvcompile" entry point is
# not visible to torch).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
LOG="$OUT/log.txt"
what=${1:-all}
export PYTHONPATH=.:benchmarks
python -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -2 >> "$LOG"
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch, triton, transformers
from importlib.metadata import entry_points
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("torch_dynamo_backends entry points:", [e.name for e in entry_points(group="torch_dynamo_backends")])
print("kvcompile by name:", "kvcompile" in torch._dynamo.list_backends())
PY
if [ "$what" = tests ] || [ "$what" = all ]; then
  # per-test timeout (pytest-timeout where installed) so a hang names itself; -rf lists the failures
  timeout "${TEST_TIMEOUT:-330}" python -m pytest -q -n 8 -p no:cacheprovider -m "not slow" -rf \
    --junitxml="$OUT/junit.xml" tests > "$OUT/tests.txt" 2>&1
  echo "pytest exit: $?" >> "$OUT/tests.txt"
  grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests.txt" | tail -30 | tee -a "$LOG"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "${MODEL_TIMEOUT:-200}" python benchmarks/bench_model.py --context 32768 --batch 1,8 --steps 20 \
    --max-batch --max-batch-tries 5 --out "$OUT" 2>&1 | tail -25 | tee -a "$LOG"
  rm -f "$OUT/bench_model.txt"
  timeout "${WRITE_TIMEOUT:-45}" python benchmarks/bench_write.py --out "$OUT" 2>&1 | tail -12 | tee -a "$LOG"
fi
if [ "$what" = layouts ]; then
  for layout in k4v4 kivi; do
    if [ "$layout" = k4v4 ]; then args="--k-bits 4 --v-bits 4"; else args="--scheme kivi"; fi
    mkdir -p "$OUT/$layout"
    timeout "${MODEL_TIMEOUT:-240}" python benchmarks/bench_model.py --context 32768 --batch 1,8 --steps 20 \
      --max-batch --max-batch-tries 5 $args --out "$OUT/$layout" 2>&1 | tail -20 | tee -a "$LOG"
  done
fi
