#!/usr/bin/env bash
# N processes on this machine, each with D simulated CPU devices, joined into one JAX job by
# jax.distributed (gloo collectives over 127.0.0.1): multi-host code paths without a cluster.
#
#   launch/local.sh N D COMMAND...
#   launch/local.sh 2 4 jaxvid train --config configs/tiny.py --workdir runs/mp --config.train.steps=20
#
# Process 0 prints to this terminal; process i > 0 writes $JAXVID_LOG_DIR/process_i.log
# (default: a new temporary folder, printed first). Ctrl-C or SIGTERM is passed to every
# process (they save a checkpoint and exit 0). Exits with the first non-zero status, if any.
set -uo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
n=$1; d=$2; shift 2
for value in "$n" "$d"; do
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: error: NUM_PROCESSES and DEVICES_PER_PROCESS must be whole numbers >= 1, got '$n' and '$d'" >&2
    exit 2
  fi
done
logs=${JAXVID_LOG_DIR:-$(mktemp -d -t jaxvid-local-XXXXXX)}
mkdir -p "$logs"
port=${JAXVID_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
echo "local.sh: $n processes x $d CPU devices, coordinator 127.0.0.1:$port, logs in $logs" >&2

# Other XLA flags the caller set are kept; the device count is this script's.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g') --xla_force_host_platform_device_count=$d"

# The output relays ignore Ctrl-C and SIGTERM (a terminal signals the whole process group): a
# process that lost its stdout would fail to log, and stop without its checkpoint. They end with
# their process's output.
pids=()
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < n; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" \
    JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    "$@" > >(trap '' INT TERM; if ((i == 0)); then cat; else cat > "$logs/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; rc=$?
    # wait returns > 128 when a trapped signal interrupts it: keep waiting for the process.
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    forward TERM   # one process failed: the others would wait for it forever
  fi
done
exit $status
