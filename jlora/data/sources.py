"""Rows of a data set, from a local file or folder or from the Hugging Face Hub.

`load_rows(source, split)` returns a list of plain dicts. `source` is one of

- a local file: `.tsv` (tab-separated, quoting off as GLUE needs: `csv.QUOTE_NONE`), `.csv`,
  `.jsonl` or `.json` (JSON lines, or one JSON array of objects); `split` is then ignored;
- a local folder holding `<split>.tsv`, `<split>.csv`, `<split>.jsonl` or `<split>.json`
  ("dev" and "validation" stand in for each other);
- a Hub data set `name[:config]`, read with `datasets.load_dataset(name, config, split=...)`.
  Short names: `glue/<task>` is `nyu-mll/glue` with config `<task>`, `gsm8k` and
  `openai/gsm8k` get config `main`. Split "dev" is read as the Hub's "validation".

CSV/TSV columns whose every value is an integer literal become `int` (labels), as on the Hub.
The repository ships small real samples in `data/` (`DATA_DIR`): `data/sst2` and `data/gsm8k`;
a relative path `data/...` missing from the working directory is looked up there.

Example:
  >>> rows = load_rows(DATA_DIR / "sst2", "dev")
  >>> len(rows), sorted(rows[0]), type(rows[0]["label"]).__name__
  (872, ['label', 'sentence'], 'int')
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

# The repository's shipped samples (present in a clone, not in an installed wheel).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"

_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
_SPLIT_ALIASES = {"dev": ("dev", "validation"), "validation": ("validation", "dev")}
# Hub names that need a repository or config spelled out.
_HUB_ALIASES = {"gsm8k": ("openai/gsm8k", "main"), "openai/gsm8k": ("openai/gsm8k", "main")}
_INT = re.compile(r"[-+]?\d+")


def _alternatives() -> str:
    return (
        f"the local samples shipped in the repository: {DATA_DIR / 'sst2'} (SST-2: train, dev) "
        f"and {DATA_DIR / 'gsm8k'} (GSM8K: train, test), e.g. load_rows('data/sst2', 'dev')"
    )


def _typed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Columns whose every value is an integer literal as `int`."""
    if not rows:
        return rows
    int_cols = [k for k in rows[0] if all(_INT.fullmatch(str(r[k] or "")) for r in rows)]
    for r in rows:
        for k in int_cols:
            r[k] = int(r[k])
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            if suffix == ".tsv":
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
        bad = [i for i, r in enumerate(rows) if None in r or None in r.values()]
        if bad:
            raise ValueError(
                f"source {str(path)!r}: row {bad[0] + 2} has a different number of fields than "
                f"the header {reader.fieldnames}"
            )
        return _typed(rows)
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"source {str(path)!r}: expected JSON objects, one per row")
        return rows
    raise ValueError(f"source {str(path)!r}: file type {suffix!r}; expected one of {_SUFFIXES}")


def _read_folder(folder: Path, split: str) -> list[dict[str, Any]]:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        for suffix in _SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return _read_file(path)
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)
    raise FileNotFoundError(
        f"source {str(folder)!r}: no file for split {split!r}; expected "
        f"{split}{{{','.join(_SUFFIXES)}}}, found {found}"
    )


def _hub_name(source: str) -> tuple[str, str | None]:
    """`(repository, config)` of a Hub source `name[:config]` or a short name."""
    name, _, config = source.partition(":")
    if name in _HUB_ALIASES:
        repo, default = _HUB_ALIASES[name]
        return repo, config or default
    if name.startswith("glue/") and not config:
        return "nyu-mll/glue", name.removeprefix("glue/")
    return name, config or None


def _read_hub(source: str, split: str) -> list[dict[str, Any]]:
    import datasets

    repo, config = _hub_name(source)
    hub_split = "validation" if split == "dev" else split
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as e:  # offline, unknown name, unknown split: all end up here
        raise ConnectionError(
            f"source {source!r}: could not load Hub data set {repo!r} (config {config!r}, "
            f"split {hub_split!r}): {type(e).__name__}: {e}. Without the Hub, use a local file "
            f"or folder instead, such as {_alternatives()}"
        ) from e
    return [dict(r) for r in ds]


def load_rows(source: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Rows (dicts) of `split` of a local file, a local folder or a Hub data set.

    Example:
      >>> rows = load_rows(DATA_DIR / "gsm8k", "test")
      >>> len(rows), rows[0]["answer"].split("####")[-1].strip()
      (200, '18')
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split {split!r}: expected a non-empty string such as 'train' or 'dev'")
    path = Path(source).expanduser()
    shipped = DATA_DIR.parent / path  # "data/sst2" from any working directory
    if not path.exists() and not path.is_absolute() and shipped.resolve().is_relative_to(DATA_DIR):
        path = shipped if shipped.exists() else path
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path, split)
    text = os.fspath(source)
    looks_local = (
        isinstance(source, os.PathLike)
        or text.startswith((".", "/", "~", "\\"))
        or path.suffix.lower() in _SUFFIXES
    )
    if looks_local:
        raise FileNotFoundError(
            f"source {text!r}: no such file or folder. Expected a .tsv/.csv/.jsonl/.json file, "
            f"a folder holding <split>.tsv/.csv/.jsonl, or a Hub name like 'glue/sst2' or "
            f"'openai/gsm8k'; or use {_alternatives()}"
        )
    return _read_hub(text, split)
