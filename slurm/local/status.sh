#!/usr/bin/env bash
# Is the local test cluster up? Prints sinfo; exit 0 when both fake nodes are usable, 1 otherwise.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

command -v sinfo >/dev/null || { say "not installed (run slurm/local/install.sh)"; exit 1; }
if cluster_up; then
    sinfo -N -o '%N %P %t %c %G'
    say "up (state in $STATE_DIR)"
    exit 0
fi
timeout 10 sinfo 2>&1 || true
say "down (start it with slurm/local/start.sh)"
exit 1
