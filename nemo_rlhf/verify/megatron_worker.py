"""One rank of the conversion certificate: megatron-core loads the .nemo weights and runs the prompts.

Launched by `certificate.run_megatron` as
`torchrun --standalone --nproc-per-node TP*PP -m nemo_rlhf.verify.megatron_worker ...` (gloo, CPU).
Everything that touches the checkpoint is megatron-core's own code: the model is its GPTModel
(local spec) and the weights come through its `dist_checkpointing.load` into the model's
`sharded_state_dict(prefix="model.")`, then a strict `load_state_dict`, the same path NeMo
takes. Logits come from its pipeline schedule with full-vocabulary gathering; the last stage's
first TP rank writes them to --out.

With --reward the model is a NeMo-Aligner reward model: the last stage also has Aligner's
`rm_head` (see megatron_cpu.attach_reward_head), the forward skips the output layer as
Aligner's does, and --out gets one reward per prompt, read at position lengths-1.

--out's metadata says which megatron-core ran (`megatron_core`) and the dtype the checkpoint
stores its weights in (`stored_dtype`). For a parallel-residual (GPT-NeoX) model --out also
holds `nemo21_falcon`: the outputs with NeMo 2.1's Falcon-layer semantics (see
parallel_residual), so the certificate can report how far NeMo 2.1 itself is from HF.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="model_config.yaml")
    parser.add_argument("--weights", required=True, help="model_weights/ directory (torch_dist)")
    parser.add_argument("--tokens", required=True, help="safetensors with input_ids [B, S]")
    parser.add_argument("--out", required=True, help="safetensors to write logits [B, S, V] to")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True, help="padded vocabulary size of the model")
    parser.add_argument("--reward", action="store_true",
                        help="reward model: rewards [B, A] at lengths-1 (the tokens file holds `lengths`)")
    parser.add_argument("--dump-dir", default=None,
                        help="also save each rank's loaded parameters as rank<N>.safetensors (layout checks)")
    return parser.parse_args(argv)


def load_weights(model, weights_dir: str) -> None:
    """megatron-core's own distributed load, then a strict module load (as NeMo does)."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict(prefix="model.")
    # NeMo-Aligner's GPTRewardModel.sharded_state_dict drops the head's _extra_state (it saves
    # none); its local linear holds None there, which the strict module load gets back below.
    sharded.pop("model.rm_head._extra_state", None)
    state = dist_checkpointing.load(sharded, weights_dir, strict="raise_unexpected")
    state = {k[len("model."):]: v for k, v in state.items()}
    if hasattr(model, "rm_head"):
        state["rm_head._extra_state"] = None
    model.load_state_dict(state, strict=True)


def _stored_dtype(weights_dir: str) -> str:
    """Dtype the checkpoint stores the model's weights in (its embedding's), as megatron reads it."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(weights_dir)
    return str(meta["model.embedding.word_embeddings.weight"].dtype).removeprefix("torch.")


def _dump_local(model, dump_dir: str) -> None:
    """Saves this rank's parameters as megatron placed them (TP shard, stage-local layer numbers)."""
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    meta = {"tp_rank": str(parallel_state.get_tensor_model_parallel_rank()),
            "pp_rank": str(parallel_state.get_pipeline_model_parallel_rank())}
    save_file(tensors, os.path.join(dump_dir, f"rank{torch.distributed.get_rank()}.safetensors"), metadata=meta)


def _keep(output, non_loss_data=True):
    """The schedule's "loss function": keeps the last stage's output as it is.

    With collect_non_loss_data=True both megatron-core 0.10 and 0.16 store what it returns
    (0.10 always calls it; 0.16 also accepts None, 0.10 does not).
    """
    return output


def _logits_step(positions, mask, lengths):
    """Schedule step for a language model: full-vocabulary logits on the last stage."""

    def step(data_iterator, module):
        return module(next(data_iterator), positions, mask, runtime_gather_output=True), _keep

    return step


def _reward_step(positions, mask, lengths):
    """Schedule step for a reward model, as NeMo-Aligner's GPTRewardModel.forward computes it.

    Aligner runs GPTModel with `post_process` switched off: the decoder still applies its final
    layernorm (it has its own post_process) and GPTModel returns those hidden states instead of
    logits. Its rm_head maps every position; the reward is the one at lengths-1 (right padding).
    """

    def step(data_iterator, module):
        return reward_outputs(module, next(data_iterator), positions, mask, lengths), _keep

    return step


def head_outputs(module, tokens, positions, mask):
    """The reward head at every position [S, B, A] on the last stage (a critic's values), else hidden states.

    NeMo-Aligner's reward model and critic are one GPT with `rm_head`; the critic reads all positions.
    """
    last_stage = module.post_process
    module.post_process = False
    try:
        hidden = module(tokens, positions, mask)  # [S, B, H]
    finally:
        module.post_process = last_stage
    if not last_stage:
        return hidden  # sent on to the next stage
    per_position, _ = module.rm_head(hidden)  # [S, B, A]; bias added inside (skip_bias_add=False)
    return per_position


def reward_outputs(module, tokens, positions, mask, lengths):
    """NeMo-Aligner's reward forward of one stage: rewards [B, A] at lengths-1 on the last stage, else hidden states.

    Shared with the parity workers (nemo_rlhf.parity.megatron_train_worker), which train through it.
    """
    out = head_outputs(module, tokens, positions, mask)
    if not module.post_process:
        return out
    return out[lengths - 1, torch.arange(out.shape[1])]


def _forward(model, tokens: torch.Tensor, lengths: torch.Tensor | None = None):
    """Forward-only pass through megatron's pipeline schedule; logits (or rewards, given lengths) on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    step = (_logits_step if lengths is None else _reward_step)(positions, mask, lengths)
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=seq, micro_batch_size=batch, forward_only=True, collect_non_loss_data=True)
    return outputs[0] if outputs else None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state
    from safetensors.torch import load_file, save_file

    from nemo_rlhf.verify import parallel_residual
    from nemo_rlhf.verify.megatron_compat import megatron_version
    from nemo_rlhf.verify.megatron_cpu import apply_cpu_shims, attach_reward_head, build_gpt_model

    apply_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=args.pp)
    with open(args.config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    model = build_gpt_model(cfg, args.vocab, args.tp, args.pp)
    if args.reward and parallel_state.is_pipeline_last_stage():
        attach_reward_head(model, cfg)
    load_weights(model, args.weights)
    if args.dump_dir:
        _dump_local(model, args.dump_dir)
    inputs = load_file(args.tokens)
    lengths = inputs["lengths"] if args.reward else None
    results = {"rewards" if args.reward else "logits": _forward(model, inputs["input_ids"], lengths)}
    if parallel_residual.is_parallel_residual(cfg):
        # The same weights as NeMo 2.1's Falcon layer computes them (output biases left out).
        parallel_residual.set_drop_output_biases(model, True)
        results["nemo21_falcon"] = _forward(model, inputs["input_ids"], lengths)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        meta = {"megatron_core": megatron_version(), "stored_dtype": _stored_dtype(args.weights)}
        save_file({k: v.float().contiguous() for k, v in results.items()}, args.out, metadata=meta)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0


def run_reporting_errors(entry) -> int:
    """Runs `entry()`; on failure leaves the reason in <out>.rank<N>.error for the parent to report.

    torchrun buries a worker's traceback in its own output; the parent wants one line. Shared by
    every torchrun worker (the certificate's and the parity harness's).
    """
    try:
        return entry()
    except Exception as exc:
        out = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--out"), None)
        if out:
            rank = os.environ.get("RANK", "0")
            with open(f"{out}.rank{rank}.error", "w", encoding="utf-8") as f:
                f.write(f"{type(exc).__name__}: {exc}"[:4000])
        raise


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_reporting_errors(main))
