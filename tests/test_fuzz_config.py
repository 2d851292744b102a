"""Fuzzing of config validation: `AdapterConfig`/`Rule` and the run-config loader of `train.py`.

The rule under test: every bad user input raises exactly one `jlora.errors.UserError` (for
configs: `ConfigError`) whose message is one line; any other exception escaping is a bug. What
is accepted must be usable: hashable, finite numbers, and (for a run config) an `adapter`
section that `AdapterConfig` accepts. Hypothesis runs derandomized (a fixed seed per test, no
example database) so CI never flakes; the explicit `@example`s are inputs known to have broken
a validator.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jlora.config import MAX_SIZE, METHODS, AdapterConfig, Rule
from jlora.errors import ConfigError, UserError
from jlora.methods import option_names
from jlora.train import config as run_config

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT64 = (-(2**63), 2**63 - 1)

# ---------------------------------------------------------------------------------------------
# Values: broad on purpose (wrong types, non-finite and huge numbers, nested garbage).

# Keywords AdapterConfig takes: its generic fields and every method's flat options.
GENERIC = [f.name for f in dataclasses.fields(AdapterConfig) if f.name != "options"]
FIELDS = [*GENERIC, *option_names()]
UNKNOWN = ["rnak", "mehtod", "lr", "target", "alpha_", "dropout_rate"]
WORDS = [
    *METHODS,
    *("kaiming", "gaussian", "raw", "pinv", "first", "random", "regenerate", "cache"),
    *("attention", "all-linear", "dora", "LoRA", "", " ", "8", "1e-3", "2e-5", "0.1"),
    *("nan", "inf", "-inf", ".inf", "true", "null", "~", "a\nb"),
]
REGEXES = [
    *(".*", r".*/(query|value)/kernel", "enc/q/kernel", r"enc/.*", "x" * 300),
    *("(", ")", "[z-a]", "a{3,2}", "(?L)a", "a{4294967296}", "\\", "*", "(?P<1>a)", "(?P<a\nb>x)"),
    "(" * 1200 + ")" * 1200,
]
HUGE_INTS = [MAX_SIZE, MAX_SIZE + 1, *INT64, INT64[0] - 1, INT64[1] + 1, 2**64, 10**400, -(10**400)]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 0.999, 1.0]

INTS = st.one_of(st.integers(-10, 70), st.integers(), st.sampled_from(HUGE_INTS))
FLOATS = st.one_of(st.floats(), st.sampled_from(SPECIAL_FLOATS))


def _scalars(huger: bool = False) -> st.SearchStrategy[Any]:
    """Numbers (incl. huge and non-finite), bools, None and strings (incl. bad regexes);
    `huger` adds 10**5000, past Python's int-to-str limit (even its repr() raises ValueError,
    so it is built, not listed: hypothesis shows the strategy)."""
    scalars = [INTS, FLOATS, st.booleans(), st.none(), st.text(max_size=12)]
    scalars.append(st.sampled_from([*WORDS, *REGEXES]))
    if huger:
        scalars.append(st.builds(pow, st.just(10), st.just(5000)))
    return st.one_of(*scalars)


def _nested(scalars: st.SearchStrategy[Any], tuples: bool) -> st.SearchStrategy[Any]:
    """`scalars` and lists (and tuples), dicts of them, nested a few levels."""

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        lists = st.lists(children, max_size=4)
        keys = st.one_of(st.text(max_size=6), st.sampled_from(FIELDS))
        options = [lists, st.dictionaries(keys, children, max_size=3)]
        if tuples:
            options.append(lists.map(tuple))
        return st.one_of(*options)

    return st.recursive(scalars, extend, max_leaves=8)


VALUES = _nested(_scalars(huger=True), tuples=True)
YAML_VALUES = _nested(_scalars(), tuples=False)  # what a YAML document can hold
RULE_LIKE = st.one_of(
    st.tuples(st.sampled_from(REGEXES), _scalars()),
    st.tuples(st.sampled_from(REGEXES), _scalars(), _scalars()),
    st.lists(st.one_of(st.sampled_from(REGEXES), _scalars()), min_size=1, max_size=3),
)

# Values each field accepts, so that fuzzing also reaches configs that validate.
GOOD: dict[str, list[Any]] = {
    "method": list(METHODS),
    "rank": [1, 4, 8, MAX_SIZE],
    "alpha": [1, 16.0, 0.5, 1e308, 5e-324],
    "targets": [
        ".*",
        "enc/q/kernel",
        [".*/q/kernel", (".*/v/kernel", 4, 8.0)],
        (".*", 2, 4.0),
        (".*", None),
        ["a", "b", "c"],
        Rule(pattern=".*", rank=2, alpha=1.0),
    ],
    "dropout": [0, 0.0, -0.0, 0.1, 0.999],
    "rslora": [True, False],
    "seed": [0, -1, 12345, *INT64],
    "lora_init": ["kaiming", "gaussian"],
    "pissa_niter": [None, 0, 4],
    "nlora_core": ["raw", "pinv"],
    "nlora_sampling": ["first", "random"],
    "nlora_rcond": [0, 1e-2, 0.5],
    "nola_num_basis": [(4, 3), [256, 256], (MAX_SIZE, 1)],
    "nola_basis": ["regenerate", "cache"],
    "gora_rank_range": [(1, 1), [4, 32], (2, MAX_SIZE)],
    "gora_gamma": [0, 5e-2, 1e308],
    "gora_lr_ratio": [16.0, 1],
}


def _good(name: str) -> list[Any]:
    """Accepted values of an `AdapterConfig` field (its default for a field `GOOD` lacks)."""
    if name in GOOD:
        return GOOD[name]
    fields = [f for f in dataclasses.fields(AdapterConfig) if f.name == name]
    if fields:
        return [fields[0].default]
    owner = METHODS[option_names()[name][0]].options_class
    return [owner().to_flat()[name]]


def _field_values(name: str) -> st.SearchStrategy[Any]:
    options = [st.sampled_from(_good(name)), VALUES]
    if name == "targets":
        options += [RULE_LIKE, st.lists(RULE_LIKE, max_size=3)]
    return st.one_of(*options)


@st.composite
def adapter_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    """`AdapterConfig` keywords: mostly accepted values (a method and its own options), up to
    three fuzzed fields (any field or option, so also misplaced options), and now and then an
    unknown keyword."""
    method = draw(st.sampled_from(list(METHODS)))
    own = METHODS[method].options_class.flat_names()
    optional = {name: st.sampled_from(_good(name)) for name in [*GENERIC[1:], *own]}
    kw: dict[str, Any] = {"method": method}
    kw.update(draw(st.fixed_dictionaries({}, optional=optional)))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        kw[name] = draw(_field_values(name))
    if draw(st.integers(0, 4)) == 0:
        kw[draw(st.sampled_from(UNKNOWN))] = draw(VALUES)
    return kw


# ---------------------------------------------------------------------------------------------
# Checks shared by the properties.


def _assert_one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert msg.splitlines() == [msg], f"{type(e).__name__} message is not one line: {msg!r}"


_ADAPTER_MESSAGE = re.compile(r"AdapterConfig\.(\w+)(\S*)=(.+) is invalid: expected (.+)")


def _assert_adapter_error(e: ConfigError) -> None:
    _assert_one_line(e)
    m = _ADAPTER_MESSAGE.fullmatch(str(e))
    assert m is not None, f"message not in the AdapterConfig format: {e}"
    assert m.group(1) in FIELDS, f"message names no field: {e}"


def _numbers(x: Any) -> Iterator[int | float]:
    """Every int/float (not bool) inside `x`, looking into tuples, lists and `Rule`s."""
    if isinstance(x, Rule):
        x = dataclasses.astuple(x)
    if isinstance(x, tuple | list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, int | float) and not isinstance(x, bool):
        yield x


def _assert_usable(cfg: AdapterConfig) -> None:
    """A config that validated: hashable, typed, finite, and its scales finite."""
    flat = cfg.to_flat()
    assert AdapterConfig(**flat) == cfg and hash(cfg) == hash(AdapterConfig(**flat))
    assert repr(cfg)
    for f, value in flat.items():
        for v in _numbers(value):
            assert math.isfinite(v), f"AdapterConfig.{f}={value!r} is not finite"
    assert isinstance(cfg.method, str) and type(cfg.rank) is int
    assert isinstance(cfg.targets, tuple) and cfg.targets
    for rule in cfg.targets:
        assert isinstance(rule, Rule) and isinstance(rule.pattern, str)
        rank = cfg.rank if rule.rank is None else rule.rank
        alpha = cfg.alpha if rule.alpha is None else rule.alpha
        assert math.isfinite(cfg.scale(rank, alpha))
    for f in ("alpha", "dropout", "nlora_rcond", "gora_gamma", "gora_lr_ratio"):
        assert f not in flat or type(flat[f]) is float, f
    for f in ("nola_num_basis", "gora_rank_range"):
        if f in flat:
            pair = flat[f]
            assert isinstance(pair, tuple) and len(pair) == 2
            assert all(type(v) is int for v in pair)
    assert isinstance(cfg.rslora, bool)
    assert type(cfg.seed) is int and INT64[0] <= cfg.seed <= INT64[1]  # jax.random.key's range


# ---------------------------------------------------------------------------------------------
# a. AdapterConfig and Rule.


@FUZZ
@given(kw=adapter_kwargs())
@example(kw={"alpha": math.nan})
@example(kw={"alpha": math.inf})
@example(kw={"alpha": 10**400})
@example(kw={"alpha": "16"})
@example(kw={"rank": True})
@example(kw={"rank": 10**400})
@example(kw={"rank": 10**5000})
@example(kw={"rank": "8"})
@example(kw={"rank": 8.0})
@example(kw={"seed": 2**64})
@example(kw={"seed": False})
@example(kw={"dropout": 1.0})
@example(kw={"dropout": -0.1})
@example(kw={"dropout": "0.1"})
@example(kw={"dropout": math.nan})
@example(kw={"method": ["lora"]})
@example(kw={"method": {"lora": 1}})
@example(kw={"targets": "a{4294967296}"})
@example(kw={"targets": "(" * 1200 + ")" * 1200})
@example(kw={"targets": "(?P<a\nb>x)"})
@example(kw={"targets": [("a", 10**400)]})
@example(kw={"targets": ("a", 10**400)})
@example(kw={"targets": [["a", ["b"]]]})
@example(kw={"targets": {"a": 1}})
@example(kw={"targets": b"abc"})
@example(kw={"targets": ("a", 2, math.nan)})
@example(kw={"targets": ("a", True)})
@example(kw={"nola_num_basis": [4, 4]})
@example(kw={"nola_num_basis": b"\x01\x02"})
@example(kw={"nola_num_basis": (2**40, 1)})
@example(kw={"gora_rank_range": ("1", "2")})
@example(kw={"gora_rank_range": (True, 2)})
@example(kw={"pissa_niter": 10**400})
@example(kw={"gora_gamma": 10**400})
@example(kw={"nlora_rcond": -0.0})
@example(kw={"rnak": 4})
@example(kw={"rank": 4, "mehtod": "lora"})
def test_adapter_config_fuzz(kw: dict[str, Any]) -> None:
    """`AdapterConfig(**kw)` is usable or raises one-line `ConfigError`; `TypeError` only for
    an unknown keyword (Python's own check, naming it)."""
    unknown = sorted(set(kw) - set(FIELDS))
    try:
        cfg = AdapterConfig(**kw)
    except ConfigError as e:
        assert not unknown, f"unknown {unknown} should fail first, as a TypeError"
        _assert_adapter_error(e)
    except TypeError as e:
        assert unknown, f"TypeError for known fields only: {e}"
        assert any(repr(k) in str(e) for k in unknown), str(e)
        _assert_one_line(e)
    else:
        assert not unknown
        _assert_usable(cfg)


@FUZZ
@given(
    pattern=st.one_of(st.sampled_from(REGEXES), VALUES),
    rank=st.one_of(st.none(), st.sampled_from([1, 8, MAX_SIZE]), VALUES),
    alpha=st.one_of(st.none(), st.sampled_from([1, 8.0]), VALUES),
)
@example(pattern=".*", rank=MAX_SIZE + 1, alpha=None)
@example(pattern=".*", rank=None, alpha=10**400)
@example(pattern=".*", rank=None, alpha=math.nan)
@example(pattern="a{99999999999}", rank=None, alpha=None)
def test_rule_fuzz(pattern: Any, rank: Any, alpha: Any) -> None:
    """`Rule(...)` is hashable with finite numbers, or raises one-line `ConfigError`."""
    try:
        rule = Rule(pattern=pattern, rank=rank, alpha=alpha)
    except ConfigError as e:
        _assert_adapter_error(e)
    else:
        hash(rule)
        assert all(math.isfinite(v) for v in _numbers(rule))
        assert AdapterConfig(targets=rule).targets == (rule,)


# ---------------------------------------------------------------------------------------------
# b. The run-config loader (`jlora.train.config`).

_HINTS = typing.get_type_hints(run_config.RunConfig)
_DEFAULTS = run_config.to_dict(run_config.RunConfig())
SECTION_KEYS: dict[str, list[str]] = {
    f.name: [g.name for g in dataclasses.fields(_HINTS[f.name])]
    for f in dataclasses.fields(run_config.RunConfig)
    if dataclasses.is_dataclass(_HINTS[f.name])
}
SECTION_KEYS["adapter"] = FIELDS
TOP_LEVEL = [f.name for f in dataclasses.fields(run_config.RunConfig)]
JUNK_KEYS: list[Any] = ["stpes", "rnak", "", "a\nb", "Train", 1, None, True, 1.5]


def _plain(x: Any) -> Any:
    """`x` with tuples as lists and `Rule`s as mappings: what YAML can hold."""
    if isinstance(x, Rule):
        return dataclasses.asdict(x)
    if isinstance(x, tuple | list):
        return [_plain(v) for v in x]
    return x


def _good_run_value(section: str | None, key: Any) -> list[Any]:
    """Accepted values for `section.key` (or a top-level `key`), from the defaults."""
    if section == "adapter" and key in FIELDS:
        extra = ["attention", "all-linear"] if key == "targets" else []
        return [_plain(v) for v in _good(key)] + extra
    node = _DEFAULTS if section is None else _DEFAULTS.get(section, {})
    if key in node:
        return [node[key]]
    return [None]


@st.composite
def run_documents(draw: st.DrawFn) -> Any:
    """A parsed config file: sections with real and junk keys, or (rarely) not a mapping."""
    if draw(st.integers(0, 9)) == 0:
        return draw(YAML_VALUES)
    doc: dict[Any, Any] = {}
    for name in draw(st.lists(st.sampled_from([*TOP_LEVEL, *JUNK_KEYS]), max_size=4, unique=True)):
        keys = SECTION_KEYS.get(name)
        if keys is None or draw(st.integers(0, 5)) == 0:
            doc[name] = draw(st.one_of(st.sampled_from(_good_run_value(None, name)), YAML_VALUES))
            continue
        base = _DEFAULTS[name] if draw(st.booleans()) else {}
        section = dict(base)
        for key in draw(st.lists(st.sampled_from([*keys, *JUNK_KEYS]), max_size=4, unique=True)):
            good = st.sampled_from(_good_run_value(name, key))
            section[key] = draw(st.one_of(good, YAML_VALUES))
        doc[name] = section
    return doc


def _dump(doc: Any, flow: bool | None = None) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=flow)


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """Bytes of a config file: a dumped document, one cut short (often invalid YAML), random
    text, or random bytes (often not UTF-8)."""
    kind = draw(st.sampled_from(["doc", "doc", "cut", "text", "bytes"]))
    if kind in ("doc", "cut"):
        text = _dump(draw(run_documents()), draw(st.sampled_from([None, True, False])))
        if kind == "cut":
            text = text[: draw(st.integers(0, len(text)))] + draw(st.text(max_size=4))
        return text.encode()
    if kind == "text":
        yamlish = st.sampled_from(
            ["train:", " steps: ", "[", "]", "{", "}", ":", "-", "\n", "&a", "*a"]
        )
        parts = st.lists(st.one_of(yamlish, st.text(max_size=6)), max_size=12)
        return "".join(draw(parts)).encode()
    return draw(st.binary(max_size=40))


def _yaml_text(value: Any) -> str:
    """`value` as one line of flow-style YAML, as a `--set` value."""
    return _dump([value], flow=True).strip()[1:-1]


DOTTED = [f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys] + TOP_LEVEL
JUNK_DOTTED = ["", ".", "a..b", " train.steps ", "adapter.", "train.stpes", "train.steps.x"]
OVERRIDES = st.lists(
    st.one_of(
        st.builds(
            "{}={}".format,
            st.sampled_from(DOTTED + JUNK_DOTTED),
            st.one_of(YAML_VALUES.map(_yaml_text), st.text(max_size=12)),
        ),
        st.text(max_size=20),
    ),
    max_size=3,
)


def _assert_valid_run_config(cfg: Any) -> None:
    """What `train.py` relies on in a loaded config, beyond its dataclass types."""
    assert isinstance(cfg, run_config.RunConfig)
    plain = run_config.to_dict(cfg)
    for v in _numbers(plain):
        assert math.isfinite(v), f"a non-finite number was accepted: {plain}"
        assert INT64[0] <= v <= INT64[1], f"a number past int64 was accepted: {plain}"
    for name in ("max_train_examples", "max_eval_examples"):
        n = getattr(cfg.data, name)
        assert n is None or n >= 1, f"data.{name}={n!r} was accepted"
    if not cfg.train.full_finetune:
        # What `jlora.train.loop.adapter_config` builds, with a placeholder for a preset name.
        kwargs = dict(cfg.adapter)
        if kwargs.get("targets", "attention") in ("attention", "all-linear"):
            kwargs["targets"] = ".*"
        for key in ("nola_num_basis", "gora_rank_range"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        kwargs.setdefault("seed", cfg.train.seed)
        try:
            AdapterConfig(**kwargs)
        except (ConfigError, TypeError) as e:
            raise AssertionError(f"the loader accepted adapter={cfg.adapter!r}: {e}") from e


def _outcome(fn: Callable[[], Any]) -> None:
    """`fn()` returns a valid `RunConfig` or raises a one-line `UserError`."""
    try:
        cfg = fn()
    except UserError as e:
        _assert_one_line(e)
    else:
        _assert_valid_run_config(cfg)


@FUZZ
@given(doc=run_documents())
@example(doc={"train": {"steps": math.inf}})
@example(doc={"train": {"learning_rate": math.inf}})
@example(doc={"train": {"learning_rate": "nan"}})
@example(doc={"adapter": {"rnak": 4}})
@example(doc={"adapter": {"method": "lora", "rnak": 4}})
@example(doc={"adapter": {"rank": -4}})
@example(doc={"adapter": {"method": "lora", "rank": -4}})
@example(doc={"adapter": {"method": "lora", "alpha": math.nan}})
@example(doc={"adapter": {"method": "lora", "targets": [["a", ["b"]]]}})
@example(doc={"adapter": {"method": "lora", 1: 2}})
@example(doc={"data": {"max_train_examples": -5}})
@example(doc={"data": {"max_eval_examples": 0}})
@example(doc={"a\nb": 1})
@example(doc={"train": {"a\nb": 1}})
@example(doc={"train": {"seed": 2**64, "full_finetune": True}})
@example(doc=[1, 2])
@example(doc="train")
@example(doc=None)
def test_from_dict_fuzz(doc: Any) -> None:
    """`from_dict(doc)` is a valid `RunConfig` or raises a one-line `UserError`."""
    _outcome(lambda: run_config.from_dict(doc))


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A folder for the fuzzed config files (module-scoped: hypothesis reuses it)."""
    return tmp_path_factory.mktemp("fuzz-config")


@FUZZ
@given(data=config_files(), overrides=OVERRIDES)
@example(data=b"train: [1,", overrides=[])
@example(data=b"train: {steps: .inf}", overrides=[])
@example(data=b"adapter: {rnak: 4}", overrides=[])
@example(data=b"adapter: {rank: -4}", overrides=[])
@example(data=b"data: {max_train_examples: -5}", overrides=[])
@example(data=b"train: {learning_rate: .inf}", overrides=[])
@example(data=b"- 1\n- 2\n", overrides=[])
@example(data=b"42\n", overrides=[])
@example(data=b"", overrides=[])
@example(data=b"train: {steps: \xff\xfe}\n", overrides=[])
@example(data=b"\xff\xfe\x00t", overrides=[])
@example(data=b"train: {steps: " + b"9" * 5000 + b"}", overrides=[])
@example(data=b"train: " + b"[" * 3000 + b"]" * 3000, overrides=[])
@example(data=b"train: &a {steps: *a}", overrides=[])
@example(data=b'"a\\nb": 1', overrides=[])
@example(data=b"", overrides=["train.steps=[1,"])
@example(data=b"", overrides=["train.steps=.inf"])
@example(data=b"", overrides=["train.steps"])
@example(data=b"train: {steps: 5}", overrides=["train.steps.x=1"])
@example(data=b"train: null", overrides=["train.steps=5"])
def test_load_fuzz(config_dir: pathlib.Path, data: bytes, overrides: list[str]) -> None:
    """`load(file, overrides)` is a valid `RunConfig` or raises a one-line `UserError`."""
    path = config_dir / "run.yaml"
    path.write_bytes(data)
    _outcome(lambda: run_config.load(path, overrides))


@FUZZ
@given(doc=run_documents(), overrides=OVERRIDES)
@example(doc={}, overrides=["=5"])
@example(doc={}, overrides=["train=5", "train.steps=1"])
@example(doc={}, overrides=["adapter.rank=-4"])
@example(doc={}, overrides=["adapter.rnak=4"])
@example(doc={}, overrides=["data.max_train_examples=-5"])
@example(doc={}, overrides=["train.learning_rate=.inf"])
@example(doc={}, overrides=["train.seed=18446744073709551616", "train.full_finetune=true"])
@example(doc={}, overrides=["train.a\nb=1"])
@example(doc={}, overrides=["train.steps=" + "[" * 3000])
@example(doc={}, overrides=["train.steps=&a [*a]"])
@example(doc={}, overrides=["name=\xff"])
def test_overrides_fuzz(doc: Any, overrides: list[str]) -> None:
    """`--set` overrides on a parsed file: a valid `RunConfig` or a one-line `UserError`."""
    if not isinstance(doc, dict):
        doc = {}
    _outcome(lambda: run_config.from_dict(run_config.apply_overrides(doc, overrides)))
