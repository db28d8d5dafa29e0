"""Reading a mergekit config: its text, its YAML data, and where each key and value sits.

Errors are placed at the config's line: ``_Source.error(message, at)`` points at the value
(or key) at a path such as ``("models", 1, "parameters", "weight")``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from tvlang.errors import Span, TvlangError

_NOT_YET = "not supported by tvlang import yet"


def _read(config: str | os.PathLike) -> tuple[str, str | None]:
    """(text, path) of a config given as a path, or (text, None) for YAML text."""
    is_path = isinstance(config, os.PathLike) or (
        isinstance(config, str) and "\n" not in config
        and (config.endswith((".yml", ".yaml")) or os.path.isfile(config))
    )
    if not is_path:
        return str(config), None
    path = os.fspath(config)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except OSError as exc:
        raise TvlangError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TvlangError(f"{path}: not a text file (a mergekit config is YAML)") from None


_Path = tuple  # a place in the config: ("models", 1, "parameters", "weight")


class _Source:
    """The config's text and data, and where each key and value sits in the text."""

    def __init__(self, text: str, filename: str | None) -> None:
        self.text = text
        self.filename = filename
        self.shown = filename if filename is not None else "<config>"
        self.directory = os.path.dirname(os.path.abspath(filename)) if filename else os.getcwd()
        self.values: dict[_Path, tuple[int, int]] = {}
        self.keys: dict[_Path, tuple[int, int]] = {}
        self.aliases: dict[_Path, _Path] = {}  # a path the translation uses -> where it is written
        self.data = self._load()

    def _load(self) -> Any:
        try:
            import yaml  # an optional dependency: the mergekit extra
        except ImportError:
            raise TvlangError("reading a mergekit config needs PyYAML",
                              notes=("install it: pip install 'tvlang[mergekit]'",)) from None
        try:
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(self.text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            span = Span.of(self.text, mark.index, min(len(self.text), mark.index + 1)) if mark else None
            raise TvlangError(f"not valid YAML: {exc.problem or exc.context}", span, source=self.text,
                              filename=self.shown) from None
        except yaml.YAMLError as exc:
            raise TvlangError(f"not valid YAML: {exc}", filename=self.shown) from None
        if root is not None:
            self._mark(root, (), yaml)
        return data

    def _mark(self, node: Any, path: _Path, yaml: Any) -> None:
        self.values[path] = (node.start_mark.index, node.end_mark.index)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                self.keys[path + (name,)] = (key.start_mark.index, key.end_mark.index)
                self._mark(value, path + (name,), yaml)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._mark(item, path + (index,), yaml)

    def error(self, message: str, at: _Path = (), *, key: bool = False, notes: tuple[str, ...] = ()) -> TvlangError:
        """An error placed at the value (or, with ``key``, the key) at ``at`` in the config."""
        at = tuple(at)
        for alias, real in self.aliases.items():  # ("models", ...) of a config written with slices
            if at[:len(alias)] == alias:
                at = real + at[len(alias):]
        where = (self.keys if key else self.values).get(at)
        if where is None and key:
            where = self.values.get(at)
        span = None
        if where is not None:
            start, end = where
            line_end = self.text.find("\n", start)
            # A block value runs to the next key; underline its first line only.
            end = min(end, line_end) if line_end >= 0 else end
            span = Span.of(self.text, start, max(end, start + 1) if start < len(self.text) else start)
        return TvlangError(message, span, source=self.text, filename=self.shown, notes=notes)


def _where(path: _Path) -> str:
    """``("models", 1, "parameters")`` -> ``models[1].parameters``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _suggest(word: str, choices) -> tuple[str, ...]:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return (f"did you mean '{close[0]}'?",) if close else ()
