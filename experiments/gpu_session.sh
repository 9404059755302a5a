#!/usr/bin/env bash
# One call on a lent GPU machine (no internet there), from the repository root:
#   experiments/gpu_session.sh [STAGE ...]     stages: tests tune bench (default: all three)
#     tests  the test suite on CUDA                         -> $OUT/pytest_cuda.txt, junit_cuda.xml
#     tune   tile tuning per model (experiment=tune)        -> results/<GPU>/tune.jsonl, tritonmoe/configs/
#     bench  Megablocks + the latency grid (experiment=latency) -> results/<GPU>/latency.jsonl
#     skew   Megablocks + T6/T7 (experiment=skew, model=mixtral_8x7b) -> results/<GPU>/skew.jsonl
#     stages Megablocks + T3 per-stage times and launch counts (experiment=stages, Mixtral and DeepSeek-V3)
#     traffic T4 DRAM bytes of the first GEMM, fused vs unfused, with Nsight Compute (experiment=traffic, Mixtral)
#     hf_model transformers' Mixtral (2 layers) per experts implementation, eager and CUDA graph (experiment=hf_model)
#     decode the per-kernel timeline of T <= 2 forwards replayed from a CUDA graph (probe_decode)
#     sweep  the GEMMs' tile order: N swept a few tiles at a time over all M-blocks (probe_sweep)
#     power  the compute-bound end timed in bursts of 25 ms and over 500 ms, clocks sampled (probe_power)
#     flush  short forwards timed after do_bench's zero-write L2 flush vs a read-only one (probe_flush)
#     ridge  the GEMMs where experts average 64-1024 rows: cuBLAS, grouped_mm and tritonmoe against the floor (probe_ridge)
#     ws     a dense GEMM per tile, persistent, and warp-specialised persistent (Triton) against cuBLAS (probe_ws)
#     front  the router matmul, routing and schedule at T = 32-8192 timed alone, with variants (probe_front)
#     combine the combine against what fusing it into the down projection would cost: atomic adds, zero, cast (probe_combine)
#     routing each expert's rows in the latency grid's routing and the rows padded to 16/64/128-row tiles (probe_routing)
#     skewprof Nsight Compute per GEMM at the skew grid's worst cells: time, tensor/DRAM busy, DRAM bytes (probe_skew_profile)
#     skeworder the worst skew cells with the hot experts first, last, spread or as the grid has them (probe_skew_order)
#     skewgroup the worst skew cells with an expert's M-blocks grouped otherwise, or 64-row tails (probe_skew_group)
#     skewinterleave the worst skew cells with busy and one-block experts' tiles interleaved, 64-row tails, both
#               (probe_skew_interleave)
#   Everything written under results/ and tritonmoe/configs/ comes back as $OUT/results.tgz.
# Prepare on a machine with internet first (git-ignored, sent as carry):
#   make gpu-carry   # .whl/ (pytest, Hydra wheels for Python 3.12) and .carry/baselines/ (Megablocks sdists)
# Megablocks wheels built by an earlier call come back as $OUT/mbwheels.tar; unpacked into
# .carry/mbwheels/ they are installed instead of building again (~3 minutes).
# Environment: MODELS (comma list), TOKENS (Hydra list, e.g. [1,64]), TEST_TIMEOUT (s), TEST_SELECT (pytest -k),
# TEST_RESUME (a junit xml from a tests stage stopped at its limit: run only the tests it has no record of),
# TUNE_MINUTES, SKEWPROF_CELLS and SKEWGROUP_CELLS (E:T cells for skewprof and skewgroup, space-separated;
# default each probe's own), PROBE_SKEWS and PROBE_VARIANTS (those probes' routings and variants, comma lists),
# BUILD_MEGABLOCKS=1 (build it in the background even without the bench stage),
# HYDRA_ARGS (more overrides, space-separated), SESSION_SECONDS (deadline for the tests stage),
# TRITONMOE_COMMIT (the commit, for provenance: the tree sent here has no trustworthy .git; write the
# hash into the command on the sending machine: `$(git rev-parse HEAD)` evaluated there named a stale one).
set -uo pipefail
stages=" ${*:-tests tune bench} "   # skew runs only when named
OUT=${OUT:-results/_gpu_session}
MODELS=${MODELS:-mixtral_8x7b,qwen2_57b_a14b,deepseek_v3}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
overrides=()
[[ -n ${TOKENS:-} ]] && overrides+=("++profile.tokens=$TOKENS")  # the gpu profile has no tokens key: add it
read -ra extra <<<"${HYDRA_ARGS:-}"; overrides+=("${extra[@]}")

mb_pid=
if [[ $stages == *" bench "* || $stages == *" skew "* || $stages == *" stages "* || $stages == *" flush "* \
      || -n ${BUILD_MEGABLOCKS:-} ]]; then
  if ls .carry/mbwheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/mbwheels/*.whl
  elif [[ -d .carry/baselines ]]; then
    echo "building Megablocks in the background (about 3 minutes) ..."
    ( bash .carry/baselines/build_megablocks.sh /tmp/mbwheels >"$OUT/megablocks_build.log" 2>&1 \
        && tar cf "$OUT/mbwheels.tar" -C /tmp/mbwheels . ) &
    mb_pid=$!
  fi
fi

# Megablocks built in the background: wait for it and install it, once, before the first stage that times it.
megablocks_ready() {
  [[ -z $mb_pid ]] && return
  wait "$mb_pid" && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/mbwheels/*.whl \
    || echo "Megablocks build failed: see $OUT/megablocks_build.log (its rows will say unavailable)"
  mb_pid=
}

stage_tests() {
  # SIGINT at the limit: pytest still prints its summary of what failed. Stop before the
  # call's limit (SESSION_SECONDS, default 570) so the files still get packed.
  limit=$(( ${SESSION_SECONDS:-570} - SECONDS - 20 )); (( limit > ${TEST_TIMEOUT:-400} )) && limit=${TEST_TIMEOUT:-400}
  echo "tests: up to $limit s"
  select=(); [[ -n ${TEST_SELECT:-} ]] && select=(-k "$TEST_SELECT")
  targets=(tests)
  if [[ -n ${TEST_RESUME:-} ]]; then  # only the tests that junit file (a run stopped at its limit) has no record of
    python3 -m pytest --collect-only -q tests --device cuda "${select[@]}" -p no:cacheprovider 2>/dev/null \
      | grep "::" >/tmp/collected.txt
    python3 - "$TEST_RESUME" >/tmp/recorded.txt <<'PY'
import sys, xml.etree.ElementTree as ET
for c in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    if c.get("name"):
        print(c.get("classname").replace(".", "/") + ".py::" + c.get("name"))
PY
    grep -vxF -f /tmp/recorded.txt /tmp/collected.txt >/tmp/rest.txt
    echo "tests: $(wc -l </tmp/rest.txt) of $(wc -l </tmp/collected.txt) collected have no record in $TEST_RESUME"
    [[ -s /tmp/rest.txt ]] || { echo "tests: nothing left to run"; return; }
    mapfile -t targets </tmp/rest.txt; select=()
  fi
  timeout -s INT "$limit" python3 -m pytest -n 16 -q -rfE --tb=short "${targets[@]}" --device cuda "${select[@]}" \
    --junitxml "$OUT/junit_cuda.xml" -p no:cacheprovider -W ignore::pytest.PytestWarning >"$OUT/pytest_cuda.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_cuda.txt" | tail -40
}

stage_tune() {
  python3 -m experiments -m experiment=tune profile=gpu model="$MODELS" "${overrides[@]}" \
    ${TUNE_MINUTES:+experiment.max_minutes=$TUNE_MINUTES} 2>&1 \
    | tee "$OUT/tune.log" | grep -v "^ *$"
}

# One experiment on the GPU profile: its log in $OUT/<name>.log, its progress lines not echoed.
run_experiment() {
  local name=$1; shift
  python3 -m experiments "$@" experiment="$name" profile=gpu "${overrides[@]}" 2>&1 \
    | tee "$OUT/$name.log" | grep -v "^\["
}

stage_bench() { megablocks_ready; run_experiment latency -m model="$MODELS"; }
stage_skew() { megablocks_ready; run_experiment skew model=mixtral_8x7b; }
stage_stages() { megablocks_ready; run_experiment stages -m model=mixtral_8x7b,deepseek_v3; }
stage_traffic() { run_experiment traffic model=mixtral_8x7b; }
stage_hf_model() { run_experiment hf_model model=mixtral_8x7b; }
stage_decode() { python3 -m experiments.probe_decode 2>&1 | tee "$OUT/probe_decode.log"; }
stage_sweep() { python3 -m experiments.probe_sweep 2>&1 | tee "$OUT/probe_sweep.log"; }
stage_power() { python3 -m experiments.probe_power 2>&1 | tee "$OUT/probe_power.log"; }
stage_ridge() { python3 -m experiments.probe_ridge 2>&1 | tee "$OUT/probe_ridge.log"; }
stage_ws() { python3 -m experiments.probe_ws 2>&1 | tee "$OUT/probe_ws.log"; }
stage_front() { python3 -m experiments.probe_front 2>&1 | tee "$OUT/probe_front.log"; }
stage_combine() { python3 -m experiments.probe_combine 2>&1 | tee "$OUT/probe_combine.log"; }
stage_routing() { python3 -m experiments.probe_routing 2>&1 | tee "$OUT/probe_routing.log" | grep -v "^\["; }
stage_skewprof() { python3 -m experiments.probe_skew_profile ${SKEWPROF_CELLS:-} 2>&1 | tee "$OUT/probe_skew_profile.log"; }
stage_skeworder() { python3 -m experiments.probe_skew_order 2>&1 | tee "$OUT/probe_skew_order.log" | grep -v "^\["; }
stage_skewgroup() { python3 -m experiments.probe_skew_group ${SKEWGROUP_CELLS:-} 2>&1 | tee "$OUT/probe_skew_group.log" | grep -v "^\["; }
stage_skewinterleave() {
  python3 -m experiments.probe_skew_interleave 2>&1 | tee "$OUT/probe_skew_interleave.log" | grep -v "^\["
}
stage_flush() { megablocks_ready; python3 -m experiments.probe_flush 2>&1 | tee "$OUT/probe_flush.log"; }

for stage in $stages; do "stage_$stage"; done
[[ -n $mb_pid ]] && wait "$mb_pid"
tar czf "$OUT/results.tgz" results tritonmoe/configs 2>/dev/null
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
