#!/usr/bin/env bash
# DeepSpeed launcher over a hostfile ("host slots=8" per line), passwordless ssh between nodes.
# Usage: HOSTFILE=hostfile launch/deepspeed_hostfile.sh configs/pretrain_glm_10b.yaml [overrides]
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:?}" --master_port "${MASTER_PORT:-29500}" \
    --module megatron_glm.pretrain --config "$@"
