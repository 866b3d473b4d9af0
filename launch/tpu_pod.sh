#!/usr/bin/env bash
# The same command on every worker of a TPU VM pod slice; JAX detects the pod (--multihost=auto).
#   launch/tpu_pod.sh my-tpu us-central2-b --flagfile=experiments/flags/ip2p_pgd_tdae.flags \
#       --images=/mnt/data/photos --weights_dir=/mnt/models/ip2p --workdir=/mnt/runs/x
# Prerequisites: the repo checked out at the same path on every worker (or a shared disk), and
#   pip install -e ".[tpu]" run once on all workers (use --command with --worker=all as below).
# The workdir should be on a shared filesystem (GCS FUSE / Filestore) for orbax checkpoints; each
# process writes its own images, process 0 the merged metrics and report.
set -euo pipefail
TPU=${1:?usage: tpu_pod.sh TPU_NAME ZONE [experiment flags...]}; ZONE=${2:?zone}; shift 2
REPO=${TDAE_REPO:-~/tdae_jax}
ARGS=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd $REPO && python -m experiments.tdae${ARGS} --multihost=auto"
