#!/usr/bin/env bash
# The main job: install, then run the default small-scale pipeline (SmolLM2-135M-Instruct,
# SFT -> RM -> PPO -> eval on CPU) into runs/default (override with the first argument).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NEMO_RLHF_VENV:-$repo/.venv}"
bash "$repo/scripts/install.sh"
out="${1:-$repo/runs/default}"
"$venv/bin/nemo-rlhf" run --out "$out"
"$venv/bin/nemo-rlhf" lineage show "$out/eval"
