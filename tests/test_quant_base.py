"""A frozen base kept quantized from the moment it is read (issue 14): `jlora.models.load(...,
quantize=)` tensor by tensor, a GGUF file's own blocks kept, the inits and GoRA's pre-pass on a
quantized base, the storage's layouts on a mesh, and train.py runs that quantize at load."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_quant import run_and_resume

import jlora
import jlora.models as jm
from jlora import quant, sharding
from jlora.quant import dequantize_params, is_quantized, quantize_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
STORIES = ROOT / "tests" / "fixtures" / "stories260K" / "stories260K.bin"


def _quantized(tree) -> dict:
    return {p: x for p, x in traverse_util.flatten_dict(tree, sep="/").items() if is_quantized(x)}


@pytest.fixture(scope="module")
def stories():
    return jm.load(STORIES)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_load_quantizes_each_kernel_as_it_is_read(stories, fmt):
    """The kernels come out as quantizing the plain load would make them; the embeddings and
    norms are the plain load's."""
    _, plain, _ = stories
    _, got, _ = jm.load(STORIES, quantize=fmt)
    want = quantize_params(plain, fmt, jm.QUANTIZE_PATTERN)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(_quantized(got)) == 35  # 5 layers × 7 (the head is tied to the embeddings)


def test_load_refuses_an_unknown_quantization():
    with pytest.raises(ValueError, match=r"quantize='fp4': expected None or one of \('gguf', "):
        jm.load(STORIES, quantize="fp4")


def test_the_head_of_a_classifier_is_never_quantized():
    import re

    for path in ("classifier/kernel", "pooler/dense/kernel", "score/kernel"):
        assert not re.fullmatch(jm.QUANTIZE_PATTERN, path)
    for path in ("encoder/layer_0/attention/self/query/kernel", "lm_head/kernel"):
        assert re.fullmatch(jm.QUANTIZE_PATTERN, path)


def _tiny_gguf(path: pathlib.Path, types: dict[str, str]) -> dict[str, np.ndarray]:
    """A 1-layer Llama GGUF with a byte-level vocabulary (256 tokens), its linear weights in the
    GGML formats `types` gives per projection (float32 otherwise); returns the HF arrays as
    the file holds them (quantized and dequantized)."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import _llamacpp_permute

    rng = np.random.default_rng(3)
    shapes = {"model.embed_tokens.weight": (256, 64), "model.norm.weight": (64,)}
    shapes |= {
        f"model.layers.0.{n}.weight": (64,) for n in ("input_layernorm", "post_attention_layernorm")
    }
    for proj, shape in [("q", (64, 64)), ("k", (32, 64)), ("v", (32, 64)), ("o", (64, 64))]:
        shapes[f"model.layers.0.self_attn.{proj}_proj.weight"] = shape
    for proj, shape in [("gate", (96, 64)), ("up", (96, 64)), ("down", (64, 96))]:
        shapes[f"model.layers.0.mlp.{proj}_proj.weight"] = shape
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    gg = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    names |= {f"model.layers.0.{k}.weight": f"blk.0.{v}.weight" for k, v in gg.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [("block_count", 1), ("context_length", 512), ("embedding_length", 64),
                       ("feed_forward_length", 96), ("head_count", 4), ("head_count_kv", 2),
                       ("layer_norm_rms_eps", 1e-6), ("vocab_size", 256)]:  # fmt: skip
        getattr(w, f"add_{add}")(value)
    from tokenizers import pre_tokenizers

    w.add_tokenizer_model("gpt2")  # every byte a token, no merges: any text tokenizes
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    w.add_token_merges([])
    w.add_eos_token_id(0)
    stored = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * (0.1 if len(shape) == 2 else 1)
        x_file = x
        if "q_proj" in name or "k_proj" in name:
            x_file = _llamacpp_permute(x, 4 if "q_proj" in name else 2)
        proj = name.split(".")[-2]
        if proj in types:
            qt = gguf.GGMLQuantizationType[types[proj].upper()]
            raw = gguf.quants.quantize(x_file, qt)
            w.add_tensor(names[name], raw, raw_dtype=qt)
            back = gguf.quants.dequantize(raw, qt)
            if "q_proj" in name or "k_proj" in name:
                from jlora.models.gguf import unpermute_rope

                back = unpermute_rope(back, 4 if "q_proj" in name else 2)
            stored[name] = back
        else:
            w.add_tensor(names[name], x_file)
            stored[name] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


TYPES = {"q_proj": "q4_0", "k_proj": "q4_1", "v_proj": "q8_0", "o_proj": "q4_1", "up_proj": "q4_0",
         "gate_proj": "q8_0", "down_proj": "q4_1"}  # fmt: skip


def test_a_gguf_loads_with_its_blocks_kept(tmp_path):
    """`quantize="gguf"`: every linear weight of the file is kept in its own GGML format (the
    q/k rows un-permuted as whole blocks), dequantizing to exactly the plain load's values, and
    the model computes what the plain load computes."""
    _tiny_gguf(tmp_path / "t.gguf", TYPES)
    model, plain, _ = jm.load(tmp_path / "t.gguf")
    _, kept, _ = jm.load(tmp_path / "t.gguf", quantize="gguf")
    q = _quantized(kept)
    assert {p.split("/")[-2]: x.fmt for p, x in q.items()} == TYPES
    flat = traverse_util.flatten_dict(plain, sep="/")
    for p, x in q.items():
        np.testing.assert_array_equal(np.asarray(x.dequantize()), np.asarray(flat[p]), err_msg=p)
    ids = jnp.asarray([[1, 5, 9, 13, 2, 7]], jnp.int32)
    with quant.dequantizing():
        got = model.apply({"params": kept}, ids)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(model.apply({"params": plain}, ids)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("fmt", ["nf4", "q4_1"])
def test_inits_on_a_quantized_base(stories, fmt):
    """A method that only reads the kernel leaves the quantized base as it is; PiSSA reads the
    dequantized kernel and stores its residual quantized the same way: exactly the init of the
    dequantized base with its residual quantized alike."""
    model, plain, _ = stories
    params = quantize_params(plain, fmt, ".*self_attn/.*kernel")  # 64-wide attention
    targets = jm.preset(model, "attention")
    base, _ = jlora.init(jlora.AdapterConfig(method="dora", rank=4, targets=targets), params, 0)
    assert base is params
    cfg = jlora.AdapterConfig(method="pissa", rank=4, targets=targets)
    base, adapters = jlora.init(cfg, params, 0)
    base_fp, adapters_fp = jlora.init(cfg, dequantize_params(params), 0)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(adapters_fp), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    flat, flat_fp = (traverse_util.flatten_dict(t, sep="/") for t in (base, base_fp))
    stored = _quantized(params)
    assert sorted(_quantized(base)) == sorted(stored) and len(stored) == 20
    for p, q in stored.items():
        want = quant.quantize_like(q, flat_fp[p])
        assert (flat[p].fmt, flat[p].dtype) == (q.fmt, q.dtype)
        for a, b in zip(jax.tree.leaves(flat[p]), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
        assert not np.array_equal(np.asarray(flat[p].dequantize()), np.asarray(q.dequantize()))


def test_gradient_stats_on_a_quantized_base_are_those_of_its_dequantized_copy(stories):
    model, plain, _ = stories
    params = quantize_params(plain, "nf4", jm.QUANTIZE_PATTERN)
    cfg = jlora.AdapterConfig(
        method="gora", rank=2, targets=jm.preset(model, "all-linear"), gora_rank_range=(1, 4)
    )
    ids = jax.random.randint(jax.random.key(0), (2, 12), 1, 500)

    def loss(p, batch):
        logits = model.apply({"params": p}, batch)
        return jnp.mean(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[..., None], -1)[..., 0]
        )

    got = jlora.gradient_stats(loss, params, [ids, ids[::-1]], cfg)
    want = jlora.gradient_stats(loss, dequantize_params(params), [ids, ids[::-1]], cfg)
    assert sorted(got) == sorted(want) and len(got) == 35
    for p in want:
        scale = float(jnp.max(jnp.abs(want[p])))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), atol=1e-5 * scale)


SIZES = {"data": 1, "fsdp": 2, "tensor": 4}


def test_quantized_storage_shards_with_its_kernel(stories):
    """Each storage array takes its kernel's mesh axes through the format's axis roles: the
    output axis leads the block formats, the input axis is split by whole blocks."""
    model, plain, _ = stories
    rules = jm.sharding_rules(model)
    L = "model/layers_0/"
    kernel_specs = jlora.targets.flatten(sharding.param_specs(plain, rules, SIZES))
    assert kernel_specs[L + "self_attn/q_proj/kernel"] == sharding.P("fsdp", "tensor")
    assert kernel_specs[L + "self_attn/o_proj/kernel"] == sharding.P("tensor", "fsdp")
    want = {
        "nf4": {  # (64, 64) kernels: packed (64, 32), absmax (64, 1)
            "q_proj": {"packed": ("tensor", "fsdp"), "absmax": ("tensor", None)},
            "o_proj": {"packed": ("fsdp", "tensor"), "absmax": ("fsdp", None)},
        },
        "int8": {  # codes like the kernel, absmax with its output axis
            "q_proj": {"codes": ("fsdp", "tensor"), "absmax": ("tensor",)},
            "o_proj": {"codes": ("tensor", "fsdp"), "absmax": ("fsdp",)},
        },
        "q8_0": {  # d (64, 2), qs (64, 2, 32)
            "q_proj": {"d": ("tensor", "fsdp"), "qs": ("tensor", "fsdp", None)},
            "o_proj": {"d": ("fsdp", None), "qs": ("fsdp", None, None)},
        },
    }
    for fmt, by_proj in want.items():
        q = quantize_params(plain, fmt, ".*self_attn/.*kernel")
        specs = jlora.targets.flatten(sharding.param_specs(q, rules, SIZES))
        for proj, fields in by_proj.items():
            s = specs[L + f"self_attn/{proj}/kernel"]
            assert is_quantized(s)
            assert {f: tuple(getattr(s.data, f)) for f in fields} == fields, (fmt, proj)
    # Placed on a one-device mesh: the same tree, and it still runs.
    from jlora.train.placement import Placement

    place = Placement(sharding.make_mesh(sharding.MeshShape(), jax.devices()[:1]), rules)
    q = place.base(quantize_params(plain, "nf4", jm.QUANTIZE_PATTERN))
    assert len(_quantized(q)) == 35
    # where a full-precision companion of the kernel (GoRA's accumulator) goes: the kernel's spec
    for proj, spec in [("q_proj", ("fsdp", "tensor")), ("o_proj", ("tensor", "fsdp"))]:
        stored = _quantized(q)[L + f"self_attn/{proj}/kernel"]
        assert quant.kernel_sharding(stored).spec == sharding.P(*spec)


# --- train.py ---


def _run_config(method: str, quantize: str, source: str = str(STORIES), data=None, **train):
    from test_quant import _gsm8k_config

    cfg = _gsm8k_config(quantize=quantize)
    from jlora.train import config

    d = config.to_dict(cfg)
    d["model"]["source"] = source
    d["adapter"] = {"method": method, "rank": 4, "targets": "all-linear"}
    if method == "gora":
        d["adapter"]["gora_rank_range"] = [2, 8]
    if method in ("gora", "loraga"):
        d["train"]["prepass_batches"] = 2
    d["train"].update(train)
    d["data"].update(data or {})
    return config.from_dict(d)


# GoRA ran here too (its pre-pass on the quantized base: 80 s of CI time); that pre-pass is
# test_gradient_stats_on_a_quantized_base_are_those_of_its_dequantized_copy's.
@pytest.mark.parametrize("method", ["lora", pytest.param("loraga", marks=pytest.mark.slow)])
def test_a_run_quantized_at_load_resumes_and_exports(tmp_path, method):
    """LoRA with the stories260K Llama quantized as it is read, LoRA-GA (residual: quantized
    after its init): the base stays NF4, a stopped and resumed run has the uninterrupted
    losses, and the PEFT export is an adapter for the original base."""
    from jlora.train.export import export_run, restore_run

    cfg = _run_config(method, "nf4")
    run_and_resume(cfg, tmp_path)
    setup, _, _ = restore_run(tmp_path / "a")
    assert len(_quantized(setup.frozen["base"])) == 35
    folder = export_run(tmp_path / "a", "peft", tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").exists()


# --- quantization-aware inits: QPiSSA and LoftQ ---


def _pretrained_like(shape, seed=0):
    """A kernel with a decaying spectrum and a few strong directions, as pretrained ones have."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(shape).astype(np.float32) * 0.02
    for i in range(6):
        k += np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])) * 0.05 / (i + 1)
    return k.astype(np.float32)


def _peft_loftq(weight, num_iter, rank, bnb):
    """PEFT's `loftq_init` loop (peft/utils/loftq_utils.py, NF4 branch) on the CPU: PEFT itself
    moves the weight to CUDA. bitsandbytes' quantizer; its reference dequantization."""
    bnbf, torch = bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    res = weight.clone()
    for i in range(num_iter):
        packed, state = bnbf.quantize_4bit(res, blocksize=64, quant_type="nf4")
        deq = _dequantize_4bit_compute(
            packed.reshape(-1), state.absmax, _get_4bit_code("nf4", "cpu"), 64,
            tuple(res.shape), torch.float32,
        )  # fmt: skip
        res = weight - deq
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :rank])
        R = torch.sqrt(torch.diag(S)[:rank, :]) @ Vh
        if i + 1 == num_iter:
            break
        res = weight - L @ R
    return deq, L @ R


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_is_peft_loftq_init(iters):
    """LoRA with alpha = r (scale 1, where PEFT's unscaled factors are the fit too): the same
    dequantized base and ΔW as PEFT's loop, on bitsandbytes' NF4 (bit-identical quantizers)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    k = _pretrained_like((256, 128))  # (d_in, d_out); PEFT's weight is its transpose
    cfg = jlora.AdapterConfig(method="lora", rank=8, alpha=8.0)
    base, adapters = quant.loftq.init(cfg, {"w": {"kernel": k}}, 0, fmt="nf4", iters=iters)
    deq, delta = _peft_loftq(torch.from_numpy(k.T.copy()), iters, 8, (bnbf, torch))
    ours_q = np.asarray(base["w"]["kernel"].dequantize()).T
    # Iteration 1 quantizes K itself: bit-identical. Later ones quantize K − ΔK, ΔK from two
    # SVD implementations: the block scales differ in their last bits, and a value on a code
    # boundary may round the other way.
    if iters == 1:
        np.testing.assert_array_equal(ours_q, deq.numpy())
    close = np.abs(ours_q - deq.numpy()) <= 1e-5 * np.abs(k).max()
    assert np.mean(close) > 0.999, np.mean(close)
    ours_delta = np.asarray(jlora.delta(adapters)["w/kernel"]).T
    np.testing.assert_allclose(ours_delta, delta.numpy(), atol=1e-4 * np.abs(delta.numpy()).max())


def test_loftq_and_qpissa_reduce_the_error_of_the_quantized_start():
    k = _pretrained_like((256, 128), seed=1)
    params = {"w": {"kernel": k}}
    err = {}
    for method in ("lora", "pissa"):
        cfg = jlora.AdapterConfig(method=method, rank=8, alpha=16.0)
        for iters in (0, 1, 4):
            base, ad = quant.loftq.init(cfg, params, 0, fmt="nf4", iters=iters)
            err[method, iters] = quant.loftq.relative_error(params, base, ad)["w/kernel"]
    plain = np.linalg.norm(
        k - np.asarray(quantize_params(params, "nf4")["w"]["kernel"].dequantize())
    )
    assert err["lora", 0] == pytest.approx(plain / np.linalg.norm(k), rel=1e-5)  # ΔK = 0
    assert err["lora", 0] > err["lora", 1] > err["lora", 4]
    assert err["pissa", 0] < err["lora", 0]  # QPiSSA: the principal part stays in full precision
    assert err["pissa", 4] < err["pissa", 0]
    with pytest.raises(ValueError, match=r"method 'dora' has none; expected one of \('lora', "):
        quant.loftq.init(jlora.AdapterConfig(method="dora", rank=2), params, 0, iters=1)
    with pytest.raises(ValueError, match=r"iters=-1: expected an integer >= 0"):
        quant.loftq.init(jlora.AdapterConfig(rank=2), params, 0, iters=-1)


@pytest.mark.optimized  # LoftQ's SVD iterations run long: optimized compiles (conftest)
def test_a_loftq_run_starts_close_and_exports_for_the_original_base(tmp_path):
    """`model.loftq_iters`: the quantized base plus the initial adapters is nearer the
    full-precision model than plain quantization, and the PEFT export folds out the initial
    ΔK (as for residual methods): PEFT's ΔK' = ΔK_trained − ΔK_init, on the original base."""
    from safetensors.numpy import load_file

    from jlora.errors import ConfigError
    from jlora.train import loop
    from jlora.train.export import export_run, restore_run

    cfg = _run_config("lora", "nf4", steps=2)
    from jlora.train import config

    cfg = config.from_dict(
        {**config.to_dict(cfg), "model": {**config.to_dict(cfg)["model"], "loftq_iters": 2}}
    )
    loop.run(cfg, tmp_path / "a", progress=False)
    setup, trainable, _ = restore_run(tmp_path / "a")
    _, plain, _ = jm.load(STORIES)
    base = {**setup.frozen["base"], **trainable["head"]}
    loftq_err = quant.loftq.relative_error(plain, base, setup.initial_adapters)
    plain_q = quantize_params(plain, "nf4", jm.QUANTIZE_PATTERN)
    zero = {
        p: a.replace(params={**a.params, "B": jnp.zeros_like(a.params["B"])})
        for p, a in setup.initial_adapters.items()
    }
    plain_err = quant.loftq.relative_error(plain, plain_q, zero)
    assert all(loftq_err[p] < plain_err[p] for p in plain_err), (loftq_err, plain_err)

    folder = export_run(tmp_path / "a", "peft", tmp_path / "peft")
    c = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    _, adapters = setup.assemble(trainable)
    want = jlora.delta(adapters)
    init = jlora.delta(setup.initial_adapters)
    path = "model/layers_1/mlp/up_proj/kernel"
    key = next(k for k in tensors if "layers.1.mlp.up_proj.lora_A" in k)
    A, B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
    assert A.shape[0] == 2 * 4  # [A, A0] @ [B; −B0]: rank 2r
    got = (B @ A).T * c["lora_alpha"] / c["r"]
    np.testing.assert_allclose(got, np.asarray(want[path] - init[path]), atol=1e-5)

    for bad, match in [
        ({"loftq_iters": 1}, r"model.loftq_iters=1: expected 0 unless model.quantize is set"),
        ({"quantize": "nf4", "loftq_iters": -1}, r"model.loftq_iters=-1: expected an integer"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config.from_dict({"model": bad})
    with pytest.raises(ConfigError, match=r"loftq_iters=2: expected 0 for adapter.method='dora'"):
        config.from_dict(
            {"model": {"quantize": "nf4", "loftq_iters": 2}, "adapter": {"method": "dora"}}
        )


@pytest.mark.slow  # 22 s per method; test_a_gguf_loads_with_its_blocks_kept stays fast
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_a_run_on_gguf_blocks_resumes_and_exports(tmp_path, method):
    """train.py with `model.quantize=gguf` on a GGUF whose layers are Q4_0 / Q4_1 / Q8_0: the
    blocks are kept (PiSSA's residual requantized in each kernel's own format), a stopped and
    resumed run has the uninterrupted losses, and the merged export is the dequantized base
    plus the trained ΔW."""
    from jlora.train.export import export_run, restore_run

    _tiny_gguf(tmp_path / "t.gguf", TYPES)
    byte_level = {"max_length": 512, "buckets": [512]}  # one token a byte
    cfg = _run_config(method, "gguf", source=str(tmp_path / "t.gguf"), data=byte_level)
    run_and_resume(cfg, tmp_path)
    setup, trainable, _ = restore_run(tmp_path / "a")
    kept = _quantized(setup.frozen["base"])
    assert {p.split("/")[-2]: x.fmt for p, x in kept.items()} == TYPES
    params, adapters = setup.assemble(trainable)
    ids = jnp.asarray([[1, 5, 9, 13, 2, 7]], jnp.int32)
    with jlora.inject(adapters):
        want = setup.model.apply({"params": params}, ids)
    model, merged, _ = jm.load(export_run(tmp_path / "a", "merged", tmp_path / "merged"))
    got = model.apply({"params": merged}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert (export_run(tmp_path / "a", "peft", tmp_path / "peft") / "adapter_config.json").exists()
