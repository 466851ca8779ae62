"""Read records from every format plugins accept, each tagged with where it came from.

Formats: ``.txt``, ``.jsonl`` (``.gz`` too), ``.json``, ``.parquet``, ``.csv``,
webdataset ``.tar`` shards, and Hugging Face ``datasets`` (``hf:<name>[:split]``
or a ``save_to_disk`` folder). Every record carries its file and line (or row,
or shard key) so a bad one is reported where the user can fix it.

Empty values / truncated media / duplicates / mixed types: the readers pass values on as
they are and leave the judging to the plugin, which knows the field (:func:`require_fields`,
:func:`require_text`, :func:`optional_text`). Blank lines of ``.jsonl`` and ``.txt`` (line mode)
are skipped; ``null`` stays ``None``; a CSV has no null, so an empty cell is ``""``. A cut file is
a ``DataError``: invalid JSON at its line, an unterminated CSV quote, a parquet file after the
rows it could read, a tar shard cut inside a member (or holding one member name twice).
Repeated records are all yielded (:mod:`~modalforge.data.duplicates` counts them); one file named
twice in a spec (``a.jsonl`` and ``*.jsonl``) is a ``DataError``. Types are JSON's and parquet's
own, per record (an ``int`` on one line and a ``str`` on the next stay so); CSV gives strings only.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

from modalforge.data.errors import DataError
from modalforge.data.paths import expand_paths, is_hf_dataset_dir

TEXT_EXTENSIONS = ("txt", "text", "caption", "transcript", "cls", "label", "json")


@dataclass
class Record:
    """One example and where it came from."""

    data: dict[str, Any]
    source: str
    location: str

    def where(self) -> str:
        return f"{self.source}, {self.location}"


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_txt(path: str, mode: str, text_field: str) -> Iterator[Record]:
    with _open_text(path) as handle:
        if mode == "file":
            yield Record({text_field: handle.read()}, path, "file")
            return
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield Record({text_field: line.rstrip("\n")}, path, f"line {number}")


def _read_jsonl(path: str) -> Iterator[Record]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON ({err.msg}: column {err.colno})", source=path,
                                location=f"line {number}") from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object per line, got {type(obj).__name__}", source=path,
                                location=f"line {number}")
            yield Record(obj, path, f"line {number}")


def _read_json(path: str) -> Iterator[Record]:
    try:
        with _open_text(path) as handle:
            obj = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg})", source=path, location=f"line {err.lineno}") from None
    if isinstance(obj, dict):
        for key in ("data", "train", "rows", "examples"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise DataError("expected a list of objects, or an object with a list under 'data'", source=path)
    if not isinstance(obj, list):
        raise DataError(f"expected a list of objects, got {type(obj).__name__}", source=path)
    for index, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"expected an object, got {type(item).__name__}", source=path, location=f"item {index}")
        yield Record(item, path, f"item {index}")


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for item in batch.to_pylist():
                yield Record(item, path, f"row {row}")
                row += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowIOError name no file
        raise DataError(f"unreadable parquet after {row} rows ({type(err).__name__}: {err})", source=path,
                        location=f"row {row}") from None


def _read_csv(path: str) -> Iterator[Record]:
    # strict: an unterminated quote is an error at the line it opened, not a silently merged rest of file
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, strict=True)
        start = 1
        try:
            for item in reader:
                location = f"line {start + 1}" if reader.line_num == start + 1 else f"lines {start + 1}-{reader.line_num}"
                if None in item:
                    raise DataError(f"{len(reader.fieldnames or []) + len(item[None])} fields where the header has "
                                    f"{len(reader.fieldnames or [])}", source=path, location=location)
                missing = [k for k, v in item.items() if v is None]
                if missing:
                    raise DataError(f"row has no value for column(s) {missing} (header: {reader.fieldnames})",
                                    source=path, location=location)
                yield Record(dict(item), path, location)
                start = reader.line_num
        except csv.Error as err:
            raise DataError(f"malformed CSV ({err}); a quote opened at or after line {start + 1} is never closed"
                            if "end of data" in str(err) else f"malformed CSV ({err})",
                            source=path, location=f"line {start + 1}") from None


def decode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a webdataset sample: text and json fields to ``str``/objects, binary fields kept as bytes."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if key.startswith("__"):
            out[key] = value
            continue
        ext = key.rsplit(".", 1)[-1].lower()
        if isinstance(value, bytes) and ext in TEXT_EXTENSIONS:
            text = value.decode("utf-8")
            out[key] = json.loads(text) if ext == "json" else text
        else:
            out[key] = value
    return out


def _read_tar(path: str) -> Iterator[Record]:
    import webdataset as wds

    try:
        for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
            key = sample.get("__key__", "?")
            try:
                yield Record(decode_sample(sample), path, f"key {key}")
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"cannot decode sample: {err}", source=path, location=f"key {key}") from None
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - tarfile / webdataset errors name no file
        raise DataError(f"unreadable webdataset shard: {type(err).__name__}: {err}", source=path) from None


def _read_hf(spec: str) -> Iterator[Record]:
    import datasets

    name, _, split = spec.removeprefix("hf:").partition(":")
    split = split or "train"
    if is_hf_dataset_dir(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"split '{split}' not in {sorted(loaded)}", source=name)
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(name, split=split)
        except Exception as err:  # noqa: BLE001 - connection and lookup errors alike
            raise DataError(
                f"cannot load Hugging Face dataset '{name}' (split '{split}'): {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}. Without access to the Hub, save it elsewhere with "
                "`datasets.load_dataset(...).save_to_disk('/data/x')` and use data.train=/data/x", source=spec) from None
    for index, item in enumerate(loaded):
        yield Record(dict(item), name, f"row {index}")


def read_records(spec: str | Sequence[str] | None, *, what: str = "data.train",
                 txt_mode: Literal["file", "line"] = "file", text_field: str = "text") -> Iterator[Record]:
    """Every record of every file named by ``spec``, in order."""
    if isinstance(spec, str) and spec.startswith("hf:"):
        yield from _read_hf(spec)
        return
    for path in expand_paths(spec, what=what):
        if is_hf_dataset_dir(path):
            yield from _read_hf(path)
        elif path.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(path)
        elif path.endswith(".json"):
            yield from _read_json(path)
        elif path.endswith((".txt", ".txt.gz")):
            yield from _read_txt(path, txt_mode, text_field)
        elif path.endswith(".parquet"):
            yield from _read_parquet(path)
        elif path.endswith(".csv"):
            yield from _read_csv(path)
        elif path.endswith(".tar"):
            yield from _read_tar(path)
        else:
            raise DataError(f"{what}: unsupported file type '{Path(path).suffix}' (use .txt, .jsonl, .json, "
                            ".parquet, .csv, .tar shards or a datasets folder)", source=path)


def _type_names(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {"str": "a string", "int": "an integer", "float": "a number", "list": "a list", "dict": "an object",
             "bytes": "binary data", "bool": "a boolean"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in types)


def require_fields(record: Record, fields: Mapping[str, type | tuple[type, ...]]) -> None:
    """Raise ``DataError`` naming the record's place if a field is missing or of the wrong type."""
    for name, expected in fields.items():
        if name not in record.data or record.data[name] is None:
            raise DataError(f"missing field '{name}' (expected {_type_names(expected)}); keys present: "
                            f"{sorted(k for k in record.data if not k.startswith('__'))}",
                            source=record.source, location=record.location)
        if not isinstance(record.data[name], expected):
            raise DataError(f"field '{name}' is {type(record.data[name]).__name__}, expected {_type_names(expected)}",
                            source=record.source, location=record.location)


def require_text(record: Record, name: str, what: str = "value") -> str:
    """The string field ``name``, stripped; missing, not a string, or empty / whitespace-only is a ``DataError``.

    For fields whose emptiness is always a mistake (a caption, a label, a file path): CSV has no
    null, so an empty cell arrives as ``""`` and would otherwise be trained, or resolve to a folder."""
    require_fields(record, {name: str})
    text = record.data[name].strip()
    if not text:
        raise DataError(f"field '{name}' is empty (expected {what})", source=record.source, location=record.location)
    return text


def optional_text(record: Record, name: str) -> str | None:
    """The string field ``name``, stripped, or ``None`` when absent, null or empty (a CSV's empty cell).

    Any other type is a ``DataError``: a number where text belongs is a column mix-up, not a caption."""
    value = record.data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"field '{name}' is {type(value).__name__} {value!r}, expected a string", source=record.source,
                        location=record.location)
    return value.strip() or None


def label_text(record: Record, name: str, *, required: bool) -> str | None:
    """A class label as text: a string (stripped) or an integer (``1`` and ``"1"`` are one class).

    ``None``, or blank (a CSV's empty cell), is "no label": an error when ``required``. A boolean or
    a float is an error: ``True`` would become a class named "True", ``1.0`` another than ``1``."""
    value = record.data.get(name)
    if value is None and required:
        require_fields(record, {name: (str, int)})  # its "missing field" message, keys present listed
    if isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
        raise DataError(f"field '{name}' is {type(value).__name__} {value!r}, expected a string or an integer",
                        source=record.source, location=record.location)
    text = None if value is None else str(value).strip() or None
    if text is None and required:
        raise DataError(f"field '{name}' is empty (expected a class label)", source=record.source,
                        location=record.location)
    return text


def count_or_fail(records: list[Record], spec: Any, what: str = "data.train") -> list[Record]:
    """``records`` unchanged, or an error if there are none."""
    if not records:
        raise DataError(f"{what}: no records in '{spec}'")
    return records
