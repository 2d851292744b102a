"""PEFT LoRA export of jlora adapters: `to_peft`, and `fold`, which turns any method into plain
LoRA factors.

`to_peft` writes `adapter_config.json` + `adapter_model.safetensors` in PyTorch layout for the
matching transformers class (`BertForSequenceClassification`, `LlamaForCausalLM`, ...), for
`peft.PeftModel.from_pretrained(base, path)`. Every method folds into a plain LoRA: the middle
matrix goes into B (`lora_B = (M @ B)ᵀ`), NOLA's and VeRA's A and B are materialised, and the
methods that rewrote the frozen kernel (PiSSA, LoRA-GA, Nyström `pinv` / `random`) become a
rank-2r adapter on the ORIGINAL base, `A' = [A, A0]`, `B' = [M B; −M0 B0]`, because
`(K − s·A0 M0 B0) + s·A M B = K + s·(A M B − A0 M0 B0)`. PEFT's scale `lora_alpha / r` is matched
per target with `use_rslora=False` and `lora_alpha = s·r`; targets whose (r, lora_alpha) differ
from the most common ones go to `rank_pattern` / `alpha_pattern`, keyed by full module names
(PEFT matches keys as regexes `(.*\\.)?key$`, first key wins; the export checks that every key
selects its own module only). Heads passed as `extra_params` go to `modules_to_save`, saved
under the names PEFT itself writes (`base_model.model.classifier.weight`: PEFT drops the
`modules_to_save.default.` part when saving and restores it when loading). A method that needs
more than lora_A / lora_B (DoRA's magnitude) adds it through `Method.peft_extra`.

Module names come from the model's family (`jlora.models.<family>.params.hf_module` and
`peft_task_type`, plus any `adapter_config.json` fields in its `PEFT_CONFIG`: GPT-2's
`fan_in_fan_out=True` for its Conv1D projections), so this module has no per-family branch.
Folding is done in float64 and written as float32. Stacked kernels are exported per layer after
`jlora.models.scan.unstack_adapters` (`fold` refuses them). Nothing non-finite is written: a NaN or
Inf adapter leaf, `extra_params` leaf or folded tensor is a `CheckpointError` raised before the
folder is created or touched.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import jax
import numpy as np

from jlora import persist, targets
from jlora.adapters import Adapters, split_seed, with_seed
from jlora.methods import METHODS, Adapter, AdapterSpec

__all__ = ["PEFT_FILE", "fold", "hf_module", "to_peft"]

PEFT_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@functools.partial(jax.jit, static_argnames="spec")
def _factors_jit(params: dict[str, jax.Array], seed: jax.Array | None, *, spec: AdapterSpec) -> Any:
    return METHODS[spec.method].factors(params, with_seed(spec, seed))


def _lora_factors(adapter: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` in float64 with `ΔK = s · A @ B` (the middle matrix folded into B)."""
    static, seed = split_seed(adapter.spec)
    A, M, B = _factors_jit(adapter.params, seed, spec=static)
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    if M is not None:
        B = np.asarray(M, np.float64) @ B
    return A, B


def fold(
    path: str, adapter: Adapter, initial: Adapter | None = None, *, rewritten: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """`(A', B')` in float64 with `ΔK' = s · A' @ B'` relative to the ORIGINAL kernel.

    For a method whose init rewrote the frozen kernel (`spec.residual`, or `rewritten`: a LoftQ
    init, `jlora.quant.loftq`), `initial` is the adapter the init returned for this target; the
    result has rank 2r: `[A, A0] @ [B; −B0]`. For
    DoRA these are the factors of the direction `K + s·A'@B'` (PEFT's lora_A / lora_B); the
    magnitude comes from `Method.peft_extra`.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> cfg = jlora.AdapterConfig(method="pissa", rank=2)
      >>> _, init = jlora.init(cfg, {"q": {"kernel": jnp.eye(6)}}, 0)
      >>> A, B = fold("q/kernel", init["q/kernel"], init["q/kernel"])  # untrained: ΔK' = 0
      >>> A.shape, B.shape, bool(np.abs(A @ B).max() < 1e-12)
      ((6, 4), (4, 6), True)
    """
    spec = adapter.spec
    if spec.stack:
        raise ValueError(
            f"adapter {path!r} is for a stacked kernel {spec.kernel_shape}: to_peft exports 2-D "
            "kernels only (unstack the layers first: jlora.models.scan.unstack_adapters)"
        )
    A, B = _lora_factors(adapter)
    if not (spec.residual or rewritten):
        return A, B
    if initial is None:
        raise ValueError(
            f"initial_adapters lacks {path!r}: method {spec.method!r} rewrote the frozen kernel "
            "at init, so the PEFT export (on the original base) needs the initial factors; pass "
            "initial_adapters = the adapters jlora.init returned (jlora.init(config, "
            "original_params, key) recomputes them)"
        )
    if initial.spec != spec:
        raise ValueError(
            f"initial_adapters[{path!r}].spec={initial.spec} differs from the trained adapter's "
            f"spec={spec}: expected the adapter jlora.init returned for this target"
        )
    A0, B0 = _lora_factors(initial)
    return np.concatenate([A, A0], axis=1), np.concatenate([B, -B0], axis=0)


def _linen_module(path: str) -> str:
    module, _, leaf = path.removeprefix("params/").rpartition("/")
    if leaf != "kernel" or not module:
        raise ValueError(
            f"adapter target {path!r}: expected the '/'-joined path of a module's 'kernel'"
        )
    return module


def _family(model: Any) -> ModuleType:
    """The model's family module (`jlora.models.<family>.params`), which names its HF modules."""
    from jlora.models.hub import family_of

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    fam = family_of(model_type) if isinstance(model_type, str) else None
    if fam is None or not isinstance(model, fam.model_class):
        raise ValueError(
            f"model={type(model).__name__}: to_peft exports adapters of jlora.models models "
            "(Llama-family: llama, mistral, qwen2, qwen3; GPT-2: gpt2; BERT-family: bert, "
            "roberta)"
        )
    return fam


def hf_module(model: Any, module: str) -> str:
    """Hugging Face module name of a Linen module path of a jlora model (its family's
    `hf_module`).

    Example:
      >>> from jlora.models.llama import Llama, LlamaConfig
      >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...                   num_hidden_layers=1, num_attention_heads=2)
      >>> hf_module(Llama(cfg), "model/layers_0/self_attn/q_proj")
      'model.layers.0.self_attn.q_proj'
    """
    return _family(model).hf_module(model.config, module)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _patterns(values: Mapping[str, Any], field: str) -> tuple[Any, dict[str, Any]]:
    """The most common value (PEFT's default) and `{module: value}` for the others."""
    default = collections.Counter(values.values()).most_common(1)[0][0]
    pattern = {m: v for m, v in values.items() if v != default}
    # PEFT resolves a module by the first key k with re.match(rf"(.*\.)?({k})$", module).
    compiled = [(k, re.compile(rf"(.*\.)?({k})$")) for k in pattern]
    for m in values:
        hit = next((k for k, rx in compiled if rx.match(m)), None)
        if hit != (m if m in pattern else None):
            raise ValueError(f"{field} key {hit!r} would also select module {m!r} in PEFT")
    return default, pattern


def _float32(x: np.ndarray) -> np.ndarray:
    """A contiguous float32 copy; an overflow becomes Inf silently (`persist.check_finite` reports
    it)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, np.float32)


def _same_fields(fields: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The `adapter_config.json` fields every target's method sets (`Method.peft_extra`): one
    config holds them all, so targets that disagree (DoRA mixed with LoRA) cannot be exported."""
    (first, want), *rest = fields.items()
    for p, got in rest:
        if got != want:
            raise ValueError(
                f"adapters {first!r} and {p!r} need different PEFT config fields ({want} vs "
                f"{got}, from methods' peft_extra): one PEFT folder has one adapter_config.json; "
                "export them separately"
            )
    return dict(want)


def to_peft(
    model: Any,
    adapters: Adapters,
    path: str | os.PathLike,
    *,
    initial_adapters: Adapters | None = None,
    rewritten: bool = False,
    extra_params: Any = None,
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Writes a PEFT LoRA folder equal to the jlora-adapted model (see the module docstring).

    A method that needs more than lora_A / lora_B adds its tensors and `adapter_config.json`
    fields through `Method.peft_extra` (DoRA: `lora_magnitude_vector` and `use_dora=True`); every
    target must then set the same fields.

    Args:
      model: the jlora model (`Bert`, `Llama`-family or `GPT2`) whose parameters the adapters
        target.
      adapters: the trained adapters.
      path: the folder to write (created if needed).
      initial_adapters: what `jlora.init` returned; needed for methods that rewrote the frozen
        kernel (`pissa`, `loraga`, `nlora`/`inttune` with `nlora_core="pinv"`), since PEFT
        loads the adapter onto the original base weights.
      rewritten: every target's frozen kernel was rewritten at init whatever the method (a LoftQ
        init: `jlora.quant.loftq`, whose base is `quantize(K − ΔK0)`): fold as for residual
        methods, so the adapter is for the original, full-precision base (as PEFT's own).
      extra_params: trained non-adapter parameters as Linen subtrees, e.g.
        `{"classifier": ..., "pooler": ...}`; each top-level module goes to `modules_to_save`.
      base_model_name_or_path: written into `adapter_config.json` (a hub id or a folder).

    Returns the folder. Load it with `peft.PeftModel.from_pretrained(base, folder)` on a
    transformers model holding the original weights.

    Raises:
      CheckpointError: a leaf of `adapters` or `extra_params`, or a folded float32 tensor, holds
        NaN or Inf (checked before anything is written).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora, jlora.models as jm
      >>> from jlora.models.bert import Bert, BertConfig
      >>> cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
      ...                  num_attention_heads=2, intermediate_size=8, num_labels=2)
      >>> model = Bert(cfg)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
      >>> acfg = jlora.AdapterConfig(rank=2, targets=jm.preset(model, "attention"))
      >>> _, ad = jlora.init(acfg, params, 0)
      >>> folder = to_peft(model, ad, tempfile.mkdtemp(), extra_params={"classifier":
      ...                  params["classifier"]})
      >>> c = json.loads((folder / "adapter_config.json").read_text())
      >>> c["task_type"], c["r"], c["lora_alpha"], c["modules_to_save"]
      ('SEQ_CLS', 2, 16, ['classifier'])
      >>> c["target_modules"][0]
      'bert.encoder.layer.0.attention.output.dense'
    """
    fam = _family(model)
    if not adapters:
        raise ValueError("adapters is empty: nothing to export")
    out = pathlib.Path(path)
    persist.check_adapters_finite(adapters, extra_params, out)
    initial_adapters = initial_adapters or {}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float | int] = {}
    fields: dict[str, dict[str, Any]] = {}  # adapter_config.json fields of each target's method
    for p, adapter in adapters.items():
        A, B = fold(p, adapter, initial_adapters.get(p), rewritten=rewritten)
        module = fam.hf_module(model.config, _linen_module(p))
        r = A.shape[1]
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = _float32(A.T)
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = _float32(B.T)
        ranks[module] = r
        alphas[module] = _number(float(adapter.spec.scale) * r)
        fields[p], extra = METHODS[adapter.spec.method].peft_extra(adapter.params, adapter.spec)
        for name, leaf in extra.items():
            tensors[f"{_PEFT_PREFIX}{module}.{name}"] = _float32(np.asarray(leaf))
    config_fields = _same_fields(fields)
    modules_to_save = None
    if extra_params is not None:
        modules_to_save = sorted(hf_module(model, top) for top in extra_params)
        for top in modules_to_save:
            inside = [m for m in ranks if m.startswith(top + ".")]
            if inside:
                raise ValueError(
                    f"extra_params module {top!r} contains adapter targets {inside[:3]}: "
                    "modules_to_save must be disjoint from the LoRA targets"
                )
        for p, leaf in targets.flatten(extra_params).items():
            module, _, name = p.rpartition("/")
            x = np.asarray(leaf, np.float32)
            hf = f"{hf_module(model, module)}.{'bias' if name == 'bias' else 'weight'}"
            tensors[_PEFT_PREFIX + hf] = np.ascontiguousarray(x.T if name == "kernel" else x)
    # Finite leaves can still fold to Inf in float32 (`M @ B` overflowing).
    persist.check_finite(tensors, lambda key: f"PEFT tensor {key!r}", out)
    r, rank_pattern = _patterns(ranks, "rank_pattern")
    lora_alpha, alpha_pattern = _patterns(alphas, "alpha_pattern")
    peft_config = {
        "peft_type": "LORA",
        "task_type": fam.peft_task_type(model.config),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": max(float(a.spec.dropout) for a in adapters.values()),
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        # The family's own fields (GPT-2's Conv1D projections: fan_in_fan_out=True).
        **getattr(fam, "PEFT_CONFIG", {}),
        **config_fields,
    }
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, str(out / PEFT_FILE), metadata={"format": "pt"})
    (out / persist.CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    return out
