#!/usr/bin/env bash
# The device check (tools/device_check.py): the accelerator test subset, float32 vs bfloat16
# training images/s at 224 px, pmap over the local devices, and the integer pass bit-exact
# between the accelerator and the CPU. Fits in 10 minutes on one GPU; --cpu is the CI-sized
# form. Run from anywhere; writes summary.json and summary.txt to --out (default
# ${TMPDIR:-/tmp}/qfsep_device_check/<UTC time>).
#
#   tools/device_check.sh [--cpu] [--out DIR] [more flags of tools/device_check.py]
#
# DEVICE_CHECK_TIMEOUT (seconds, default 570) caps the whole run; the summary keeps the
# sections that finished.
set -uo pipefail
cd "$(dirname "$0")/.."
args=("$@")
out=""
cpu=0
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --cpu) cpu=1 ;;
    --out) out="${args[$((i + 1))]:-}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
  esac
done
if [[ -z "$out" ]]; then
  out="${TMPDIR:-/tmp}/qfsep_device_check/$(date -u +%Y%m%d-%H%M%S)"
  args+=(--out "$out")
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [[ $cpu == 1 ]]; then
  export JAX_PLATFORMS=cpu
  # Two CPU devices, so that the pmap section compares 2 devices with 1 (a device count in
  # XLA_FLAGS already, coming later, wins).
  export XLA_FLAGS="--xla_force_host_platform_device_count=2 ${XLA_FLAGS:-}"
fi
mkdir -p "$out"
timeout --signal=TERM --kill-after=20 "${DEVICE_CHECK_TIMEOUT:-570}" \
  python tools/device_check.py "${args[@]}" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
if [[ $status == 124 ]]; then
  echo "device check: stopped at ${DEVICE_CHECK_TIMEOUT:-570} s; $out/summary.json has the sections that finished"
fi
exit "$status"
