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
    with pytest.raises(ValueError, match=r"beam_style='fairseq': expected one of"):
        jm.generate(model, params, ids, max_new_tokens=2, num_beams=2, beam_style="fairseq")


def _gpt2_beam_reference(torch, tm, prompt, *, beam, length_penalty, ngram, eval_len, eos):
    """microsoft/LoRA `examples/NLG/src/gpt2_beam.py`'s `beam()` for one prompt, transcribed
    (MIT licence) with a full forward pass per step instead of its key/value cache."""

    def banned(history, num_hypos, n, cur_len):  # `_calc_banned_ngram_tokens`
        if cur_len + 1 < n:
            return [[] for _ in range(num_hypos)]
        generated = [{} for _ in range(num_hypos)]
        for idx in range(num_hypos):
            gen = history[idx].tolist()
            for g in zip(*[gen[i:] for i in range(n)], strict=False):
                generated[idx][tuple(g[:-1])] = [*generated[idx].get(tuple(g[:-1]), []), g[-1]]
        start = cur_len + 1 - n
        return [generated[h].get(tuple(history[h, start:cur_len].tolist()), []) for h in
                range(num_hypos)]  # fmt: skip

    best_score, best_sequence = {}, torch.zeros((1, eval_len), dtype=torch.long)

    def add_candidate(beam_scores, history, eos_ids):  # `_add_beam_candidate`
        last = history[:, -1]
        for i in range(beam):
            if eos_ids is None or last[i] in eos_ids:
                cur_len = history.shape[-1]
                score = beam_scores.view(-1)[i] / cur_len**length_penalty
                if 0 not in best_score or best_score[0] < score:
                    best_score[0] = score
                    best_sequence[0][:cur_len] = history[i]
                beam_scores.view(-1)[i] = -float("inf")

    query = torch.tensor(prompt)[None].repeat(beam, 1)
    beam_scores = torch.zeros((1, beam), dtype=torch.float)
    history = None
    with torch.no_grad():
        for i in range(eval_len):
            full = query if history is None else torch.cat([query, history], dim=1)
            logits = tm(full).logits[:, -1, :].float()
            if ngram > 0 and history is not None:
                for h, tokens in enumerate(banned(history, beam, ngram, i)):
                    logits[h, tokens] = -float("inf")
            logprob = torch.log(torch.softmax(logits, dim=-1))
            if i == 0:
                next_scores = logprob.view(1, beam, -1)[:, 0, :]
            else:
                next_scores = (beam_scores.unsqueeze(-1) + logprob.view(1, beam, -1)).view(1, -1)
            next_scores, next_tokens = torch.topk(next_scores, beam, dim=1)
            vocab = logprob.shape[-1]
            beam_id, token_id = (next_tokens // vocab).view(-1), (next_tokens % vocab).view(-1, 1)
            beam_scores = next_scores
            history = token_id if history is None else torch.cat([history[beam_id], token_id], 1)
            add_candidate(beam_scores, history, eos)
        add_candidate(beam_scores, history, None)
    return best_sequence[0].numpy()


@pytest.mark.parametrize(
    "beams,lp,ngram", [(4, 0.9, 2), pytest.param(3, 0.6, 0, marks=pytest.mark.slow)]
)
def test_gpt2_beam_style_matches_the_lora_script(beams, lp, ngram):
    """`beam_style="gpt2_beam"` gives the sequences of microsoft/LoRA's `gpt2_beam.py` on the same
    random model, left-padded rows included, with a stop token that ends some hypotheses."""
    torch = pytest.importorskip("torch")
    tm = _torch_model("llama3_rope")
    model, params = _to_jax(tm)
    ids, _, left = _batch()
    settings = dict(
        num_beams=beams, length_penalty=lp, no_repeat_ngram_size=ngram, beam_style="gpt2_beam"
    )
    eos = _eos(model, params, ids, left, **settings)
    new = 8
    out = np.asarray(
        jm.generate(model, params, ids, left, max_new_tokens=new, stop_tokens=[eos],
                    pad_token_id=PAD, **settings)
    )  # fmt: skip
    stopped = 0
    for row in range(ids.shape[0]):
        prompt = ids[row][left[row].astype(bool)].tolist()
        ref = _gpt2_beam_reference(torch, tm, prompt, beam=beams, length_penalty=lp, ngram=ngram,
                                   eval_len=new, eos=[eos])  # fmt: skip
        got = out[row, ids.shape[1] :]
        # gpt2_decode.py reads a prediction up to its first stop token.
        end = next((j + 1 for j, x in enumerate(ref) if x == eos), new)
        stopped += end < new or ref[new - 1] == eos
        np.testing.assert_array_equal(got[:end], ref[:end])
        assert (got[end:] == PAD).all()
    assert stopped  # some row's best hypothesis ended on the stop token
