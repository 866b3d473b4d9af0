#!/usr/bin/env bash
# One process per GPU node under SLURM; the coordinator is the first node of the allocation.
#   sbatch -N 4 --gpus-per-node=8 launch/gpu_slurm.sh --flagfile=experiments/flags/ip2p_pgd_tdae.flags \
#       --images=/data/photos --weights_dir=/models/ip2p --workdir=/shared/runs/x
# Prerequisite: pip install -e ".[gpu]" in the job's environment; the workdir on a shared filesystem.
#SBATCH --ntasks-per-node=1
set -euo pipefail
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${TDAE_PORT:-12345}
srun --ntasks-per-node=1 bash -c "python -m experiments.tdae $(printf ' %q' "$@") --multihost=on \
  --coordinator=${HEAD}:${PORT} --num_processes=\${SLURM_NTASKS} --process_id=\${SLURM_PROCID}"
