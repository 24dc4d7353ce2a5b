#!/usr/bin/env bash
# Start the one-machine test cluster: munged, slurmctld and two slurmd (fake nodes n1, n2 on
# 127.0.0.1, two fake GPUs each). Installs slurm-wlm + munge first if missing. Idempotent: when
# the cluster already answers it says so and changes nothing. State is wiped at each start.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

started=$SECONDS
take_lock
bash "$HERE/install.sh"
if cluster_up; then
    say "already running (state in $STATE_DIR); nothing to do"
    sinfo
    exit 0
fi
require_root

start_munge() {
    if munge_up; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&-
    for _ in $(seq 50); do munge_up && return 0; sleep 0.2; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

render() {  # render TEMPLATE OUTPUT: substitute the @NAME@ placeholders
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@N1_PORT@|$N1_PORT|g" -e "s|@N2_PORT@|$N2_PORT|g" \
        -e "s|@CPUS@|$(nproc)|g" -e "s|@MEM_MB@|1024|g" "$1" > "$2"
}

write_config() {
    mkdir -p "$CONF_DIR"
    local f
    for f in slurm.conf gres.conf; do
        if [ -e "$CONF_DIR/$f" ] && ! grep -q "$MARKER" "$CONF_DIR/$f"; then
            die "$CONF_DIR/$f exists and was not written by this script; refusing to replace it"
        fi
    done
    render "$HERE/slurm.conf.in" "$CONF_DIR/slurm.conf"
    render "$HERE/gres.conf.in" "$CONF_DIR/gres.conf"
}

# Daemons left over from an earlier start that no longer answers.
bash "$HERE/stop.sh" --quiet
case "$STATE_DIR" in /|"") die "refusing to wipe STATE_DIR='$STATE_DIR'";; esac
rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/dev"
ln -s /dev/null "$STATE_DIR/dev/nvidia0"
ln -s /dev/null "$STATE_DIR/dev/nvidia1"
write_config
start_munge
slurmctld </dev/null >/dev/null 2>&1 9>&- || die "slurmctld failed to start (see $STATE_DIR/slurmctld.log)"
slurmd -N n1 </dev/null >/dev/null 2>&1 9>&- || die "slurmd n1 failed to start (see $STATE_DIR/slurmd-n1.log)"
slurmd -N n2 </dev/null >/dev/null 2>&1 9>&- || die "slurmd n2 failed to start (see $STATE_DIR/slurmd-n2.log)"
for _ in $(seq 120); do
    if cluster_up; then
        say "up in $((SECONDS - started)) s (state in $STATE_DIR, config in $CONF_DIR)"
        sinfo
        exit 0
    fi
    sleep 0.5
done
sinfo -N -l || true
tail -n 20 "$STATE_DIR"/*.log >&2 || true
die "the cluster did not come up within 60 s (logs above, in $STATE_DIR)"
