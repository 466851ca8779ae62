"""OpenAssistant (OASST1/2) message trees flattened to conversations.

A tree is a prompter message whose replies are ranked assistant messages, whose replies
are prompter messages, and so on. ``best`` follows the best-ranked reply at each turn
(``rank`` 0 is best; an unranked reply comes after the ranked ones), one conversation per
tree; ``all`` gives one conversation per leaf. A conversation ends on an assistant
message (a trailing prompter message has no answer to learn). Deleted messages, and
those that failed review, are left out with their replies. Rows of the Hub layout
(one message per row, ``parent_id`` pointing up) are first joined into trees.

Empty values / truncated media / duplicates / mixed types: a message without text (``null``, or
a number) is an error; a blank assistant message is one too, once the path is checked
(:func:`~modalforge.text.formats.check_messages`). A message id that appears twice, in rows or
inside one tree, is an error naming it (a join by id would keep one of the two silently). Ids
are compared as they are: ``1`` and ``"1"`` differ, and a reply whose parent exists only under
the other type is an error saying so. Rows that never reach a root (a ``parent_id`` cycle) are an
error, not dropped. No media here.
"""

from __future__ import annotations

from typing import Any, Literal

from modalforge.data.errors import DataError
from modalforge.data.readers import Record
from modalforge.text.formats import Message

Paths = Literal["best", "all"]
ROLES = {"prompter": "user", "user": "user", "assistant": "assistant", "system": "system"}


def _order(node: dict[str, Any]) -> tuple[int, float]:
    rank = node.get("rank")
    return (0, float(rank)) if isinstance(rank, (int, float)) and not isinstance(rank, bool) else (1, 0.0)


def _kept(node: dict[str, Any]) -> bool:
    return not node.get("deleted") and node.get("review_result") is not False


def _message(node: dict[str, Any], record: Record) -> Message:
    role = ROLES.get(str(node.get("role")))
    if role is None:
        raise DataError(f"OASST message {node.get('message_id')!r} has role {node.get('role')!r}, expected "
                        "prompter or assistant (data.roles= maps others)", source=record.source,
                        location=record.location)
    text = node.get("text", node.get("content"))
    if not isinstance(text, str):
        raise DataError(f"OASST message {node.get('message_id')!r} has no text", source=record.source,
                        location=record.location)
    return {"role": role, "content": text}


def tree_paths(root: dict[str, Any], record: Record, paths: Paths = "best") -> list[list[Message]]:
    """The conversations of one tree (nested ``replies``), each ending on an assistant message."""
    if paths not in ("best", "all"):
        raise DataError(f"data.oasst_paths={paths!r} is not one of: best, all")
    out: list[list[Message]] = []

    def walk(node: dict[str, Any], prefix: list[Message]) -> None:
        here = prefix + [_message(node, record)]
        replies = sorted((r for r in node.get("replies") or [] if isinstance(r, dict) and _kept(r)), key=_order)
        if paths == "best":
            replies = replies[:1]
        if not replies:
            while here and here[-1]["role"] != "assistant":
                here = here[:-1]
            if any(m["role"] == "assistant" for m in here):
                out.append(here)
            return
        for reply in replies:
            walk(reply, here)

    _refuse_repeated_ids(root, record)
    if _kept(root):
        walk(root, [])
    return out


def _refuse_repeated_ids(root: dict[str, Any], record: Record) -> None:
    """Two messages of one tree with one id: the export is corrupt (or a reply was pasted twice)."""
    seen: set[Any] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        key = node.get("message_id")
        if key is not None and key in seen:
            raise DataError(f"OASST message id {key!r} appears twice in this tree", source=record.source,
                            location=record.location)
        seen.add(key)
        stack += [r for r in node.get("replies") or [] if isinstance(r, dict)]


def join_rows(rows: list[Record]) -> list[tuple[dict[str, Any], Record]]:
    """Rows (one message each) as nested trees, each with the record of its root (for errors and ``where``)."""
    by_id: dict[Any, dict[str, Any]] = {}
    for row in rows:
        node = {**row.data, "replies": []}
        if node["message_id"] in by_id:
            raise DataError(f"OASST message id {node['message_id']!r} appears twice", source=row.source,
                            location=row.location)
        by_id[node["message_id"]] = node
    roots = []
    for row in rows:
        node = by_id[row.data["message_id"]]
        parent = row.data.get("parent_id")
        if parent is None:
            roots.append((node, row))
        elif parent in by_id:
            by_id[parent]["replies"].append(node)
        else:
            other = next((k for k in by_id if str(k) == str(parent)), None)
            raise DataError(f"OASST message {row.data['message_id']!r} replies to {parent!r}, which is not in this "
                            "source (a tree split across files?)", source=row.source, location=row.location,
                            hint=None if other is None else f"there is a message {other!r}: ids of one type "
                                                            "({type(other).__name__}) throughout, please")
    _refuse_unrooted(rows, roots)
    return roots


def _refuse_unrooted(rows: list[Record], roots: list[tuple[dict[str, Any], Record]]) -> None:
    """Rows never reached from a root (``parent_id`` cycles) would be dropped without a word."""
    reached: set[Any] = set()
    stack = [node for node, _ in roots]
    while stack:
        node = stack.pop()
        reached.add(node["message_id"])
        stack += node["replies"]
    lost = next((row for row in rows if row.data["message_id"] not in reached), None)
    if lost is not None:
        raise DataError(f"OASST message {lost.data['message_id']!r} never reaches a message whose parent_id is "
                        "null (a parent_id cycle)", source=lost.source, location=lost.location)
