"""Run as a script with 8 host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`):
for each model family, method and mesh shape, the loss and the adapter gradients of a sharded
step (base by the family's rules, adapters derived from their kernels, batch over data × fsdp)
against the same step without shardings. Prints one JSON object per line:
{"family", "method", "mesh", "loss_diff", "grad_diff", "grad_scale", "layouts"}; and for the
Llama, GoRA's gradient pre-pass on each mesh (method "prepass", "kernel_layouts": whether every
accumulator came back in its kernel's layout), and the inits that compute from the kernel
(method "init-<name>": the merged weights of `jlora.init` on the placed base against the
unplaced one, "init_layouts": whether every adapter leaf and rewritten kernel came out of the
init in its final layout)."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

import jlora
import jlora.models as jm
from jlora import sharding
from jlora.models.bert import Bert, BertConfig
from jlora.models.llama import Llama, LlamaConfig

# (8,1,1), pure data parallelism, is left to tests/test_mesh_training.py (the loop on it).
MESHES = [(2, 4, 1), (2, 2, 2), (1, 1, 8)]
# The steps on (2,2,2), where every axis shards. LoRA on the other meshes, and DoRA and NOLA,
# are left to tests/test_mesh_training.py, whose 5 training steps on those meshes equal the
# 1-device run's (which their gradients must do); each row here compiles a step on 8 devices.
METHODS = {
    "lora": {},
    "slora": {},
    "vera": {},
}
# BERT runs fewer methods (each row compiles a step): one with a middle matrix, one with vectors.
BERT_METHODS = ("slora", "vera")


def model(family: str):
    if family == "bert":
        cfg = BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
        )
        return Bert(cfg)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Llama(cfg)


def perturbed(adapters):
    """Random (not constant) offsets on every leaf, so that every leaf has a gradient."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return tree.unflatten(noisy)


def make_step(m, out_shardings=None):
    """Loss and gradients of the trainable leaves; with `out_shardings`, the gradients come out
    in the layout of their leaves (as an optimizer update needs them)."""

    def loss(tr, fr, base, ids, mask):
        with jlora.inject(jlora.combine(tr, fr)):
            out = m.apply({"params": base}, ids, mask)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss), out_shardings=out_shardings)


def sharded_args(m, mesh, trainable, frozen, base, ids, mask):
    """The step's arguments placed on `mesh`: the base by the family's rules, the adapters
    derived from their kernels, the batch over data × fsdp."""
    base_specs = sharding.param_specs(base, jm.sharding_rules(m), mesh)
    adapters = jlora.combine(trainable, frozen)
    kernels = {p: s for p, s in jlora.targets.flatten(base_specs).items() if p in adapters}
    tr_specs, fr_specs = jlora.split(sharding.adapter_specs(adapters, kernels, mesh))
    batch = sharding.P(sharding.BATCH)
    pairs = ((trainable, tr_specs), (frozen, fr_specs), (base, base_specs), (ids, batch))
    placed = [jax.device_put(x, sharding.named(mesh, s)) for x, s in pairs]
    return (*placed, jax.device_put(mask, sharding.named(mesh, batch))), tr_specs


def prepass_rows(m, params, ids, mask):
    """GoRA's gradient pre-pass (`jlora.gradient_stats`) on the placed base against the unplaced
    one: the same mean gradients, each accumulator in its kernel's layout."""
    cfg = jlora.AdapterConfig(method="gora", rank=4, targets=jm.preset(m, "all-linear"))

    def loss(p, batch):
        out = m.apply({"params": p}, batch["ids"], batch["mask"])
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    batch = {"ids": ids, "mask": mask}
    want = jlora.gradient_stats(loss, params, [batch, batch], cfg)
    for shape in MESHES:
        sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
        mesh = sharding.make_mesh(sharding.MeshShape(**sizes))
        specs = sharding.param_specs(params, jm.sharding_rules(m), mesh)
        placed = jax.device_put(params, sharding.named(mesh, specs))
        placed_batch = jax.device_put(batch, NamedSharding(mesh, sharding.P(sharding.BATCH)))
        got = jlora.gradient_stats(loss, placed, [placed_batch, placed_batch], cfg)
        flat = jlora.targets.flatten(specs)
        same = {
            p: g.sharding.is_equivalent_to(NamedSharding(mesh, flat[p]), g.ndim)
            for p, g in got.items()
        }
        row = {
            "family": "llama",
            "method": "prepass",
            "mesh": list(shape),
            "loss_diff": 0.0,
            "grad_diff": max(float(np.abs(np.asarray(got[p]) - want[p]).max()) for p in want),
            "grad_scale": max(float(np.abs(x).max()) for x in want.values()),
            "kernel_layouts": all(same.values()),
            "sharded_targets": sum(
                not NamedSharding(mesh, flat[p]).is_fully_replicated for p in got
            ),
        }
        print(json.dumps(row), flush=True)


# Inits that read the kernel (NLoRA's CUR slices, PiSSA's SVD; both rewrite the kernel) or the
# pre-pass gradients (GoRA's and LoRA-GA's B).
INIT_METHODS = {
    "nlora": {"nlora_core": "pinv"},  # pinv core: the residual kernel is written
    "pissa": {},
    "gora": {},
    "loraga": {},
}


def init_rows(m, params):
    """`jlora.init` on the base placed by the family's rules (gradients laid out like their
    kernels) against the unplaced init: the same merged weights, every output in its layout."""
    flat_params = jlora.targets.flatten(params)
    preset = jm.preset(m, "all-linear")
    for method, options in INIT_METHODS.items():
        cfg = jlora.AdapterConfig(method=method, rank=4, targets=preset, **options)
        paths = [t.path for t in jlora.targets.select(params, cfg.targets, cfg.rank, cfg.alpha)]
        keys = jax.random.split(jax.random.key(5), len(paths))
        grads = None
        if jlora.METHODS[method].needs_grads:
            grads = {
                p: jax.random.normal(k, flat_params[p].shape)
                for p, k in zip(paths, keys, strict=True)
            }
        base0, ad0 = jlora.init(cfg, params, 0, grads=grads)
        want = jlora.targets.flatten(jlora.merge(base0, ad0))
        for shape in MESHES:
            sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
            mesh = sharding.make_mesh(sharding.MeshShape(**sizes))
            specs = sharding.param_specs(params, jm.sharding_rules(m), mesh)
            placed = jax.device_put(params, sharding.named(mesh, specs))
            kspecs = jlora.targets.flatten(specs)
            g = None
            if grads is not None:
                g = {p: jax.device_put(x, NamedSharding(mesh, kspecs[p])) for p, x in grads.items()}
            base, ad = jlora.init(cfg, placed, 0, grads=g)
            layouts = sharding.adapter_specs(ad, {p: kspecs[p] for p in ad}, mesh)
            ok = [
                x.sharding.is_equivalent_to(NamedSharding(mesh, layouts[p].params[n]), x.ndim)
                for p in ad
                for n, x in ad[p].params.items()
            ]
            flat_base = jlora.targets.flatten(base)
            ok += [
                flat_base[p].sharding.is_equivalent_to(NamedSharding(mesh, kspecs[p]), 2)
                for p in ad
            ]
            got = jlora.targets.flatten(jlora.merge(base, ad))
            row = {
                "family": "llama",
                "method": f"init-{method}",
                "mesh": list(shape),
                "loss_diff": 0.0,
                "grad_diff": max(float(np.abs(np.asarray(got[p]) - want[p]).max()) for p in ad),
                "grad_scale": max(float(np.abs(want[p]).max()) for p in ad),
                "init_layouts": all(ok),
                "sharded_leaves": sum(
                    not x.sharding.is_fully_replicated
                    for a in ad.values()
                    for x in a.params.values()
                ),
            }
            print(json.dumps(row), flush=True)


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    for family in ("llama", "bert"):
        m = model(family)
        ids = jax.random.randint(jax.random.key(1), (8, 8), 3, 64)
        mask = jnp.ones((8, 8), jnp.int32).at[0, -3:].set(0)
        params = m.init(jax.random.key(0), ids, mask)["params"]
        step = make_step(m)  # unsharded reference
        for method, options in METHODS.items():
            if family == "bert" and method not in BERT_METHODS:
                continue
            cfg = jlora.AdapterConfig(
                method=method, rank=4, targets=jm.preset(m, "all-linear"), **options
            )
            base, adapters = jlora.init(cfg, params, 0)
            trainable, frozen = jlora.split(perturbed(adapters))
            want_loss, want = step(trainable, frozen, base, ids, mask)
            for shape in [(2, 2, 2)]:
                sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
                mesh = sharding.make_mesh(sharding.MeshShape(**sizes))
                args, tr_specs = sharded_args(m, mesh, trainable, frozen, base, ids, mask)
                replicated = jax.sharding.NamedSharding(mesh, sharding.P())
                sharded_step = make_step(m, (replicated, sharding.named(mesh, tr_specs)))
                got_loss, got = sharded_step(*args)
                diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), got, want)
                # The layouts of one row-parallel target (o_proj / attention output dense).
                path = next(p for p in got if "o_proj" in p or "attention/output" in p)
                row = {
                    "family": family,
                    "method": method,
                    "mesh": list(shape),
                    "loss_diff": abs(float(got_loss) - float(want_loss)),
                    "grad_diff": max(jax.tree.leaves(diffs)),
                    "grad_scale": max(float(np.abs(x).max()) for x in jax.tree.leaves(want)),
                    "target": path,
                    "layouts": {n: str(x.sharding.spec) for n, x in got[path].params.items()},
                }
                print(json.dumps(row), flush=True)
        if family == "llama":
            prepass_rows(m, params, ids, mask)
            init_rows(m, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
