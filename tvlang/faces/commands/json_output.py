"""``--json``: one JSON object on stdout, for success and for errors alike (docs/cli-json.md).

Every command with ``--json`` prints one object, indented by 2, keys in the documented
order. An error is ``{"ok": false, "exit": 1 or 2, "errors": [...]}`` on stdout, with
the usual rendered message on stderr and the usual exit status (1 for a recipe or
data error, 2 for a usage error).

>>> from tvlang.errors import Span, TvlangError
>>> source = "out = pre + ftt\\n"
>>> err = TvlangError("unknown name 'ftt'", Span.of(source, 12, 15), source=source, filename="r.tv")
>>> entry = error_object(err)["errors"][0]
>>> entry["message"], entry["file"], entry["line"], entry["column"]
("unknown name 'ftt'", 'r.tv', 1, 13)
"""

from __future__ import annotations

import json
from typing import Any

from tvlang.errors import TvlangError

__all__ = ["emit", "error_entry", "error_object", "usage_error_object"]


def emit(data: Any) -> None:
    """Print ``data`` as the command's one JSON object."""
    print(json.dumps(data, indent=2, ensure_ascii=False))


def error_entry(err: TvlangError) -> dict[str, Any]:
    """One error: its message, where it is (file, 1-based line and column, null when not in a recipe),
    the tensor it is about, and its notes."""
    span = err.span
    filename = err.filename if err.filename and not err.filename.startswith("<") else None
    return {"message": err.message, "file": filename,
            "line": span.line if span else None, "column": span.column if span else None,
            "end_line": span.end_line if span else None, "end_column": span.end_column if span else None,
            "tensor": err.tensor, "notes": list(err.notes)}


def error_object(err: TvlangError, **extra: Any) -> dict[str, Any]:
    """The object a recipe or data error prints (exit 1); ``extra`` keys follow ``errors``."""
    return {"ok": False, "exit": 1, "errors": [error_entry(e) for e in err.errors], **extra}


def usage_error_object(message: str) -> dict[str, Any]:
    """The object a command-line mistake prints (exit 2)."""
    entry = {"message": message, "file": None, "line": None, "column": None, "end_line": None, "end_column": None,
             "tensor": None, "notes": []}
    return {"ok": False, "exit": 2, "errors": [entry]}
