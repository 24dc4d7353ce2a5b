"""Benchmark HF -> NeMo conversion against the I/O floor: time ratio and peak RSS.

    python bench/bench_convert.py [--repeats 3] [--synthetic-gb 2.0] [--results bench/results]

For each checkpoint (the real SmolLM2-135M-Instruct, and a synthetic Llama of about
`--synthetic-gb` GB in fp32 built from config with random weights) it runs these jobs, each in
a fresh process so that VmHWM is that job's peak:

* floor: `safetensors.torch.load_file` + `save_file` of the same tensors, the least a Python
  converter must do: read every byte, write every byte (it holds the whole model). It writes
  what the .nemo holds: a tied model's embedding a second time (NeMo's checkpoint always has
  an output layer) and the tokenizer/config files, so both sides write the same bytes (the
  table shows them);
* ours-dir: `hf_to_nemo` to an extracted .nemo directory (certificate off: `hf_to_nemo` is the
  conversion; the CLI's certificate and hashes run after it and are not timed);
* ours-tar: `hf_to_nemo` to a .nemo tar.

Fairness: the jobs run interleaved, the order rotating each repeat; before every job the
source is read once (warm page cache for all) and `sync` flushes dirty pages (equal writeback
state); each job's output is deleted after it. Seconds are measured inside the child around
the call (imports excluded), as wall time and as the child's CPU time (user + sys), which
the other tenants of a shared machine disturb less than wall time. RSS: the child's VmHWM,
and the RSS of an idle interpreter that imported torch, reported so that the ratio can also
be read without the interpreter's share. Medians over the repeats; targets (issue 4): time
<= 1.5x the floor, peak RSS <= half the floor's. Writes bench/results/convert.json and
convert.md.
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

# A child reports {"seconds", "cpu_seconds", "peak_rss_gib", "import_rss_gib"} as its last stdout line.
_CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
job, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def rss_gib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 2**20

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

if job == "idle":
    import torch
    print(json.dumps({"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_gib": rss_gib("VmHWM:"),
                      "import_rss_gib": rss_gib("VmRSS:")}))
    sys.exit(0)
if job == "floor":
    from safetensors.torch import load_file, save_file
    config = json.loads((src / "config.json").read_text())
else:
    from nemo_rlhf.convert.convert import hf_to_nemo
imported, cpu0, start = rss_gib("VmRSS:"), cpu(), time.perf_counter()
if job == "floor":
    for i, f in enumerate(sorted(src.glob("*.safetensors"))):
        tensors = load_file(str(f))
        save_file(tensors, str(dst / f"out-{i}.safetensors"))
        embedding = tensors.get("model.embed_tokens.weight")
        if config.get("tie_word_embeddings") and embedding is not None:  # the .nemo's output layer
            save_file({"lm_head.weight": embedding}, str(dst / f"out-{i}-lm_head.safetensors"))
        del tensors, embedding
    for f in src.iterdir():  # the tokenizer and config files the .nemo carries in hf_assets/
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)
else:
    hf_to_nemo(src, dst / ("model.nemo" if job == "ours-tar" else "model_nemo"))
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_gib": rss_gib("VmHWM:"),
                  "import_rss_gib": imported}))
"""

JOBS = ("floor", "ours-dir", "ours-tar")


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


def _warm(src: Path) -> None:
    """Reads the source once (page cache warm for every job alike) and flushes dirty pages."""
    for f in src.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    os.sync()


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


def bench_model(name: str, src: Path, repeats: int, scratch: Path, idle_rss: float) -> dict:
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    runs = {job: [] for job in JOBS}
    for i in range(repeats):
        for job in JOBS[i % len(JOBS):] + JOBS[:i % len(JOBS)]:  # rotate the order: no job always first
            _warm(src)
            runs[job].append(run_job(job, src, scratch))
            r = runs[job][-1]
            print(f"{name} #{i + 1} {job}: {r['seconds']:.2f} s (cpu {r['cpu_seconds']:.2f} s), "
                  f"{r['peak_rss_gib']:.2f} GiB", flush=True)
    summary = {job: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                     "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in rs),
                     "peak_rss_gib_max": max(r["peak_rss_gib"] for r in rs),
                     "output_bytes": rs[-1]["output_bytes"], "runs": rs} for job, rs in runs.items()}
    floor = summary["floor"]
    for job, s in summary.items():
        s["time_ratio"] = s["seconds_median"] / floor["seconds_median"]
        s["cpu_ratio"] = s["cpu_seconds_median"] / floor["cpu_seconds_median"]
        s["rss_ratio"] = s["peak_rss_gib_max"] / floor["peak_rss_gib_max"]
        s["rss_ratio_above_idle"] = (s["peak_rss_gib_max"] - idle_rss) / (floor["peak_rss_gib_max"] - idle_rss)
    return {"model": name, "safetensors_bytes": size, "repeats": repeats, "jobs": summary}


def write_markdown(results: list[dict], idle_rss: float, path: Path) -> None:
    lines = ["# HF -> NeMo conversion vs the load_file + save_file floor", "",
             f"Medians of {results[0]['repeats']} interleaved runs (order rotating) on a shared 2-core machine; "
             "seconds inside the process, imports excluded; wall and CPU (user+sys) time. Peak RSS is the job's "
             f"VmHWM; an idle interpreter that imported torch holds {idle_rss:.2f} GiB, and the last column is the "
             "RSS ratio with that subtracted from both sides. Targets: time <= 1.5x floor, RSS <= 0.5x floor.", "",
             "| model | size GB | job | output GB | wall s | x floor | CPU s | x floor | peak RSS GiB | x floor "
             "| x floor above idle |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for job, s in res["jobs"].items():
            lines.append(f"| {res['model']} | {res['safetensors_bytes'] / 1e9:.2f} | {job} | "
                         f"{s['output_bytes'] / 1e9:.3f} | {s['seconds_median']:.2f} | {s['time_ratio']:.2f} | "
                         f"{s['cpu_seconds_median']:.2f} | {s['cpu_ratio']:.2f} | {s['peak_rss_gib_max']:.2f} | "
                         f"{s['rss_ratio']:.2f} | {s['rss_ratio_above_idle']:.2f} |")
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
    idle_rss = statistics.median(run_job("idle", models[0][1], scratch)["peak_rss_gib"] for _ in range(3))
    results = [bench_model(name, src, args.repeats, scratch, idle_rss) for name, src in models]
    args.results.mkdir(parents=True, exist_ok=True)
    report = {"idle_torch_rss_gib": idle_rss, "models": results}
    (args.results / "convert.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(results, idle_rss, args.results / "convert.md")
    print((args.results / "convert.md").read_text())


if __name__ == "__main__":
    main()
