"""Benchmark HF -> NeMo conversion against the I/O floor: time ratio and peak RSS.

    python bench/bench_convert.py [--repeats 3] [--synthetic-gb 2.0] [--results bench/results]

For each checkpoint (the real SmolLM2-135M-Instruct, and a synthetic Llama of about
`--synthetic-gb` GB in fp32 built from config with random weights) it runs, interleaved and
each in a fresh process so that ru_maxrss is that job's peak:

* floor: `safetensors.torch.load_file` + `save_file` of the same tensors (the least a Python
  converter must do: read every byte, write every byte; it holds the whole model);
* floor-torch-save: `load_file` + one `torch.save` of the same tensors: the cost of the record
  format a torch_dist checkpoint must use (zip records with CRC32, which megatron's loader reads
  through torch.load), without any conversion;
* ours-dir: `hf_to_nemo` to an extracted .nemo directory, certificate off (`--no-verify`);
* ours-tar: `hf_to_nemo` to a .nemo tar (the dist checkpoint is packed after writing, as NeMo does).

Seconds are measured inside the child around the call (imports excluded; torch import
dominates process start for all three); RSS is the child's peak. Targets (issue 4): time <=
1.5x the floor, peak RSS <= half the floor's. The page cache is warm for every job (the
source is read once before timing), so the numbers compare CPU and write cost, not cold disk.
Writes bench/results/convert.json and convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A child reports {"seconds": float, "peak_rss_gib": float} as its last stdout line.
_CHILD = r"""
import json, sys, time
from pathlib import Path
job, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if job == "floor":
    from safetensors.torch import load_file, save_file
    start = time.perf_counter()
    files = sorted(src.glob("*.safetensors"))
    for i, f in enumerate(files):
        tensors = load_file(str(f))
        save_file(tensors, str(dst / f"out-{i}.safetensors"))
        del tensors
elif job == "floor-torch-save":
    from safetensors.torch import load_file
    import torch
    start = time.perf_counter()
    for i, f in enumerate(sorted(src.glob("*.safetensors"))):
        torch.save(load_file(str(f)), dst / f"out-{i}.pt")
else:
    from nemo_rlhf.convert.convert import hf_to_nemo
    start = time.perf_counter()
    hf_to_nemo(src, dst / ("model.nemo" if job == "ours-tar" else "model_nemo"))
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_gib": hwm_kib / 2**20}))
"""

JOBS = ("floor", "floor-torch-save", "ours-dir", "ours-tar")


def synthetic_llama(out_dir: Path, target_gb: float) -> Path:
    """A random fp32 Llama of about `target_gb` GB (hidden 1536, 4 KV heads), written once and reused."""
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, ffn, vocab = 1536, 4096, 50304  # the GPT-2 tokenizer from ../shared/data, padded to 64
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden // 3) + 3 * hidden * ffn  # q,o + k,v (GQA) + mlp
    layers = max(1, round((target_gb * 2**30 / 4 - 2 * vocab * hidden) / per_layer))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False,
                      max_position_embeddings=2048)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100GB")
    from nemo_rlhf.spec.paths import data_root

    shutil.copyfile(data_root("auto") / "tokenizers" / "gpt2" / "tokenizer.json", tmp / "tokenizer.json")
    os.replace(tmp, out_dir)
    return out_dir


def smollm2_dir(cache: Path) -> Path:
    from nemo_rlhf.models.materialize import materialize_named

    out = cache / "smollm2"
    return out if (out / "config.json").is_file() else materialize_named("smollm2-135m-instruct", out)


def run_job(job: str, src: Path, scratch: Path) -> dict:
    dst = Path(tempfile.mkdtemp(prefix=f"{job}-", dir=scratch))
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, job, str(src), str(dst)], capture_output=True,
                              text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{job} on {src} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["output_bytes"] = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        return result
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def bench_model(name: str, src: Path, repeats: int, scratch: Path) -> dict:
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    for f in src.glob("*.safetensors"):  # warm the page cache for every job alike
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    runs = {job: [] for job in JOBS}
    for i in range(repeats):
        for job in JOBS:
            runs[job].append(run_job(job, src, scratch))
            print(f"{name} #{i + 1} {job}: {runs[job][-1]['seconds']:.2f} s, "
                  f"{runs[job][-1]['peak_rss_gib']:.2f} GiB", flush=True)
    summary = {job: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                     "peak_rss_gib_max": max(r["peak_rss_gib"] for r in rs), "runs": rs} for job, rs in runs.items()}
    floor = summary["floor"]
    for job in JOBS[1:]:
        summary[job]["time_ratio"] = summary[job]["seconds_median"] / floor["seconds_median"]
        summary[job]["rss_ratio"] = summary[job]["peak_rss_gib_max"] / floor["peak_rss_gib_max"]
    return {"model": name, "safetensors_bytes": size, "jobs": summary}


def write_markdown(results: list[dict], path: Path) -> None:
    lines = ["# HF -> NeMo conversion vs the load_file + save_file floor", "",
             "Median seconds (inside the process, imports excluded) and peak RSS of each job; targets: "
             "time <= 1.5x floor, RSS <= 0.5x floor.", "",
             "| model | size GB | job | seconds | x floor | peak RSS GiB | x floor |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for job, s in res["jobs"].items():
            lines.append(f"| {res['model']} | {res['safetensors_bytes'] / 1e9:.2f} | {job} | {s['seconds_median']:.2f} "
                         f"| {s.get('time_ratio', 1.0):.2f} | {s['peak_rss_gib_max']:.2f} | "
                         f"{s.get('rss_ratio', 1.0):.2f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-gb", type=float, default=2.0, help="0 skips the synthetic model")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nemo-rlhf-bench-convert")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    scratch = args.cache / "scratch"
    scratch.mkdir(exist_ok=True)
    models = [("smollm2-135m", smollm2_dir(args.cache))]
    if args.synthetic_gb > 0:
        models.append((f"synthetic-llama-{args.synthetic_gb:g}gb",
                       synthetic_llama(args.cache / f"synthetic-{args.synthetic_gb:g}gb", args.synthetic_gb)))
    results = [bench_model(name, src, args.repeats, scratch) for name, src in models]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "convert.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_markdown(results, args.results / "convert.md")
    print((args.results / "convert.md").read_text())


if __name__ == "__main__":
    main()
