"""One rank of the loss and curve parity checks: megatron-core computes (and trains on) the losses NeMo trains on.

Launched by `launch_workers` as `torchrun --standalone --nproc-per-node TP -m
nemo_rlhf.parity.megatron_train_worker ...` (gloo, CPU). The model and its weights come the
way the conversion certificate gets them (`verify.megatron_cpu.build_gpt_model`,
`verify.megatron_worker.load_weights`: megatron-core's GPTModel, its `dist_checkpointing.load`),
so a .nemo written by `nemo-rlhf convert hf-to-nemo` is read exactly as NeMo reads it.

Steps run through megatron's own pipeline schedule (`get_forward_backward_func`) with the loss
NeMo computes:

* SFT (`--stage sft`): GPTModel gets `labels` and returns megatron's vocab-parallel token
  cross-entropy [B, S] (no full-vocabulary gather: what NeMo trains on); the micro-batch loss
  is NeMo's `loss_func`, sum(ce * loss_mask) / sum(loss_mask). NeMo shifts in the dataset:
  tokens = ids[:-1], labels = ids[1:], loss_mask = mask[1:].
* RM (`--stage rm`): chosen and rejected stacked on the batch axis (as NeMo-Aligner's
  reward model does), rewards read at lengths-1 (`verify.megatron_worker.reward_outputs`),
  loss -log sigmoid(r_chosen - r_rejected), mean over the micro-batch's pairs.
* Critic (`--stage critic`, loss mode only): NeMo-Aligner's critic is the reward model read at
  every position; writes `mb{i}.values` [B, S] (PPO loss parity: the values of a rollout).
  A PPO policy's log-probs are `--stage sft`'s per-token CE with the sign flipped (megatron's
  vocab-parallel CE of the next token: what NeMo-Aligner's DistributedLogprob computes).

The schedule divides each micro-batch loss by the number of micro-batches, so a step's
gradient is that of the mean of the micro-batch means: NeMo's reduction.

With `--pp` > 1 the schedule is megatron's pipelined one (p2p over gloo): the micro-batches of one call
are right-padded to one width (its p2p tensors have one shape), the results come from the last stage,
and SFT's gathered-logits CE is not computed (the model is called outside the schedule for it).

`--mode loss` runs one batch forward only and writes the per-token CE (SFT: from megatron's
vocab-parallel CE and from the full-vocabulary logits) or the rewards (RM). `--mode train` runs
`--steps` optimizer steps with megatron's DistributedDataParallel and `get_megatron_optimizer`
(torch AdamW on CPU, clip_grad=0, no loss scaling) under an `OptimizerParamScheduler` with a
constant learning rate (it applies NeMo's weight-decay rule: none on biases and 1-D weights),
and writes each step's loss as NeMo logs it (the mean of the micro-batch losses) and, for the
RM, each step's rewards.

Inputs (`--inputs`, safetensors): per micro-batch `mb{i}.tokens` [b, s] and `mb{i}.labels` /
`mb{i}.loss_mask` (SFT), `mb{i}.lengths` (RM, chosen lengths then rejected lengths) or nothing more (critic), for
i in 0 .. steps * micro_batches - 1, in training order. The first TP rank of the last pipeline stage writes `--out`.
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
    parser.add_argument("--inputs", required=True, help="safetensors with the micro-batches (see the module doc)")
    parser.add_argument("--out", required=True, help="safetensors to write the results to")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vocab", type=int, required=True, help="padded vocabulary size of the model")
    parser.add_argument("--stage", choices=("sft", "rm", "critic"), required=True)
    parser.add_argument("--mode", choices=("loss", "train"), required=True)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps (train)")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--adam-beta1", type=float, default=0.9)
    parser.add_argument("--adam-beta2", type=float, default=0.999)
    parser.add_argument("--adam-eps", type=float, default=1e-8)
    return parser.parse_args(argv)


def _causal(seq: int, batch: int):
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    return positions, mask


def _sft_step(data_iterator, module):
    """NeMo's SFT micro-batch: megatron's vocab-parallel token CE, then the masked token mean."""
    from nemo_rlhf.parity.losses import masked_token_mean

    batch = next(data_iterator)
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"].float()
    positions, mask = _causal(*tokens.shape[::-1])
    per_token = module(tokens, positions, mask, labels=labels)  # [b, s]

    def loss_func(output):
        loss = masked_token_mean(output, loss_mask)
        return loss, {"loss": loss.detach().clone(), "token_ce": output.detach().clone()}

    return per_token, loss_func


def _rm_step(data_iterator, module):
    """NeMo-Aligner's RM micro-batch: rewards at lengths-1, Bradley-Terry loss averaged over the pairs."""
    from nemo_rlhf.parity.losses import bradley_terry
    from nemo_rlhf.verify.megatron_worker import reward_outputs

    batch = next(data_iterator)
    tokens, lengths = batch["tokens"], batch["lengths"]
    positions, mask = _causal(*tokens.shape[::-1])
    # Megatron's DDP wrapper only forwards the call; the reward forward needs the model's post_process/rm_head.
    # Its gradient hooks sit on the parameters, so calling the wrapped model still accumulates into DDP's buffers.
    inner = module.module if hasattr(module, "module") and not hasattr(module, "rm_head") else module
    rewards = reward_outputs(inner, tokens, positions, mask, lengths)  # [2b, 1]

    def loss_func(output):
        chosen, rejected = output.float().flatten().chunk(2)
        loss = bradley_terry(chosen, rejected)["loss"]
        return loss, {"loss": loss.detach().clone(), "rewards": output.detach().float().flatten().clone()}

    return rewards, loss_func


def _critic_step(data_iterator, module):
    """NeMo-Aligner's critic forward: the value head at every position (forward only: no loss)."""
    from nemo_rlhf.verify.megatron_worker import head_outputs

    tokens = next(data_iterator)["tokens"]
    positions, mask = _causal(*tokens.shape[::-1])
    values = head_outputs(module, tokens, positions, mask)  # [s, b, 1] (hidden states before the last stage)
    if module.post_process:
        values = values[..., 0].transpose(0, 1)  # [b, s]

    def loss_func(output):
        zero = output.sum() * 0
        return zero, {"loss": zero.detach(), "values": output.detach().float().clone()}

    return values, loss_func


STEPS = {"sft": _sft_step, "rm": _rm_step, "critic": _critic_step}
KEYS = {"sft": ("tokens", "labels", "loss_mask"), "rm": ("tokens", "lengths"), "critic": ("tokens",)}


def _micro_batches(inputs: dict, stage: str, count: int, same_width: bool = False) -> list[dict]:
    """The micro-batches in order; `same_width` right-pads [b, s] tensors to the widest (pipeline p2p shapes:
    padding after the last real token changes nothing before it, the loss mask is 0 and RM reads at lengths-1)."""
    batches = [{k: inputs[f"mb{i}.{k}"] for k in KEYS[stage]} for i in range(count)]
    if same_width:
        width = max(b["tokens"].shape[1] for b in batches)
        for b in batches:
            for k, v in b.items():
                if v.dim() == 2:
                    b[k] = torch.nn.functional.pad(v, (0, width - v.shape[1]))
    return batches


def _run_schedule(model, micro_batches: list[dict], stage: str, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = micro_batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=STEPS[stage], data_iterator=iter(micro_batches),
        model=[model], num_microbatches=len(micro_batches), seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0], forward_only=forward_only)


def _gathered_token_ce(model, micro_batch: dict) -> torch.Tensor:
    """Token CE from the full-vocabulary logits megatron gathers (the HF side's computation)."""
    from nemo_rlhf.parity.losses import token_cross_entropy

    tokens, labels = micro_batch["tokens"], micro_batch["labels"]
    positions, mask = _causal(*tokens.shape[::-1])
    with torch.no_grad():
        logits = model(tokens, positions, mask, runtime_gather_output=True).float()  # [b, s, V]
    return token_cross_entropy(logits, labels)


def _loss_mode(model, args, inputs: dict) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    micro_batches = _micro_batches(inputs, args.stage, args.micro_batches, same_width=args.pp > 1)
    with torch.no_grad():
        reduced = _run_schedule(model, micro_batches, args.stage, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return {}
    out = {"mb_loss": torch.stack([r["loss"] for r in reduced])}
    for i, (r, mb) in enumerate(zip(reduced, micro_batches)):
        width = inputs[f"mb{i}.tokens"].shape[1]  # per-position results at the micro-batch's own width
        if args.stage == "sft":
            out[f"mb{i}.token_ce"] = r["token_ce"][:, :width]
            if args.pp == 1:
                out[f"mb{i}.token_ce_gathered"] = _gathered_token_ce(model, mb)
        elif args.stage == "critic":
            out[f"mb{i}.values"] = r["values"][:, :width]
        else:
            out[f"mb{i}.rewards"] = r["rewards"]
    return out


def _optimizer(model, args):
    """megatron's optimizer (torch AdamW on CPU) and the scheduler that applies lr and NeMo's weight-decay rule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.lr, weight_decay=args.weight_decay,
                             adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                             clip_grad=0.0, bf16=False, fp16=False, params_dtype=torch.float32,
                             use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr, lr_warmup_steps=0,
        lr_decay_steps=max(args.steps, 1), lr_decay_style="constant", start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=max(args.steps, 1), wd_incr_style="constant")
    return optimizer, scheduler


def _train_mode(model, args, inputs: dict) -> dict[str, torch.Tensor]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = _optimizer(ddp, args)
    micro_batches = _micro_batches(inputs, args.stage, args.steps * args.micro_batches, same_width=args.pp > 1)
    losses, rewards = [], []
    for step in range(args.steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        chunk = micro_batches[step * args.micro_batches:(step + 1) * args.micro_batches]
        reduced = _run_schedule(ddp, chunk, args.stage, forward_only=False)
        update_ok, _, _ = optimizer.step()
        if not update_ok:
            raise RuntimeError(f"megatron's optimizer skipped step {step}")
        scheduler.step(increment=1)
        if not reduced:  # not the last pipeline stage: the losses are computed there
            continue
        losses.append(torch.stack([r["loss"] for r in reduced]).mean())  # NeMo logs the mean over micro-batches
        if args.stage == "rm":
            rewards.append(torch.cat([r["rewards"] for r in reduced]))
    if not losses:
        return {}
    out = {"step_loss": torch.stack(losses)}
    if rewards:
        out["step_rewards"] = torch.stack(rewards)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state
    from safetensors.torch import load_file, save_file

    from nemo_rlhf.verify.megatron_compat import megatron_version
    from nemo_rlhf.verify.megatron_cpu import apply_cpu_shims, attach_reward_head, build_gpt_model
    from nemo_rlhf.verify.megatron_worker import load_weights

    apply_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=args.pp)
    with open(args.config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    model = build_gpt_model(cfg, args.vocab, args.tp, args.pp)
    if args.stage in ("rm", "critic") and parallel_state.is_pipeline_last_stage():
        attach_reward_head(model, cfg)
    load_weights(model, args.weights)
    inputs = load_file(args.inputs)
    if args.stage == "critic" and args.mode != "loss":
        raise ValueError("--stage critic runs in --mode loss only")
    if args.mode == "loss":
        model.eval()
        results = _loss_mode(model, args, inputs)
    else:
        model.train()
        results = _train_mode(model, args, inputs)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        save_file({k: v.float().contiguous() for k, v in results.items()}, args.out,
                  metadata={"megatron_core": megatron_version()})
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nemo_rlhf.verify.megatron_worker import run_reporting_errors

    sys.exit(run_reporting_errors(main))
