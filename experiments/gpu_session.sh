#!/usr/bin/env bash
# One call on a lent GPU machine (no internet there), from the repository root:
#   experiments/gpu_session.sh tests   # the test suite on CUDA -> $OUT/junit_cuda.xml
#   experiments/gpu_session.sh bench   # Megablocks build + the latency grid for the three models
#   experiments/gpu_session.sh all
# Prepare on a machine with internet first (both paths are git-ignored and travel as carry):
#   make gpu-carry   # .whl/ (pytest wheels for Python 3.12) and .carry/baselines/ (Megablocks sdists)
set -uo pipefail
stage=${1:-all}
OUT=${OUT:-results/_gpu_session}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [[ $stage == tests || $stage == all ]]; then
  python3 -m pytest -n 8 -q tests --device cuda --junitxml "$OUT/junit_cuda.xml" -p no:cacheprovider 2>&1 \
    | tail -30 | tee "$OUT/pytest_cuda.txt"
fi

if [[ $stage == bench || $stage == all ]]; then
  if [[ -d .carry/baselines ]]; then
    echo "building Megablocks (about 3 minutes) ..."
    bash .carry/baselines/build_megablocks.sh /tmp/mbwheels >"$OUT/megablocks_build.log" 2>&1 \
      && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/mbwheels/*.whl \
      || echo "Megablocks build failed: see $OUT/megablocks_build.log (its rows will say unavailable)"
  fi
  python3 -m experiments -m experiment=latency profile=gpu model=mixtral_8x7b,qwen2_57b_a14b,deepseek_v3 \
    2>&1 | tee "$OUT/latency.log" | grep -v "^\[" 
  cp results/*/latency*.json* "$OUT/" 2>/dev/null
fi
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
