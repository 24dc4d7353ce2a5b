"""Keep the last rollout of the TRL PPO run: the fixed rollout `nemo-rlhf parity loss --stage ppo` replays.

TRL 1.12's PPOTrainer holds a rollout (queries, responses, log-probs, reference log-probs, values,
scores) only as local variables of `PPOTrainer.train` and offers no hook that sees them. The one point
where all of them are alive is the `on_step_end` callback, called from inside that loop after the PPO
epochs on the rollout; `RolloutCapture` reads them there from the loop's frame, read-only, by TRL's own
names (the same names `parity.ppo_math` runs TRL's source lines with). A TRL whose loop lacks one of
them is reported in the stage notes and nothing is written.

What is written (`parity.rollout_file` format): TRL's left-padded queries, the responses truncated
after the EOS, and per response position TRL's own rollout-time numbers: log-probs and reference
log-probs (tempered, as TRL computes them), the value model's values, the reward model's raw scores
(TRL's missing_eos_penalty taken back out: the parity math applies it per side), lengths and EOS flags.
The policy and value model the stage saves are the ones that trained on that rollout.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import TrainerCallback

from nemo_rlhf.parity.ppo_math import Rollout
from nemo_rlhf.parity.rollout_file import RolloutTokens, save_token_rollout

ROLLOUT = "rollout.safetensors"
VALUE_MODEL_DIR = "value_model"
NAMES = ("queries", "postprocessed_responses", "sequence_lengths", "contain_eos_token", "logprobs", "ref_logprobs",
         "values", "scores")


def _train_frame():
    """The frame of TRL's PPOTrainer.train that is calling back, or None."""
    from trl.experimental.ppo.ppo_trainer import PPOTrainer

    code = PPOTrainer.train.__code__
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


class RolloutCapture(TrainerCallback):
    """Copies the rollout of the last PPO step; `write` saves it.

    Only the last step: on Python < 3.13 reading a running frame's f_locals leaves a snapshot dict on
    the frame that keeps those tensors alive until the next read or the frame's end (here: train()
    returning right after), so reading every step would hold one extra rollout through the next.
    """

    def __init__(self, pad_id: int, missing_eos_penalty: float | None):
        self.pad_id, self.penalty = pad_id, missing_eos_penalty
        self.last: tuple[RolloutTokens, Rollout] | None = None
        self.problem = ""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:
            return
        frame = _train_frame()
        seen = frame.f_locals if frame is not None else {}
        missing = [n for n in NAMES if n not in seen]
        if missing:
            self.problem = f"TRL's PPOTrainer.train holds no {', '.join(missing)} at on_step_end"
            return
        v = {n: seen[n].detach().to("cpu") for n in NAMES}
        del frame, seen
        scores = v["scores"].float().clone()
        if self.penalty is not None:
            scores[~v["contain_eos_token"]] += self.penalty  # raw RM scores: TRL subtracted the penalty in place
        queries = v["queries"].long()
        tokens = RolloutTokens(queries, (queries != self.pad_id).sum(1), v["postprocessed_responses"].long())
        zeros = torch.zeros_like(v["logprobs"], dtype=torch.float32)
        self.last = (tokens, Rollout(lengths=v["sequence_lengths"].long() + 1, ends_with_eos=v["contain_eos_token"],
                                     logprobs=v["logprobs"].float(), ref_logprobs=v["ref_logprobs"].float(),
                                     values=v["values"].float(), scores=scores, new_logprobs=zeros,
                                     new_values=zeros))

    def write(self, out: Path) -> dict:
        """Save the last rollout to out/ROLLOUT; the note for the manifest."""
        if self.last is None:
            return {"written": False, "why": self.problem or "TRL's train loop did not reach its last step"}
        tokens, rollout = self.last
        save_token_rollout(out / ROLLOUT, tokens, rollout, with_current=False)
        return {"written": True, "file": ROLLOUT, "value_model": VALUE_MODEL_DIR,
                "responses": int(len(rollout.lengths)), "response_length": int(rollout.logprobs.shape[1]),
                "without_eos": int((~rollout.ends_with_eos).sum())}
