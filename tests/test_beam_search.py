"""Beam search and no-repeat n-grams (`jlora.models.generate(num_beams=...)`) against
transformers' `generate` with the same settings on the same random-weight model: identical
sequences, left-padded batches included."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_decoders import _batch, _to_jax, _torch_model

import jlora.models as jm
from jlora.models.beam import banned_ngrams

PAD = 1  # not 0: transformers fills finished beam-search rows with `pad_token_id or eos`


def _eos(model, params, ids, mask, **settings) -> int:
    """A token the search picks without a stop token (row 0's third new token), so that with it
    as the stop token some hypotheses end early."""
    free = jm.generate(model, params, ids, mask, max_new_tokens=4, stop_tokens=(), **settings)
    return int(np.asarray(free)[0, ids.shape[1] + 2])


# (num_beams, length_penalty, no_repeat_ngram_size, early_stopping, with a stop token)
SETTINGS = {
    "beams4": (4, 1.0, 0, False, False),
    "e2e-recipe": (4, 0.9, 3, False, True),  # the LoRA/NOLA E2E recipe's knobs, smaller
    "early-stop": (3, 1.2, 0, True, True),
    "never": (3, 2.0, 2, "never", True),
    "greedy-no-repeat": (1, 1.0, 2, False, True),
}


@pytest.mark.parametrize(
    "setting",
    [s if s == "e2e-recipe" else pytest.param(s, marks=pytest.mark.slow) for s in SETTINGS],
)
def test_matches_transformers_generate(setting):
    torch = pytest.importorskip("torch")
    beams, lp, ngram, early, stop = SETTINGS[setting]
    tm = _torch_model("llama3_rope")
    model, params = _to_jax(tm)
    ids, _, left = _batch()
    settings = dict(
        num_beams=beams, length_penalty=lp, no_repeat_ngram_size=ngram, early_stopping=early
    )
    eos = _eos(model, params, ids, left, **settings) if stop else None
    with torch.no_grad():
        ref = tm.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(left),
            max_new_tokens=10,
            do_sample=False,
            num_beams=beams,
            length_penalty=lp,
            no_repeat_ngram_size=ngram,
            early_stopping=early,
            pad_token_id=PAD,
            eos_token_id=eos,
        ).numpy()
    out = np.asarray(
        jm.generate(
            model,
            params,
            ids,
            left,
            max_new_tokens=10,
            stop_tokens=() if eos is None else [eos],
            pad_token_id=PAD,
            **settings,
        )
    )
    n = ref.shape[1]  # transformers crops to the longest returned hypothesis
    np.testing.assert_array_equal(out[:, :n], ref)
    assert (out[:, n:] == PAD).all()
    if stop and setting != "never":  # stopping is exercised: a returned hypothesis stopped
        assert (ref[:, ids.shape[1] :] == eos).any()  # ("never" with penalty 2 keeps long ones)


def test_banned_ngrams_by_hand():
    seq = jnp.array([[5, 6, 7, 5, 6, 9, 9, 9]])
    # At length 5 the last bigram is "5 6", seen before followed by 7: 7 is banned (n = 3).
    assert np.flatnonzero(banned_ngrams(seq, jnp.int32(5), 3, 10)[0]).tolist() == [7]
    # n = 2 at length 5: the last token 6 was followed by 7 before.
    assert np.flatnonzero(banned_ngrams(seq, jnp.int32(5), 2, 10)[0]).tolist() == [7]
    # n = 1 bans every token seen so far.
    assert np.flatnonzero(banned_ngrams(seq, jnp.int32(3), 1, 10)[0]).tolist() == [5, 6, 7]
    # Too short to hold an n-gram yet: nothing banned.
    assert not banned_ngrams(seq, jnp.int32(1), 3, 10).any()


def test_beam_search_arguments_are_checked():
    model, params = _to_jax(_torch_model("llama3_rope"))
    ids, _, _ = _batch()
    with pytest.raises(ValueError, match=r"num_beams=0: expected an integer >= 1"):
        jm.generate(model, params, ids, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match=r"beam search is deterministic here"):
        jm.generate(model, params, ids, max_new_tokens=2, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size=-1"):
        jm.generate(model, params, ids, max_new_tokens=2, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match=r"early_stopping='always'"):
        jm.generate(model, params, ids, max_new_tokens=2, num_beams=2, early_stopping="always")
