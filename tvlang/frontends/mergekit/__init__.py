"""mergekit configs as tvlang recipes (``tvlang import config.yml``).

``to_recipe(config)`` reads a mergekit YAML config (the file ``mergekit-yaml`` takes; read
with PyYAML's ``safe_load``) and writes an equivalent ``.tv`` recipe. Its comments keep
the config's intent: the merge method, and where each value came from (a model's
``parameters``, the global ``parameters``, or mergekit's default). ``translate(config)``
gives the recipe with the run options the config implies (``dtype``/``out_dtype``).
The semantics followed are mergekit 0.1.5's; what is covered, what is refused, and where
the two differ by design is in docs/mergekit.md.

The package, by responsibility: ``source`` reads the config text and places errors at its
lines; ``config`` resolves the config as mergekit does (models, parameters and their
precedence, dtypes, tokenizer); ``spec`` holds the types a method is described with;
``methods`` is the table of mergekit's methods, whose translations are in ``linear``,
``geometric`` and ``gta``; ``expressions`` builds recipe expressions; ``writer`` lays out
the recipe. Names with a leading underscore are private to the package.

>>> import os, tempfile
>>> root = tempfile.mkdtemp()
>>> for name in ("base", "math", "code"):
...     os.mkdir(os.path.join(root, name))
>>> path = os.path.join(root, "merge.yml")
>>> with open(path, "w") as f:
...     _ = f.write('''
... models:
...   - model: math
...     parameters: {weight: 0.6}
...   - model: code
...     parameters: {weight: 0.4}
... base_model: base
... merge_method: task_arithmetic
... ''')
>>> print(to_recipe(path), end="")
# merge.yml as a tvlang recipe (tvlang import, mergekit 0.1.5 semantics).
# merge_method: task_arithmetic -- Task Arithmetic (Ilharco et al. 2023): the base plus the
#   weighted sum of the task vectors (model - base).
# load() paths are relative to this file, as mergekit's are to the directory it runs in: keep
#   the recipe next to merge.yml.
<BLANKLINE>
base = load("base")  # base_model
math = load("math")  # models[0]: weight 0.6 (models[0].parameters)
code = load("code")  # models[1]: weight 0.4 (models[1].parameters)
<BLANKLINE>
# normalize false (mergekit's default), lambda 1 (mergekit's default)
out = base + 0.6*(math - base) + 0.4*(code - base)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tvlang.frontends.mergekit.config import _Merge
from tvlang.frontends.mergekit.source import _read, _Source
from tvlang.frontends.mergekit.spec import MERGEKIT_VERSION
from tvlang.frontends.mergekit.writer import _write

__all__ = ["MERGEKIT_VERSION", "Translation", "to_recipe", "translate"]


@dataclass(frozen=True)
class Translation:
    """A config as a recipe, with what running it needs besides the recipe.

    ``filename`` is the config's path (None for text): compile the recipe with it, so
    that its ``load()`` paths resolve against the config's directory. ``options`` are the
    run options the config implies (``out_dtype``, ``dtype``), as ``Plan.run`` takes them.
    """

    recipe: str
    filename: str | None
    options: dict[str, str]
    method: str


def to_recipe(config: str | os.PathLike) -> str:
    """The ``.tv`` recipe of a mergekit config: a path to a YAML file, or the YAML text."""
    return translate(config).recipe


def translate(config: str | os.PathLike) -> Translation:
    """Translate a mergekit config (a path to a YAML file, or the YAML text).

    Raises TvlangError, placed at the config's line, for what tvlang cannot express.
    """
    text, filename = _read(config)
    source = _Source(text, filename)
    merge = _Merge.from_config(source)
    return Translation(_write(merge), filename, merge.run_options(), merge.method.name)
