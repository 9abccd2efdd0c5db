#!/usr/bin/env bash
# DeepSpeed's multi-node launcher over a hostfile ("host slots=N" per line).
# Usage (venv active, same paths and a shared checkpoint directory on every node):
#   HOSTFILE=hostfile MASTER_ADDR=node0 launch/deepspeed_hostfile.sh configs/pretrain_glm_10b.yaml
# LAUNCHER: pdsh (default; passwordless ssh to every host), openmpi (mpirun; MASTER_ADDR/PORT
# are passed with -x, as DeepSpeed passes neither), slurm (srun inside an allocation; ranks take
# the master from the node list). LAUNCHER_ARGS go to pdsh/mpirun/srun; DS_ARGS to deepspeed.
# Runs the glm-pretrain console script by path: DeepSpeed's slurm launcher drops --module.
# The ranks get DeepSpeed's PYTHON*/UCX*/... variables and the KEY=VALUE lines of .deepspeed_env
# (in the current or home directory): put PATH, DS_ACCELERATOR, NCCL_* etc. there (README).
set -euo pipefail
script=$(command -v glm-pretrain) || { echo "glm-pretrain not on PATH: activate the venv" >&2; exit 2; }
launcher=${LAUNCHER:-pdsh}
port=${MASTER_PORT:-29500}
largs=${LAUNCHER_ARGS:-}
dsargs=${DS_ARGS:-}
if [[ $launcher == openmpi ]]; then
    largs="-x MASTER_ADDR=${MASTER_ADDR:?} -x MASTER_PORT=$port $largs"
elif [[ $launcher == slurm && $dsargs != *--no_ssh_check* ]]; then
    dsargs="--no_ssh_check $dsargs"  # srun needs no ssh; DeepSpeed's runner would try it
fi
# shellcheck disable=SC2086  # dsargs is a list of deepspeed options
exec deepspeed --hostfile "${HOSTFILE:?}" --launcher "$launcher" --master_addr "${MASTER_ADDR:?}" \
    --master_port "$port" $dsargs --launcher_args "$largs" \
    "$script" --config "$@"
