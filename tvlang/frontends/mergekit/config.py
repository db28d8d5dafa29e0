"""A mergekit config resolved as mergekit 0.1.5 resolves it: models, base, parameters with
their precedence (a model's own, then the global ones, then the method's default), dtypes
and the tokenizer; whatever tvlang cannot express is an error at the config's line."""

from __future__ import annotations

import os
import re
from typing import Any

from tvlang.frontends.mergekit.methods import _METHODS, _NO_OPERATOR
from tvlang.frontends.mergekit.slices import _slices_as_models
from tvlang.frontends.mergekit.source import _NOT_YET, _Path, _Source, _suggest, _where
from tvlang.frontends.mergekit.spec import (
    _KNOWN_PARAMS,
    _ORIGIN_DEFAULT,
    REQUIRED,
    _Input,
    _Method,
    _Param,
)
from tvlang.frontends.mergekit.values import _close, _open, _value
from tvlang.language.builtins import BUILTINS
from tvlang.language.pertensor import PER_TENSOR
from tvlang.language.syntax import RESERVED


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
        data, header = _slices_as_models(source, data)
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
        merge.header += header
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
            parts = entry.get("parts")  # slices: a stack of layer ranges (frontends.mergekit.slices)
            for key in entry:
                if key not in ("model", "parameters") and not (key in ("parts", "base") and "parts" in entry):
                    raise source.error(f"unknown key '{key}' in models[{index}]", at + (key,), key=True,
                                       notes=_suggest(key, ("model", "parameters")))
            path = _local_path(source, entry["model"], at + ("model",))
            if parts is not None:
                parts = tuple((_local_path(source, p, at + ("model",)), span) for p, span in parts)
                path = " + ".join(f"{p}[{start}:{end}]" for p, (start, end) in parts)
            if path in seen:
                raise source.error(f"'{path}' is merged twice (models[{seen[path]}] and models[{index}])",
                                   at + ("model",), notes=("mergekit refuses duplicate inputs too",))
            seen[path] = index
            is_base = path == base_path or entry.get("base") is True or (
                parts is not None and all(p == base_path for p, _ in parts))
            name = "base" if is_base else names.new(path if parts is None else "_".join(dict.fromkeys(
                os.path.basename(os.path.normpath(p)) for p, _ in parts)))
            self.inputs.append(_Input(name, path, at + ("model",), index, is_base, parts=parts))
        if base_path is not None:
            self.base = next((i for i in self.inputs if i.is_base), None)
            if self.base is None and any(i.parts for i in self.inputs):
                if self.method.base != "ignored":
                    raise source.error(f"{self.method.name} merges each slice with its base_model, and '{base_path}'"
                                       " is not a source of the slices", ("base_model",),
                                       notes=("add it to every slice's sources, with the same layer_range",))
                self.header.append(f"base_model: {base_path} is not a source of the slices; {self.method.name} "
                                   "does not use it, and the output takes the first source's config files.")
            elif self.base is None:
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

    def _resolve(self, param: _Param, scopes: list, item: _Input | None,
                 unmatched: _Path | None = None) -> tuple[Any, str]:
        """mergekit's precedence: the model's own parameters, then the global ones, then the default."""
        for index, (settings, at) in enumerate(scopes):
            if param.name in settings:
                value = _value(self.source, param, settings[param.name], at + (param.name,))
                if _open(value):  # filters that some tensors match none of: mergekit reads the next scope
                    rest, origin = self._resolve(param, scopes[index + 1:], item, unmatched=at + (param.name,))
                    return _close(value, rest), f"{_where(at)}, else {origin}"
                return value, _where(at)
        if unmatched is not None and param.default is REQUIRED:
            raise self.source.error(f"{param.name}: no filter matches some tensors, and there is no other value "
                                    "for them", unmatched, notes=("add a last entry without a filter: - value: ...",))
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
    supported = ("models", "slices", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer")
    later = {
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
    if "+" in value:
        raise source.error(f"'{value}' is not a local path; a LoRA adapter (model+lora) is {_NOT_YET}", at,
                           notes=("merge the adapter into its model first and write that model's path, or write"
                                  " the merge as a recipe: load(\"hf:org/model\") + lora(\"adapter-dir\")",))
    if _HUB_ID.fullmatch(value):  # as mergekit does: not a local path, so a Hub model id (@revision)
        return "hf:" + value
    raise source.error(f"model '{value}' is neither a local path ({full}: no such file or directory) nor a"
                       " Hub model id (org/name or org/name@revision)", at)


# A Hugging Face model id, as mergekit's configs write them: ``org/name`` or ``name``, then
# ``@revision`` (a branch, tag or commit); tvlang reads it as ``hf:org/name@revision``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?(?:@[\w./-]+)?")


def _settings(source: _Source, value: Any, at: _Path) -> dict:
    if value is None:
        return {}  # 'parameters:' with nothing under it
    if not isinstance(value, dict):
        raise source.error(f"{_where(at)} must be a mapping of parameter names to values", at)
    return value


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
        if name in BUILTINS or name in RESERVED or name in PER_TENSOR:
            name += "_model"
        candidate, n = name, 2
        while candidate in self.used:
            candidate, n = f"{name}_{n}", n + 1
        self.used.add(candidate)
        return candidate
