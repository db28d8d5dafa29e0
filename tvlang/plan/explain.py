"""What ``explain`` prints: the recipe, its optimized form, what each output reads, the plan.

The optimized IR is printed back as tvlang text through the printer (nodes used
twice become named temporaries ``t0``, ``t1``, ...), whole-model scalars by the
names of their reduction tasks, and each per-tensor step by the text form its op
has in ``STEP_OPS``. A scalar output is shown last, as arithmetic on those names.

>>> import tvlang
>>> for line in tvlang.compile("pre + 0.5*(ft - pre)").explain().splitlines()[-5:]:
...     print(line)
  b0 = read(pre)
  b0 *= 0.5
  b1 = read(ft)
  b0 += 0.5 * b1
  write(out, b0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlang.language import ast
from tvlang.language.checker import load_builtins
from tvlang.language.pertensor import PerTensor
from tvlang.language.printer import to_text
from tvlang.language.trampoline import Frame, trampoline
from tvlang.plan.ir import IRProgram, Node, const_value, postorder
from tvlang.plan.schedule import STEP_OPS, Schedule, Step, format_coef

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["explain", "explain_data", "ir_text", "shown", "step_text"]

_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}  # the IR's arithmetic ops, as the language writes them


def explain(plan: "Plan") -> str:
    """The program as written, optimized, what each output reads, and the per-tensor program."""
    data = explain_data(plan)
    lines = ["# as written", data["as_written"], "", "# optimized", data["optimized"], "", "# sources read"]
    for output in data["outputs"]:
        lines.append(f"{output['name']} ({output['kind']}): {', '.join(output['reads']) or '(none)'}")
    lines += _surgery(plan, [key for output in data["outputs"] for key in output["reads"]])
    lines += _renames(data["renamed"])
    passes = data["passes"]
    lines += ["", f"# plan: {passes} streaming pass{'es' if passes != 1 else ''} over the inputs"]
    for level in data["reductions"]:
        lines.append(f"# pass {level['pass']}: whole-model scalars")
        lines.extend(f"{scalar['name']} = {scalar['expr']}" for scalar in level["scalars"])
        lines.extend("  " + step for step in level["steps"])
    main = data["main"]
    if main is not None:
        lines.append(f"# pass {main['pass']}: per tensor ({main['buffers']} buffers)")
        lines.extend("  " + step for step in main["steps"])
    if data["scalar_outputs"]:
        lines.append("# scalar outputs, from the whole-model scalars")
        lines.extend(f"{scalar['name']} = {scalar['expr']}" for scalar in data["scalar_outputs"])
    return "\n".join(lines)


def _surgery(plan: "Plan", reads: list[str]) -> list[str]:
    """What each stack read (layer surgery) takes from its parts, in output layer order."""
    lines = []
    for key in dict.fromkeys(reads):
        spec = plan.optimized.sources.get(key)
        if spec is None or not (spec.parts or spec.layers):
            continue
        described, total = [], 0
        for part in spec.parts or (spec,):
            where = part.key if part.layers is None else part.key.rsplit(", layers=", 1)[0] + ")"
            if part.layers is None:
                described.append(f"every layer of {where}")
                total = None
            else:
                start, end = part.layers
                described.append(f"layers {start}-{end - 1} of {where}")
                total = None if total is None else total + end - start
        count = f" ({total} layers)" if total is not None else ""
        sides = ("; embeddings from the first part, the other tensors outside the layers from the last"
                 if len(spec.parts) > 1 else "")
        lines.append(f"{key}: {', then '.join(described)}, renumbered from 0{count}{sides}")
    return ["", "# layer surgery (stack)"] + lines if lines else []


def _renames(renamed: list[dict]) -> list[str]:
    """The explicit renamings of the sources read (``load(..., strip_prefix=, add_prefix=)``)."""
    lines = [f"{entry['source']}: tensor names {' then '.join(rename_steps(entry))}, before automatic alignment"
             for entry in renamed]
    return ["", "# renamed"] + lines if lines else []


def rename_steps(rename) -> list[str]:
    """What an explicit renaming (a SourceSpec, or ``explain_data``'s entry) does, in order, in words."""
    get = rename.get if isinstance(rename, dict) else lambda name: getattr(rename, name)
    steps = []
    if get("strip_prefix"):
        steps.append(f"lose the prefix '{get('strip_prefix')}'")
    if get("add_prefix"):
        steps.append(f"get the prefix '{get('add_prefix')}'")
    return steps


def explain_data(plan: "Plan") -> dict:
    """The sections of :func:`explain` as plain data (``tvlang explain --json``, docs/cli-json.md).

    >>> import tvlang
    >>> data = explain_data(tvlang.compile("pre + 0.5*(ft - pre)"))
    >>> data["outputs"], data["passes"], data["main"]["steps"][-1]
    ([{'name': 'out', 'kind': 'model', 'reads': ['pre', 'ft']}], 1, 'write(out, b0)')
    """
    sched = plan.schedule
    names = _ScalarNames(sched)
    outputs = [{"name": name, "kind": plan.output_kind(name), "reads": list(plan.sources_read(name))}
               for name in plan.outputs]
    reductions = []
    for number, (tasks, program) in enumerate(sched.levels, start=1):
        reductions.append({"pass": number,
                           "scalars": [{"name": task.name, "expr": _scalar_text(task.node, None)} for task in tasks],
                           "steps": [step_text(step, names) for step in program.steps]})
    main = None
    if sched.main.steps:
        main = {"pass": len(sched.levels) + 1, "buffers": sched.main.n_buffers,
                "steps": [step_text(step, names) for step in sched.main.steps]}
    return {"as_written": plan.program_text(), "optimized": plan.optimized_text(), "outputs": outputs,
            "passes": sched.passes, "reductions": reductions, "main": main,
            "scalar_outputs": [{"name": name, "expr": _scalar_text(node, names)} for name, node in sched.scalars],
            "renamed": [{"source": key, "strip_prefix": spec.strip_prefix, "add_prefix": spec.add_prefix}
                        for key in dict.fromkeys(k for o in outputs for k in o["reads"])
                        if (spec := plan.optimized.sources.get(key)) is not None and rename_steps(spec)]}


class _ScalarNames:
    def __init__(self, sched: Schedule) -> None:
        self.sched = sched

    def __call__(self, node: Node) -> str:
        task = self.sched.tasks.get(id(node))
        if task is not None:
            return task.name
        return _scalar_text(node, self)


def _scalar_text(node: Node, names) -> str:
    return to_text(trampoline(_scalar_ast(node, names)))


def shown(value: float) -> float:
    """A coefficient as explain shows it: 12 significant digits, so folding
    residues print as written (0.1 + 0.2 shows as 0.3); the plan keeps the exact value."""
    return float(f"{value:.12g}")


# _scalar_ast and _vector_ast are frames (see trampoline): an operand's AST is yielded,
# so the IR of a deep recipe (optimized or not) prints without recursion.

def _scalar_ast(node: Node, names) -> Frame:
    if node.op == "const":
        value = shown(const_value(node))
        return ast.Neg(ast.Number(-value)) if value < 0 else ast.Number(value)
    if node.op == "reduce":
        task = names.sched.tasks.get(id(node)) if isinstance(names, _ScalarNames) else None
        if task is not None:
            return ast.Name(task.name)
        args = []
        for arg in node.args:
            args.append((yield _vector_ast(arg, {})))
        return ast.Call(node.attr[0].lstrip("@"), tuple(args))
    if node.op == "neg":
        return ast.Neg((yield _scalar_ast(node.args[0], names)))
    left = yield _scalar_ast(node.args[0], names)
    return ast.BinOp(_SYMBOLS[node.op], left, (yield _scalar_ast(node.args[1], names)))


def _vector_ast(node: Node, temps: dict[int, str]) -> Frame:
    if id(node) in temps:
        return ast.Name(temps[id(node)])
    op = node.op
    if op == "source":
        return ast.Name(node.attr[0])
    if op == "zero":
        return ast.Call("zero")
    if op == "call":
        name, options = node.attr
        kwargs = tuple(ast.Keyword(k, _literal(v)) for k, v in options if not _is_default(name, k, v))
        args = []
        for arg in node.args:
            args.append((yield _vector_ast(arg, temps)))
        return ast.Call(name, tuple(args), kwargs)
    if op == "neg":
        return ast.Neg((yield _vector_ast(node.args[0], temps)))
    if op in ("add", "sub", "mul", "div"):
        left, right = node.args
        left_ast = yield (_scalar_ast(left, None) if left.kind == "scalar" else _vector_ast(left, temps))
        right_ast = yield (_scalar_ast(right, None) if right.kind == "scalar" else _vector_ast(right, temps))
        return ast.BinOp(_SYMBOLS[op], left_ast, right_ast)
    # lin: c1*x1 + c2*x2 - ..., starting with a positive term where there is one
    pairs = list(zip(node.attr, node.args))
    positive = [i for i, (c, _) in enumerate(pairs) if not (c.op == "const" and const_value(c) < 0)]
    if positive:
        pairs.insert(0, pairs.pop(positive[0]))
    result: ast.Expr | None = None
    for coef, vec in pairs:
        term = yield _vector_ast(vec, temps)
        negative = coef.op == "const" and const_value(coef) < 0
        magnitude = abs(shown(const_value(coef))) if coef.op == "const" else None
        if magnitude == 1.0:
            scaled = term
        elif magnitude is not None:
            scaled = ast.BinOp("*", ast.Number(magnitude), term)
        else:
            scaled = ast.BinOp("*", (yield _scalar_ast(coef, None)), term)
        if result is None:
            result = ast.Neg(scaled) if negative else scaled
        else:
            result = ast.BinOp("-" if negative else "+", result, scaled)
    return result if result is not None else ast.Call("zero")


def _is_default(builtin: str, option: str, value: object) -> bool:
    """Whether ``value`` is what the built-in's row gives ``option`` anyway (explain leaves it out)."""
    row = load_builtins().get(builtin)
    if row is None:
        return False
    for arg in (*row.params, *row.options):
        if arg.name == option:
            default = arg.default
            if isinstance(default, ast.Node):
                return _literal(value) == default
            if isinstance(default, (list, tuple)):
                return tuple(default) == value
            return default == value
    return False


def _literal(value: object) -> ast.Expr:
    if isinstance(value, PerTensor):
        return value.to_ast()
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, str):
        return ast.String(value)
    if isinstance(value, tuple):
        return ast.ListExpr(tuple(_literal(v) for v in value))
    number = float(value)  # type: ignore[arg-type]
    return ast.Neg(ast.Number(-number)) if number < 0 else ast.Number(number)


def ir_text(program: IRProgram) -> str:
    """The optimized program in tvlang syntax; nodes used twice become named temporaries."""
    roots = list(program.roots())
    uses: dict[int, int] = {}
    for node in postorder(roots):
        for child in node.args:
            uses[id(child)] = uses.get(id(child), 0) + 1
    for node in roots:
        uses[id(node)] = uses.get(id(node), 0) + 1
    temps: dict[int, str] = {}
    statements: list[ast.Stmt] = []
    for node in postorder(roots):
        if node.kind == "vector" and node.op in ("lin", "call") and uses.get(id(node), 0) >= 2:
            name = f"t{len(temps)}"
            statements.append(ast.Assign(name, trampoline(_vector_ast(node, temps))))
            temps[id(node)] = name
    for name, node in program.outputs:
        value = trampoline(_scalar_ast(node, None) if node.kind == "scalar" else _vector_ast(node, temps))
        statements.append(ast.Out(None if name == "out" else name, value))
    return to_text(ast.Program(tuple(statements))).rstrip("\n")


def step_text(step: Step, names) -> str:
    """One per-tensor step as explain prints it (the text form is the op's, in ``STEP_OPS``)."""
    def coef(value) -> str:
        text = format_coef(value, names)
        simple = text.lstrip("-").replace(".", "").replace("e", "").isalnum() or text.startswith("1/")
        return text if simple else f"({text})"

    return STEP_OPS[step.op].text(step, coef, _option_text)


def _option_text(value: object) -> str:
    return to_text(_literal(value))


