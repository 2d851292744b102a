"""Rows of a data set, from a local file or folder or from the Hugging Face Hub.

`load_rows(source, split)` returns a list of plain dicts; `load_table(source, split)` returns
them as a `Table` that also knows the file and line of each row, for error messages. `source` is

- a local file: `.tsv` (tab-separated, quoting off as GLUE needs: `csv.QUOTE_NONE`), `.csv`,
  `.jsonl` or `.json` (JSON lines, or one JSON array of objects); `split` is then ignored;
- a local folder holding `<split>.tsv`, `<split>.csv`, `<split>.jsonl` or `<split>.json`
  ("dev" and "validation" stand in for each other);
- a Hub data set `name[:config]`, read with `datasets.load_dataset(name, config, split=...)`.
  Short names: `glue/<task>` is `nyu-mll/glue` with config `<task>`, `gsm8k` and
  `openai/gsm8k` get config `main`. Split "dev" is read as the Hub's "validation".

A source is local, and never sent to the Hub, when it is a path object, is absolute, starts with
`.` or `~`, ends in a data-file suffix, its first path component exists (in the working
directory, or `data` for the shipped samples), or it does not look like a Hub name
(`name` or `owner/name`, optionally `:config`).

CSV/TSV columns whose every value is an integer literal become `int` (labels), as on the Hub.
The repository ships small real samples in `data/` (`DATA_DIR`): `data/sst2` and `data/gsm8k`;
a relative path `data/...` missing from the working directory is looked up there.

Problems are `jlora.errors.DataError`s with a one-line message naming the file and line: a
missing file, folder or split file (`DataNotFoundError`, also a `FileNotFoundError`, as is a
source neither local nor loadable from the Hub), an empty file, bytes that are not UTF-8, a JSON
syntax error, a CSV/TSV row with the wrong number of fields. `jlora.data.checks` checks the rows
against what a task reads.

Example:
  >>> rows = load_rows(DATA_DIR / "sst2", "dev")
  >>> len(rows), sorted(rows[0]), type(rows[0]["label"]).__name__
  (872, ['label', 'sentence'], 'int')
  >>> load_table(DATA_DIR / "sst2", "dev").where(0).endswith("dev.tsv line 2")
  True
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from jlora.errors import DataError, exception_line

# The repository's shipped samples (present in a clone, not in an installed wheel).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"

_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
_SPLIT_ALIASES = {"dev": ("dev", "validation"), "validation": ("validation", "dev")}
# Hub names that need a repository or config spelled out.
_HUB_ALIASES = {"gsm8k": ("openai/gsm8k", "main"), "openai/gsm8k": ("openai/gsm8k", "main")}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")
_INT = re.compile(r"[-+]?\d+")
_EXPECTED = (
    "expected a .tsv/.csv/.jsonl/.json file, a folder of <split>.tsv/.csv/.jsonl/.json files, "
    "or a Hub name like 'glue/sst2' or 'openai/gsm8k'"
)


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file, folder or split file that does not exist, or a source that is neither local
    nor loadable from the Hub (a `DataError` that `except FileNotFoundError` catches too)."""


@dataclasses.dataclass
class Table:
    """The rows of one split and where they came from.

    Attributes:
      origin: the file read, or the Hub data set (`"hub data set 'x' (config ..., split ...)"`).
      rows: one dict per row.
      lines: each row's (first) line in the file; None where rows have no line (a JSON array,
        the Hub), and `where` counts rows instead.
    """

    origin: str
    rows: list[dict[str, Any]]
    lines: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """`"<file> line <n>"` of row i, or `"<origin> row <i + 1>"` without line numbers."""
        if self.lines is not None:
            return f"{self.origin} line {self.lines[i]}"
        return f"{self.origin} row {i + 1}"

    def head(self, n: int | None) -> Table:
        """A table of the first n rows (all of them when n is None)."""
        lines = None if self.lines is None else self.lines[:n]
        return Table(self.origin, self.rows[:n], lines)


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


def _decode(path: Path) -> str:
    """The text of a UTF-8 file (a BOM dropped); bytes that are not UTF-8 name their line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({exception_line(e)})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path} line {line} column {column}: bytes {data[e.start : e.end]!r} are not "
            f"UTF-8; save the file as UTF-8"
        ) from None


def _read_delimited(path: Path, text: str) -> Table:
    """Rows of a CSV or TSV text with a header line; every row needs the header's field count."""
    tsv = path.suffix.lower() == ".tsv"
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    header: list[str] | None = None
    header_line, end = 0, 0
    rows, lines = [], []
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:  # a blank line
                continue
            if header is None:
                header, header_line = fields, start
                continue
            if len(fields) != len(header):
                kind = "tab-separated" if tsv else "comma-separated"
                raise DataError(
                    f"{path} line {start}: {len(fields)} fields; expected {len(header)} "
                    f"{kind} fields like the header (line {header_line}): {', '.join(header)}"
                )
            rows.append(dict(zip(header, fields, strict=True)))
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV/TSV ({e})") from None
    return Table(str(path), _typed(rows), lines)


def _json_syntax_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> DataError:
    return DataError(
        f"{path} line {line or e.lineno} column {e.colno}: invalid JSON ({e.msg}); expected JSON "
        "lines (one object per line) or one JSON array of objects"
    )


def _read_json(path: Path, text: str) -> Table:
    """Rows of JSON lines, or of one JSON array (whose rows have no line numbers)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_syntax_error(path, e) from None
        table = Table(str(path), rows)
    else:
        rows, lines = [], []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is valid JSON
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _json_syntax_error(path, e, line=n) from None
            lines.append(n)
        table = Table(str(path), rows, lines)
    for i, row in enumerate(table.rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{table.where(i)}: expected a JSON object (one row), found "
                f"{type(row).__name__} {_short(row)}"
            )
    return table


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters (one line: repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _read_file(path: Path) -> Table:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: file type {suffix!r}; expected one of {', '.join(_SUFFIXES)}")
    text = _decode(path)
    delimited = suffix in (".tsv", ".csv")
    table = _read_delimited(path, text) if delimited else _read_json(path, text)
    if not table.rows:
        expected = "a header line and at least one row" if delimited else "at least one object"
        raise DataError(f"{path}: no rows; expected {expected}")
    return table


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files that may hold `split` in `folder`, in the order they are looked for."""
    names = _SPLIT_ALIASES.get(split, (split,))
    return [folder / f"{name}{suffix}" for name in names for suffix in _SUFFIXES]


def _read_folder(folder: Path, split: str) -> Table:
    candidates = _split_files(folder, split)
    for path in candidates:
        if path.is_file():
            return _read_file(path)
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)
    raise DataNotFoundError(
        f"{folder}: no file for split {split!r}; looked for "
        f"{', '.join(p.name for p in candidates)}; the folder holds "
        f"{', '.join(found) or 'no .tsv/.csv/.jsonl/.json files'}"
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


def _read_hub(source: str, split: str) -> Table:
    repo, config = _hub_name(source)
    hub_split = "validation" if split == "dev" else split
    origin = f"hub data set {repo!r} (config {config!r}, split {hub_split!r})"
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as e:  # offline, unknown name, unknown split: all end up here
        raise DataNotFoundError(
            f"{source!r} is neither a local file or folder nor loadable from the Hugging Face "
            f"hub ({origin}: {exception_line(e)}); without the hub, use a local file or folder, "
            f"such as {_alternatives()}"
        ) from e
    table = Table(origin, [dict(r) for r in ds])
    if not table.rows:
        raise DataError(f"{origin}: no rows")
    return table


def _shipped(path: Path) -> Path:
    """`path`, or its copy under `DATA_DIR` for a relative `data/...` missing here."""
    shipped = DATA_DIR.parent / path  # "data/sst2" from any working directory
    if not path.exists() and not path.is_absolute() and shipped.resolve().is_relative_to(DATA_DIR):
        return shipped if shipped.exists() else path
    return path


def is_local(source: str | os.PathLike) -> bool:
    """Whether `source` names a local file or folder (existing or not) rather than a Hub data
    set; see the module docstring for the rule.

    Example:
      >>> is_local("data/sst3"), is_local("./x"), is_local("a.tsv"), is_local("glue/sst2")
      (True, True, True, False)
    """
    if isinstance(source, os.PathLike):
        return True
    path = Path(source)
    if source.startswith((".", "/", "~", "\\")) or path.is_absolute():
        return True
    if path.suffix.lower() in _SUFFIXES or not _HUB_NAME.fullmatch(source):
        return True
    first = Path(path.parts[0]) if path.parts else path
    return first.exists() or _shipped(first) != first


def _nearby(path: Path) -> str:
    """`" (<parent>/ holds a, b, ...)"` for a missing path whose folder exists, else `""`."""
    for candidate in (path, _shipped(path.parent) / path.name):
        parent = candidate.parent
        if parent != Path(".") and parent.is_dir():
            names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
            more = ", ..." if len(names) > 8 else ""
            return f" ({parent}/ holds {', '.join(names[:8]) or 'nothing'}{more})"
    return ""


def load_table(source: str | os.PathLike, split: str) -> Table:
    """The rows of `split` of a local file, a local folder or a Hub data set, as a `Table`.

    Example:
      >>> t = load_table(DATA_DIR / "gsm8k", "test")
      >>> len(t), t.origin.endswith("test.jsonl"), t.lines[:2]
      (200, True, [1, 2])
    """
    if not isinstance(split, str) or not split:
        raise DataError(f"split {split!r}: expected a non-empty string such as 'train' or 'dev'")
    text = os.fspath(source)
    path = _shipped(Path(text).expanduser())
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path, split)
    if is_local(source):
        raise DataNotFoundError(
            f"{text}: no such file or folder{_nearby(path)}; {_EXPECTED}; or use {_alternatives()}"
        )
    return _read_hub(text, split)


def load_rows(source: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Rows (dicts) of `split` of a local file, a local folder or a Hub data set.

    Example:
      >>> rows = load_rows(DATA_DIR / "gsm8k", "test")
      >>> len(rows), rows[0]["answer"].split("####")[-1].strip()
      (200, '18')
    """
    return load_table(source, split).rows
