"""Column and role mapping, applied to a record before its format is detected.

``data.columns={prompt: question, completion: answer}`` reads the field a format calls
``prompt`` from the dataset's ``question`` column (LLaMA-Factory's ``dataset_info.json``
columns, axolotl's field mappings); ``role`` and ``content`` map the keys inside
messages (``{role: speaker, content: text}``). ``data.roles={human: user, gpt: assistant}``
renames role values, in messages, in ShareGPT's ``from`` and in a record's own ``role``
(OASST rows). A mapped column a record lacks is an error naming the record: a mapping
that silently does nothing would train on the wrong field, or on nothing. A mixture
source's own ``columns`` / ``roles`` replace the global ones for that source.
"""

from __future__ import annotations

from typing import Any, Mapping

from modalforge.data.errors import DataError
from modalforge.data.readers import Record

#: Keys of a message, not of a record: ``columns`` entries for them apply inside message lists.
MESSAGE_KEYS = ("role", "content")


def check_mapping(columns: Mapping[str, str] | None, roles: Mapping[str, str] | None,
                  key: str = "data") -> tuple[dict[str, str], dict[str, str]]:
    """The two mappings as plain ``{str: str}`` dicts; anything else is an error naming the option."""
    out = []
    for name, value in (("columns", columns), ("roles", roles)):
        value = value or {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):
            raise DataError(f"{key}.{name} must map names to names, e.g. "
                            + ("{prompt: question, completion: answer}" if name == "columns"
                               else "{human: user, gpt: assistant}") + f"; got {value!r}")
        out.append(dict(value))
    return out[0], out[1]


def _map_message(message: Any, keys: dict[str, str], roles: dict[str, str]) -> Any:
    if not isinstance(message, dict):
        return message
    out = dict(message)
    for canonical, column in keys.items():
        if column in out:
            out[canonical] = out.pop(column)
    for key in ("role", "from"):
        if isinstance(out.get(key), str) and out[key] in roles:
            out[key] = roles[out[key]]
    return out


def _map_value(value: Any, keys: dict[str, str], roles: dict[str, str]) -> Any:
    if isinstance(value, list) and any(isinstance(m, dict) for m in value):
        return [_map_message(m, keys, roles) for m in value]
    if isinstance(value, dict) and "replies" in value:  # an OASST tree: mapped all the way down
        node = _map_message(value, keys, roles)
        node["replies"] = [_map_value(r, keys, roles) for r in value.get("replies") or []]
        return node
    return value


def map_record(record: Record, columns: Mapping[str, str] | None = None,
               roles: Mapping[str, str] | None = None) -> Record:
    """``record`` with ``columns`` renamed to the names the formats use and role values renamed by ``roles``."""
    if not columns and not roles:
        return record
    columns, roles = dict(columns or {}), dict(roles or {})
    keys = {k: v for k, v in columns.items() if k in MESSAGE_KEYS}
    data, renamed = dict(record.data), {}
    for canonical, column in columns.items():
        if canonical in MESSAGE_KEYS and column not in data:
            continue
        if column not in data:
            present = sorted(k for k in data if not k.startswith("__"))
            raise DataError(f"data.columns maps {canonical!r} to column {column!r}, which this record lacks; "
                            f"keys present: {present}", source=record.source, location=record.location)
        renamed[canonical] = data[column]
    for column in columns.values():  # all at once: {prompt: completion, completion: prompt} swaps
        data.pop(column, None)
    data.update(renamed)
    data = {k: _map_value(v, keys, roles) for k, v in data.items()}
    if isinstance(data.get("role"), str) and data["role"] in roles:
        data["role"] = roles[data["role"]]
    return Record(data, record.source, record.location)


def mapping_for(datamodule: Any, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """The (columns, roles) of the source ``read`` is called for: its own where it has them, else the
    DataModule's ``data.columns`` / ``data.roles`` (validation sets take the global ones)."""
    source = datamodule.source_for(what)
    options = source.options if source is not None else {}
    if not options:
        return datamodule.columns, datamodule.roles
    return check_mapping(options.get("columns", datamodule.columns), options.get("roles", datamodule.roles),
                         key=source.what)
