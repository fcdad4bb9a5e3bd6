#!/usr/bin/env bash
# A TPU workload on GKE through XPK (https://github.com/AI-Hypercomputer/xpk), one or more
# slices. XPK builds an image from BASE_IMAGE plus this directory and runs COMMAND on every
# host of every slice; JAX finds the other hosts itself (distributed.initialize=on).
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-128 SLICES=2 launch/xpk.sh WORKLOAD_NAME COMMAND...
#   CLUSTER=my-cluster TPU_TYPE=v5p-128 SLICES=2 launch/xpk.sh b-run jaxvid train \
#       --config configs/dit.py:B --workdir /mnt/shared/runs/b --config.mesh.fsdp=-1 \
#       --config.mesh.data=2 --config.mesh.dcn_data=2
#
# With SLICES > 1, put the slices on an axis that tolerates the slower data-center network
# (data parallelism): mesh.dcn_data=SLICES. The workdir must be on a file system every host
# sees (a gcsfuse or Filestore mount in the pod); gs:// URLs are not accepted as workdirs yet.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: CLUSTER=... TPU_TYPE=... [SLICES=1] [BASE_IMAGE=...] launch/xpk.sh WORKLOAD_NAME COMMAND..." >&2
  exit 2
fi
workload=$1; shift
: "${CLUSTER:?set CLUSTER}" "${TPU_TYPE:?set TPU_TYPE}"
cd "$(dirname "$0")/.."
xpk workload create \
  --cluster="$CLUSTER" \
  --workload="$workload" \
  --tpu-type="$TPU_TYPE" \
  --num-slices="${SLICES:-1}" \
  --base-docker-image="${BASE_IMAGE:-python:3.11}" \
  --command="pip install -q -e . 'jax[tpu]' && $(printf '%q ' "$@") --config.distributed.initialize=on"
