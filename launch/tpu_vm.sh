#!/usr/bin/env bash
# A Cloud TPU VM pod slice (e.g. v5p-64: 8 hosts): every host runs the same command, and JAX
# finds the other hosts itself (distributed.initialize=on). Run from your workstation.
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE REPO_URL      # once: clone and install on every host
#   launch/tpu_vm.sh run   TPU_NAME ZONE COMMAND...    # e.g.:
#   launch/tpu_vm.sh run my-v5p-64 us-east5-a jaxvid train --config configs/dit.py:B \
#       --workdir /mnt/shared/runs/b --config.mesh.data=-1 --config.mesh.fsdp=8
#
# The workdir must be on a file system every host sees (Filestore/NFS, or a gcsfuse mount of a
# bucket); gs:// URLs are not accepted as workdirs yet. A maintenance event sends SIGTERM: the
# run saves and exits 0; run the same command again to resume.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: launch/tpu_vm.sh setup TPU_NAME ZONE REPO_URL | run TPU_NAME ZONE COMMAND..." >&2
  exit 2
fi
mode=$1; tpu=$2; zone=$3; shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }
case "$mode" in
  setup)
    ssh_all "set -e; git clone $1 jaxvid || git -C jaxvid pull; cd jaxvid; python3 -m venv .venv; \
             .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . 'jax[tpu]'" ;;
  run)
    ssh_all "cd jaxvid && source .venv/bin/activate && $(printf '%q ' "$@") --config.distributed.initialize=on" ;;
  *)
    echo "launch/tpu_vm.sh: unknown mode $mode (setup or run)" >&2; exit 2 ;;
esac
