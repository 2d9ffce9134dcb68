#!/usr/bin/env bash
# Data-parallel Oryx training on the GPUs of one host: torchrun + NCCL, DDP or FSDP2 (fully_shard).
#
#   scripts/multigpu.sh                 # 2 GPUs, DDP: the default run's model, global batch 32 x 512
#   NGPU=4 PARALLEL=fsdp scripts/multigpu.sh --config configs/oryx-tg-130m.yaml --train-data /data/corpus
#
# Each rank takes its slice of every global batch and of the global batch's mode draws, so N GPUs train exactly
# what one process would train on the same global batch (`--batch-size` is global). Extra arguments go to
# `oryx train` (see `oryx train --help`) and replace the default ones. Keep NVLink multicast off on shared hosts
# (NCCL_NVLS_ENABLE=0).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-2}
PARALLEL=${PARALLEL:-ddp}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works from a checkout without pip install
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ "$#" -eq 0 ]; then  # the default run's model with a GPU-sized global batch
    set -- --batch-size 32 --out-dir "runs/multigpu-$PARALLEL-$NGPU" --overwrite
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m oryx.cli train --parallel "$PARALLEL" "$@"
