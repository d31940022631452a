#!/usr/bin/env bash
# wait-overclone.sh [SOCKET] [TIMEOUT_SECONDS]
#
# Waits until overclone answers gRPC health checks on SOCKET. Run it before
# restarting containerd with a config that names overclone: a snapshotter that
# does not answer fails every pull and container start, and takes a Kubernetes
# node NotReady.
set -euo pipefail

socket=${1:-/run/containerd-overclone/containerd-overclone-grpc.sock}
timeout=${2:-60}
overclone=${OVERCLONE:-$(command -v overclone || echo /usr/local/bin/overclone)}

deadline=$((SECONDS + timeout))
until "$overclone" health --address "$socket" >/dev/null 2>&1; do
	if ((SECONDS >= deadline)); then
		echo "overclone on $socket did not answer within ${timeout}s" >&2
		"$overclone" health --address "$socket" || true
		exit 1
	fi
	sleep 1
done
echo "overclone answers on $socket"
