"""KV-cache text generation for the decoder models (`Llama` and its relatives).

The prompt is processed in one pass that fills a key/value cache sized for prompt + new
tokens; then one token per step in a `lax.while_loop`, stopping early once every row has
produced a stop token. The whole loop is one jitted program per (model, batch shape,
max_new_tokens, adapter structure).

Left padding works as in transformers: RoPE positions are the cumulative count of real tokens,
so a padded row generates exactly what it would alone. Adapters are passed in (not taken from
an enclosing `jlora.inject` context) because a jitted function traced once would otherwise keep
the adapters of its first call.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.models.llama import LlamaConfig, Llama
  >>> from jlora.models import generate
  >>> model = Llama(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
  ...                           num_hidden_layers=1, num_attention_heads=2))
  >>> ids = jnp.array([[0, 5, 6], [4, 5, 6]]); mask = jnp.array([[0, 1, 1], [1, 1, 1]])
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> generate(model, params, ids, mask, max_new_tokens=4).shape
  (2, 7)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.models.decoding import prefill

# Beam-search conventions `generate(num_beams > 1, beam_style=...)` follows.
BEAM_STYLES = ("transformers", "gpt2_beam")


def _sample(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Nucleus sampling at `temperature`; the smallest set of tokens whose mass reaches top_p."""
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is below top_p (the most likely one always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "no_repeat_ngram_size")
)
def _generate(
    model: Any,
    params: Any,
    adapters: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_tokens: jax.Array,
    pad_token_id: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    no_repeat_ngram_size: int = 0,
) -> jax.Array:
    b, t = input_ids.shape
    total = t + max_new_tokens
    forward, last, cache, valid, pos = prefill(
        model, params, adapters, input_ids, attention_mask, total
    )
    seq = jnp.full((b, total), pad_token_id, input_ids.dtype).at[:, :t].set(input_ids)
    state = (jnp.int32(0), last, cache, valid, pos, jnp.zeros((b,), bool), seq)

    def cond(state):
        i, _, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, last, cache, valid, pos, done, seq = state
        if no_repeat_ngram_size:  # prompt included, as transformers does
            from jlora.models.beam import banned_ngrams

            banned = banned_ngrams(seq, t + i, no_repeat_ngram_size, last.shape[-1])
            last = jnp.where(banned, -jnp.inf, last)
        if greedy:
            tok = jnp.argmax(last, axis=-1)
        else:
            tok = _sample(last, jax.random.fold_in(key, i), temperature, top_p)
        tok = jnp.where(done, pad_token_id, tok).astype(seq.dtype)
        seq = seq.at[:, t + i].set(tok)
        done = done | jnp.isin(tok, stop_tokens)
        valid = valid.at[:, t + i].set(True)
        logits, cache = forward(tok[:, None], valid, pos[:, None], cache, t + i)
        return i + 1, logits[:, -1], cache, valid, pos + 1, done, seq

    *_, seq = jax.lax.while_loop(cond, body, state)
    return seq


def generate(
    model: Any,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | int | None = None,
    pad_token_id: int | None = None,
    adapters: Any = None,
    key: jax.Array | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    early_stopping: bool | str = False,
    beam_style: str = "transformers",
) -> jax.Array:
    """Prompt plus up to `max_new_tokens` new tokens per row, `(batch, prompt + new)`: greedy,
    nucleus sampling, or (`num_beams > 1`) beam search as transformers' `generate` runs them.

    Args:
      model: a decoder with `init_cache` (e.g. `jlora.models.llama.Llama`).
      params: its parameters (the `"params"` collection).
      input_ids: `(batch, prompt)` token ids, left-padded when prompts differ in length.
      attention_mask: `(batch, prompt)` 1 for real tokens, 0 for padding (default all 1).
      max_new_tokens: how many tokens to generate at most.
      temperature: 0 for greedy decoding; otherwise the softmax temperature of sampling.
      top_p: nucleus sampling mass (1.0 = plain sampling).
      stop_tokens: ids that end a row (default: the config's `eos_token_id`); the stop token is
        kept and everything after it is `pad_token_id`.
      pad_token_id: filler after a stop (default: config `pad_token_id`, else the first stop
        token, else 0).
      adapters: a jlora adapter pytree to apply factored (as `jlora.inject`), or None.
      key: PRNG key for sampling (default `jax.random.key(0)`).
      num_beams: beams of a beam search (`jlora.models.beam`); 1: greedy or sampling.
      length_penalty: beam search ranks finished hypotheses by log-probability / generated
        length ** length_penalty (transformers' convention; < 1 favours shorter ones).
      no_repeat_ngram_size: n > 0 forbids every token that would repeat an n-gram of the row,
        prompt included (transformers' `no_repeat_ngram_size`), in every decoding mode.
      early_stopping: beam search's stopping rule, as transformers': False (its heuristic),
        True (once every beam has finished) or "never".
      beam_style: "transformers" (its `generate`, above) or "gpt2_beam": microsoft/LoRA's
        `gpt2_beam.py`, the decoder behind the LoRA and NOLA papers' E2E numbers (top
        `num_beams` per step, no early stopping, no-repeat n-grams over the generated tokens
        only; `jlora.models.beam.gpt2_beam_search`). `early_stopping` does not apply to it.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1]")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r}: expected an integer >= 1")
    if num_beams > 1 and temperature != 0:
        raise ValueError(
            f"num_beams={num_beams} with temperature={temperature!r}: beam search is "
            "deterministic here; expected temperature=0"
        )
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ValueError(
            f"no_repeat_ngram_size={no_repeat_ngram_size!r}: expected an integer >= 0 (0: off)"
        )
    if beam_style not in BEAM_STYLES:
        raise ValueError(f"beam_style={beam_style!r}: expected one of {BEAM_STYLES}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r}: expected True, False or 'never'")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids has shape {input_ids.shape}: expected (batch, prompt)")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}"
        )
    config = model.config
    if stop_tokens is None:
        stop_tokens = config.eos_token_id
    if stop_tokens is None:
        stop_tokens = ()
    elif isinstance(stop_tokens, int):
        stop_tokens = (stop_tokens,)
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = next(iter(stop_tokens), 0)
    if num_beams > 1:
        from jlora.models import beam  # beam imports jlora.models (this package)

        search = beam.gpt2_beam_search if beam_style == "gpt2_beam" else beam.beam_search
        extra = {} if beam_style == "gpt2_beam" else {"early_stopping": early_stopping}
        return search(
            model,
            params,
            adapters or {},
            input_ids,
            attention_mask,
            jnp.asarray(list(stop_tokens), jnp.int32),
            jnp.int32(pad_token_id),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            length_penalty=float(length_penalty),
            no_repeat_ngram_size=no_repeat_ngram_size,
            **extra,
        )
    return _generate(
        model,
        params,
        adapters or {},
        input_ids,
        attention_mask,
        key if key is not None else jax.random.key(0),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        stop,
        jnp.int32(pad_token_id),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
