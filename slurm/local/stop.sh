#!/usr/bin/env bash
# Stop the local test cluster: cancel every job first (slurmstepd outlives a stopped slurmd and
# would keep running jobs), then stop the slurmd's and slurmctld. munged is left running (other
# tools may use it); pass --all to stop it too. Idempotent. --quiet: say nothing when nothing runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

quiet=0 all=0
for arg in "$@"; do
    case "$arg" in
        --quiet) quiet=1 ;;
        --all) all=1 ;;
        *) die "unknown argument $arg (use --quiet, --all)" ;;
    esac
done

take_lock
running=0
for f in "$STATE_DIR"/slurmctld.pid "$STATE_DIR"/slurmd-*.pid; do
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && running=1
done
if [ "$running" = 0 ]; then
    [ "$quiet" = 1 ] || say "not running; nothing to stop"
else
    require_root
    if timeout 10 squeue -h -o %i >/dev/null 2>&1; then
        scancel --full --user=root 2>/dev/null || true
        scancel --full 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    for f in "$STATE_DIR"/slurmd-*.pid; do stop_pidfile "$f"; done
    stop_pidfile "$STATE_DIR/slurmctld.pid"
    say "stopped"
fi
if [ "$all" = 1 ] && [ -f /run/munge/munged.pid ]; then
    stop_pidfile /run/munge/munged.pid && say "stopped munged"
fi
