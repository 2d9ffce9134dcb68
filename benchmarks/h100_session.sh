#!/usr/bin/env bash
# One H100 session: verify the CUDA fast paths against the PyTorch reference, then time training throughput of the
# 130m presets (issue 3) and the mixer core (issue 5). Run from the repository root on the GPU machine with the fla-core
# wheel carried in .whl/ (see benchmarks/README.md). Logs and JSON go to $OUT (default ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src ORYX_FLA_HOPPER_BACKWARD=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
stage() { local limit=$1 name=$2; shift 2; echo "=== $name (limit ${limit}s)"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?"; tail -n 25 "$OUT/$name.log"; }
stage 60 cpu-model-tests python3 -m pytest -p no:cacheprovider -q -x tests/test_model.py -k "generate or beam or pieces or save"
stage 150 gpu-linear-tests python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu.py -k "chunked or fused or auto or head_dim"
stage 150 throughput-2k python3 -m oryx.cli bench --presets oryx-tg-130m transformer-130m oryx-tm-130m gdn-130m mamba2-130m \
  --modes mix --lengths 2048 --tokens 32768 --dtype bfloat16 --repeats 3 --json "$OUT/throughput-2k.json"
stage 80 throughput-8k python3 -m oryx.cli bench --presets oryx-tg-130m transformer-130m --modes mix --lengths 8192 \
  --tokens 32768 --dtype bfloat16 --repeats 3 --json "$OUT/throughput-8k.json"
