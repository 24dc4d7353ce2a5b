"""The PPO rollout file: one fixed rollout batch in safetensors, what `parity loss --stage ppo --rollouts` reads.

Per-response fields (B x T response coordinates) are `ppo_math.Rollout`'s; with tokens (for the model
check) also `RolloutTokens.FIELDS` in TRL's layout. `save_token_rollout` writes one (`--save-rollout`, and
the PPO stage for the last rollout of its TRL run: RUN/ppo/rollout.safetensors); `new_logprobs` and
`new_values` may be absent where the models compute them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemo_rlhf.errors import UserError
from nemo_rlhf.parity.ppo_math import Rollout

CURRENT = ("new_logprobs", "new_values")  # what the models compute; optional in a file with tokens


@dataclass(frozen=True)
class RolloutTokens:
    """The tokens of a rollout in TRL's layout (the Rollout's numbers are per response position)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded with the pad id
    prompt_lengths: torch.Tensor  # (B,)
    response_ids: torch.Tensor  # (B, T) the pad id after the EOS / the last real token

    FIELDS = ("prompt_ids", "prompt_lengths", "response_ids")

    def query_responses(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    def nemo_rows(self, pad_id: int) -> torch.Tensor:
        """NeMo-Aligner's layout: each row its prompt then its response, right-padded to one width."""
        width = int(self.prompt_lengths.max()) + self.response_ids.shape[1]
        rows = torch.full((len(self.prompt_lengths), width), pad_id, dtype=torch.long)
        start = self.prompt_ids.shape[1] - self.prompt_lengths
        for i, (s, p) in enumerate(zip(start.tolist(), self.prompt_lengths.tolist())):
            rows[i, :p] = self.prompt_ids[i, s:]
            rows[i, p:p + self.response_ids.shape[1]] = self.response_ids[i]
        return rows

    def response_index(self) -> torch.Tensor:
        """(B, T) index into NeMo's next-token coordinates (row[:, :-1]) of each response token's prediction."""
        t = torch.arange(self.response_ids.shape[1]).unsqueeze(0)
        return self.prompt_lengths.unsqueeze(1) - 1 + t


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read {path}: {err}", where="--rollouts", fix="pass a safetensors file") from None


def read_rollout(path: Path, optional: tuple[str, ...] = ()):
    """A fixed rollout batch from safetensors holding every `ppo_math.Rollout` field (B x T response coordinates);
    fields in `optional` may be absent (zeros: the caller computes them)."""
    tensors = _load(path)
    names = [f.name for f in fields(Rollout)]
    missing = [n for n in names if n not in tensors and n not in optional]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}", where="--rollouts",
                        fix=f"save all of {', '.join(names)} (see nemo_rlhf.parity.ppo_math.Rollout)")
    like = tensors.get("logprobs")
    values = {n: tensors[n] if n in tensors else torch.zeros_like(like) for n in names}
    values["ends_with_eos"] = values["ends_with_eos"].bool()
    values["lengths"] = values["lengths"].long()
    return Rollout(**values)


def read_token_rollout(path: Path) -> tuple[RolloutTokens, Rollout]:
    """A rollout file with tokens: `RolloutTokens.FIELDS` plus Rollout's fields (new_* may be absent: the
    models compute them)."""
    tensors = _load(path)
    missing = [n for n in RolloutTokens.FIELDS if n not in tensors]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: the models need the rollout's tokens",
                        where="--rollouts", fix="save prompt_ids (left-padded), prompt_lengths and response_ids, "
                                                "or pass --math-only to compare the formulations on its numbers")
    tokens = RolloutTokens(tensors["prompt_ids"].long(), tensors["prompt_lengths"].long(),
                           tensors["response_ids"].long())
    rollout = read_rollout(path, optional=CURRENT)
    b, t = tokens.response_ids.shape
    if rollout.logprobs.shape != (b, t) or len(tokens.prompt_lengths) != b:
        raise UserError(f"{path}: response_ids is {b} x {t} but logprobs is {tuple(rollout.logprobs.shape)} and "
                        f"prompt_lengths has {len(tokens.prompt_lengths)}", where="--rollouts",
                        fix="save every per-position field in response coordinates (B x T)")
    return tokens, rollout


def save_token_rollout(path: Path, tokens: RolloutTokens, rollout: Rollout, with_current: bool = True) -> Path:
    """Write a rollout `read_token_rollout` reads back (atomically); without `CURRENT` unless `with_current`."""
    from safetensors.torch import save

    from nemo_rlhf.atomic_file import atomic_open

    numbers = {k: v for k, v in asdict(rollout).items() if with_current or k not in CURRENT}
    tensors = {**{name: getattr(tokens, name) for name in RolloutTokens.FIELDS}, **numbers}
    with atomic_open(path, "wb") as handle:
        handle.write(save({k: v.contiguous() for k, v in tensors.items()}))
    return Path(path)
