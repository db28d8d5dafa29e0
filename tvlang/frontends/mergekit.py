"""mergekit configs as tvlang recipes (``tvlang import config.yml``).

``to_recipe(config)`` reads a mergekit YAML config (the file ``mergekit-yaml`` takes; read
with PyYAML's ``safe_load``) and writes an equivalent ``.tv`` recipe. Its comments keep
the config's intent: the merge method, and where each value came from (a model's
``parameters``, the global ``parameters``, or mergekit's default). ``translate(config)``
gives the recipe with the run options the config implies (``dtype``/``out_dtype``).
The semantics followed are mergekit 0.1.5's; what is covered, what is refused, and where
the two differ by design is in docs/mergekit.md.

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

import difflib
import os
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

from tvlang.errors import Span, TvlangError
from tvlang.language import ast
from tvlang.language.builtins import BUILTINS
from tvlang.language.printer import to_text
from tvlang.language.syntax import RESERVED

__all__ = ["MERGEKIT_VERSION", "Translation", "to_recipe", "translate"]

MERGEKIT_VERSION = "0.1.5"  # the release whose semantics the translation follows

_WIDTH = 96  # recipe lines longer than this are broken at a call's arguments
_NOT_YET = "not supported by tvlang import yet"


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


# -- reading the config ----------------------------------------------------------------------

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
        where = (self.keys if key else self.values).get(tuple(at))
        if where is None and key:
            where = self.values.get(tuple(at))
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


# -- mergekit's methods and parameters -------------------------------------------------------

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class _Param:
    """A parameter of a mergekit method, as mergekit 0.1.5 declares it."""

    name: str
    kind: str  # "number" or "bool"
    scope: str  # "shared" (global parameters only), "input" (every input), "non_base" (all but the base)
    default: Any = REQUIRED


@dataclass(frozen=True)
class _Method:
    """A mergekit merge method: its parameters, its input rules and its translation."""

    name: str
    title: str  # what it computes, for the recipe's header
    params: tuple[_Param, ...]
    translate: Callable[["_Merge"], "_Out"]
    base: str = "ignored"  # "required", "optional", or "ignored" (the base is one more input)
    min_inputs: int = 1
    max_inputs: int | None = None
    # Generalized task arithmetic: elect signs, how task vectors are pruned, defaults.
    consensus: bool = False
    sparsify: str | None = None  # None, "magnitude", "random", "outliers", "della"

    def param(self, name: str) -> _Param | None:
        return next((p for p in self.params if p.name == name), None)


def _gta_params(sparsify: str | None, normalize: bool, rescale: bool) -> tuple[_Param, ...]:
    params = [
        _Param("int8_mask", "bool", "shared", False),
        _Param("normalize", "bool", "shared", normalize),
        _Param("rescale", "bool", "shared", rescale),
        _Param("lambda", "number", "shared", 1.0),
        _Param("weight", "number", "non_base"),
    ]
    if sparsify is not None:  # mergekit takes a density for task_arithmetic too, and ignores it
        params.append(_Param("density", "number", "non_base", 1.0))
    if sparsify == "outliers":
        params.append(_Param("gamma", "number", "non_base", 0.01))
    if sparsify == "della":
        params.append(_Param("epsilon", "number", "non_base", 0.15))
    return tuple(params)


# Every parameter name of a mergekit 0.1.5 method: one that the chosen method does not take
# has no effect (mergekit ignores it; the recipe says so), any other name is an error.
_KNOWN_PARAMS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
    "filter_wise", "nuslerp_row_wise", "nuslerp_flatten", "scale", "normalize_weights", "eps",
    "max_iter", "tol", "select_topk", "r", "alpha",
})

# mergekit methods with no tvlang operator yet (docs/mergekit.md, "Not supported yet").
_NO_OPERATOR = ("multislerp", "karcher", "nearswap", "arcee_fusion", "sce", "ram", "ramplus_tl")


# -- the resolved config -----------------------------------------------------------------------

@dataclass
class _Input:
    """One model that a merge reads, with its resolved per-model parameters."""

    name: str  # its name in the recipe
    path: str  # as written in the config
    at: _Path  # where the path is written in the config
    index: int | None  # position in models, None for a base_model that models does not list
    is_base: bool
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"models[{self.index}]" if self.index is not None else "base_model"


@dataclass
class _Out:
    """A method's translation: the output expression, lines to put before it, notes."""

    expr: ast.Expr
    notes: list[str] = field(default_factory=list)  # comment paragraphs above ``out``
    extra: list[tuple[str, ast.Expr, str]] = field(default_factory=list)  # (name, value, comment) assignments


_ORIGIN_DEFAULT = "mergekit's default"
_ORIGIN_GLOBAL = "parameters"


class _Merge:
    """A config resolved as mergekit resolves it, for the parts tvlang can express."""

    def __init__(self, source: _Source, method: _Method) -> None:
        self.source = source
        self.method = method
        self.inputs: list[_Input] = []
        self.base: _Input | None = None
        self.shared: dict[str, Any] = {}
        self.shared_origins: dict[str, str] = {}
        self.header: list[str] = []  # notes for the recipe's header
        self.dtype: str | None = None
        self.out_dtype: str | None = None

    @property
    def non_base(self) -> list[_Input]:
        return [i for i in self.inputs if not i.is_base]

    # -- from the config -------------------------------------------------------------------

    @classmethod
    def from_config(cls, source: _Source) -> "_Merge":
        data = source.data
        if not isinstance(data, dict):
            raise source.error("a mergekit config is a mapping (merge_method: ..., models: ...)")
        for key in data:
            _check_top_key(source, key)
        if "merge_method" not in data:
            raise source.error("the config has no merge_method", notes=("add one, e.g. merge_method: linear",))
        if "models" not in data:
            raise source.error("the config has no models", notes=("list the models to merge under models:",))
        name = data["merge_method"]
        method = _METHODS.get(name) if isinstance(name, str) else None
        if method is None:
            if name in _NO_OPERATOR:
                raise source.error(f"merge_method '{name}' has no tvlang operator yet", ("merge_method",),
                                   notes=(f"{_NOT_YET}: see docs/mergekit.md",))
            raise source.error(f"unknown merge_method '{name}'", ("merge_method",),
                               notes=_suggest(name, [*_METHODS, *_NO_OPERATOR]))
        merge = cls(source, method)
        merge._models(data)
        merge._parameters(data)
        merge._check_counts()
        merge._dtypes(data)
        merge._tokenizer(data)
        return merge

    def _models(self, data: dict) -> None:
        source = self.source
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise source.error("models must be a list of '- model: PATH' entries", ("models",))
        base_path = data.get("base_model")
        if base_path is not None:
            base_path = _local_path(source, base_path, ("base_model",))
        names = _Names()
        seen: dict[str, int] = {}
        for index, entry in enumerate(models):
            at = ("models", index)
            if isinstance(entry, str):
                raise source.error("a models entry is a mapping: '- model: PATH'", at,
                                   notes=(f"write '- model: {entry}'",))
            if not isinstance(entry, dict) or "model" not in entry:
                raise source.error("a models entry needs 'model: PATH'", at)
            for key in entry:
                if key not in ("model", "parameters"):
                    raise source.error(f"unknown key '{key}' in models[{index}]", at + (key,), key=True,
                                       notes=_suggest(key, ("model", "parameters")))
            path = _local_path(source, entry["model"], at + ("model",))
            if path in seen:
                raise source.error(f"'{path}' is merged twice (models[{seen[path]}] and models[{index}])",
                                   at + ("model",), notes=("mergekit refuses duplicate inputs too",))
            seen[path] = index
            is_base = path == base_path
            self.inputs.append(_Input("base" if is_base else names.new(path), path, at + ("model",), index, is_base))
        if base_path is not None:
            self.base = next((i for i in self.inputs if i.is_base), None)
            if self.base is None:
                # mergekit adds a base_model that models does not list as one more input.
                self.base = _Input("base", base_path, ("base_model",), None, True)
                self.inputs.append(self.base)
        if self.method.base == "ignored":
            for item in self.inputs:
                item.is_base = False  # merged like any other input; base_model only orders the output

    def _parameters(self, data: dict) -> None:
        source = self.source
        method = self.method
        global_params = _settings(source, data.get("parameters"), ("parameters",))
        per_model = {}
        for item in self.inputs:
            if item.index is not None:
                entry = data["models"][item.index]
                per_model[item.index] = _settings(source, entry.get("parameters"), ("models", item.index, "parameters"))
        for settings, at in [(global_params, ("parameters",))] + [
            (s, ("models", i, "parameters")) for i, s in per_model.items()
        ]:
            for name in settings:
                if name not in _KNOWN_PARAMS:
                    raise source.error(f"unknown parameter '{name}' in {_where(at)}", at + (name,), key=True,
                                       notes=_suggest(name, sorted(_KNOWN_PARAMS)))
                param = method.param(name)
                if param is None:
                    self.header.append(f"{_where(at + (name,))}: '{name}' has no effect on {method.name}; "
                                       "mergekit ignores it, and so does this recipe.")
                elif param.scope == "shared" and at != ("parameters",):
                    self.header.append(f"{_where(at + (name,))}: mergekit reads '{name}' from the global "
                                       "parameters only and ignores it here, and so does this recipe.")
                elif param.scope == "non_base" and self.base is not None and at[1:2] == (self.base.index,):
                    self.header.append(f"{_where(at + (name,))}: {method.name} takes no '{name}' for the "
                                       "base_model; mergekit ignores it, and so does this recipe.")
        for param in method.params:
            if param.scope == "shared":
                value, origin = self._resolve(param, [(global_params, ("parameters",))], None)
                self.shared[param.name], self.shared_origins[param.name] = value, origin
                continue
            for item in self.inputs:
                if param.scope == "non_base" and item.is_base:
                    continue
                scopes = []
                if item.index is not None:
                    scopes.append((per_model[item.index], ("models", item.index, "parameters")))
                scopes.append((global_params, ("parameters",)))
                value, origin = self._resolve(param, scopes, item)
                item.values[param.name], item.origins[param.name] = value, origin

    def _resolve(self, param: _Param, scopes: list, item: _Input | None) -> tuple[Any, str]:
        """mergekit's precedence: the model's own parameters, then the global ones, then the default."""
        for settings, at in scopes:
            if param.name in settings:
                return _value(self.source, param, settings[param.name], at + (param.name,)), _where(at)
        if param.default is REQUIRED:
            who = f" for {item.label} ({item.path})" if item is not None else ""
            where = item.at if item is not None else ("merge_method",)
            raise self.source.error(
                f"{self.method.name} needs parameter '{param.name}'{who}", where,
                notes=("give it under that model's parameters, or for every model under the global parameters",)
                if item is not None else (f"give it under the global parameters: {param.name}: ...",))
        return param.default, _ORIGIN_DEFAULT

    def _check_counts(self) -> None:
        method, source = self.method, self.source
        if method.base == "required" and self.base is None:
            raise source.error(f"{method.name} needs a base_model", ("merge_method",))
        count = len(self.inputs)
        if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
            if method.min_inputs == method.max_inputs:
                wanted = f"exactly {method.min_inputs}"
            elif method.max_inputs is None:
                wanted = f"at least {method.min_inputs}"
            else:
                wanted = f"at most {method.max_inputs}"
            counted = " (base_model counts as one)" if self.base is not None else ""
            raise source.error(f"{method.name} merges {wanted} models{counted}; this config gives {count}",
                               ("models",))
        if method.name == "nuslerp" and len(self.non_base) != 2:
            raise source.error(f"nuslerp merges exactly 2 models besides the base; this config gives "
                               f"{len(self.non_base)}", ("models",))

    def _dtypes(self, data: dict) -> None:
        for key in ("dtype", "out_dtype"):
            value = data.get(key)
            if value is None:
                continue
            name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
            if name not in ("float32", "float16", "bfloat16", "float64"):
                raise self.source.error(f"{key} must be float32, float16, bfloat16 or float64, got {value!r}",
                                        (key,))
            setattr(self, key, name)
        written = (f"the output is written in {self.out_dtype or self.dtype}: run this recipe with --out-dtype "
                   f"{self.out_dtype or self.dtype} (a recipe does not carry run options)")
        if self.dtype == "float64":
            compute = "mergekit merges in float64: run this recipe with --dtype float64"
        elif self.dtype == "float32":
            compute = "tvlang computes in float32 (its default), as mergekit does here"
        elif self.dtype:
            compute = (f"mergekit converts the inputs to {self.dtype} and merges in it; tvlang computes in float32 "
                       f"(--dtype) and rounds once, so results can differ by a few {self.dtype} steps")
        if self.dtype:
            self.header.append(f"dtype: {self.dtype} -> {compute}" + ("." if self.out_dtype else f"; {written}."))
        if self.out_dtype:
            self.header.append(f"out_dtype: {self.out_dtype} -> {written}.")
        if self.shared.get("int8_mask"):
            self.header.append("int8_mask: true only makes mergekit's sign masks smaller in memory; "
                               "it does not change the result.")

    def _tokenizer(self, data: dict) -> None:
        source = self.source
        chosen, at = data.get("tokenizer_source"), ("tokenizer_source",)
        block = data.get("tokenizer")
        if block is not None and chosen is not None:
            raise source.error("give tokenizer_source or tokenizer, not both", ("tokenizer",), key=True)
        if block is not None:
            if not isinstance(block, dict):
                raise source.error("tokenizer must be a mapping (source: base)", ("tokenizer",))
            for key in block:
                if key != "source":
                    raise source.error(f"tokenizer.{key} is {_NOT_YET}", ("tokenizer", key), key=True,
                                       notes=("tvlang copies a tokenizer's files; it does not edit vocabularies",))
            chosen, at = block.get("source", "union"), ("tokenizer", "source")
        if chosen is None:
            return
        if chosen == "union":
            raise source.error("a union of the models' vocabularies is " + _NOT_YET, at,
                               notes=("tokenizer_source: base keeps the base's vocabulary and tokenizer",))
        first = self.base if self.base is not None else self.inputs[0]
        if chosen == "base":
            if self.base is None:
                raise source.error("tokenizer_source: base needs a base_model", at)
        elif not (isinstance(chosen, str) and chosen == first.path):
            raise source.error(f"copying the tokenizer of '{chosen}' is {_NOT_YET}", at,
                               notes=(f"the output takes the config and tokenizer files of {first.path}",))
        self.header.append(
            f"{_where(at)}: {chosen} -> the output takes {first.path}'s config and tokenizer files (tvlang "
            f"copies them from the first model a recipe reads: {first.name}). The models share its vocabulary "
            "(another vocabulary size is a shape error at run time, where mergekit would realign embedding rows).")

    def run_options(self) -> dict[str, str]:
        options = {}
        if self.dtype == "float64":
            options["dtype"] = "float64"
        if self.out_dtype or self.dtype:
            options["out_dtype"] = self.out_dtype or self.dtype
        return options


def _check_top_key(source: _Source, key: Any) -> None:
    supported = ("models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer")
    later = {
        "slices": "layer slices (frankenmerges) are " + _NOT_YET,
        "modules": "per-module merges are " + _NOT_YET,
        "chat_template": "setting a chat template is " + _NOT_YET,
    }
    if key in supported:
        return
    if key in later:
        raise source.error(f"{key}: {later[key]}", (key,), key=True)
    raise source.error(f"unknown key '{key}' in a mergekit config", (key,), key=True,
                       notes=_suggest(key, [*supported, *later]))


def _local_path(source: _Source, value: Any, at: _Path) -> str:
    """A model reference that is a local path (relative to the config), else an error."""
    if isinstance(value, dict):
        raise source.error("a model written as a mapping (path, revision, lora) is " + _NOT_YET, at,
                           notes=("write the model's local path",))
    if not isinstance(value, str) or not value:
        raise source.error("a model is a path to a local checkpoint", at)
    full = value if os.path.isabs(value) else os.path.join(source.directory, value)
    if os.path.exists(full):
        return value
    notes = ("Hub ids are not supported by tvlang import yet: download the model to a local directory"
             " and write that directory's path",)
    if "+" in value:
        raise source.error(f"'{value}' is not a local path; a LoRA adapter (model+lora) is {_NOT_YET}", at,
                           notes=("merge the adapter into its model first and write that model's path",))
    kind = "a Hub id with a revision" if "@" in value else "no such file or directory"
    raise source.error(f"model '{value}' is not a local path ({kind}: {full})", at, notes=notes)


def _settings(source: _Source, value: Any, at: _Path) -> dict:
    if value is None:
        return {}  # 'parameters:' with nothing under it
    if not isinstance(value, dict):
        raise source.error(f"{_where(at)} must be a mapping of parameter names to values", at)
    return value


_TRUE = ("true", "yes", "on", "1", "t", "y")
_FALSE = ("false", "no", "off", "0", "f", "n")


def _value(source: _Source, param: _Param, value: Any, at: _Path) -> Any:
    """A parameter's value as mergekit validates it; gradients and filters are errors."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "filter"}:
        if value.get("filter") not in (None, "*"):
            raise source.error(f"{param.name}: parameters filtered by tensor name are {_NOT_YET}", at + ("filter",))
        return _value(source, param, value["value"], at + ("value",))
    if isinstance(value, list):
        raise source.error(f"{param.name}: per-layer values (a gradient) and filter lists are {_NOT_YET}", at,
                           notes=("give one value for every layer",))
    if value is None or isinstance(value, dict):
        raise source.error(f"{param.name} needs a {'number' if param.kind == 'number' else 'true or false'}", at)
    if param.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise source.error(f"{param.name} must be true or false, got {value!r}", at)
    if isinstance(value, bool):
        raise source.error(f"{param.name} must be a number, got {str(value).lower()}", at)
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string; mergekit takes it as a number
        try:
            value = float(value)
        except ValueError:
            raise source.error(f"{param.name} must be a number, got '{value}'", at) from None
    if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise source.error(f"{param.name} must be a finite number, got {value!r}", at)
    return float(value)


class _Names:
    """Recipe names for model paths: readable, unique, and never a built-in or reserved word."""

    def __init__(self) -> None:
        self.used = {"base", "out"}

    def new(self, path: str) -> str:
        stem = os.path.basename(os.path.normpath(path))
        stem = re.sub(r"\.(safetensors|bin|pt|pth|json)$", "", stem)
        name = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "model"
        if name[0].isdigit():
            name = "m_" + name
        if name in BUILTINS or name in RESERVED:
            name += "_model"
        candidate, n = name, 2
        while candidate in self.used:
            candidate, n = f"{name}_{n}", n + 1
        self.used.add(candidate)
        return candidate


# -- expressions -----------------------------------------------------------------------------

def _tidy(value: float) -> float:
    """A number computed from config values, without float noise in the recipe (0.30000000000000004 -> 0.3)."""
    return float(f"{value:.12g}")


def _num(value: float) -> ast.Expr:
    return ast.Neg(ast.Number(-value)) if value < 0 else ast.Number(float(value))


def _name(name: str) -> ast.Name:
    return ast.Name(name)


def _scaled(coef: float, expr: ast.Expr) -> ast.Expr:
    return expr if coef == 1 else ast.BinOp("*", _num(coef), expr)


def _sum(terms: list[tuple[float, ast.Expr]], start: ast.Expr | None = None) -> ast.Expr:
    """``start + c1*e1 - c2*e2 ...``, subtracting the terms with negative coefficients."""
    result = start
    for coef, expr in terms:
        if result is None:
            result = _scaled(coef, expr)
        elif coef < 0:
            result = ast.BinOp("-", result, _scaled(-coef, expr))
        else:
            result = ast.BinOp("+", result, _scaled(coef, expr))
    assert result is not None
    return result


def _call(func: str, args: list[ast.Expr], **options: Any) -> ast.Call:
    keywords = tuple(ast.Keyword(k.rstrip("_"), _literal(v)) for k, v in options.items() if v is not None)
    return ast.Call(func, tuple(args), keywords)


def _literal(value: Any) -> ast.Expr:
    if isinstance(value, ast.Node):
        return value
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, str):
        return ast.String(value)
    if isinstance(value, (list, tuple)):
        return ast.ListExpr(tuple(_num(v) for v in value))
    return _num(value)


def _delta(item: _Input, base: _Input) -> ast.Expr:
    return ast.BinOp("-", _name(item.name), _name(base.name))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return to_text(_num(value))


# -- the methods -----------------------------------------------------------------------------

def _linear(merge: _Merge) -> _Out:
    inputs = list(merge.inputs)
    if merge.base is not None:  # read first: the output's config and tokenizer are base_model's, as in mergekit
        inputs.sort(key=lambda i: i is not merge.base)
    weights = [i.values["weight"] for i in inputs]
    total = sum(weights)
    terms = [(w, _name(i.name)) for w, i in zip(weights, inputs)]
    if merge.shared["normalize"]:
        if total == 0:
            raise merge.source.error("linear with normalize: true needs weights whose sum is not 0 "
                                     "(mergekit divides by it)", ("models",))
        expr = _sum(terms)
        if total != 1:
            expr = ast.BinOp("/", expr, _num(_tidy(total)))
        return _Out(expr, [f"normalize {_show(True)} ({merge.shared_origins['normalize']}): the weights are "
                           f"divided by their sum, {_show(_tidy(total))}."])
    notes = [f"normalize false ({merge.shared_origins['normalize']}): the weighted sum as it is."]
    return _scaled_models(merge, inputs, weights, notes)


def _scaled_models(merge: _Merge, inputs: list[_Input], coefs: list[float], notes: list[str]) -> _Out:
    """``sum(c_i * m_i)`` for models whose coefficients need not sum to 1. tvlang's affine rule
    refuses a scaled model (usually a bug); the excess ``C - 1`` of the first model is read
    a second time as plain tensors (``load_delta``), which makes the sum a valid Model."""
    total = sum(coefs)
    terms = [(c, _name(i.name)) for c, i in zip(coefs, inputs)]
    if abs(total - 1) < 1e-9:
        return _Out(_sum(terms), notes)
    first = inputs[0]
    raw = f"{first.name}_raw"
    excess = _tidy(total - 1)
    notes.append(f"The coefficients sum to {_show(_tidy(total))}: the result is {_show(_tidy(total))} times a "
                 f"model, which tvlang's affine rule refuses (it is usually a bug). So {first.name} is read a "
                 f"second time as plain numbers ({raw}, load_delta), and {_show(excess)} of its coefficient moves "
                 "there: the same values, with model weights that sum to 1.")
    terms[0] = (_tidy(coefs[0] - excess), terms[0][1])
    terms = [t for t in terms if t[0] != 0]
    expr = _sum(terms + [(excess, _name(raw))])
    return _Out(expr, notes, [(raw, _call("load_delta", [ast.String(first.path)]),
                               f"{first.name}'s tensors as plain numbers")])


def _passthrough(merge: _Merge) -> _Out:
    only = merge.inputs[0]
    scale = only.values["scale"]
    if scale is None:
        return _Out(_name(only.name), ["passthrough: the model as it is."])
    return _scaled_models(merge, [only], [scale], [f"passthrough with scale {_show(scale)} ({only.origins['scale']})."])


def _slerp(merge: _Merge) -> _Out:
    other = merge.non_base[0]
    t = merge.shared["t"]
    note = (f"t {_show(t)} ({merge.shared_origins['t']}): t = 0 gives the base, t = 1 {other.name}; "
            "linear where a tensor's two values are nearly colinear (|cos| > 0.9995), as mergekit.")
    return _Out(_call("slerp", [_name(merge.base.name), _name(other.name), _num(t)]), [note])


def _nuslerp(merge: _Merge) -> _Out:
    source = merge.source
    if merge.base is None:
        raise source.error("nuslerp without a base_model is " + _NOT_YET, ("merge_method",),
                           notes=("with a base_model it is base + slerp of the two task vectors",))
    for name, supported in (("nuslerp_flatten", True), ("nuslerp_row_wise", False)):
        if merge.shared[name] != supported:
            raise source.error(f"nuslerp with {name}: {_show(merge.shared[name])} is {_NOT_YET}",
                               ("parameters", name))
    first, second = merge.non_base
    w1, w2 = first.values["weight"], second.values["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else _tidy(w2 / (w1 + w2))
    note = (f"t = weight of {second.name} / sum of the weights = {_show(w2)}/({_show(w1)} + {_show(w2)}) "
            f"= {_show(t)}: each tensor's task vectors are interpolated on the sphere (nuslerp_flatten: true).")
    expr = ast.BinOp("+", _name(merge.base.name),
                     _call("slerp", [_delta(first, merge.base), _delta(second, merge.base), _num(t)]))
    return _Out(expr, [note])


def _model_stock(merge: _Merge) -> _Out:
    if merge.shared["filter_wise"]:
        raise merge.source.error("model_stock with filter_wise: true is " + _NOT_YET, ("parameters", "filter_wise"))
    args = [_name(merge.base.name)] + [_name(i.name) for i in merge.non_base]
    return _Out(_call("model_stock", args), ["filter_wise false: one interpolation ratio per tensor."])


def _gta(merge: _Merge) -> _Out:
    """The generalized task arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*."""
    method, source, base = merge.method, merge.source, merge.base
    entries = merge.non_base
    shared = merge.shared
    notes = [", ".join(f"{name} {_show(shared[name])} ({merge.shared_origins[name]})"
                       for name in ("normalize", "rescale", "lambda") if name in shared
                       and (name != "rescale" or method.sparsify is not None))]
    if not entries:
        return _Out(_name(base.name), notes + ["No model besides the base: mergekit returns the base."])
    weights = [i.values["weight"] for i in entries]
    densities = [i.values.get("density", 1.0) for i in entries]
    if method.sparsify is not None:
        for item in entries:
            if not 0 <= item.values["density"] <= 1:  # mergekit: above 1 keeps all, below 0 none
                raise source.error(f"density must be in [0, 1], got {_show(item.values['density'])}",
                                   _origin_at(item, "density"))
    if shared["rescale"] and method.sparsify in ("magnitude", "outliers"):
        raise source.error(f"rescale: true (restore each task vector's L1 norm after pruning) with {method.name} is "
                           + _NOT_YET, ("parameters", "rescale"))
    rescale = shared["rescale"]
    if method.sparsify in ("random", "della") and rescale:
        notes.append("rescale true: tvlang divides the kept entries by their keep probability (the paper's rule); "
                     "mergekit 0.1.5 restores each task vector's L1 norm instead (equal in expectation). The random "
                     "masks differ from mergekit's too (seeded per tensor name).")
    normalize, lam = shared["normalize"], shared["lambda"]
    deltas = [_delta(i, base) for i in entries]
    one_density = all(d == densities[0] for d in densities)

    if method.sparsify == "della":
        epsilons = [i.values["epsilon"] for i in entries]
        for label, values in (("density", densities), ("epsilon", epsilons)):
            if any(v != values[0] for v in values):
                raise source.error(f"{method.name} with a different {label} per model is {_NOT_YET}",
                                   _origin_at(entries[1], label), notes=(f"give one {label} for every model",))
        density, epsilon = densities[0], epsilons[0]
        if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise source.error(f"epsilon {_show(epsilon)} must keep density - epsilon and density + epsilon inside "
                               f"(0, 1) (density {_show(density)})", _origin_at(entries[0], "epsilon"))
        call = _call("della", deltas, density=density, epsilon=epsilon, lambda_=lam if lam != 1 else None,
                     elect=None if method.consensus else "none", **_weighting(weights, normalize),
                     rescale=None if rescale else False)
        return _Out(ast.BinOp("+", _name(base.name), call), notes)

    if method.consensus:
        if method.sparsify == "magnitude" and one_density:
            call = _call("ties", deltas, density=densities[0], **_weighting(weights, normalize))
        elif method.sparsify == "random" and one_density:
            call = _call("dare_ties", deltas, p=_tidy(1 - densities[0]), **_weighting(weights, normalize),
                         rescale=None if rescale else False)
        else:
            pruned = [_prune(method.sparsify, d, i, n, rescale) for n, (d, i) in enumerate(zip(deltas, entries))]
            call = _call("ties", pruned, density=1, **_weighting(weights, normalize))
        return _Out(ast.BinOp("+", _name(base.name), _scaled(lam, call)), notes)

    terms = [(w, _prune(method.sparsify, d, i, n, rescale))
             for n, (w, d, i) in enumerate(zip(weights, deltas, entries))]
    total = sum(weights)
    divide = normalize and abs(total) >= 1e-8 and total != 1
    if normalize and abs(total) < 1e-8:
        notes.append("The weights sum to 0: mergekit does not divide by them.")
    if not divide and lam == 1:
        return _Out(_sum(terms, _name(base.name)), notes)  # base + 0.5*(a - base) + 0.3*(b - base)
    mixed = _sum(terms)
    if lam != 1:
        mixed = ast.BinOp("*", _num(lam), mixed)
    if divide:
        mixed = ast.BinOp("/", mixed, _num(_tidy(total)))
    return _Out(ast.BinOp("+", _name(base.name), mixed), notes)


def _weighting(weights: list[float], normalize: bool) -> dict[str, Any]:
    """The options of ties/dare_ties/della for mergekit's weights and normalize."""
    if all(w == 1 for w in weights):
        return {"merge": "mean" if normalize else "sum"}
    return {"weights": weights, "merge": "weighted_mean" if normalize else "sum"}


def _prune(sparsify: str | None, delta: ast.Expr, item: _Input, seed: int, rescale: bool) -> ast.Expr:
    density = item.values.get("density", 1.0)
    if sparsify is None:
        return delta
    if sparsify == "magnitude":
        return _call("topk", [delta, _num(density)])
    if sparsify == "outliers":
        return _call("breadcrumbs", [delta, _num(density)], gamma=item.values["gamma"])
    assert sparsify == "random"
    return _call("dare", [delta, _num(_tidy(1 - density))], seed=seed or None, rescale=None if rescale else False)


def _origin_at(item: _Input, name: str) -> _Path:
    origin = item.origins.get(name, "")
    if origin.startswith("models["):
        return ("models", item.index, "parameters", name)
    if origin == _ORIGIN_GLOBAL:
        return ("parameters", name)
    return item.at


def _gta_method(name: str, title: str, consensus: bool, sparsify: str | None, normalize: bool,
                rescale: bool) -> _Method:
    return _Method(name, title, _gta_params(sparsify, normalize, rescale), _gta, base="required",
                   consensus=consensus, sparsify=sparsify)


_METHODS: dict[str, _Method] = {m.name: m for m in (
    _Method("linear", "a weighted average of the models (Wortsman et al. 2022, model soups).",
            (_Param("weight", "number", "input"), _Param("normalize", "bool", "shared", True)), _linear),
    _Method("passthrough", "one model copied as it is, or scaled.",
            (_Param("scale", "number", "input", None),), _passthrough, max_inputs=1),
    _Method("slerp", "spherical interpolation between the base and one other model, tensor by tensor.",
            (_Param("t", "number", "shared"),), _slerp, base="required", min_inputs=2, max_inputs=2),
    _Method("nuslerp", "spherical interpolation of two task vectors, weighted, tensor by tensor.",
            (_Param("weight", "number", "non_base"), _Param("nuslerp_row_wise", "bool", "shared", False),
             _Param("nuslerp_flatten", "bool", "shared", True)), _nuslerp, base="optional",
            min_inputs=2, max_inputs=3),  # two models, and the base if there is one
    _Method("model_stock", "Model Stock (Jang et al. 2024): the base moved toward the fine-tunes' average by "
            "a ratio set by the angle between them.",
            (_Param("filter_wise", "bool", "shared", False),), _model_stock, base="required", min_inputs=3),
    _gta_method("task_arithmetic", "Task Arithmetic (Ilharco et al. 2023): the base plus the weighted sum of the "
                "task vectors (model - base).", False, None, False, False),
    _gta_method("ties", "TIES-Merging (Yadav et al. 2023): trim each task vector to its density by magnitude, "
                "elect a sign per entry, merge the entries that agree with it.", True, "magnitude", True, False),
    _gta_method("dare_ties", "DARE (Yu et al. 2024) then TIES' sign election: drop random entries of each task "
                "vector, rescale the rest, merge the entries that agree with the elected sign.",
                True, "random", False, True),
    _gta_method("dare_linear", "DARE (Yu et al. 2024): drop random entries of each task vector, rescale the "
                "rest, add them to the base.", False, "random", False, True),
    _gta_method("breadcrumbs", "Model Breadcrumbs (Davari & Belilovsky 2023): drop each task vector's largest "
                "(gamma) and smallest entries, keep density of them.", False, "outliers", False, False),
    _gta_method("breadcrumbs_ties", "Model Breadcrumbs (Davari & Belilovsky 2023) with TIES' sign election.",
                True, "outliers", False, False),
    _gta_method("della", "DELLA-Merging (Deep et al. 2024): keep entries with probabilities ranked by "
                "magnitude, rescale, elect signs, merge.", True, "della", True, True),
    _gta_method("della_linear", "DELLA-Merging (Deep et al. 2024) without sign election.",
                False, "della", False, True),
)}


# -- writing the recipe ------------------------------------------------------------------------

def _write(merge: _Merge) -> str:
    out = merge.method.translate(merge)
    source = merge.source
    lines: list[str] = []
    title = os.path.basename(source.filename) if source.filename else "A mergekit config"
    lines.append(f"# {title} as a tvlang recipe (tvlang import, mergekit {MERGEKIT_VERSION} semantics).")
    lines += _comment(f"merge_method: {merge.method.name} -- {merge.method.title}")
    where = f"keep the recipe next to {title}" if source.filename else "keep the recipe in that directory"
    lines += _comment("load() paths are relative to this file, as mergekit's are to the directory it runs in: "
                      + where + ".")
    for note in merge.header:
        lines += _comment(note)
    lines.append("")

    reads = sorted(merge.inputs, key=lambda i: (i is not merge.base, merge.inputs.index(i)))
    statements = [(f"{i.name} = {to_text(_call('load', [ast.String(i.path)]))}", _describe(merge, i)) for i in reads]
    statements += [(f"{name} = {to_text(value)}", comment) for name, value, comment in out.extra]
    width = max(len(s) for s, _ in statements)
    for statement, comment in statements:
        lines.append(f"{statement:<{width}}  # {comment}" if comment else statement)
    lines.append("")
    for note in out.notes:
        if note:
            lines += _comment(note)
    lines.append(_layout("out = ", out.expr))
    return "\n".join(lines) + "\n"


def _describe(merge: _Merge, item: _Input) -> str:
    label = "base_model" if item is merge.base and item.index is None else item.label
    if item is merge.base and item.index is not None:
        label += " (base_model)"
    by_origin: dict[str, list[str]] = {}
    for name, value in item.values.items():
        if name == "scale" and value is None:
            continue
        by_origin.setdefault(item.origins[name], []).append(f"{name} {_show(value)}")
    parts = [f"{', '.join(values)} ({origin})" for origin, values in by_origin.items()]
    return label + (": " + "; ".join(parts) if parts else "")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=_WIDTH, initial_indent="# ", subsequent_indent="#   ",
                         break_long_words=False, break_on_hyphens=False)


def _layout(head: str, expr: ast.Expr) -> str:
    """``head + expr`` on one line when it fits; else a long sum one term per line, or the
    widest call's arguments one per line."""
    text = head + to_text(expr)
    if len(text) <= _WIDTH:
        return text
    terms = _terms(expr)
    lines = [f"    {sign + ' ' if sign else ''}{term}" for sign, term in terms]
    if len(terms) > 2 and all(len(line) <= _WIDTH for line in lines):
        return head + "(\n" + "\n".join(lines) + "\n)"
    calls = [n for n in ast.walk(expr) if isinstance(n, ast.Call) and len(n.args) + len(n.kwargs) > 1]
    if not calls:
        return text
    widest = max(calls, key=lambda c: len(to_text(c)))
    marker = "__tvlang_call__"
    outer = to_text(_replace(expr, widest, ast.Name(marker)))
    inner = [to_text(a) + "," for a in widest.args]
    options = ", ".join(to_text(k) for k in widest.kwargs)
    if options:
        inner.append(options + ",")
    body = f"{widest.func}(\n" + "".join(f"    {part}\n" for part in inner) + ")"
    return head + outer.replace(marker, body)


def _terms(expr: ast.Expr) -> list[tuple[str, str]]:
    """A chain ``a + b - (c - d)`` as ``[("", "a"), ("+", "b"), ("-", "(c - d)")]``."""
    terms: list[tuple[str, str]] = []
    node = expr
    while isinstance(node, ast.BinOp) and node.op in "+-":
        right = to_text(node.right)
        if isinstance(node.right, ast.BinOp) and node.right.op in "+-":
            right = f"({right})"
        terms.append((node.op, right))
        node = node.left
    terms.append(("", to_text(node)))
    return terms[::-1]


def _replace(node: ast.Expr, old: ast.Expr, new: ast.Expr) -> ast.Expr:
    if node is old:
        return new
    if isinstance(node, ast.BinOp):
        return ast.BinOp(node.op, _replace(node.left, old, new), _replace(node.right, old, new))
    if isinstance(node, ast.Neg):
        return ast.Neg(_replace(node.operand, old, new))
    if isinstance(node, ast.Call):
        return ast.Call(node.func, tuple(_replace(a, old, new) for a in node.args),
                        tuple(ast.Keyword(k.name, _replace(k.value, old, new)) for k in node.kwargs))
    return node
