#!/usr/bin/env bash
# The small-scale pipeline on one GPU (the lent H200 machine of the `device` tool), as a benchmark:
# the tiny recipe as a smoke test, then the default recipe's stages at SmolLM2-135M's shape
# (bench/gpu/smollm2-shape-gpu.yaml). That machine has torch + CUDA but no network: the Python
# packages it lacks travel as wheels in .whl/ and the data in .gpudata/ (both ignored by git):
#   mkdir -p .gpudata && cp -r ../shared/data/. .gpudata/
#   pip download --no-deps --python-version 3.12 ... -d .whl trl==1.12.0 transformers==5.24.0 datasets==5.2.0 \
#       omegaconf==2.3.0 dill multiprocess gguf; pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# Results: $OUT/gpu-pipeline.{json,md} (bench/gpu/summarize.py) and the logs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD" NEMO_RLHF_DATA_ROOT="$PWD/.gpudata" TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__)" | tee -a "$out/gpu.txt"
status=0
for spec in recipes/tiny-cpu.yaml bench/gpu/smollm2-shape-gpu.yaml; do
  name="$(basename "$spec" .yaml)"
  python3 -m nemo_rlhf run "$spec" --out "/tmp/runs/$name" >"$out/$name.log" 2>&1 || status=$?
  tail -n 30 "$out/$name.log"
done
python3 bench/gpu/summarize.py /tmp/runs "$out/gpu-pipeline" || status=$?
exit "$status"
