#!/usr/bin/env bash
# Runs the jax_mxfp4 benchmarks on the device machine and collects the results.
#
#   benchmarks/run_all.sh OUT_DIR [--quick] [--only quantize,gemm,decode,decode_tp] [--ncu] [--cpu-smoke]
#
# For each benchmark: python -m benchmarks.bench_<name> --out OUT_DIR (JSON, PNG,
# profiler traces, log) which also writes benchmarks/results/<bench>-<device>.json;
# then regenerates the README performance section (python -m benchmarks.report),
# writes OUT_DIR/perf_section.md, and prints a short summary last.
# Expected on one H100 (estimates; compile time dominates): --quick all three ~4-5 min;
# full quantize ~2-3 min, decode ~3-4 min, decode_tp ~4-5 min (2 GPUs; not in the default
# set: --only decode_tp), gemm ~8 min (it stops starting new
# shapes after GEMM_BUDGET_S, default 450 s, and says which ones it skipped).
# Each bench runs under a timeout (SIGINT: it writes what it has) chosen so that
# these fit a 10-minute command:
#   benchmarks/run_all.sh "$OUT" --quick
#   benchmarks/run_all.sh "$OUT" --only quantize,decode
#   benchmarks/run_all.sh "$OUT" --only gemm
# Environment: PYTHON (default python3), GEMM_BUDGET_S, {QUANTIZE,GEMM,DECODE}_TIMEOUT_S,
# BENCH_ARGS (extra args for every bench),
# QUANTIZE_ARGS / GEMM_ARGS / DECODE_ARGS / DECODE_TP_ARGS (extra args for one bench, e.g.
# GEMM_ARGS="--shapes 4096x14336,14336x4096,2880x5760"), JAX_MXFP4_GIT_COMMIT (recorded
# when the tree has no .git). Back on the dev machine:
#   python -m benchmarks.report --import FETCHED_OUT_DIR [--merge]   # -> benchmarks/results + README
set -u -o pipefail

usage() { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
QUICK=""; ONLY="quantize,gemm,decode"; NCU=0; SMOKE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --only) ONLY=$2; shift ;;
    --ncu) NCU=1 ;;
    --cpu-smoke) SMOKE="--cpu-smoke" ;;
    -h|--help) usage ;;
    *) echo "run_all.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
export PYTHONUNBUFFERED=1

echo "=== preflight ($(date -u +%FT%TZ)) repo $(pwd) -> $OUT"
if ! $PY - "$SMOKE" <<'EOF' 2>&1 | tee "$OUT/preflight.log"; then
import sys
smoke = sys.argv[1] == "--cpu-smoke"
try:
    import jax
    if smoke:
        jax.config.update("jax_platforms", "cpu")
    import jax_mxfp4
    from jax_mxfp4 import _native
except Exception as err:
    print(f"PREFLIGHT FAILED: cannot import jax / jax_mxfp4: {type(err).__name__}: {err}")
    print("Build/install first, e.g. pip install --no-build-isolation --no-deps . (or copy _ext*.so into jax_mxfp4/)")
    sys.exit(3)
devs = jax.devices()
print(f"jax {jax.__version__}; devices: {devs}")
print(f"jax_mxfp4 CUDA kernels built: {_native.cuda_enabled()}; registered kernels: "
      f"{[k.name for k in jax_mxfp4.kernels.REGISTRY]}")
if not smoke and devs[0].platform != "gpu":
    print("PREFLIGHT FAILED: jax sees no GPU (is the CUDA plugin installed?)")
    sys.exit(3)
if not smoke and not _native.cuda_enabled():
    print("WARNING: the extension was built without CUDA: 'ours' quantize will fail loudly per case")
EOF
  echo "preflight failed; see $OUT/preflight.log"; exit 3
fi

FAILED=()
run_bench() {  # name timeout_s args...
  local name=$1 tmo=$2; shift 2
  echo; echo "=== bench_$name (timeout ${tmo}s) $(date -u +%T)"
  local t=$(date +%s)
  # SIGINT first: the benches write their JSON after every shape group.
  timeout -k 30 -s INT "$tmo" $PY -m "benchmarks.bench_$name" --out "$OUT" $QUICK $SMOKE "$@" ${BENCH_ARGS:-} \
    2>&1 | grep --line-buffered -v -E '^(W|I)[0-9]{4} ' | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== bench_$name exit $rc after $(( $(date +%s) - t ))s"
  [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
}

pick() { if [ -n "$QUICK$SMOKE" ]; then echo "$1"; else echo "$2"; fi; }  # quick/smoke vs full default

IFS=',' read -r -a BENCHES <<< "$ONLY"
for b in "${BENCHES[@]}"; do
  case "$b" in
    quantize) run_bench quantize "${QUANTIZE_TIMEOUT_S:-$(pick 150 230)}" ${QUANTIZE_ARGS:-} ;;
    gemm) run_bench gemm "${GEMM_TIMEOUT_S:-$(pick 220 560)}" --budget-s "${GEMM_BUDGET_S:-$(pick 170 450)}" \
            ${GEMM_ARGS:-} ;;
    decode) run_bench decode "${DECODE_TIMEOUT_S:-$(pick 180 320)}" ${DECODE_ARGS:-} ;;
    decode_tp) run_bench decode_tp "${DECODE_TP_TIMEOUT_S:-$(pick 200 400)}" ${DECODE_TP_ARGS:-} ;;
    *) echo "unknown benchmark '$b' (quantize, gemm, decode, decode_tp)"; FAILED+=("$b(unknown)") ;;
  esac
done

if [ "$NCU" -eq 1 ]; then
  if command -v ncu >/dev/null; then
    echo; echo "=== ncu cross-check"
    timeout -k 30 -s INT 400 $PY -m benchmarks.ncu_check --out "$OUT" 2>&1 | tee "$OUT/ncu_check.log" \
      || FAILED+=("ncu_check")
  else
    echo "ncu not on PATH: skipping the ncu cross-check"
  fi
fi

echo; echo "=== README performance section"
if [ -z "$SMOKE" ]; then
  $PY -m benchmarks.report || echo "README not updated (see the error above); the section is in $OUT/perf_section.md"
  $PY -m benchmarks.report --print > "$OUT/perf_section.md" || true
else
  $PY -m benchmarks.report --results-dir "$OUT" --include-smoke --print > "$OUT/perf_section.md" || true
fi

echo; echo "=== summary ($(( $(date +%s) - T0 ))s total; results in $OUT)"
shopt -s nullglob
JSONS=("$OUT"/*.json)
[ ${#JSONS[@]} -gt 0 ] && $PY -m benchmarks.report --summary "${JSONS[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all benchmarks exited 0"
