#!/usr/bin/env bash
# The whole test suite: install, start the local SLURM test cluster, then pytest. Extra arguments
# go to pytest. The cluster (slurm/local/, installed on first use; needs root) is left running for
# the next run; stop it with slurm/local/stop.sh. Without it the SLURM tests fail (they never skip).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NEMO_RLHF_VENV:-$repo/.venv}"
NEMO_RLHF_TEST=1 bash "$repo/scripts/install.sh"  # test mode: also the browser the report test opens
bash "$repo/slurm/local/start.sh" </dev/null \
    || echo "warning: the local SLURM cluster did not start (see above); the SLURM tests will fail" >&2
cd "$repo"
"$venv/bin/python" -m pytest -q "$@"
