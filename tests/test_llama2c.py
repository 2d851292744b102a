"""stories260K (a real pretrained llama2.c model): the Flax Llama matches an independent NumPy
forward written from llama2.c's own layout (interleaved RoPE, unpermuted weights)."""

from __future__ import annotations

import pathlib
import random
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import jlora
from jlora.models import llama2c
from jlora.models.llama import Llama

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "stories260K"


def _numpy_forward(tokens: list[int]) -> np.ndarray:
    """llama2.c's run.c forward over a whole sequence, in float64, straight from the file."""
    raw = (FIXTURE / "stories260K.bin").read_bytes()
    dim, hidden, L, nh, nkv, vocab, _ = struct.unpack("7i", raw[:28])
    w = np.frombuffer(raw[28:], np.float32).astype(np.float64)
    hd, kv_dim, o = dim // nh, nkv * (dim // nh), 0

    def take(*shape):
        nonlocal o
        n = int(np.prod(shape))
        o += n
        return w[o - n : o].reshape(shape)

    emb, rms_att = take(vocab, dim), take(L, dim)
    wq, wk, wv, wo = (
        take(L, dim, dim),
        take(L, kv_dim, dim),
        take(L, kv_dim, dim),
        take(L, dim, dim),
    )
    rms_ffn, w1, w2, w3 = (
        take(L, dim),
        take(L, hidden, dim),
        take(L, dim, hidden),
        take(L, hidden, dim),
    )
    rms_final = take(dim)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * g

    def rope(x, pos):  # x: (t, heads, hd), adjacent pairs rotate together
        freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
        ang = pos[:, None, None] * freq
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
        out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
        return out

    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    x = emb[tokens]
    for i in range(L):
        h = rms(x, rms_att[i])
        q = rope((h @ wq[i].T).reshape(t, nh, hd), pos)
        k = rope((h @ wk[i].T).reshape(t, nkv, hd), pos)
        v = (h @ wv[i].T).reshape(t, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(t, dim) @ wo[i].T
        h = rms(x, rms_ffn[i])
        g = h @ w1[i].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w3[i].T)) @ w2[i].T
    return rms(x, rms_final) @ emb.T


@pytest.fixture(scope="module")
def stories():
    config, params = llama2c.load_checkpoint(FIXTURE / "stories260K.bin")
    params = jax.tree.map(jnp.asarray, params)
    return Llama(config), params, llama2c.Llama2cTokenizer(FIXTURE / "tok512.bin")


def test_logits_match_numpy_reference(stories):
    model, params, tok = stories
    ids = tok.encode("Once upon a time, there was a little dog")
    got = model.apply({"params": params}, jnp.array([ids]))[0]
    want = _numpy_forward(ids)
    assert np.abs(np.asarray(got) - want).max() <= 1e-4


@pytest.mark.slow  # 71 s; the forward parity tests stay fast
def test_greedy_generation_matches_reference_and_is_fluent(stories):
    model, params, tok = stories
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    ids = ref = [tok.bos_token_id]
    for _ in range(30):
        ids = [*ids, int(jnp.argmax(fwd(params, jnp.array([ids]))[0, -1]))]
        ref = [*ref, int(np.argmax(_numpy_forward(ref)[-1]))]
    assert ids == ref
    text = tok.decode(ids)
    words = text.split()
    assert len(words) >= 15 and text[0].isupper()
    assert (
        sum(
            w.strip(".,!\"'").lower() in {"the", "a", "was", "she", "he", "to", "and"}
            for w in words
        )
        >= 3
    ), text


def test_tokenizer_round_trip(stories):
    _, _, tok = stories
    text = "Lily and Tom went to the park. They saw a big red ball!"
    enc = tok(text)
    assert enc["input_ids"][0][0] == tok.bos_token_id
    assert enc["attention_mask"] == [[1] * len(enc["input_ids"][0])]
    assert tok.decode(enc["input_ids"][0]) == text
    assert tok.decode(tok.encode("naïve café")) == "naïve café"  # byte fallback


def _llama2c_encode(tok, text: str) -> list[int]:
    """run.c's `encode`, as written there: merge the best-scoring adjacent pair (the first of
    equal scores) until none is in the vocabulary, scanning the whole sequence each time."""
    ids = []
    for ch in " " + text if text else "":
        piece = ch.encode()
        ids += [tok.ids[piece]] if piece in tok.ids else [b + 3 for b in piece]
    while True:
        best, at = -1e10, -1
        for i in range(len(ids) - 1):
            merged = tok.ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if merged is not None and tok.scores[merged] > best:
                best, at = tok.scores[merged], i
        if at < 0:
            return [tok.bos_token_id, *ids]
        ids[at : at + 2] = [tok.ids[tok.pieces[ids[at]] + tok.pieces[ids[at + 1]]]]


def test_tokenizer_merges_as_llama2c_does(stories):
    _, _, tok = stories
    rng = random.Random(0)
    texts = ["", " ", "aaaaaaaaaaaaaaaa", "the the the the", "Lily's 3 cats (naïve) ran."]
    texts += [
        "".join(rng.choice("ab cdeé thn\n .,漢") for _ in range(rng.randint(0, 40)))
        for _ in range(300)
    ]
    for text in texts:
        assert tok.encode(text) == _llama2c_encode(tok, text), repr(text)
    # Memoized encodes are copies: changing one does not change the next.
    first = tok.encode("Once upon a time")
    first.append(7)
    assert tok.encode("Once upon a time") == _llama2c_encode(tok, "Once upon a time")


def test_padded_batch_matches_unpadded(stories):
    model, params, tok = stories
    a, b = tok.encode("The cat sat"), tok.encode("Once upon a time there was")
    pad = len(b) - len(a)
    ids = jnp.array([a + [0] * pad, b])
    mask = jnp.array([[1] * len(a) + [0] * pad, [1] * len(b)])
    out = model.apply({"params": params}, ids, attention_mask=mask)
    np.testing.assert_allclose(
        out[0, : len(a)], model.apply({"params": params}, jnp.array([a]))[0], atol=1e-5
    )


@pytest.mark.parametrize("method", ["lora", "nlora", "inttune", "nola", "pissa"])
@pytest.mark.parametrize("targets", [r".*/self_attn/(q|k|v|o)_proj/kernel", r".*_proj/kernel"])
def test_adapters_on_a_real_model(stories, method, targets):
    model, params, tok = stories
    ids = jnp.array([tok.encode("One day, a little bird")])
    extra = {"nola_num_basis": (32, 32)} if method == "nola" else {}
    cfg = jlora.AdapterConfig(method=method, rank=4, targets=targets, **extra)
    base, adapters = jlora.init(cfg, params, jax.random.key(0))
    rng = iter(jax.random.split(jax.random.key(1), 1000))
    adapters = {
        p: a.replace(
            params={
                n: v + 0.05 * jax.random.normal(next(rng), v.shape) if n in a.spec.trainable else v
                for n, v in a.params.items()
            }
        )
        for p, a in adapters.items()
    }
    with jlora.inject(adapters):
        factored = model.apply({"params": base}, ids)
    merged = model.apply({"params": jlora.merge(base, adapters)}, ids)
    assert rel_err(factored, merged) <= 1e-4
