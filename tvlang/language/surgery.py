"""Rows of layer surgery: ``stack``, a model built from ranges of other models' layers.

``load("a", layers=[0, 24])`` reads layers 0..23 of ``a`` (renumbered from 0, with ``a``'s
tensors outside the layers); ``stack(p1, p2, ...)`` is one model whose layers are those of
``p1``, then ``p2``'s renumbered after them, and so on (mergekit's ``slices``). Each part is
a ``load(...)`` call (with or without ``layers=``) or a name bound to one: a stack is a
*source*, read tensor by tensor like a checkpoint, so every operator takes it as it takes a
loaded model, and ``slerp(stack(...), stack(...), t=0.5)`` merges two stacks layer by layer.

Tensors outside the layers come from the first part when they are embeddings (a name with
``embed``, or GPT-2's ``wte``/``wpe``), else from the last part (the final norm, the output
head), as mergekit takes them from its first and last slice. The run layer opens the parts
(``tvlang.run.stacked``); an output written as a model directory takes the first part's
``config.json`` with its layer count set to the stack's. See docs/operators.md, ``stack``.

>>> from tvlang.language.builtins import BUILTINS
>>> BUILTINS["stack"].stage, BUILTINS["stack"].result
('source', 'model')
"""

from __future__ import annotations

from tvlang.language.rows import Arg, Builtin

__all__ = ["SURGERY"]

SURGERY: tuple[Builtin, ...] = (
    Builtin(
        "stack",
        variadic=Arg("parts", "model", doc='load("PATH", layers=[START, END]) calls, or names bound to them'),
        min_variadic=1,
        result="model",
        stage="source",
        summary="One model of the parts' layers in turn, renumbered (layer surgery, a frankenmerge).",
        reference="mergekit slices / layer_range / passthrough",
    ),
)
