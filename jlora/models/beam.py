"""Beam search for the decoder models, as transformers' `generate(num_beams=...)` runs it (its
vectorized beam search of transformers 5), so that a decoding recipe ("beam 10, length penalty
0.9, no repeated 4-grams") means the same thing here as in the papers' PyTorch code.

Per step, for `b` prompts × `k` beams:
1. log-softmax of each running beam's next-token logits (float32), with the tokens that would
   repeat an n-gram of the row (prompt included, as transformers does) set to -inf
   (`no_repeat_ngram_size`), plus the beam's running score;
2. the top `max(2, 1 + number of stop tokens) · k` continuations over all beams × vocabulary;
3. those ending in a stop token (or reaching the length limit) and among the top `k` become
   finished hypotheses scored `sum of log-probs / (generated length ** length_penalty)`, kept if
   among the `k` best finished so far; the best `k` others keep running;
4. the search stops when no running beam can beat the worst finished one by transformers'
   heuristic (`early_stopping=False`: the best running score at the current length), when
   every beam has finished (`early_stopping=True`), or at the length limit.
The result is each row's best finished hypothesis. The whole search is one jitted program with
a key/value cache of `b · k` rows, reordered by gathering each step.

Example (a 2-layer random Llama; any decoder with `init_cache` works):
  >>> import jax, jax.numpy as jnp, jlora.models as jm
  >>> from jlora.models.llama import LlamaConfig, Llama
  >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
  ...                   num_hidden_layers=2, num_attention_heads=2)
  >>> model, ids = Llama(cfg), jnp.array([[4, 5, 6]])
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> out = jm.generate(model, params, ids, max_new_tokens=5, num_beams=3, stop_tokens=())
  >>> out.shape
  (1, 8)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.decoding import prefill

# transformers' "impossible" score offset (finished beams leaving the running set, and so on).
_NEG = -1.0e9


def banned_ngrams(seq: jax.Array, cur_len: jax.Array, n: int, vocab: int) -> jax.Array:
    """`(rows, vocab)` True where the next token would complete an n-gram already in
    `seq[:, :cur_len]` (transformers' `NoRepeatNGramLogitsProcessor`).

    Example:
      >>> seq = jnp.array([[1, 2, 3, 1, 2, 0]])
      >>> jnp.nonzero(banned_ngrams(seq, jnp.int32(5), 3, 5)[0])[0].tolist()  # "1 2" -> 3
      [3]
    """
    rows, length = seq.shape
    starts = jnp.arange(length - n + 1)
    windows = seq[:, starts[:, None] + jnp.arange(n - 1)[None, :]]  # (rows, starts, n - 1)
    prefix = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
    match = jnp.all(windows == prefix[:, None, :], axis=-1) & (starts + n - 1 < cur_len)[None]
    nxt = seq[:, starts + n - 1]
    banned = jnp.zeros((rows, vocab), jnp.int32).at[jnp.arange(rows)[:, None], nxt].max(match)
    return (banned > 0) & (cur_len + 1 >= n)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x[r, index[r, j], ...]`: beams `index` of every row."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "num_beams",
        "max_new_tokens",
        "length_penalty",
        "no_repeat_ngram_size",
        "early_stopping",
    ),
)
def beam_search(
    model: Any,
    params: Any,
    adapters: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    stop_tokens: jax.Array,
    pad_token_id: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    no_repeat_ngram_size: int,
    early_stopping: bool | str,
) -> jax.Array:
    """`(batch, prompt + max_new_tokens)`: each row's best hypothesis, `pad_token_id` after its
    end (see the module docstring; `jlora.models.generate` checks the arguments and calls this).

    `stop_tokens` holds the stop ids (an empty array: none)."""
    b, t = input_ids.shape
    k = num_beams
    length = t + max_new_tokens
    n_stop = stop_tokens.shape[0]
    keep = max(2, 1 + n_stop) * k
    # Length-penalty denominators (generated length s + 1 at step s), in float64 as Python does.
    denom = jnp.asarray(np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty)
    denom = denom.astype(jnp.float32)
    if early_stopping == "never" and length_penalty > 0.0:
        best_len = jnp.full((max_new_tokens,), float(max_new_tokens) ** length_penalty)
        best_len = best_len.astype(jnp.float32)
    else:
        best_len = denom

    ids = jnp.repeat(input_ids, k, axis=0)
    mask = jnp.repeat(attention_mask, k, axis=0)
    forward, last, cache, valid, pos = prefill(model, params, adapters, ids, mask, length)
    vocab = last.shape[-1]
    running = jnp.full((b, k, length), pad_token_id, input_ids.dtype)
    running = running.at[:, :, :t].set(ids.reshape(b, k, t))
    state = (
        jnp.int32(0),
        last,
        cache,
        valid,
        pos,  # position of the next token
        running,
        jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG),  # running scores
        running,  # finished sequences
        jnp.full((b, k), _NEG, jnp.float32),  # finished scores
        jnp.zeros((b, k), bool),  # finished slot holds a hypothesis
        jnp.ones((b, 1), bool),  # a running beam may still beat the finished ones
        jnp.bool_(True),  # keep going
    )
    top_k_mask = jnp.arange(keep) < k

    def cond(state):
        return (state[0] < max_new_tokens) & state[-1]

    def body(state):
        step, last, cache, valid, pos, running, run_scores, seqs, scores, done, open_, _ = state
        cur = t + step
        logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
        if no_repeat_ngram_size:
            flat_seq = running.reshape(b * k, length)
            logp = jnp.where(
                banned_ngrams(flat_seq, cur, no_repeat_ngram_size, vocab), -jnp.inf, logp
            )
        logp = logp.reshape(b, k, vocab) + run_scores[..., None]
        top_lp, top_index = jax.lax.top_k(logp.reshape(b, k * vocab), keep)
        beam, token = top_index // vocab, (top_index % vocab).astype(running.dtype)
        top_seq = _take(running, beam)
        top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, token[..., None], cur, axis=2)
        hits = jnp.isin(token, stop_tokens) | (cur + 1 >= length)
        # The best k unfinished continuations keep running.
        run_lp = top_lp + hits * _NEG
        nxt = jax.lax.top_k(run_lp, k)[1]
        running, run_scores, src = _take(top_seq, nxt), _take(run_lp, nxt), _take(beam, nxt)
        # Continuations that finished among the top k join the k best finished hypotheses.
        just = hits & top_k_mask[None, :]
        fin = top_lp / denom[step]
        if early_stopping is True:
            fin = fin + (jnp.all(done, axis=-1, keepdims=True) * _NEG)
        fin = fin + (~open_) * _NEG + (~just) * _NEG
        merged_scores = jnp.concatenate([scores, fin], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        seqs = _take(jnp.concatenate([seqs, top_seq], axis=1), best)
        scores = _take(merged_scores, best)
        done = _take(jnp.concatenate([done, just], axis=1), best)
        # transformers' early-stop heuristic, at the new length.
        best_running = run_scores[:, :1] / best_len[step]
        worst = jnp.where(done, jnp.min(scores, axis=1, keepdims=True), _NEG)
        open_ = open_ & jnp.any(best_running > worst, axis=-1, keepdims=True)
        go = jnp.any(open_) & ~jnp.all(hits)
        if early_stopping is True:
            go = go & ~jnp.all(done)
        # Reorder the cache rows to the beams that continue, then feed their new tokens.
        rows = (jnp.arange(b)[:, None] * k + src).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], cache)
        valid = valid[rows].at[:, cur].set(True)
        new = jax.lax.dynamic_slice_in_dim(running, cur, 1, axis=2).reshape(b * k, 1)
        logits, cache = forward(new, valid, pos[:, None], cache, cur)
        return (step + 1, logits[:, -1], cache, valid, pos + 1, running, run_scores, seqs,
                scores, done, open_, go)  # fmt: skip

    state = jax.lax.while_loop(cond, body, state)
    return state[7][:, 0]


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "num_beams",
        "max_new_tokens",
        "length_penalty",
        "no_repeat_ngram_size",
    ),
)
def gpt2_beam_search(
    model: Any,
    params: Any,
    adapters: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    stop_tokens: jax.Array,
    pad_token_id: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    no_repeat_ngram_size: int,
) -> jax.Array:
    """`(batch, prompt + max_new_tokens)`: beam search as microsoft/LoRA's `gpt2_beam.py` runs it
    (the decoder of the LoRA and NOLA papers' E2E numbers), `pad_token_id` after each row's end.

    It differs from transformers' search (`beam_search`) in four ways: each step keeps only the
    top `num_beams` continuations; a beam that emits a stop token is offered as a finished
    hypothesis (score `sum of log-probs / generated length ** length_penalty`, stop token
    counted) and stays in the beam with score -inf; no-repeat n-grams look at the generated
    tokens only, not the prompt; and there is no early stopping: after `max_new_tokens` steps
    every live beam is offered too (length `max_new_tokens`), and the best hypothesis offered
    at any step wins (the first of equal scores). `jlora.models.generate(...,
    beam_style="gpt2_beam")` checks the arguments and calls this.
    """
    b, t = input_ids.shape
    k, n_new = num_beams, max_new_tokens
    length = t + n_new
    # Length-penalty denominators (generated length s + 1 at step s), in float64 as Python does.
    denom = jnp.asarray(np.arange(1, n_new + 1, dtype=np.float64) ** length_penalty)
    denom = denom.astype(jnp.float32)

    ids = jnp.repeat(input_ids, k, axis=0)
    mask = jnp.repeat(attention_mask, k, axis=0)
    forward, last, cache, valid, pos = prefill(model, params, adapters, ids, mask, length)
    vocab = last.shape[-1]

    def offer(best, cand, cand_scores, cand_ok):
        """Fold candidates `(b, k, n_new)` scored `(b, k)` (`cand_ok`: offered) into the best
        hypothesis of each row: a candidate replaces it when there is none yet or it scores
        strictly higher, beams taken in order (so the first of equal scores wins)."""
        seq, score, have = best
        for j in range(k):
            take = cand_ok[:, j] & (~have | (cand_scores[:, j] > score))
            seq = jnp.where(take[:, None], cand[:, j], seq)
            score = jnp.where(take, cand_scores[:, j], score)
            have = have | take
        return seq, score, have

    state = (
        jnp.int32(0),
        last,
        cache,
        valid,
        pos,  # position of the next token
        jnp.full((b, k, n_new), pad_token_id, input_ids.dtype),  # generated tokens per beam
        jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-jnp.inf),  # beam scores (step 0: beam 0)
        (
            jnp.full((b, n_new), pad_token_id, input_ids.dtype),
            jnp.full((b,), -jnp.inf, jnp.float32),
            jnp.zeros((b,), bool),
        ),
    )

    def cond(state):
        # Beams all at -inf can never be offered with a finite score: nothing changes after.
        return (state[0] < n_new) & jnp.any(jnp.isfinite(state[6]))

    def body(state):
        step, last, cache, valid, pos, hist, scores, best = state
        # gpt2_beam.py: log(softmax(.)) of the logits with banned n-grams at -inf.
        if no_repeat_ngram_size:
            flat = hist.reshape(b * k, n_new)
            banned = banned_ngrams(flat, step, no_repeat_ngram_size, vocab)
            last = jnp.where(banned, -jnp.inf, last.astype(jnp.float32))
        logp = jnp.log(jax.nn.softmax(last.astype(jnp.float32), axis=-1))
        total = scores[..., None] + logp.reshape(b, k, vocab)
        top, index = jax.lax.top_k(total.reshape(b, k * vocab), k)
        beam, token = index // vocab, (index % vocab).astype(hist.dtype)
        hist = jax.lax.dynamic_update_slice_in_dim(_take(hist, beam), token[..., None], step, 2)
        ended = jnp.isin(token, stop_tokens)
        best = offer(best, hist, top / denom[step], ended)
        scores = jnp.where(ended, -jnp.inf, top)
        rows = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], cache)
        cur = t + step
        valid = valid[rows].at[:, cur].set(True)
        logits, cache = forward(token.reshape(b * k, 1), valid, pos[:, None], cache, cur)
        return step + 1, logits[:, -1], cache, valid, pos + 1, hist, scores, best

    step, _, _, _, _, hist, scores, best = jax.lax.while_loop(cond, body, state)
    # After the last step every beam is offered at length max_new_tokens (gpt2_beam.py's final
    # `_add_beam_candidate` without stop tokens); skipped when the loop ended early, where every
    # score is -inf and a row has a hypothesis already.
    last_round = (step == n_new) & jnp.ones((b, k), bool)
    seq, _, _ = offer(best, hist, scores / denom[n_new - 1], last_round)
    return jnp.concatenate([input_ids, seq], axis=1)
