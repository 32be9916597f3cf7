"""Read rows (dicts) from a local JSONL/JSON/Parquet/CSV file or a `datasets` name.

Local files are read here so a malformed row is reported as `file:line`; `datasets` is used for hub
names and Parquet.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from p3o.errors import UsageError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class InMemoryDataset:
    """Rows already in memory (a `datasets.Dataset`, an iterable dataset or a list of dicts, as the
    Python API takes them), named by the argument that gave them, so errors read `train_dataset: row 3`."""

    def __init__(self, data: Any, name: str):
        self.name = name
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # columns
            data = [dict(zip(data, values)) for values in zip(*data.values())]
        try:
            self.rows = [dict(row) for row in data]  # an iterable dataset is read whole: p3o shuffles by index
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be a datasets.Dataset, an iterable of dicts (rows) or a path, "
                             f"got {type(data).__name__}") from None

    def __str__(self) -> str:
        return self.name


def as_dataset_spec(data: Any, name: str) -> str | InMemoryDataset:
    """A path or hub name as it is; anything else as rows in memory."""
    return str(data) if isinstance(data, (str, Path)) else InMemoryDataset(data, name)


def read_rows(spec: str | InMemoryDataset, split: str = "train", config: str | None = None) -> list[dict[str, Any]]:
    """All rows of a dataset, in order. `spec` is a local file, a `datasets` name or rows in memory."""
    if isinstance(spec, InMemoryDataset):
        if not spec.rows:
            raise UsageError(f"{spec} has no rows")
        return spec.rows
    path = Path(spec)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"dataset file {spec} does not exist")
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[path.suffix]
        try:
            rows = reader(path)
        except UnicodeDecodeError as exc:
            raise UsageError(f"{spec}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    elif path.is_file():
        raise UsageError(f"dataset {spec}: unsupported file type; use .jsonl, .json, .parquet or .csv")
    elif path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        rows = _read_saved(path, split)
    else:  # a `datasets` hub name, or a local directory of data files that `load_dataset` understands
        rows = _read_hub(spec, split, config)
    if not rows:
        raise UsageError(f"dataset {spec} has no rows")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not part of the data
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be "
                                 "one JSON object") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # column layout
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{path}: expected a list of JSON objects (or use .jsonl, one object a line)")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return [dict(row) for row in csv.DictReader(fh)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_hub(name: str, split: str, config: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as exc:  # offline, missing, or a bad split: all end the same way for the user
        raise UsageError(f"dataset {name!r} is neither a local .jsonl/.json/.parquet/.csv file nor a loadable "
                         f"`datasets` name ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _read_saved(path: Path, split: str) -> list[dict[str, Any]]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UsageError(f"dataset {path} has no split {split!r}; splits: {', '.join(data)} (--dataset_split)")
        data = data[split]
    return list(data)


def require_columns(rows: list[dict[str, Any]], columns: list[str], spec: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UsageError(f"dataset {spec} has no column {missing[0]!r}; columns found: {', '.join(rows[0])}")
