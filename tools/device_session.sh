#!/usr/bin/env bash
# What runs on the lent GPU machine (Python 3.12, jax 0.11.2 + CUDA plugin, no
# network). The compiled extension comes in a wheel built on the dev machine
# for that Python (`pip wheel --no-build-isolation --no-deps -w .devcarry .`
# in a Python 3.12 venv with jax 0.11.2, nvcc on PATH), carried in .devcarry/;
# `install` puts its _ext .so into this checkout's jax_mxfp4/, so the package,
# tests and benchmarks all come from the same tree (PYTHONPATH=checkout).
#
#   tools/device_session.sh STAGE...     stages, in the order given:
#     install     unpack the wheel's extension module into jax_mxfp4/
#     info        GPU, driver, jax devices, kernel selection
#     tests       pytest -m gpu: the GPU tests (the CPU suite is CI's job)
#     tests:FILE  the GPU tests of one test file
#     tests-cpu   the rest of the suite on the same machine
#     example:NAME  python examples/NAME.py (e.g. example:tensor_parallel on 2 GPUs)
#     selftest    build + run the standalone Marlin self-test (csrc/marlin), --quick
#     selftest-full  the self-test's whole grid (correctness + timing of every config)
#     selftest-small8  small8 (the default at M <= 8) and small (forced, --config) timed in
#                 one process at M = 1, 2, 4, 8 on the six benchmark shapes (after selftest);
#                 benchmarks/selftest_json.py turns the logs into a results JSON
#     sanitize    compute-sanitizer memcheck + racecheck: Marlin self-test --quick and
#                 the JAX-driven kernels (tools/sanitizer_driver.py); sanitize-marlin and
#                 sanitize-quantize do one kernel family each
#     profile     Nsight Compute (--set detailed) of the quantize kernel and the Marlin GEMM at
#                 the target shapes (tools/profile_driver.py); reports in profile_*.log
#     bench-quick           benchmarks/run_all.sh --quick
#     bench:NAMES           benchmarks/run_all.sh --only NAMES (e.g. bench:quantize,decode)
# Logs and benchmark results collect in /tmp/session and are packed into
# $OUT/session.tgz after every stage (the device tool brings back a few files only).
set -uo pipefail
OUT=${OUT:-/tmp/out}
LOGS=/tmp/session
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Tests may start a second jax process on the same GPUs (the multi-GPU sharding worker):
# no process takes 75% of GPU memory up front (jax's allocator then grows on demand; the
# benchmarks' warm-up calls make every timed call find its memory already reserved).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
status=0
run() {  # run NAME CMD...: stream to stdout and $LOGS/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "=== $name: $*" | tee "$LOGS/$name.log"
  local t0=$SECONDS
  timeout -k 5 "${STAGE_TIMEOUT:-420}" "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
sanitize_marlin() {
  [ -x /tmp/marlin_selftest ] || run selftest_build nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
    -Icsrc csrc/marlin/marlin_selftest.cu csrc/marlin/marlin_gemm.cu csrc/marlin/marlin_plan.cc -o /tmp/marlin_selftest
  run memcheck_marlin_selftest compute-sanitizer --tool memcheck --error-exitcode 3 /tmp/marlin_selftest --quick
  run racecheck_marlin_selftest compute-sanitizer --tool racecheck --error-exitcode 3 /tmp/marlin_selftest --quick
  run memcheck_marlin_ffi tools/sanitize.sh memcheck Marlin python3 tools/sanitizer_driver.py marlin
}
sanitize_dequantize() {
  run memcheck_dequantize tools/sanitize.sh memcheck MarlinDequantize python3 tools/sanitizer_driver.py marlin_dequantize
  run racecheck_dequantize tools/sanitize.sh racecheck MarlinDequantize python3 tools/sanitizer_driver.py marlin_dequantize
}
sanitize_quantize() {
  run memcheck_quantize tools/sanitize.sh memcheck QuantizeKernel python3 tools/sanitizer_driver.py quantize
  run racecheck_quantize tools/sanitize.sh racecheck QuantizeKernel python3 tools/sanitizer_driver.py quantize
}
for stage in "$@"; do
  case $stage in *=*) export "${stage?}"; continue ;; esac  # VAR=value sets e.g. STAGE_TIMEOUT
  case $stage in
    install)
      run install python3 -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('.devcarry/jax_mxfp4-*-cp312-*.whl')[0]); [w.extract(n, '.') for n in w.namelist() if n.startswith('jax_mxfp4/_ext')]; print(w.namelist())" ;;
    info)
      run info bash -c 'nvidia-smi; python3 -c "import jax, jax_mxfp4; print(jax.__version__, jax.devices()); print(jax_mxfp4.explain_selection((16, 4096), jax.numpy.bfloat16, (4096, 4096)))"' ;;
    tests) run tests_gpu pytest -v -rs -m gpu -p no:cacheprovider -o faulthandler_timeout=60 --durations=15 tests ;;
    tests:*) run "tests_gpu_$(basename "${stage#tests:}" .py)" pytest -v -rs -m gpu -p no:cacheprovider \
               -o faulthandler_timeout=60 --durations=10 "${stage#tests:}" ;;
    tests-cpu) run tests_cpu pytest -q -rs -m "not gpu" -p no:cacheprovider tests ;;
    example:*) run "example_${stage#example:}" python3 "examples/${stage#example:}.py" ;;
    selftest)
      run selftest_build nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
        csrc/marlin/marlin_selftest.cu csrc/marlin/marlin_gemm.cu csrc/marlin/marlin_plan.cc -o /tmp/marlin_selftest
      run selftest /tmp/marlin_selftest --quick ;;
    selftest-full) run selftest_full /tmp/marlin_selftest ;;
    selftest-small8)
      sh="--shape 28672x8192 --shape 8192x8192 --shape 4096x4096 --shape 14336x4096 --shape 4096x14336 --shape 5760x2880"
      for rep in 1 2; do  # two rounds: the spread between them is the noise
        run "selftest_small8_$rep" /tmp/marlin_selftest --dtype bf16 $sh --m 1 --m 2 --m 4 --m 8 --reps 50
        run "selftest_small_$rep" /tmp/marlin_selftest --dtype bf16 $sh --m 1 --m 2 --m 4 --m 8 --reps 50 --config small
      done ;;
    sanitize) sanitize_marlin; sanitize_quantize ;;
    sanitize-marlin) sanitize_marlin ;;
    sanitize-quantize) sanitize_quantize ;;
    sanitize-dequantize) sanitize_dequantize ;;
    profile)
      for k in quantize marlin; do
        pat=QuantizeKernel; [ $k = marlin ] && pat=Marlin
        run "profile_$k" ncu --set detailed --clock-control none --kernel-name "regex:$pat" \
          --launch-skip 0 python3 tools/profile_driver.py $k
      done ;;
    bench-quick) run bench_quick bash benchmarks/run_all.sh "$LOGS/results" --quick ;;
    bench:*) run "bench_${stage#bench:}" bash benchmarks/run_all.sh "$LOGS/results" --only "${stage#bench:}" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  tar czf "$OUT/session.tgz" -C "$LOGS" .  # after every stage: a call cut off at its limit keeps what ran
done
exit $status
