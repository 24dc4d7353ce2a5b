#!/usr/bin/env bash
# The whole test suite: install, then pytest. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NEMO_RLHF_VENV:-$repo/.venv}"
bash "$repo/scripts/install.sh"
cd "$repo"
"$venv/bin/python" -m pytest -q "$@"
