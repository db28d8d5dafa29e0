"""A config source for an in-memory base, so that ``from_pretrained`` loads the output directory.

A base read from a model directory brings its ``config.json`` and tokenizer files,
which a Model output directory copies. A base bound in memory (a state dict, an
``nn.Module``) has none; ``run(..., config=...)`` gives them:

- a directory: its config and tokenizer files are copied, as a base directory's are;
- a ``transformers`` ``PretrainedConfig``: written as ``config.json`` (``to_json_string``,
  what ``save_pretrained`` writes);
- a model with ``.config`` (a ``PreTrainedModel``): its config, and its
  ``generation_config.json`` when it generates.

A base bound as a module that carries such a ``.config`` uses it without being asked.
The files are written to a temporary folder that lives as long as the run, and that
folder stands for the base's own (``TensorReader.root``): the output copies it, and a
tied output head is recognised from it (tvlang.run.layout).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

from tvlang.errors import TvlangError
from tvlang.plan.records import DeltaBinding
from tvlang.run.bindings import Bound

__all__ = ["ConfigFolder", "attach_config"]


class ConfigFolder:
    """The folder a config source stands for; ``close()`` removes it when tvlang wrote it."""

    def __init__(self, path: str, temporary: tempfile.TemporaryDirectory | None = None) -> None:
        self.path = path
        self._temporary = temporary

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


def attach_config(bound: Bound, bindings: Mapping[str, Any], config: Any = None) -> ConfigFolder | None:
    """Make ``config`` (or the base module's own ``.config``) the base's folder of model files.

    Returns the folder (to close after the run), or None when there is nothing to attach:
    no ``config`` given and the base is not a module with a config.
    """
    base = bound.readers[bound.base]
    if config is None:
        value = bindings.get(bound.base)
        if isinstance(value, DeltaBinding) or base.root or not _is_config(getattr(value, "config", None)):
            return None
        config = value
    folder = _folder(config)
    base.root = folder.path
    return folder


def _is_config(value: Any) -> bool:
    """A transformers ``PretrainedConfig``, by its duck type (transformers stays an optional extra)."""
    return callable(getattr(value, "to_json_string", None)) and callable(getattr(value, "to_dict", None))


def _folder(config: Any) -> ConfigFolder:
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isdir(path):
            raise TvlangError(f"config={path!r} is not a directory: give the folder that holds config.json")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TvlangError(f"config={path!r} holds no config.json", notes=(f"it holds: {_listing(path)}",))
        return ConfigFolder(os.path.realpath(path))
    files: dict[str, str] = {}
    if _is_config(config):
        files["config.json"] = config.to_json_string()
    elif _is_config(getattr(config, "config", None)):
        files["config.json"] = config.config.to_json_string()
        generation = getattr(config, "generation_config", None)
        can_generate = getattr(config, "can_generate", None)
        if _is_config(generation) and callable(can_generate) and can_generate():
            files["generation_config.json"] = generation.to_json_string()
    else:
        raise TvlangError(f"config= expects a directory, a transformers config or a model with .config;"
                          f" got {type(config).__name__}")
    temporary = tempfile.TemporaryDirectory(prefix="tvlang-config-")
    for name, text in files.items():
        with open(os.path.join(temporary.name, name), "w", encoding="utf-8") as f:
            f.write(text)
    return ConfigFolder(temporary.name, temporary)


def _listing(path: str) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "(nothing)"
