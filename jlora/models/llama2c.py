"""Converter for llama2.c legacy checkpoints (e.g. `stories260K.bin` + `tok512.bin`).

Layout (version 0, float32): 7 int32 `[dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len]` (a negative vocab_size means an untied classifier follows), then
token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two RoPE tables, and the
classifier if untied. Matrices are PyTorch `(out, in)`; q/k rows are in Meta's interleaved RoPE
order and are permuted to Hugging Face's rotate-half order here (as transformers' converter does).

Example:
  >>> import pathlib, jlora.models.llama2c as l2c
  >>> d = pathlib.Path(__file__).parents[2] / "tests/fixtures/stories260K"
  >>> cfg, params = l2c.load_checkpoint(d / "stories260K.bin")
  >>> cfg.num_hidden_layers, params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape
  (5, (64, 64))
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from jlora.models.llama.model import LlamaConfig


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a (n_heads·head_dim, in) q/k weight from interleaved to rotate-half order."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(out, d_in)


def load_checkpoint(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any]]:
    """`(LlamaConfig, params)` of a llama2.c legacy float32 checkpoint, in jlora's Llama layout."""
    with open(path, "rb") as f:
        header = struct.unpack("7i", f.read(28))
        data = np.frombuffer(f.read(), np.float32)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = header
    tied = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    offset = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal offset
        n = int(np.prod(shape))
        if offset + n > data.size:
            raise ValueError(f"{path}: truncated llama2.c checkpoint (header {header})")
        out = data[offset : offset + n].reshape(shape)
        offset += n
        return out

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hd // 2)  # RoPE tables: recomputed by the model
    take(seq_len, hd // 2)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=seq_len,
        tie_word_embeddings=tied,
    )
    model: dict[str, Any] = {"embed_tokens": {"embedding": emb.copy()}}
    for i in range(n_layers):
        model[f"layers_{i}"] = {
            "input_layernorm": {"weight": rms_att[i].copy()},
            "post_attention_layernorm": {"weight": rms_ffn[i].copy()},
            "self_attn": {
                "q_proj": {"kernel": _permute_rope(wq[i], n_heads).T.copy()},
                "k_proj": {"kernel": _permute_rope(wk[i], n_kv).T.copy()},
                "v_proj": {"kernel": wv[i].T.copy()},
                "o_proj": {"kernel": wo[i].T.copy()},
            },
            "mlp": {
                "gate_proj": {"kernel": w1[i].T.copy()},
                "down_proj": {"kernel": w2[i].T.copy()},
                "up_proj": {"kernel": w3[i].T.copy()},
            },
        }
    model["norm"] = {"weight": rms_final.copy()}
    params: dict[str, Any] = {"model": model}
    if not tied:
        params["lm_head"] = {"kernel": take(vocab, dim).T.copy()}
    return config, params


class Llama2cTokenizer:
    """The llama2.c tokenizer export: BPE by merge scores over byte-fallback pieces.

    Calling it returns `{"input_ids", "attention_mask"}` as transformers' tokenizers do.
    """

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, path: str | os.PathLike) -> None:
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        with open(path, "rb") as f:
            (self.max_token_length,) = struct.unpack("i", f.read(4))
            while chunk := f.read(8):
                score, n = struct.unpack("fi", chunk)
                self.pieces.append(f.read(n))
                self.scores.append(score)
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """llama2.c's encoder: a dummy-prefix space, characters (bytes as fallback), then merges."""
        ids: list[int] = []
        for ch in (" " + text) if text else "":
            piece = ch.encode()
            if piece in self.ids:
                ids.append(self.ids[piece])
            else:
                ids.extend(b + 3 for b in piece)  # byte fallback <0x00>.. are ids 3..258
        while True:
            best = (-1e30, -1, -1)
            for i in range(len(ids) - 1):
                merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best[0]:
                    best = (self.scores[merged], merged, i)
            if best[1] < 0:
                break
            _, merged, i = best
            ids[i : i + 2] = [merged]
        return [self.bos_token_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (BOS/EOS dropped, byte tokens joined as UTF-8)."""
        out = bytearray()
        for i in ids:
            if i in (self.bos_token_id, self.eos_token_id):
                continue
            piece = self.pieces[i]
            if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
                out.append(int(piece[3:5], 16))
            else:
                out += piece
        return out.decode("utf-8", errors="replace").lstrip(" ")

    def __call__(self, texts: str | list[str]) -> dict[str, list[list[int]]]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.encode(t) for t in batch]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
