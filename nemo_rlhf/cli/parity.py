"""`nemo-rlhf parity VERB`: prove that the small-scale TRL run and the large-scale NeMo run are one experiment.

    nemo-rlhf parity config SPEC [key=value ...] [--configs DIR]
    nemo-rlhf parity data   SPEC [key=value ...] [--aligner-data DIR]
    nemo-rlhf parity loss   SPEC --stage sft|rm|ppo [--hf DIR] [--nemo PATH] [--tp 2] [--aligner-data DIR]
                            PPO: [--critic DIR] [--critic-nemo PATH] [--rollouts FILE] [--save-rollout FILE]
                                 [--math-only]
    nemo-rlhf parity model  SPEC [--stage sft|rm|ppo] [--hf DIR] [--nemo PATH] [--tp N --pp M]
    nemo-rlhf parity curves SPEC --stage sft|rm [--steps N] [--tp 2] [--aligner-data DIR]
    nemo-rlhf parity curves [SPEC] --stage sft|rm|ppo --tensorboard DIR --trl-log train_log.jsonl
    nemo-rlhf parity all    SPEC [key=value ...] [--run-dir RUN] [--only LAYERS] [--skip LAYERS]

Without --hf the stage's model is RUN/<stage>/model (with --run-dir) or the spec's random base model built
as the pipeline builds it; without --nemo it is converted here with our converter. megatron-core runs on
CPU under gloo in TP torchrun processes (default TP=2).

Every verb takes --json (one JSON object: `passed`, per-check `value` and `tolerance`), --report DIR
(markdown table + PNG + JSON) and --run-dir RUN (the result goes into RUN's lineage:
RUN/parity/<name>.json and RUN/parity/manifest.json). Exit 0 when every check passes, 1 when one
fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("sft", "rm", "ppo")


def _common(p: argparse.ArgumentParser, spec: bool = True) -> None:
    if spec:
        p.add_argument("spec", nargs="?", type=Path, help="spec YAML")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.02")
    p.add_argument("--json", action="store_true", help="print one JSON object: passed, checks (value, tolerance)")
    p.add_argument("--report", type=Path, help="write <name>.md, <name>.png and <name>.json into this folder")
    p.add_argument("--run-dir", type=Path, help="record the result in this run's lineage (RUN/parity/)")


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="config, data, model, loss and curve parity between TRL and NeMo-Aligner",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="parity_command", required=True, metavar="VERB")
    cfg = verbs.add_parser("config", help="the spec's hyperparameters as TRL args and NeMo-Aligner keys, and the "
                                          "semantic differences (equivalent / configurable / incomparable)")
    _common(cfg)
    cfg.add_argument("--configs", type=Path, help="compare against rendered NeMo-Aligner configs in this folder "
                                                   "(sft.yaml, rm.yaml, ppo_actor.yaml, ppo_critic.yaml) instead "
                                                   "of rendering them from the spec")
    cfg.set_defaults(func=run_config)

    loss = verbs.add_parser("loss", help="one fixed batch: SFT/RM loss of the HF model vs the converted megatron-core "
                                         "model (TP, CPU gloo); PPO: the policy's log-probs and critic's values of "
                                         "a fixed rollout on both, through TRL's and NeMo-Aligner's PPO math")
    _common(loss)
    loss.add_argument("--stage", choices=STAGES, required=True)
    _model_args(loss)
    _pp_arg(loss)
    loss.add_argument("--aligner-data", type=Path, help="NeMo side from these NeMo-Aligner files (`nemo-rlhf data "
                                                        "prepare-aligner`); default: rendered from the TRL rows")
    loss.add_argument("--batch-size", type=int, help="examples (RM: pairs, PPO: prompts) in the batch; default: "
                                                     "micro_batch_size (PPO: rollout_batch_size)")
    loss.add_argument("--configs", type=Path, help="PPO: NeMo-Aligner keys from rendered configs in this folder")
    loss.add_argument("--rollouts", type=Path, help="PPO: a fixed rollout batch (safetensors: prompt_ids, "
                                                    "prompt_lengths, response_ids and the fields of "
                                                    "parity.ppo_math.Rollout); default: the TRL run's last rollout "
                                                    "(RUN/ppo/rollout.safetensors) with --run-dir, else sampled "
                                                    "from the policy")
    loss.add_argument("--critic", type=Path, help="PPO: the HF value model (default with --run-dir: the one the "
                                                  "PPO stage trained, RUN/ppo/value_model, else RUN/rm/model; else "
                                                  "built from the spec)")
    loss.add_argument("--critic-nemo", type=Path, help="PPO: the critic's .nemo (default: converted here)")
    loss.add_argument("--save-rollout", type=Path, help="PPO: write the rollout used to this safetensors file "
                                                        "(reuse it with --rollouts)")
    loss.add_argument("--math-only", action="store_true", help="PPO: only the two formulations, on the numbers of "
                                                               "--rollouts or of a seeded synthetic rollout")
    loss.set_defaults(func=run_loss)

    data = verbs.add_parser("data", help="NeMo-Aligner data files vs the TRL rows: identical token ids and masks")
    _common(data)
    data.add_argument("--aligner-data", type=Path, help="check these files (`nemo-rlhf data prepare-aligner`); "
                                                        "default: render them from the TRL rows now")
    data.set_defaults(func=run_data)

    model = verbs.add_parser("model", help="the conversion certificate at the recipe's TP/PP (parallel.<stage>)")
    _common(model)
    model.add_argument("--stage", choices=STAGES, default="sft", help="whose layout and model kind (rm: reward)")
    _model_args(model)
    model.add_argument("--pp", type=int, help="pipeline-parallel size (default: parallel.<stage>.pp)")
    model.set_defaults(func=run_model, tp=None)

    curves = verbs.add_parser("curves", help="N training steps with TRL and with megatron-core (TP) from the same "
                                             "weights and data order; or NeMo TensorBoard logs vs a TRL train_log")
    _common(curves)
    curves.add_argument("--stage", choices=STAGES, required=True, help="sft or rm (training); sft, rm or ppo (logs)")
    curves.add_argument("--steps", type=int, default=4, help="optimizer steps on both sides (default 4)")
    _model_args(curves)
    _pp_arg(curves)
    curves.add_argument("--aligner-data", type=Path, help="megatron side reads these NeMo-Aligner files, in order")
    curves.add_argument("--tensorboard", type=Path, help="compare logs instead: a NeMo run's TensorBoard folder")
    curves.add_argument("--trl-log", type=Path, help="with --tensorboard: the TRL stage's train_log.jsonl")
    curves.add_argument("--samples-per-step", type=int, help="with --tensorboard: TRL samples per logged step "
                                                               "(default: from the spec, micro_batch x grad_accum; "
                                                               "PPO: rollout_batch_size)")
    curves.add_argument("--max-divergence", type=float, default=None,
                        help="with --tensorboard: largest mean |NeMo - TRL| / mean |TRL| per metric (default 0.1)")
    curves.set_defaults(func=run_curves)

    every = verbs.add_parser("all", help="every layer in order (config, data, model, loss, curves): each result "
                                         "written and recorded as its own verb's, plus one summary")
    _common(every)
    every.add_argument("--configs", type=Path, help="rendered NeMo-Aligner configs (default: rendered from the spec)")
    every.add_argument("--aligner-data", type=Path, help="NeMo-Aligner data files (default: rendered from the rows)")
    every.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the loss and curve checks")
    _pp_arg(every)
    every.add_argument("--steps", type=int, default=4, help="optimizer steps of the curve checks (default 4)")
    every.add_argument("--only", help="comma-separated layers to run (config,data,model,loss,curves)")
    every.add_argument("--skip", help="comma-separated layers to leave out")
    every.set_defaults(func=run_all)


def load(args):
    """The spec of a parity verb (UserError, exit 2, when it is missing or invalid)."""
    from nemo_rlhf.errors import UserError
    from nemo_rlhf.spec.loader import load_spec

    if args.run_dir is not None and not args.run_dir.is_dir():
        raise UserError(f"{args.run_dir} is not a run directory", where="--run-dir",
                        fix="pass the folder `nemo-rlhf run` or `nemo-rlhf slurm render` wrote")
    if args.spec is None:
        raise UserError("no spec given", fix="pass the spec YAML, e.g. recipes/tiny-cpu.yaml")
    if "=" in str(args.spec) and not Path(args.spec).exists():
        raise UserError(f"{args.spec} looks like an override, not a spec file", fix="put the spec YAML first")
    return load_spec(args.spec, args.overrides)


def _save(result, args, log) -> None:
    """Write a ParityResult into --report and record it in --run-dir (when given)."""
    from nemo_rlhf.lineage.record import write_json_atomic
    from nemo_rlhf.parity.report import record_in_run, write_report

    if args.report:
        from nemo_rlhf.parity.logs import plot_series

        written = write_report(result, args.report)
        curves_png = plot_series(result, Path(args.report) / f"{result.name}-curves.png")
        written += [curves_png] if curves_png else []
        written.append(write_json_atomic(Path(args.report) / f"{result.name}.json", result.to_dict()))
        print(f"report: {', '.join(str(p) for p in written)}", file=log)
    if args.run_dir:
        print(f"recorded in {record_in_run(result, args.run_dir)}", file=log)


def emit(result, args) -> int:
    """Print, report and record a ParityResult; the exit code."""
    from nemo_rlhf.errors import UserError
    from nemo_rlhf.parity.report import format_text

    log = sys.stderr if args.json else sys.stdout
    if args.run_dir is not None and not args.run_dir.is_dir():
        raise UserError(f"{args.run_dir} is not a run directory", where="--run-dir",
                        fix="pass the folder `nemo-rlhf run` or `nemo-rlhf slurm render` wrote")
    _save(result, args, log)
    if args.json:
        print(json.dumps(result.to_dict(), default=str))
    else:
        print(format_text(result))
    return 0 if result.passed else 1


def run_all(args) -> int:
    from nemo_rlhf.errors import UserError
    from nemo_rlhf.parity.all_layers import LAYERS, Inputs, all_layers

    chosen = [name.strip() for name in (args.only or ",".join(LAYERS)).split(",") if name.strip()]
    skipped = [name.strip() for name in (args.skip or "").split(",") if name.strip()]
    unknown = sorted(set(chosen + skipped) - set(LAYERS))
    if unknown:
        raise UserError(f"unknown layer(s): {', '.join(unknown)}", where="--only/--skip",
                        fix=f"use a comma-separated list of {', '.join(LAYERS)}")
    layers = tuple(name for name in LAYERS if name in chosen and name not in skipped)
    if not layers:
        raise UserError("no layer left to check", where="--only/--skip", fix="keep at least one layer")
    if args.steps < 1:
        raise UserError("--steps must be >= 1", where="--steps", fix="pass 1 or more")
    spec = load(args)
    _check_dirs(args, "aligner_data", "configs")
    summary, results = all_layers(Inputs(spec, str(args.spec), args.run_dir, args.configs, args.aligner_data,
                                         args.tp, args.steps, args.pp), layers)
    for result in results:
        _save(result, args, sys.stderr if args.json else sys.stdout)
    return emit(summary, args)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", type=Path, help="the small-scale HF model of the stage (default: RUN/<stage>/model with "
                                           "--run-dir, else the spec's random base model, built as the pipeline "
                                           "builds it)")
    p.add_argument("--nemo", type=Path, help="its .nemo (default: converted here with `nemo-rlhf convert`)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size megatron-core runs at (default 2)")


def _pp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size megatron-core runs at (default 1; "
                                                     "TP x PP CPU processes)")


def _run_model(args, stage: str, flag: str = "hf") -> Path | None:
    """--hf (or `flag`), else the model the run's stage wrote (RUN/<stage>/model), else None (built from the spec)."""
    given = getattr(args, flag)
    if given is not None or args.run_dir is None:
        return given
    from nemo_rlhf.stages.base_model import MODEL_DIR

    folder = args.run_dir / stage / MODEL_DIR
    return folder if folder.is_dir() else None


def _run_critic(args) -> Path | None:
    """--critic, else the value model the run's PPO stage trained (RUN/ppo/value_model), else RUN/rm/model."""
    from nemo_rlhf.stages.ppo_rollout import VALUE_MODEL_DIR

    if args.critic is None and args.run_dir is not None and (args.run_dir / "ppo" / VALUE_MODEL_DIR).is_dir():
        return args.run_dir / "ppo" / VALUE_MODEL_DIR
    return _run_model(args, "rm", "critic")


def _run_rollout(args) -> Path | None:
    """--rollouts, else the last rollout of the run's TRL PPO stage (RUN/ppo/rollout.safetensors) unless the
    policy or critic is given (then the run's rollout may not be theirs), else None (sampled here)."""
    from nemo_rlhf.stages.ppo_rollout import ROLLOUT

    if args.rollouts is not None or args.run_dir is None or args.hf is not None or args.critic is not None:
        return args.rollouts
    path = args.run_dir / "ppo" / ROLLOUT
    return path if path.is_file() and not args.math_only else None


def _check_dirs(args, *names: str) -> None:
    from nemo_rlhf.errors import UserError

    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value.is_dir():
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{value} is not a folder", where=flag, fix=f"pass an existing folder to {flag}")
    if (getattr(args, "tp", None) or 1) < 1 or (getattr(args, "pp", None) or 1) < 1:
        raise UserError("--tp and --pp must be >= 1", where="--tp/--pp", fix="pass 1 or more")


def run_loss(args) -> int:
    from nemo_rlhf.parity.loss import ppo_parity, sft_rm_loss_parity

    spec = load(args)
    _check_dirs(args, "aligner_data", "configs", "hf", "critic")
    if args.stage == "ppo":
        return emit(ppo_parity(spec, args.configs, rollouts=_run_rollout(args), math_only=args.math_only,
                               policy_hf=_run_model(args, "ppo"), policy_nemo=args.nemo,
                               critic_hf=_run_critic(args),
                               critic_nemo=args.critic_nemo, tp=args.tp, pp=args.pp, batch_size=args.batch_size,
                               aligner_dir=args.aligner_data, save_rollout=args.save_rollout), args)
    result = sft_rm_loss_parity(spec, args.stage, hf_dir=_run_model(args, args.stage), nemo_path=args.nemo,
                                aligner_dir=args.aligner_data, tp=args.tp, pp=args.pp, batch_size=args.batch_size)
    return emit(result, args)


def run_data(args) -> int:
    from nemo_rlhf.parity.data_model import data_parity

    spec = load(args)
    _check_dirs(args, "aligner_data")
    return emit(data_parity(spec, args.aligner_data), args)


def run_model(args) -> int:
    from nemo_rlhf.parity.data_model import model_parity

    spec = load(args)
    _check_dirs(args, "hf")
    return emit(model_parity(spec, args.stage, _run_model(args, args.stage), args.nemo, args.tp, args.pp), args)


def _samples_per_step(args) -> int:
    from nemo_rlhf.errors import UserError

    if args.samples_per_step is not None:
        if args.samples_per_step < 1:
            raise UserError("--samples-per-step must be >= 1", where="--samples-per-step", fix="pass 1 or more")
        return args.samples_per_step
    if args.spec is None:
        raise UserError("no spec and no --samples-per-step", fix="pass the spec or --samples-per-step N")
    spec = load(args)
    if args.stage == "ppo":
        return spec.ppo.rollout_batch_size
    section = getattr(spec, args.stage)
    return section.micro_batch_size * section.grad_accum


def run_curves(args) -> int:
    from nemo_rlhf.errors import UserError
    from nemo_rlhf.parity import logs

    if args.tensorboard is not None:
        if args.trl_log is None:
            raise UserError("--tensorboard needs --trl-log", fix="pass the TRL stage's train_log.jsonl")
        scalars, rows = logs.read_tensorboard(args.tensorboard), logs.read_trl_log(args.trl_log)
        bound = logs.MAX_DIVERGENCE if args.max_divergence is None else args.max_divergence
        return emit(logs.compare_logs(scalars, rows, args.stage, _samples_per_step(args), bound), args)
    if args.stage == "ppo":
        raise UserError("training curves cover sft and rm", where="--stage",
                        fix="PPO: compare logs with --tensorboard DIR --trl-log FILE, or `parity loss --stage ppo`")
    if args.steps < 1:
        raise UserError("--steps must be >= 1", where="--steps", fix="pass 1 or more")
    from nemo_rlhf.parity.curves import curve_parity

    spec = load(args)
    _check_dirs(args, "aligner_data", "hf")
    return emit(curve_parity(spec, args.stage, args.steps, tp=args.tp, pp=args.pp, hf_dir=_run_model(args, args.stage),
                             nemo_path=args.nemo, aligner_dir=args.aligner_data), args)


def run_config(args) -> int:
    from nemo_rlhf.errors import UserError
    from nemo_rlhf.parity.config import config_parity

    if args.configs is not None and not args.configs.is_dir():
        raise UserError(f"{args.configs} is not a folder", where="--configs",
                        fix="point at the configs/ folder `nemo-rlhf slurm render` wrote")
    return emit(config_parity(load(args), args.configs, str(args.spec)), args)
