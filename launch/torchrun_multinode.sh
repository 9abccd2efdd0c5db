#!/usr/bin/env bash
# torchrun on every node (run this same command on each). Env: NNODES, NPROC_PER_NODE, HEAD_ADDR.
# Usage: NNODES=2 HEAD_ADDR=node0 launch/torchrun_multinode.sh configs/pretrain_glm_large.yaml [overrides]
set -euo pipefail
exec torchrun --nnodes "${NNODES:?}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "${HEAD_ADDR:?}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RUN_ID:-megatron_glm}" -m megatron_glm.pretrain --config "$@"
