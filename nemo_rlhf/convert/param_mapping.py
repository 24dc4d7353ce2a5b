"""The split/merge math between Hugging Face tensors and Megatron tensors, written once.

Every weight of every family is converted by one of a handful of *kinds*. A kind knows
three things:

* `pieces`: where each block of rows of the Megatron tensor of one layer comes from (rows of
  one HF tensor, or zeros), from shapes alone; the layout is defined there once;
* `to_megatron`: the HF tensor(s) of one layer -> the Megatron tensor of that layer, in the
  global (TP=1) layout a Megatron distributed checkpoint stores: the pieces assembled (a
  converter may instead write the pieces as separate chunks of the checkpoint, straight from
  the source's pages, which is what `hf_to_nemo` does);
* `to_hf`: the inverse (the same table read backwards on export);
* `shard`: the piece of the global tensor that tensor-parallel rank `r` of `tp` holds, which
  is what megatron-core's own loader puts into each rank (used to check our layout and to
  explain TP errors before any process starts);
* `unshard`: the inverse of `shard`, the global tensor from the pieces of all TP ranks in rank
  order (used to read legacy per-rank `.nemo` checkpoints).

The kinds:

| kind | HF tensors | TP split |
|---|---|---|
| replicated | 1 | none (norms, biases of row-parallel layers) |
| column | 1 | dim 0 in equal blocks |
| row | 1 | dim 1 in equal blocks |
| vocab | 1 | dim 0 after padding to the padded vocabulary (padding rows are zeros) |
| qkv | q, k, v | dim 0 by whole query groups |
| gated_mlp | gate, up | rank r holds cat(gate_r, up_r) |

Megatron's fused QKV layout (`linear_qkv`): for each query group g, its nh/ng query heads,
then k_g, then v_g, each head `head_dim` rows. A plain cat(Q, K, V) is wrong (and the tests
prove the certificate catches it). `linear_fc1` of a gated MLP is cat(gate, up) globally; under
TP rank r holds cat(gate_r, up_r), not a contiguous chunk of the global tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_rlhf.errors import UserError


@dataclass(frozen=True)
class Geometry:
    """The model sizes the kinds need.

    Attributes:
        num_heads: Attention (query) heads.
        num_query_groups: Key/value heads (query groups); equals num_heads without GQA.
        head_dim: Size of one head (kv_channels).
        vocab_size: Rows of the HF embedding / output layer.
        padded_vocab_size: Rows stored in the Megatron checkpoint (>= vocab_size).
    """

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def _split_evenly(size: int, parts: int, what: str, fix: str) -> int:
    """Block size of `size` split into `parts`; a UserError naming the fix when it does not divide."""
    if parts < 1 or size % parts:
        raise UserError(f"Cannot evenly split {what} size {size} across {parts} TP ranks", fix=fix)
    return size // parts


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a Megatron tensor (dim 0) are rows [src_start, src_start + stop - start)
    of HF tensor number `source`, or zeros when `source` is None (vocabulary padding)."""

    start: int
    stop: int
    source: int | None
    src_start: int = 0


class Kind:
    """Base of the mapping kinds: one HF tensor, unchanged, replicated under TP."""

    name = "replicated"
    num_hf = 1  # how many HF tensors make one Megatron tensor

    def pieces(self, hf_shapes: Sequence[tuple[int, ...]], geo: Geometry) -> list[Piece]:
        """The Megatron tensor's row blocks and their sources, in order; checks the HF shapes."""
        return [Piece(0, hf_shapes[0][0], 0)]

    def to_megatron(self, hf: Sequence[torch.Tensor], geo: Geometry) -> torch.Tensor:
        """The pieces assembled (the HF tensor itself when it is the only, whole piece)."""
        if hf[0].dim() == 0:
            return hf[0]
        pieces = self.pieces([tuple(t.shape) for t in hf], geo)
        first = pieces[0]
        if len(pieces) == 1 and first.source is not None and first.stop == hf[first.source].shape[0]:
            return hf[first.source]
        out = hf[0].new_empty((pieces[-1].stop, *hf[0].shape[1:]))
        for p in pieces:
            if p.source is None:
                out[p.start:p.stop].zero_()
            else:
                out[p.start:p.stop].copy_(hf[p.source][p.src_start:p.src_start + p.stop - p.start])
        return out

    def to_hf(self, tensor: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
        return [tensor]

    def megatron_shape(self, hf_shapes: Sequence[tuple[int, ...]], geo: Geometry) -> tuple[int, ...]:
        """Global Megatron shape from the HF shapes, without touching data (for planning)."""
        if not hf_shapes[0]:
            return ()
        if len({tuple(s[1:]) for s in hf_shapes}) > 1:
            raise UserError(f"the {self.name} tensors of one layer disagree in their trailing dimensions: "
                            f"{[tuple(s) for s in hf_shapes]}",
                            fix="use a checkpoint whose config.json matches its weights")
        return (self.pieces(hf_shapes, geo)[-1].stop, *hf_shapes[0][1:])

    def shard(self, tensor: torch.Tensor, rank: int, tp: int, geo: Geometry) -> torch.Tensor:
        return tensor

    def unshard(self, parts: Sequence[torch.Tensor], geo: Geometry) -> torch.Tensor:
        """The global tensor from every TP rank's piece, in rank order (the inverse of `shard`).

        Replicated: every rank must hold the same tensor (meta tensors are compared by shape only).
        """
        first = parts[0]
        for rank, part in enumerate(parts[1:], start=1):
            if part.shape != first.shape or (not part.is_meta and not torch.equal(part, first)):
                raise UserError(f"TP rank {rank} holds a different copy of a replicated tensor than rank 0",
                                fix="the per-rank checkpoint files do not come from one model: copy them again")
        return first


class Column(Kind):
    """Column-parallel linear: output features (dim 0) split in equal blocks."""

    name = "column"

    def shard(self, tensor, rank, tp, geo):
        block = _split_evenly(tensor.shape[0], tp, "dimension 0", "choose a TP size that divides it")
        return tensor[rank * block:(rank + 1) * block]

    def unshard(self, parts, geo):
        return torch.cat(list(parts), dim=0)


class Row(Kind):
    """Row-parallel linear: input features (dim 1) split in equal blocks."""

    name = "row"

    def shard(self, tensor, rank, tp, geo):
        block = _split_evenly(tensor.shape[1], tp, "dimension 1", "choose a TP size that divides it")
        return tensor[:, rank * block:(rank + 1) * block]

    def unshard(self, parts, geo):
        return torch.cat(list(parts), dim=1)


class Vocab(Column):
    """Embedding or output layer: rows padded with zeros to the padded vocabulary, split on dim 0.

    Padding rows belong to no token; export drops them, so HF -> NeMo -> HF is exact.
    """

    name = "vocab"

    def pieces(self, hf_shapes, geo):
        if hf_shapes[0][0] != geo.vocab_size:
            raise UserError(f"embedding has {hf_shapes[0][0]} rows but the config says vocab_size={geo.vocab_size}",
                            fix="use a checkpoint whose config.json matches its weights")
        rows = [Piece(0, geo.vocab_size, 0)]
        return rows + [Piece(geo.vocab_size, geo.padded_vocab_size, None)] * (geo.padded_vocab_size > geo.vocab_size)

    def to_hf(self, tensor, geo):
        if tensor.shape[0] < geo.vocab_size:
            raise UserError(f"checkpoint embedding has {tensor.shape[0]} rows, fewer than the vocabulary "
                            f"({geo.vocab_size})", fix="check override_vocab_size in model_config.yaml")
        return [tensor[:geo.vocab_size]]

    def shard(self, tensor, rank, tp, geo):
        block = _split_evenly(tensor.shape[0], tp, "vocabulary (dimension 0)",
                              "pad the vocabulary to a multiple of the TP size (override_vocab_size)")
        return tensor[rank * block:(rank + 1) * block]


class Qkv(Kind):
    """Separate q, k, v projections <-> Megatron's fused, per-query-group interleaved linear_qkv.

    Works for weights [rows, hidden] and biases [rows] alike (trailing dims are carried along).
    """

    name = "qkv"
    num_hf = 3

    def pieces(self, hf_shapes, geo):
        self._check(*hf_shapes, geo)
        q_rows, d = geo.heads_per_group * geo.head_dim, geo.head_dim
        group = q_rows + 2 * d
        out = []
        for g in range(geo.num_query_groups):  # q_g, then k_g, then v_g
            out += [Piece(g * group, g * group + q_rows, 0, g * q_rows),
                    Piece(g * group + q_rows, g * group + q_rows + d, 1, g * d),
                    Piece(g * group + q_rows + d, (g + 1) * group, 2, g * d)]
        return out

    def to_hf(self, tensor, geo):
        ng, hpg, d = geo.num_query_groups, geo.heads_per_group, geo.head_dim
        rest = tensor.shape[1:]
        expected = ng * (hpg + 2) * d
        if tensor.shape[0] != expected:
            raise UserError(f"linear_qkv has {tensor.shape[0]} rows, expected {expected} for {geo.num_heads} heads, "
                            f"{ng} query groups, head size {d}", fix="check the .nemo's model_config.yaml")
        grouped = tensor.reshape(ng, hpg + 2, d, *rest)
        q = grouped[:, :hpg].reshape(ng * hpg * d, *rest)
        k = grouped[:, hpg].reshape(ng * d, *rest)
        v = grouped[:, hpg + 1].reshape(ng * d, *rest)
        return [q.contiguous(), k.contiguous(), v.contiguous()]

    def shard(self, tensor, rank, tp, geo):
        groups = _split_evenly(geo.num_query_groups, tp, "query groups",
                               f"choose a TP size that divides num_query_groups={geo.num_query_groups}")
        rows = groups * (geo.heads_per_group + 2) * geo.head_dim
        return tensor[rank * rows:(rank + 1) * rows]

    def unshard(self, parts, geo):
        return torch.cat(list(parts), dim=0)  # each rank holds a contiguous block of whole groups

    @staticmethod
    def _check(q, k, v, geo):
        d = geo.head_dim
        want = (geo.num_heads * d, geo.num_query_groups * d, geo.num_query_groups * d)
        have = (q[0], k[0], v[0])
        if have != want:
            raise UserError(f"q/k/v projections have {have} rows, expected {want} for {geo.num_heads} heads, "
                            f"{geo.num_query_groups} key/value heads, head size {d}",
                            fix="use a checkpoint whose config.json matches its weights")


class GatedMlp(Kind):
    """Separate gate and up projections <-> Megatron's linear_fc1 = cat(gate, up)."""

    name = "gated_mlp"
    num_hf = 2

    def pieces(self, hf_shapes, geo):
        gate, up = hf_shapes
        if tuple(gate) != tuple(up):
            raise UserError(f"gate_proj {tuple(gate)} and up_proj {tuple(up)} differ in shape",
                            fix="use a checkpoint whose config.json matches its weights")
        return [Piece(0, gate[0], 0), Piece(gate[0], 2 * gate[0], 1)]

    def to_hf(self, tensor, geo):
        gate, up = tensor.chunk(2)
        return [gate.contiguous(), up.contiguous()]

    def shard(self, tensor, rank, tp, geo):
        gate, up = tensor.chunk(2)
        block = _split_evenly(gate.shape[0], tp, "MLP intermediate (ffn_hidden_size)",
                              "choose a TP size that divides ffn_hidden_size")
        part = slice(rank * block, (rank + 1) * block)
        return torch.cat([gate[part], up[part]])

    def unshard(self, parts, geo):
        halves = [part.chunk(2) for part in parts]  # rank r: cat(gate_r, up_r)
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])


REPLICATED = Kind()
COLUMN = Column()
ROW = Row()
VOCAB = Vocab()
QKV = Qkv()
GATED_MLP = GatedMlp()

KINDS = {kind.name: kind for kind in (REPLICATED, COLUMN, ROW, VOCAB, QKV, GATED_MLP)}


class FusedQkv(Qkv):
    """A fused HF query_key_value already in Megatron's layout (GPT-NeoX) <-> linear_qkv, unchanged.

    GPT-NeoX stores, per head, that head's q rows, then its k rows, then its v rows: Megatron's
    per-query-group layout with one query group per head. The tensor is copied as it is; only
    its size is checked, and TP splits it by whole query groups like `qkv`.
    """

    name = "fused_qkv"
    num_hf = 1

    def pieces(self, hf_shapes, geo):
        expected = geo.num_query_groups * (geo.heads_per_group + 2) * geo.head_dim
        if hf_shapes[0][0] != expected:
            raise UserError(f"query_key_value has {hf_shapes[0][0]} rows, expected {expected} for {geo.num_heads} "
                            f"heads of size {geo.head_dim}",
                            fix="use a checkpoint whose config.json matches its weights")
        return [Piece(0, expected, 0)]

    def to_hf(self, tensor, geo):
        return [Kind.to_megatron(self, [tensor], geo)]


FUSED_QKV = FusedQkv()
KINDS[FUSED_QKV.name] = FUSED_QKV
