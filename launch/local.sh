#!/usr/bin/env bash
# One node, N processes under the DeepSpeed launcher. No logic: env and arguments in.
# Usage: NPROC=8 launch/local.sh configs/pretrain_glm_large.yaml [section.field=value ...]
# SIGTERM/SIGINT to this pid (exec: the deepspeed command) ends it at once; the ranks see their
# launcher gone, save after the current step and exit 0 (README, "Resuming").
set -euo pipefail
exec deepspeed --num_gpus "${NPROC:-1}" --master_port "${MASTER_PORT:-29500}" \
    --module megatron_glm.pretrain --config "$@"
