"""A naive eager evaluator of recipe ASTs: the reference the optimized,
streamed result is compared with.

It walks the AST as written (no linearizing, folding, cancelling or sharing),
holds whole models in memory as dicts of tensors, and computes whole-model
reductions directly on them. Built-in kernels come from ``tvlang.ops`` (they are
tested on their own against hand computations).
"""

from __future__ import annotations

import math

import torch

from tvlang.language import ast, constants
from tvlang.language.checker import bind_call
from tvlang.language.syntax import parse, parse_expression
from tvlang.ops.context import TensorContext
from tvlang.ops.registry import KERNELS


class NaiveEvaluator:
    """Evaluate ``text`` over ``models`` (name -> {tensor name: tensor}) eagerly."""

    def __init__(self, models: dict[str, dict[str, torch.Tensor]], dtype=torch.float64, params=None):
        self.models = {k: {n: t.to(dtype) for n, t in sd.items() if t.is_floating_point()} for k, sd in models.items()}
        self.dtype = dtype
        self.params = dict(params or {})
        self.env: dict[str, object] = {}
        first = next(iter(self.models.values()))
        self.names = list(first)

    def program(self, text: str) -> dict[str, dict[str, torch.Tensor]]:
        """{output name: tensors} for a recipe or a bare expression."""
        try:
            program = parse(text)
        except Exception:
            program = ast.Program((ast.Out(None, parse_expression(text)),))
        outputs = {}
        for stmt in program.statements:
            if isinstance(stmt, ast.Param):
                self.params.setdefault(stmt.name, stmt.value)
            elif isinstance(stmt, ast.Assign):
                self.env[stmt.name] = self.expr(stmt.value)
            else:
                value = self.expr(stmt.value)
                name = stmt.name or "out"
                outputs[name] = value
                if stmt.name:
                    self.env[stmt.name] = value
        return outputs

    def expr(self, node):
        if isinstance(node, ast.Number):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            if node.id in self.params:
                return self.params[node.id]
            return self.models[node.id]
        if isinstance(node, ast.Neg):
            return self._map(lambda x: -x, self.expr(node.operand))
        if isinstance(node, ast.BinOp):
            left, right = self.expr(node.left), self.expr(node.right)
            op = node.op
            if isinstance(left, float) and isinstance(right, float):
                return constants.ARITHMETIC[op](left, right)
            if op == "+":
                return {n: left[n] + right[n] for n in self.names}
            if op == "-":
                return {n: left[n] - right[n] for n in self.names}
            if op == "*":
                scale, vec = (left, right) if isinstance(left, float) else (right, left)
                return {n: scale * vec[n] for n in self.names}
            return {n: left[n] / right for n in self.names}
        if isinstance(node, ast.Call):
            return self.call(node)
        raise TypeError(node)

    def option(self, node):
        """A built-in's option value: a literal (or a table default), or a constant number."""
        if not isinstance(node, ast.Node):  # a Python default from the table
            return tuple(node) if isinstance(node, list) else node
        if isinstance(node, (ast.String, ast.Bool)):
            return node.value
        if isinstance(node, ast.ListExpr):
            return tuple(self.option(item) for item in node.items)
        numbers = {**self.params, **{name: v for name, v in self.env.items() if isinstance(v, float)}}
        return constants.value(node, numbers)

    def _map(self, fn, value):
        if isinstance(value, float):
            return fn(value)
        return {n: fn(t) for n, t in value.items()}

    def call(self, node: ast.Call):
        bound = bind_call(node)
        row = bound.builtin
        vectors = []
        options = {}
        for param in row.params:
            value = bound.args.get(param.name)
            if param.kind in ("model", "delta", "vector"):
                vectors.append(self.expr(value))
            elif value is not None:
                options[param.name] = self.option(value)
        vectors += [self.expr(v) for v in bound.varargs]
        for option in row.options:
            value = bound.args.get(option.name)
            if value is not None:
                options[option.name] = self.option(value)
        if row.name == "norm":
            return math.sqrt(sum(float((t.double() ** 2).sum()) for t in vectors[0].values()))
        if row.name == "dot":
            return sum(float((vectors[0][n].double() * vectors[1][n].double()).sum()) for n in self.names)
        if row.name == "cos":
            a, b = vectors
            dot = sum(float((a[n].double() * b[n].double()).sum()) for n in self.names)
            na = math.sqrt(sum(float((t.double() ** 2).sum()) for t in a.values()))
            nb = math.sqrt(sum(float((t.double() ** 2).sum()) for t in b.values()))
            return dot / (na * nb) if na and nb else 0.0
        kernel = KERNELS[row.name]
        return {n: kernel([v[n] for v in vectors], TensorContext(n), **options) for n in self.names}


def evaluate(text: str, models, dtype=torch.float64, **params) -> dict[str, dict[str, torch.Tensor]]:
    return NaiveEvaluator(models, dtype, params).program(text)
