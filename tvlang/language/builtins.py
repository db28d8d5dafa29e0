"""The built-in function table: one row per built-in, and every row is here.

A row is the whole built-in: its signature (arguments with kinds, defaults, choices and
ranges, each written once), its kernel, its chunk form, its flags, the whole-model
reductions it needs, and the hints the checker gives for it. Every other table
(``KERNELS``, ``CHUNKED``, ``ELEMENTWISE``, ``MULTIPASS`` in :mod:`tvlang.ops.registry`)
is a view derived from these rows. Adding an operator is one row here plus one kernel in
``tvlang/ops`` (plus an optional chunk form); a test or a plugin registers its own rows
with :func:`register` (docs/operators.md, "Adding an operator").

This module imports no torch and nothing from the run or ops layers: kernels, chunk forms
and reducers are named as ``"module:attr"`` and resolved (:func:`resolve`) when a run needs
them.

Kinds of arguments: ``"model"``, ``"delta"``, ``"vector"`` (model or delta), ``"scalar"``
(a finite number), ``"int"`` (a whole number), ``"string"``, ``"bool"``, ``"list"`` (a list
of numbers).

Result rules: ``"model"``, ``"delta"``, ``"scalar"``, or ``"same"`` (the kind shared by the
vector arguments, which must agree).

Stages: ``"source"`` (reads a checkpoint: ``load``), ``"tensor"`` (a per-tensor kernel),
``"reduce"`` (a whole-model scalar computed in an earlier streaming pass).

>>> BUILTINS["ties"].kernel, BUILTINS["ties"].chunk_form, BUILTINS["ties"].multipass
('tvlang.ops.ties:ties', 'tvlang.ops.chunks:ties_chunks', True)
>>> BUILTINS["mean"].result, BUILTINS["norm"].stage
('same', 'reduce')
>>> BUILTINS["dare"].complete({"p": 0.3})
{'p': 0.3, 'seed': 0.0, 'rescale': True}
>>> BUILTINS["ties"].check_options({"density": 1.5}, 2)
Traceback (most recent call last):
...
tvlang.errors.TvlangError: error: ties: option 'density' must be in [0, 1], got 1.5
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tvlang.errors import TvlangError

__all__ = [
    "REQUIRED", "Arg", "Builtin", "BUILTINS", "CORE", "OPERATORS", "Reduction", "register", "resolve",
    "threshold_key", "unregister",
]

KINDS = ("model", "delta", "vector", "scalar", "int", "string", "bool", "list")
VECTOR_KINDS = ("model", "delta", "vector")
RESULTS = ("model", "delta", "scalar", "same")
STAGES = ("source", "tensor", "reduce")
_REFERENCE = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"  # "package.module:attr"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


# -- the row types -------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One parameter of a built-in.

    ``default`` is ``REQUIRED``, ``None`` (optional, absent when not given), or a value.
    ``choices`` are the allowed values of a string; ``range`` the closed interval
    ``(low, high)`` of a number. Kernels, ``check`` and the planner all read these: a
    default, a choice or a range is written here and nowhere else.
    """

    name: str
    kind: str  # see the module docstring
    default: object = REQUIRED
    choices: tuple[str, ...] | None = None
    doc: str = ""
    range: tuple[float, float] | None = None

    def problem(self, value: object) -> str | None:
        """What is wrong with the constant ``value`` by this argument's metadata, or ``None``."""
        where = f"option '{self.name}'"
        if self.kind in ("scalar", "int"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{where} must be {'an integer' if self.kind == 'int' else 'a number'}, got {value!r}"
            if self.kind == "int" and not float(value).is_integer():
                return f"{where} must be an integer, got {value!r}"
            if not math.isfinite(value):
                return f"{where} must be a finite number, got {value!r}"
            if self.range is not None and not self.range[0] <= value <= self.range[1]:
                return f"{where} must be in [{self.range[0]:g}, {self.range[1]:g}], got {value:g}"
        elif self.kind == "list":
            if not isinstance(value, (list, tuple)):
                return f"{where} must be a list of numbers, got {value!r}"
            for item in value:
                if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                    return f"{where} must hold finite numbers, got {item!r}"
        elif self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            return f"{where} must be one of {allowed}, got {value!r}"
        return None


@dataclass(frozen=True)
class Reduction:
    """A whole-model scalar a tensor built-in's call needs before its kernel runs.

    The planner streams the call's inputs ``inputs`` (indices into the kernel's
    ``inputs``) through ``reducer(*args)``, a ``"module:attr"`` Reducer class, in
    ``reducer.passes`` streaming passes, and hands its ``result()`` to the kernel as
    ``ctx.reduced[key]``.

    The Reducer protocol (also that of a ``reduce`` built-in's kernel, which streams
    all the call's vector arguments): ``passes`` (int), ``update(pass_index, tensors,
    ctx)`` once per tensor name and pass, with ``tensors`` the streamed inputs of that
    tensor (a list, in ``inputs`` order), ``end_pass(pass_index)`` after each pass,
    ``result()`` (the scalar) after the last one.
    """

    key: str
    reducer: str
    args: tuple = ()
    inputs: tuple[int, ...] = ()


#: ``rule(options, n_inputs) -> problem or None``: a check the argument metadata cannot
#: state (between options, or against the number of vector inputs). ``options`` have
#: their defaults filled in; a required option may be missing.
Rule = Callable[[Mapping[str, object], int], str | None]


@dataclass(frozen=True)
class Builtin:
    """One built-in function: its signature and everything the pipeline needs to run it.

    Signature: ``params`` are positional-or-keyword, in order. ``variadic`` (if any) takes
    the remaining positional arguments, at least ``min_variadic`` of them; the ``options``
    of a variadic built-in are keyword-only (``ties(a, b, density=0.2)``).

    Behaviour:

    - ``kernel``: ``"module:attr"`` of the per-tensor kernel (stage ``"tensor"``:
      ``kernel(inputs, ctx, **options)``) or of the Reducer class (stage ``"reduce"``).
    - ``chunk_form``: ``"module:attr"`` of a factory
      ``(ctx, numel, n_inputs, dtype, **options) -> chunk kernel or None`` that computes
      the kernel's result piece by piece (see :mod:`tvlang.ops.registry`), or ``None``.
    - ``elementwise``: the result at an entry depends on that entry of the inputs and on
      the tensor's name only, so the kernel itself runs on each piece.
    - ``multipass``: the chunk form passes over its whole input before its first result.
    - ``reductions(options, n_inputs) -> tuple[Reduction, ...]``: the whole-model scalars
      a call needs first (``options`` with defaults filled in), or ``None`` for none.
    - ``rules``: checks the argument metadata cannot state (see ``Rule``).
    - ``kind_hints``: ``(kind it got, note)``: the note the checker adds when a vector
      argument of this built-in has the wrong kind.
    """

    name: str
    params: tuple[Arg, ...] = ()
    variadic: Arg | None = None
    min_variadic: int = 0
    options: tuple[Arg, ...] = ()
    result: str = "same"
    stage: str = "tensor"
    summary: str = ""
    reference: str = ""  # which paper / library the semantics match
    kernel: str | None = None
    chunk_form: str | None = None
    elementwise: bool = False
    multipass: bool = False
    reductions: Callable[[Mapping[str, object], int], tuple[Reduction, ...]] | None = None
    rules: tuple[Rule, ...] = ()
    kind_hints: tuple[tuple[str, str], ...] = ()

    def constant_args(self) -> tuple[Arg, ...]:
        """The arguments a kernel gets as ``options``: every one that is not a vector."""
        return tuple(a for a in (*self.params, *self.options) if a.kind not in VECTOR_KINDS)

    def complete(self, options: Mapping[str, object]) -> dict[str, object]:
        """``options`` plus the defaults of the ones left out (a required one stays missing)."""
        args = self.constant_args()
        unknown = set(options) - {a.name for a in args}
        if unknown:
            raise TypeError(f"{self.name}() got unknown options {sorted(unknown)}")
        filled = dict(options)
        for arg in args:
            if arg.name not in filled and arg.default is not REQUIRED and arg.default is not None:
                filled[arg.name] = arg.default
        return filled

    def check_options(self, options: Mapping[str, object], n_inputs: int) -> dict[str, object]:
        """``options`` with their defaults filled in (:meth:`complete`), after checking them
        against the arguments' metadata and the row's rules: ``TvlangError`` (no span: the
        caller adds one) for a value the kernel would reject. A missing required option is
        not checked."""
        filled = self.complete(options)
        problems = [arg.problem(filled[arg.name]) for arg in self.constant_args() if arg.name in filled]
        problems += [rule(filled, n_inputs) for rule in self.rules]
        for problem in problems:
            if problem is not None:
                raise TvlangError(f"{self.name}: {problem}")
        return filled

    def kind_hint(self, got: str) -> str | None:
        """The checker's note for a vector argument of kind ``got`` where another was wanted."""
        return dict(self.kind_hints).get(got)

    def problems(self) -> list[str]:
        """What this row lacks or gets wrong as a row (empty when it is whole)."""
        found: list[str] = []
        if not self.name.isidentifier():
            found.append(f"name {self.name!r} is not an identifier")
        if self.stage not in STAGES:
            found.append(f"stage {self.stage!r} is not one of {STAGES}")
        if self.result not in RESULTS:
            found.append(f"result {self.result!r} is not one of {RESULTS}")
        if not self.summary:
            found.append("no summary")
        args = [*self.params, *self.options] + ([self.variadic] if self.variadic else [])
        names = [a.name for a in args]
        found += [f"argument {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
        for arg in args:
            found += [f"argument {arg.name!r}: {p}" for p in _arg_problems(arg)]
        if self.variadic is not None and self.variadic.kind not in VECTOR_KINDS:
            found.append("the variadic argument must be a model, delta or vector")
        has_kernel = self.stage in ("tensor", "reduce")
        if has_kernel and self.kernel is None:
            found.append(f"a {self.stage!r} built-in needs a kernel ('module:attr')")
        if not has_kernel and self.kernel is not None:
            found.append(f"a {self.stage!r} built-in has no kernel")
        for field in ("kernel", "chunk_form"):
            ref = getattr(self, field)
            if ref is not None and not re.fullmatch(_REFERENCE, ref):
                found.append(f"{field} {ref!r} is not a 'module:attr' reference")
        if self.stage != "tensor":
            for field in ("chunk_form", "elementwise", "multipass", "reductions"):
                if getattr(self, field):
                    found.append(f"{field} is only for 'tensor' built-ins")
        if self.multipass and self.chunk_form is None:
            found.append("multipass describes a chunk form, and there is none")
        if self.reductions is not None and not callable(self.reductions):
            found.append("reductions must be callable")
        found += [f"rule {rule!r} is not callable" for rule in self.rules if not callable(rule)]
        found += [f"kind hint for {kind!r}: only a model or a delta can be the wrong kind"
                  for kind, _ in self.kind_hints if kind not in ("model", "delta")]
        return found


def _arg_problems(arg: Arg) -> list[str]:
    found: list[str] = []
    if arg.kind not in KINDS:
        return [f"kind {arg.kind!r} is not one of {KINDS}"]
    if arg.choices is not None and arg.kind != "string":
        found.append("choices are for strings")
    if arg.range is not None and (arg.kind not in ("scalar", "int") or not arg.range[0] <= arg.range[1]):
        found.append(f"range {arg.range!r} is not an interval of numbers")
    if arg.default is not REQUIRED and arg.default is not None:
        if arg.kind in VECTOR_KINDS:
            found.append("a model or task vector argument has no default")
        elif not found:
            problem = arg.problem(arg.default)
            if problem is not None:
                found.append(f"the default: {problem}")
    return found


BUILTINS: dict[str, Builtin] = {}


def register(*rows: Builtin) -> None:
    """Add rows to ``BUILTINS``; a row that is not whole, or whose name is taken, is refused."""
    for row in rows:
        if row.name in BUILTINS:
            raise ValueError(f"built-in {row.name!r} registered twice")
        problems = row.problems()
        if problems:
            raise ValueError(f"built-in {row.name!r}: " + "; ".join(problems))
    for row in rows:
        BUILTINS[row.name] = row


def unregister(*names: str) -> None:
    """Remove rows added by :func:`register` (a test's or a plugin's own operators)."""
    for name in names:
        del BUILTINS[name]


@functools.lru_cache(maxsize=None)
def resolve(reference: str) -> object:
    """The object a row's ``"module:attr"`` reference names, imported on first use.

    Rows name their kernels, chunk forms and reducers this way so that the language
    and plan layers never import torch; the run layer resolves them when it runs.
    """
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


# -- what rows share: reductions and rules -------------------------------------------------

def threshold_key(index: int) -> str:
    """The ``ctx.reduced`` key of input ``index``'s whole-model magnitude threshold."""
    return f"threshold:{index}"


def _model_thresholds(options: Mapping[str, object], n_inputs: int) -> tuple[Reduction, ...]:
    """``scope="model"``: the exact k-th largest ``|x|`` over every tensor of each input,
    ``k = keep_count(density, total entries)``; the kernel keeps ``|x| >= threshold``."""
    if options["scope"] != "model":
        return ()
    return tuple(
        Reduction(threshold_key(i), "tvlang.ops.threshold:MagnitudeThreshold", (float(options["density"]),), (i,))
        for i in range(n_inputs)
    )


def _one_weight_per_input(options: Mapping[str, object], n_inputs: int) -> str | None:
    weights = options.get("weights") or ()
    if weights and len(weights) != n_inputs:  # type: ignore[arg-type]
        return f"option 'weights' has {len(weights)} values for {n_inputs} inputs"  # type: ignore[arg-type]
    return None


def _della_keep_probabilities(options: Mapping[str, object], n_inputs: int) -> str | None:
    """Keep probabilities span density -/+ epsilon: they must stay in (0, 1]."""
    if "density" not in options:
        return None
    density, epsilon = float(options["density"]), float(options["epsilon"])  # type: ignore[arg-type]
    if 0.0 < density < 1.0 and (density - epsilon <= 0.0 or density + epsilon > 1.0):
        return (f"density - epsilon must be > 0 and density + epsilon <= 1 "
                f"(got density={density:g}, epsilon={epsilon:g})")
    return None


def _values_not_empty(options: Mapping[str, object], n_inputs: int) -> str | None:
    return "the list of values is empty" if "values" in options and not options["values"] else None


def _glob_pattern(options: Mapping[str, object], n_inputs: int) -> str | None:
    pattern = options.get("pattern")
    if "pattern" in options and (not isinstance(pattern, str) or not pattern.strip("| ")):
        return f"the pattern must be a non-empty glob string, got {pattern!r}"
    return None


# -- reading checkpoints, averaging and adding, whole-model scalars -------------------------

CORE = (
    Builtin(
        "load",
        params=(Arg("path", "string", doc="a .safetensors file, a sharded index, a model directory, "
                                          "or a .bin/.pt state dict; relative to the recipe file"),),
        result="model",
        stage="source",
        summary="Read a checkpoint as a model (absolute weights).",
    ),
    Builtin(
        "load_delta",
        params=(Arg("path", "string", doc="a task vector file, as written by tvlang for a task-vector output"),),
        result="delta",
        stage="source",
        summary="Read a task-vector file (weights relative to a base) as a task vector.",
    ),
    Builtin(
        "mean",
        variadic=Arg("vectors", "vector", doc="models, or task vectors (not a mix)"),
        min_variadic=1,
        result="same",
        summary="Element-wise average: a model of models, a task vector of task vectors.",
        reference="Wortsman et al. 2022 (model soups, uniform soup)",
        kernel="tvlang.ops.reduce:mean",
        elementwise=True,
    ),
    Builtin(
        "sum",
        variadic=Arg("vectors", "delta", doc="task vectors"),
        min_variadic=1,
        result="delta",
        summary="Element-wise sum of task vectors (a + b + ...).",
        reference="Ilharco et al. 2023, task addition",
        kernel="tvlang.ops.reduce:sum_",
        elementwise=True,
        kind_hints=(("model",
                     "a sum of models is not a model (its coefficients would not sum to 1): "
                     "use mean(a, b) to average models, or add task vectors: sum(a - base, b - base)"),),
    ),
    Builtin(
        "norm",
        params=(Arg("x", "vector"),),
        result="scalar",
        stage="reduce",
        summary="Euclidean (Frobenius) norm over every float tensor of the whole model.",
        kernel="tvlang.ops.reduce:NormReducer",
    ),
    Builtin(
        "dot",
        params=(Arg("a", "vector"), Arg("b", "vector")),
        result="scalar",
        stage="reduce",
        summary="Dot product over every float tensor of the whole model.",
        kernel="tvlang.ops.reduce:DotReducer",
    ),
    Builtin(
        "cos",
        params=(Arg("a", "vector"), Arg("b", "vector")),
        result="scalar",
        stage="reduce",
        summary="Cosine similarity dot(a, b)/(norm(a)*norm(b)) over the whole model.",
        reference="Ilharco et al. 2023, Fig. 5 (cosine similarity of task vectors)",
        kernel="tvlang.ops.reduce:CosReducer",
    ),
)


# -- merge operators (kernels in tvlang/ops, semantics in docs/operators.md) ------------------

_FRACTION = (0.0, 1.0)
_SCOPE = ("tensor", "model")

_TIES_SHARED = (
    Arg("elect", "string", "total", ("total", "frequency"),
        "sign election: 'total' = sign of the sum of the values (TIES 'mass'), "
        "'frequency' = sign held by more inputs; an exact tie elects +"),
    Arg("merge", "string", "mean", ("mean", "sum", "weighted_mean"),
        "disjoint merge of the entries that agree with the elected sign: 'mean' divides "
        "by how many agree (TIES, PEFT), 'sum' does not divide (mergekit normalize: false), "
        "'weighted_mean' divides by the sum of the agreeing inputs' weights (mergekit "
        "normalize: true)"),
    Arg("weights", "list", (),
        doc="per-input weights applied after pruning (PEFT/mergekit style); empty = weights "
            "written into the arguments (ties(0.4*a, 0.6*b))"),
    Arg("elect_on", "string", "weighted", ("weighted", "unweighted"),
        "elect signs on the weighted values (mergekit) or the unweighted ones (PEFT); "
        "only matters with weights=[...]"),
)

OPERATORS = (
    Builtin(
        "topk",
        params=(Arg("delta", "delta"), Arg("density", "scalar", range=_FRACTION)),
        options=(Arg("scope", "string", "tensor", _SCOPE,
                     "rank magnitudes within each tensor, or over the whole model"),),
        result="delta",
        summary="magnitude pruning: keep the density fraction of entries with the largest |x|",
        reference="TIES-Merging trim step; PEFT magnitude_prune; mergekit sparsify magnitude",
        kernel="tvlang.ops.prune:topk",
        chunk_form="tvlang.ops.chunks:topk_chunks",
        multipass=True,
        reductions=_model_thresholds,
    ),
    Builtin(
        "ties",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("density", "scalar", 0.2, doc="fraction of entries of each input kept by magnitude", range=_FRACTION),
            *_TIES_SHARED,
            Arg("scope", "string", "tensor", _SCOPE,
                "trim within each tensor (PEFT, mergekit) or over the whole model (TIES paper)"),
        ),
        result="delta",
        summary="TIES-Merging: trim by magnitude, elect a sign per entry, disjoint merge",
        reference="Yadav et al. 2023 (ties-merging code); PEFT ties; mergekit ties",
        kernel="tvlang.ops.ties:ties",
        chunk_form="tvlang.ops.chunks:ties_chunks",
        multipass=True,
        reductions=_model_thresholds,
        rules=(_one_weight_per_input,),
    ),
    Builtin(
        "dare",
        params=(Arg("delta", "delta"), Arg("p", "scalar", range=_FRACTION)),
        options=(
            Arg("seed", "int", 0.0, doc="random seed; masks depend on (seed, tensor name) only"),
            Arg("rescale", "bool", True, doc="divide kept entries by 1 - p"),
        ),
        result="delta",
        summary="DARE: drop each entry with probability p, rescale the rest by 1/(1-p)",
        reference="Yu et al. 2024 (DARE); PEFT random prune with density = 1 - p",
        kernel="tvlang.ops.dare:dare",
        chunk_form="tvlang.ops.chunks:dare_chunks",
    ),
    Builtin(
        "dare_ties",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("p", "scalar", doc="drop probability of each entry", range=_FRACTION),
            Arg("seed", "int", 0.0),
            Arg("rescale", "bool", True),
            *_TIES_SHARED,
        ),
        result="delta",
        summary="DARE on each input, then TIES sign election and disjoint merge",
        reference="PEFT dare_ties; mergekit dare_ties (merge='sum' there by default)",
        kernel="tvlang.ops.ties:dare_ties",
        chunk_form="tvlang.ops.chunks:dare_ties_chunks",
        rules=(_one_weight_per_input,),
    ),
    Builtin(
        "breadcrumbs",
        params=(Arg("delta", "delta"), Arg("density", "scalar", range=_FRACTION)),
        options=(Arg("gamma", "scalar", 0.01, doc="fraction of largest-magnitude entries dropped", range=_FRACTION),),
        result="delta",
        summary="Model Breadcrumbs: drop the largest gamma fraction and keep the next density fraction",
        reference="Davari & Belilovsky 2023; mergekit magnitude_outliers (without its small-tensor bug)",
        kernel="tvlang.ops.prune:breadcrumbs",
        chunk_form="tvlang.ops.chunks:breadcrumbs_chunks",
        multipass=True,
    ),
    Builtin(
        "della",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("density", "scalar", doc="mean keep probability", range=_FRACTION),
            Arg("epsilon", "scalar", 0.15, doc="keep probabilities span density -/+ epsilon by magnitude rank",
                range=(0.0, 0.5)),
            Arg("lambda", "scalar", 1.0, doc="scale applied to the merged result"),
            Arg("seed", "int", 0.0),
            Arg("rescale", "bool", True, doc="divide kept entries by their keep probability"),
            Arg("elect", "string", "total", ("total", "frequency", "none"),
                "sign election as in ties; 'none' merges without election (della_linear)"),
            *_TIES_SHARED[1:],
        ),
        result="delta",
        summary="DELLA: magnitude-ranked keep probabilities, rescale, elect, merge",
        reference="Deep et al. 2024 (DELLA-Merging); mergekit della",
        kernel="tvlang.ops.ties:della",
        rules=(_one_weight_per_input, _della_keep_probabilities),
    ),
    Builtin(
        "slerp",
        params=(Arg("a", "vector"), Arg("b", "vector"), Arg("t", "scalar")),
        result="same",
        summary="spherical interpolation per tensor; linear when nearly colinear",
        reference="mergekit slerp (DOT_THRESHOLD 0.9995)",
        kernel="tvlang.ops.slerp:slerp",
    ),
    Builtin(
        "model_stock",
        params=(Arg("base", "model"),),
        variadic=Arg("model", "model"),
        min_variadic=2,
        result="model",
        summary="Model Stock: t*average + (1-t)*base with t from the angle between fine-tunes",
        reference="Jang et al. 2024 (Model Stock); mergekit model_stock",
        kernel="tvlang.ops.stock:model_stock",
    ),
    Builtin(
        "random_like",
        params=(Arg("delta", "delta"),),
        options=(Arg("seed", "int", 0.0),),
        result="delta",
        summary="Gaussian noise with the same Frobenius norm as each tensor",
        reference="Ilharco et al. 2023 (random task vector baseline)",
        kernel="tvlang.ops.dare:random_like",
    ),
    Builtin(
        "select",
        params=(Arg("delta", "delta"), Arg("pattern", "string")),
        result="delta",
        summary="keep tensors whose name matches a glob ('a*|b*' for several), zero the rest",
        reference="tvlang",
        kernel="tvlang.ops.select:select",
        elementwise=True,
        rules=(_glob_pattern,),
    ),
    Builtin(
        "pick",
        params=(Arg("pattern", "string"), Arg("a", "vector"), Arg("b", "vector")),
        result="same",
        summary="per tensor: a where the name matches the glob, else b",
        reference="tvlang (mergekit slices/filters)",
        kernel="tvlang.ops.select:pick",
        elementwise=True,
        rules=(_glob_pattern,),
    ),
    Builtin(
        "schedule",
        params=(Arg("delta", "delta"), Arg("values", "list")),
        options=(Arg("default", "scalar", 1.0, doc="scale of tensors with no layer index"),),
        result="delta",
        summary="scale each tensor by a value interpolated over its layer index",
        reference="mergekit gradient parameters",
        kernel="tvlang.ops.select:schedule",
        elementwise=True,
        rules=(_values_not_empty,),
    ),
)

register(*CORE, *OPERATORS)
