#!/usr/bin/env bash
# One node, N processes under the DeepSpeed launcher. No logic: env and arguments in.
# Usage: NPROC=8 launch/local.sh configs/pretrain_glm_large.yaml [section.field=value ...]
set -euo pipefail
exec deepspeed --num_gpus "${NPROC:-1}" --master_port "${MASTER_PORT:-29500}" \
    --module megatron_glm.pretrain --config "$@"
