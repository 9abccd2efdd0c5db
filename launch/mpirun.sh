#!/usr/bin/env bash
# mpirun (Open MPI): ranks from OMPI_COMM_WORLD_* variables; MASTER_ADDR must be the first host.
# Usage: NP=16 MASTER_ADDR=node0 launch/mpirun.sh -H node0:8,node1:8 -- configs/pretrain_glm_large.yaml
set -euo pipefail
args=(); while [[ $# -gt 0 && $1 != "--" ]]; do args+=("$1"); shift; done; shift || true
exec mpirun -np "${NP:?}" "${args[@]}" -x MASTER_ADDR="${MASTER_ADDR:?}" \
    -x MASTER_PORT="${MASTER_PORT:-29500}" bash -c 'RANK=$OMPI_COMM_WORLD_RANK \
    WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK \
    exec python -m megatron_glm.pretrain --config "$@"' _ "$@"
