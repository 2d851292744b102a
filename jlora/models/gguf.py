"""Reader for Llama-family GGUF files (llama.cpp's format): Hugging Face names, PyTorch layout.

A GGUF holds metadata fields and (possibly quantised) tensors under llama.cpp's names. This
module maps them back to what a `transformers` Llama checkpoint would hold:

* Names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight` etc.;
  `token_embd` / `output_norm` / `output` -> `model.embed_tokens` / `model.norm` / `lm_head`.
  Tensors without a Hugging Face counterpart (`rope_freqs.weight`) are skipped with a warning.
* Layout: GGUF lists dims fastest-first (ggml's `ne`), the reverse of numpy, so a `[in, out]`
  GGUF shape is an `(out, in)` array -- already PyTorch's `nn.Linear` layout; nothing transposed.
* Values: every tensor is dequantised to float32 by `gguf.quants.dequantize`, one per `read`,
  so peak memory is the memory-mapped file plus one tensor; or, `read(name, keep_blocks=True)`,
  a linear layer's Q4_0 / Q4_1 / Q8_0 weight is kept as its blocks (`KeptBlocks`, whose `.T`
  is the Flax kernel as a `jlora.quant.QuantizedKernel`): nothing dequantised.
* RoPE: llama.cpp rotates interleaved pairs, so `convert_hf_to_gguf.py` permutes the rows of
  q_proj / k_proj (weights and biases) from Hugging Face's rotate-half order; `read` undoes it.
* Config: a `LlamaConfig`-compatible dict from the `llama.*` fields; `tie_word_embeddings` is
  true when the file has no `output.weight`; token ids from `tokenizer.ggml.*`.

`tokenizer` rebuilds a `PreTrainedTokenizerFast` from the `tokenizer.ggml.*` fields without
torch (transformers' own `gguf_file=` path imports torch). Only byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`) are supported, not sentencepiece ones; the pre-tokenizer is
picked by `tokenizer.ggml.pre` (checked against SmolLM2; Llama 3's regex is untested here).

A missing, truncated or corrupt file, another architecture, a missing `llama.*` field or a
sentencepiece vocabulary is a `jlora.errors.ModelFileError` naming the file.

Example:
  >>> import numpy as np
  >>> w = np.arange(8.0).reshape(8, 1)  # one head of width 8, rows in llama.cpp's order
  >>> unpermute_rope(w, n_head=1).ravel().tolist()  # back to rotate-half: evens, then odds
  [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
  >>> ckpt = GGUFCheckpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
  >>> ckpt.read("model.layers.0.self_attn.k_proj.weight").shape  # doctest: +SKIP
  (192, 576)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jlora.errors import ModelFileError, exception_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# GGUF tensor name suffix -> Hugging Face module path inside `model.layers.{i}`.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp). SmolLM-style
# vocabularies split every digit off first; Llama 3 uses its own regex. Others: GPT-2's.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"}


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k weight (or bias) from llama.cpp's interleaved RoPE order to rotate-half.

    Inverts `convert_hf_to_gguf.py`'s `w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)`.

    >>> unpermute_rope(np.array([0, 1, 2, 3, 10, 11, 12, 13]), n_head=2).tolist()
    [0, 2, 1, 3, 10, 12, 11, 13]
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class KeptBlocks:
    """A GGUF linear weight (out, in) kept as its GGML blocks (`jlora.quant.ggml`); `.T` is the
    Flax kernel (in, out) it stores, as a `jlora.quant.QuantizedKernel` over host arrays."""

    def __init__(self, blocks: Any, fmt: str, shape: tuple[int, int]) -> None:
        self.blocks, self.fmt, self.shape = blocks, fmt, shape

    @property
    def T(self) -> Any:  # noqa: N802 (NumPy's name)
        from jlora.quant import QuantizedKernel

        return QuantizedKernel(data=self.blocks, fmt=self.fmt, shape=self.shape[::-1], blocksize=32)


# Open readers by (real path, size, mtime): gguf's reader parses every metadata field in
# Python when it opens a file (SmolLM2's 49,152-token vocabulary and merges: 22 s measured on a
# busy 2-core machine), and runs load the same file again (a quantized and a plain load, a
# pre-pass model). The readers are read-only memory maps; a changed file has another key.
_READERS: dict[tuple[str, int, int], Any] = {}
_MAX_READERS = 2


class GGUFCheckpoint:
    """A memory-mapped Llama GGUF: `config`, `names()` and `read(name)` in Hugging Face terms.

    Example (SmolLM2-135M): `GGUFCheckpoint(path).config["num_hidden_layers"]` is 30, and
    `{n: torch.from_numpy(a) for n, a in ckpt.items()}` is a `LlamaForCausalLM` state dict
    (add `lm_head.weight` as the embedding when `config["tie_word_embeddings"]`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._reader = self._open()
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ModelFileError(
                f"{self.path}: GGUF architecture {arch!r} is not supported (only 'llama')"
            )
        self._tensors: dict[str, Any] = {}  # Hugging Face name -> gguf ReaderTensor
        for t in self._reader.tensors:
            name = self._hf_name(t.name)
            if name is None:
                logger.warning("%s: skipping %s (no Hugging Face tensor)", self.path, t.name)
            else:
                self._tensors[name] = t
        self.config = self._make_config()
        types = sorted({t.tensor_type.name for t in self._reader.tensors})
        logger.info("%s: %d tensors (%s)", self.path, len(self._tensors), ", ".join(types))

    def _open(self) -> Any:
        """The file's `gguf.GGUFReader`; a missing, truncated or corrupt file is a
        `ModelFileError`."""
        from gguf import GGUFReader  # optional dependency: imported only when used

        if not os.path.isfile(self.path):
            raise ModelFileError(f"{self.path}: no such file")
        st = os.stat(self.path)
        key = (os.path.realpath(self.path), st.st_size, st.st_mtime_ns)
        if key in _READERS:
            return _READERS[key]
        try:
            reader = GGUFReader(self.path, "r")
        except Exception as e:  # bad magic or version, truncated tensor data: all end up here
            reason = exception_line(e)
            raise ModelFileError(
                f"{self.path}: not a readable GGUF file ({reason}); it may be truncated or "
                "corrupt: download it again"
            ) from None
        while len(_READERS) >= _MAX_READERS:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = reader
        return reader

    def field(self, key: str, default: Any = None) -> Any:
        """The value of a GGUF metadata field (str, number, bool or list), or `default`."""
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    @staticmethod
    def _hf_name(gguf_name: str) -> str | None:
        if m := _BLOCK.fullmatch(gguf_name):
            layer, kind, suffix = m.groups()
            module = _LAYER_NAMES.get(kind)
            return module and f"model.layers.{layer}.{module}.{suffix}"
        stem, _, suffix = gguf_name.rpartition(".")
        return f"{_GLOBAL_NAMES[stem]}.{suffix}" if stem in _GLOBAL_NAMES else None

    def _required(self, key: str) -> int:
        """The int value of a metadata field the config needs; a missing one names it."""
        value = self.field(key)
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise ModelFileError(f"{self.path}: GGUF field {key}={value!r}; expected an integer")
        return int(value)

    def _make_config(self) -> dict[str, Any]:
        a = lambda key, default=None: self.field(f"llama.{key}", default)  # noqa: E731
        need = lambda key: self._required(f"llama.{key}")  # noqa: E731
        n_head = need("attention.head_count")
        hidden = need("embedding_length")
        vocab = a("vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        # GGUF stores floats as float32: go through float32's shortest repr (1e-05, not 9.99e-06).
        f32 = lambda x: float(str(np.float32(x)))  # noqa: E731
        config: dict[str, Any] = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length"),
            "num_hidden_layers": need("block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
            "head_dim": int(a("attention.key_length", hidden // n_head)),
            "hidden_act": "silu",
            "rms_norm_eps": f32(a("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": f32(a("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(a("context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "mlp_bias": False,
        }
        for key, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            if (token_id := self.field(f"tokenizer.ggml.{name}_token_id")) is not None:
                config[f"{key}_token_id"] = int(token_id)
        rope_type = a("rope.scaling.type")
        if rope_type not in (None, "none"):
            config["rope_scaling"] = {
                "rope_type": rope_type,
                "factor": f32(a("rope.scaling.factor")),
            }
            if (orig := a("rope.scaling.original_context_length")) is not None:
                config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
        return config

    def names(self) -> list[str]:
        """Hugging Face names in the file: embeddings, layers in order, final norm, lm_head."""

        def rank(name: str) -> int:
            part = name.split(".")
            return (
                int(part[2]) if part[1] == "layers" else {"embed_tokens": -1}.get(part[1], 1 << 30)
            )

        return sorted(self._tensors, key=lambda n: (rank(n), n.startswith("lm_head")))

    def read(self, name: str, *, keep_blocks: bool = False) -> Any:
        """One tensor by Hugging Face name, dequantised to float32 in PyTorch layout (out, in);
        with `keep_blocks`, a linear layer's Q4_0 / Q4_1 / Q8_0 weight as `KeptBlocks` instead
        (the embeddings, norms and other types are dequantised as always)."""
        from gguf.quants import dequantize

        from jlora.quant import ggml

        if name not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml's ne is fastest-first
        fmt = self.tensor_type(name)
        if keep_blocks and fmt in ggml.FORMATS and len(shape) == 2 and "embed_tokens" not in name:
            blocks = ggml.from_bytes(t.data, fmt, rows=shape[0])
            heads = self._rope_heads(name)
            if heads:  # whole rows (output channels) move: the blocks stay blocks
                blocks = jax.tree.map(
                    lambda a: np.ascontiguousarray(unpermute_rope(a, heads)), blocks
                )
            return KeptBlocks(blocks, fmt, shape)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if heads := self._rope_heads(name):
            w = unpermute_rope(w, heads)
        return w if w.flags.writeable and w.flags.c_contiguous else np.array(w)  # not the mmap

    def tensor_type(self, name: str) -> str:
        """The GGML type of tensor `name` as stored, lower case ("q4_1", "f32", ...)."""
        return self._tensors[name].tensor_type.name.lower()

    def _rope_heads(self, name: str) -> int:
        """The head count whose RoPE order `read` undoes for tensor `name` (0: none)."""
        if ".self_attn.q_proj." in name:
            return int(self.config["num_attention_heads"])
        if ".self_attn.k_proj." in name:
            return int(self.config["num_key_value_heads"])
        return 0

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """`(name, array)` pairs, one tensor in memory at a time."""
        for name in self.names():
            yield name, self.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)


def tokenizer(ckpt: GGUFCheckpoint | str | os.PathLike) -> PreTrainedTokenizerFast:
    """A `transformers.PreTrainedTokenizerFast` rebuilt from the file's byte-level BPE fields.

    Example (SmolLM2): `tokenizer(path)(" Berlin")["input_ids"]` is `[11452]`; the file's chat
    template, if any, is set, so `apply_chat_template` works too.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pre_tok
    from transformers import PreTrainedTokenizerFast

    if not isinstance(ckpt, GGUFCheckpoint):
        ckpt = GGUFCheckpoint(ckpt)
    f = lambda key, default=None: ckpt.field(f"tokenizer.ggml.{key}", default)  # noqa: E731
    if (kind := f("model")) != "gpt2":
        raise ModelFileError(
            f"{ckpt.path}: tokenizer.ggml.model={kind!r}; jlora rebuilds only 'gpt2' (byte-level "
            "BPE) GGUF tokenizers"
        )
    tokens: list[str] = f("tokens")
    merges = [tuple(m.split(" ", 1)) for m in f("merges", [])]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tok.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = f("pre", "default")
    if pre in _DIGIT_SPLIT_PRE:
        tk.pre_tokenizer = pre_tok.Sequence([pre_tok.Digits(True), byte_level])
    elif pre in _LLAMA3_PRE:
        split = pre_tok.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        no_regex = pre_tok.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.pre_tokenizer = pre_tok.Sequence([split, no_regex])
    else:
        if pre not in ("default", "gpt2"):
            logger.warning("%s: pre-tokenizer %r unknown; using GPT-2's regex", ckpt.path, pre)
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special and matched whole; user-defined (4) are matched whole.
    types = dict(zip(tokens, f("token_type", []), strict=False))
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in types if types[t] == 3]
    )
    tk.add_tokens([AddedToken(t, normalized=False) for t in types if types[t] == 4])

    ids = {k: f(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    text = {k: None if i is None else tokens[i] for k, i in ids.items()}
    # BOS/EOS insertion as llama.cpp does it (SmolLM2: neither; Llama 3: BOS).
    added = [k for k in ("bos", "eos") if f(f"add_{k}_token", False) and ids[k] is not None]
    if added:
        single = [text["bos"]] * ("bos" in added) + ["$A"] + [text["eos"]] * ("eos" in added)
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), special_tokens=[(text[k], ids[k]) for k in added]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=text["bos"],
        eos_token=text["eos"],
        unk_token=text["unknown"],
        pad_token=text["padding"],
        clean_up_tokenization_spaces=False,  # byte-level BPE decodes exactly; no " ." -> "."
        model_max_length=ckpt.config["max_position_embeddings"],
    )
    if (template := ckpt.field("tokenizer.chat_template")) is not None:
        tok.chat_template = template
    return tok
