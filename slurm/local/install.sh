#!/usr/bin/env bash
# Install Debian's SLURM (slurm-wlm: slurmctld, slurmd, client commands) and munge, if missing.
# Works in a fresh Debian container as root: no systemd, no stdin, no prompts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
    say "slurm-wlm and munge already installed ($(slurmctld -V))"
    exit 0
fi
require_root
command -v apt-get >/dev/null || die "apt-get not found: install slurm-wlm and munge with your package manager"
export DEBIAN_FRONTEND=noninteractive
say "installing slurm-wlm and munge"
# The package lists of a fresh container are empty: update once if the install cannot find them.
apt-get install -y --no-install-recommends slurm-wlm munge </dev/null \
    || { apt-get update </dev/null && apt-get install -y --no-install-recommends slurm-wlm munge </dev/null; }
say "installed $(slurmctld -V)"
