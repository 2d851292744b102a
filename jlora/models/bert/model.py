"""BERT / RoBERTa / MiniLM encoders in Flax Linen, laid out like Hugging Face's `BertModel`.

Parameter paths follow the checkpoint names, so adapter targets read naturally:
`encoder/layer_0/attention/self/query/kernel`, `encoder/layer_0/intermediate/dense/kernel`, ...
Every projection is its own `nn.Dense` (never fused), which `jlora.inject` adapts factored.

With `num_labels` set the model ends in a sequence-classification head: BERT's tanh pooler over
[CLS] then `classifier`, or RoBERTa's `classifier/dense` → tanh → `classifier/out_proj` on <s>.
Inference only: no dropout.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.models.bert import Bert, BertConfig, mean_pool
  >>> cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
  ...                  num_attention_heads=4, intermediate_size=24)
  >>> ids, mask = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32)
  >>> params = Bert(cfg).init(jax.random.key(0), ids)["params"]
  >>> h = Bert(cfg).apply({"params": params}, ids, attention_mask=mask)
  >>> h.shape, mean_pool(h, mask).shape
  ((2, 5, 16), (2, 16))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.remat import wrap
from jlora.sharding import Rule

family = "bert"

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Architecture of a BERT-family encoder (names as in transformers' `BertConfig`)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # "roberta": positions count non-pad tokens from pad_token_id + 1, head on <s>.
    model_type: str = "bert"
    # Sequence-classification head with this many outputs; None = return the last hidden state.
    num_labels: int | None = None
    # Std of the normal init of fresh head weights.
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name}={getattr(self, name)!r}: expected >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"BertConfig.hidden_act={self.hidden_act!r}: expected one of {tuple(ACTIVATIONS)}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"BertConfig.model_type={self.model_type!r}: expected one of {MODEL_TYPES}"
            )
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"BertConfig.num_labels={self.num_labels!r}: expected None or >= 1")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id={self.pad_token_id!r}: expected 0 <= id < "
                f"vocab_size={self.vocab_size}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"BertConfig.layer_norm_eps={self.layer_norm_eps!r}: expected > 0")


def _layer_norm(c: BertConfig, dtype: Any) -> nn.LayerNorm:
    # float32 statistics (flax's default) and the two-pass variance, as PyTorch computes it.
    return nn.LayerNorm(c.layer_norm_eps, dtype=dtype, use_fast_variance=False, name="LayerNorm")


class Embeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        if c.model_type == "roberta":  # transformers' create_position_ids_from_input_ids
            not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
        else:
            positions = jnp.arange(input_ids.shape[1])[None]

        def embed(n: int, name: str) -> nn.Embed:
            return nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)

        x = embed(c.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(positions)
        return _layer_norm(c, self.dtype)(x)


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        nh = c.num_attention_heads
        q, k, v = (
            nn.Dense(d, dtype=self.dtype, name=n)(x).reshape(b, t, nh, d // nh)
            for n in ("query", "key", "value")
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / jnp.sqrt(d // nh) + bias, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


class AddNorm(nn.Module):
    """`dense` then `LayerNorm(· + residual)`: BERT's SelfOutput and Output blocks."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        x = nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense")(x)
        return _layer_norm(self.config, self.dtype)(x + residual)


class Attention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        h = SelfAttention(self.config, self.dtype, name="self")(x, bias)
        return AddNorm(self.config, self.dtype, name="output")(h, x)


class DenseAct(nn.Module):
    """`dense` then an activation: BERT's Intermediate and Pooler blocks."""

    features: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = jnp.tanh if self.act == "tanh" else ACTIVATIONS[self.act]
        return act(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


class Layer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        x = Attention(c, self.dtype, name="attention")(x, bias)
        h = DenseAct(c.intermediate_size, c.hidden_act, self.dtype, name="intermediate")(x)
        return AddNorm(c, self.dtype, name="output")(h, x)


class CarryLayer(Layer):
    """`Layer` as an `nn.scan` body: `(x, bias) -> (x', None)`."""

    def __call__(self, x: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:  # type: ignore[override]
        return super().__call__(x, bias), None


class Encoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        if self.scan_layers:  # one compiled layer, parameters stacked (`jlora.models.scan`)
            scanned = nn.scan(
                wrap(CarryLayer, self.remat, "Bert.remat"),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=self.config.num_hidden_layers,
            )
            return scanned(self.config, self.dtype, name="layer")(x, bias)[0]
        layer_class = wrap(Layer, self.remat, "Bert.remat")
        for i in range(self.config.num_hidden_layers):
            x = layer_class(self.config, self.dtype, name=f"layer_{i}")(x, bias)
        return x


class RobertaClassificationHead(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cls: jax.Array) -> jax.Array:
        c = self.config
        h = jnp.tanh(nn.Dense(c.hidden_size, dtype=self.dtype, name="dense")(cls))
        return nn.Dense(c.num_labels, dtype=self.dtype, name="out_proj")(h)


class Bert(nn.Module):
    """Encoder: `apply({"params": p}, input_ids, attention_mask=None, token_type_ids=None)` ->
    last hidden states (b, t, hidden) in `dtype`, or float32 logits (b, num_labels) with a head."""

    config: BertConfig
    dtype: Any = jnp.float32
    # Per-layer rematerialisation: "none", "full" or "dots" (see `jlora.models.remat`).
    remat: str = "none"
    # Run the encoder layers under `nn.scan` (`encoder/layer/...`, stacked; see
    # `jlora.models.scan`): one layer compiled instead of all.
    scan_layers: bool = False
    family = family

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids)
        bias = jnp.zeros((1, 1, 1, input_ids.shape[1]), jnp.float32)
        if attention_mask is not None:  # additive, on padded keys
            bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        x = Encoder(c, self.dtype, self.remat, self.scan_layers, name="encoder")(x, bias)
        if c.num_labels is None:
            return x
        if c.model_type == "roberta":
            logits = RobertaClassificationHead(c, self.dtype, name="classifier")(x[:, 0])
        else:
            pooled = DenseAct(c.hidden_size, "tanh", self.dtype, name="pooler")(x[:, 0])
            logits = nn.Dense(c.num_labels, dtype=self.dtype, name="classifier")(pooled)
        return logits.astype(jnp.float32)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Masked mean over the sequence (sentence-transformers' mean pooling), float32 (b, hidden)."""
    m = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


# Mesh layouts of the parameters (`jlora.sharding`): FSDP splits one axis of every large kernel
# over `fsdp`; tensor parallelism (Megatron) splits query/key/value and the intermediate dense
# by output (heads, MLP hidden) and the two output denses by input over `tensor`. Norms, the
# small position/type embeddings and the head are replicated.
_L = r"encoder/layer(_\d+)?/"
SHARDING = (
    Rule(r"embeddings/word_embeddings/embedding", ("tensor", "fsdp")),
    Rule(rf"{_L}(attention/self/(query|key|value)|intermediate/dense)/kernel", ("fsdp", "tensor")),
    Rule(rf"{_L}(attention/self/(query|key|value)|intermediate/dense)/bias", ("tensor",)),
    Rule(rf"{_L}(attention/output|output)/dense/kernel", ("tensor", "fsdp")),
)
