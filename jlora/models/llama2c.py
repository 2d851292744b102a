"""Converter for llama2.c legacy checkpoints (e.g. `stories260K.bin` + `tok512.bin`).

Layout (version 0, float32): 7 int32 `[dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len]` (a negative vocab_size means an untied classifier follows), then
token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two RoPE tables, and the
classifier if untied. Matrices are PyTorch `(out, in)`; q/k rows are in Meta's interleaved RoPE
order and are permuted to Hugging Face's rotate-half order here (as transformers' converter does).

The header is checked against the file: a file of another size (truncated, or not this format:
a version-1/2 export, a PyTorch zip) or an impossible header is a `jlora.errors.ModelFileError`
naming the file, as is a tokenizer file that does not parse.

Example:
  >>> import pathlib, jlora.models.llama2c as l2c
  >>> d = pathlib.Path(__file__).parents[2] / "tests/fixtures/stories260K"
  >>> cfg, params = l2c.load_checkpoint(d / "stories260K.bin")
  >>> cfg.num_hidden_layers, params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape
  (5, (64, 64))
"""

from __future__ import annotations

import heapq
import os
import struct
from typing import Any

import numpy as np

from jlora.errors import ModelFileError
from jlora.models.llama.model import LlamaConfig

_HEADER = struct.Struct("7i")
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a (n_heads·head_dim, in) q/k weight from interleaved to rotate-half order."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(out, d_in)


def _expected_floats(header: tuple[int, ...]) -> int:
    """The float32 count after the header of a legacy checkpoint with this header."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = header
    hd = dim // n_heads
    kv_dim = n_kv * hd
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim
    classifier = 0 if vocab > 0 else abs(vocab) * dim
    return abs(vocab) * dim + n_layers * per_layer + dim + seq_len * hd + classifier


def _check_header(path: str | os.PathLike, raw: bytes) -> tuple[int, ...]:
    """The header of a legacy llama2.c checkpoint, checked against the file's size."""
    if raw[:4] == b"ak42":
        raise ModelFileError(
            f"{path}: a llama2.c version-1/2 export (magic 'ak42'); jlora reads the legacy "
            "version-0 float32 format (export.py --version 0)"
        )
    if raw[:2] == b"PK":
        raise ModelFileError(
            f"{path}: a zip file (a PyTorch checkpoint?), not a llama2.c .bin; jlora reads "
            "Hugging Face folders with safetensors, .gguf files and llama2.c legacy .bin files"
        )
    if len(raw) < _HEADER.size:
        raise ModelFileError(
            f"{path}: {len(raw)} bytes; too short for a llama2.c header of 7 int32 (28 bytes)"
        )
    header = _HEADER.unpack_from(raw)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = header
    shown = ", ".join(f"{k}={v}" for k, v in zip(_FIELDS, header, strict=True))
    ok = min(dim, hidden, n_layers, n_heads, n_kv, seq_len) > 0 and vocab != 0
    ok = ok and dim % n_heads == 0 and n_heads % n_kv == 0 and dim // n_heads % 2 == 0
    if not ok:
        raise ModelFileError(
            f"{path}: header {shown} is not a llama2.c model's (expected positive sizes, "
            "n_heads dividing dim into even head sizes, n_kv_heads dividing n_heads)"
        )
    size = _HEADER.size + 4 * _expected_floats(header)
    if len(raw) < size:
        raise ModelFileError(
            f"{path}: truncated: {len(raw)} bytes, the header ({shown}) needs {size}"
        )
    if len(raw) > size:
        raise ModelFileError(
            f"{path}: {len(raw) - size} bytes more than the header ({shown}) describes; "
            "not a llama2.c legacy (version-0) checkpoint"
        )
    return header


def load_checkpoint(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any]]:
    """`(LlamaConfig, params)` of a llama2.c legacy float32 checkpoint, in jlora's Llama layout."""
    with open(path, "rb") as f:
        raw = f.read()
    header = _check_header(path, raw)
    data = np.frombuffer(raw, np.float32, offset=_HEADER.size)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = header
    tied = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    offset = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal offset
        n = int(np.prod(shape))
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
            self._parse(path, f.read())
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self._memo: dict[tuple[str, bool], tuple[int, ...]] = {}

    def _parse(self, path: str | os.PathLike, raw: bytes) -> None:
        """Read `max_token_length`, then (score, length, bytes) per piece, to the end exactly."""
        pos = 4
        if len(raw) < pos:
            raise ModelFileError(f"{path}: not a llama2.c tokenizer: {len(raw)} bytes")
        (self.max_token_length,) = struct.unpack_from("i", raw)
        while pos < len(raw):
            if pos + 8 > len(raw):
                raise ModelFileError(
                    f"{path}: not a llama2.c tokenizer: piece {len(self.pieces)} is cut off at "
                    f"byte {pos} of {len(raw)} (truncated?)"
                )
            score, n = struct.unpack_from("fi", raw, pos)
            if not 0 <= n <= len(raw) - pos - 8:
                raise ModelFileError(
                    f"{path}: not a llama2.c tokenizer: piece {len(self.pieces)} at byte {pos} "
                    f"has length {n}, beyond the file's {len(raw)} bytes (truncated?)"
                )
            self.pieces.append(raw[pos + 8 : pos + 8 + n])
            self.scores.append(score)
            pos += 8 + n

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """llama2.c's encoder: a dummy-prefix space, characters (bytes as fallback), then merges.

        llama2.c merges the best-scoring adjacent pair (the leftmost among equals) until none is
        in the vocabulary. This does the same merges in the same order, with a heap of candidate
        pairs over a linked list, in O(n log n) rather than O(n²). Results are memoized: training
        runs tokenize the same texts again.
        """
        key = (text, bos)
        hit = self._memo.get(key)
        if hit is not None:
            return list(hit)
        ids: list[int] = []
        for ch in (" " + text) if text else "":
            piece = ch.encode()
            if piece in self.ids:
                ids.append(self.ids[piece])
            else:
                ids.extend(b + 3 for b in piece)  # byte fallback <0x00>.. are ids 3..258
        ids = self._merge(ids)
        out = [self.bos_token_id, *ids] if bos else ids
        if len(self._memo) < 1_000_000:
            self._memo[key] = tuple(out)
        return out

    def _merge(self, ids: list[int]) -> list[int]:
        n = len(ids)
        nxt = list(range(1, n + 1))  # linked list over the original positions; n is the end
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])
                if merged is not None:
                    # Position i orders pairs left to right, so ties go to the leftmost pair.
                    heapq.heappush(heap, (-self.scores[merged], i, ids[i], ids[j], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or ids[i] != left or ids[j] != right:
                continue  # stale: one side merged since this pair was pushed
            ids[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [ids[i] for i in range(n) if alive[i]]

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
