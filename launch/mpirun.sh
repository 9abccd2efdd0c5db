#!/usr/bin/env bash
# mpirun (Open MPI) of the entry point, one rank per slot; each rank finds its place itself from
# OMPI_COMM_WORLD_* (megatron_glm/training/rank_discovery.py), so no wrapper runs on the nodes.
# Usage (venv active; the same venv path and a shared checkpoint directory on every node):
#   NP=2 launch/mpirun.sh -- configs/demo.yaml [overrides]               one node: nothing else
#   NP=16 MASTER_ADDR=node0 launch/mpirun.sh -H node0:8,node1:8 -- configs/pretrain_glm_large.yaml
# Arguments before -- go to mpirun (as root in a container: --allow-run-as-root). Several nodes
# need MASTER_ADDR (node0's address; MASTER_PORT optional) or mpi4py (pip install '.[mpi]').
# Forwarded to the ranks (mpirun -x; remote nodes get nothing else): PATH, LD_LIBRARY_PATH,
# PYTHONPATH, VIRTUAL_ENV, DS_ACCELERATOR, OMP_NUM_THREADS (1 unless set), MASTER_ADDR,
# MASTER_PORT, CUDA_VISIBLE_DEVICES and every GLM_*, NCCL_*, TORCH_* variable that is set.
set -euo pipefail
args=(); while [[ $# -gt 0 && $1 != "--" ]]; do args+=("$1"); shift; done; shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fwd=()
for name in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV DS_ACCELERATOR OMP_NUM_THREADS \
    MASTER_ADDR MASTER_PORT CUDA_VISIBLE_DEVICES $(compgen -e | grep -E '^(GLM|NCCL|TORCH)_' || true); do
    if [[ -n ${!name+x} ]]; then fwd+=(-x "$name"); fi
done
exec mpirun -np "${NP:?set NP, the number of ranks}" "${fwd[@]}" "${args[@]}" \
    "$(command -v python)" -m megatron_glm.pretrain --config "$@"
