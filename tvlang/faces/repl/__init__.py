"""The tvlang REPL: recipes typed one line at a time.

The REPL keeps a list of accepted statements (definitions and params). Each
new line is compiled together with the definitions it needs as one recipe
text, so the parser, the checker and the planner do all the work: what the
REPL accepts is exactly what a recipe file would accept.

- ``name = expr`` and ``param name = number`` define (or redefine) a name;
  they print nothing.
- An expression prints a summary of its value: its kind, the sources it
  reads, the number of tensors and parameters and the dtype (from the file
  headers, no tensor is read), and for a scalar (``norm(a - pre)``) its value,
  computed through its plan by streaming over the inputs.
- ``:explain EXPR``, ``:save EXPR to PATH``, ``:sources``, ``:vars``,
  ``:bind NAME=PATH``, ``:load RECIPE``, ``:help``, ``:quit``.

Modules: ``session`` (bindings, definitions, dependency order, recipe text,
error spans), ``values`` (summaries and scalar values), ``commands`` (``Repl``:
inputs and ``:commands``), ``complete`` (tab completion), ``loop`` (readline,
history, piped input).

>>> import io
>>> out, err = io.StringIO(), io.StringIO()
>>> repl = Repl(stdout=out, stderr=err)
>>> repl.feed("param lam = 0.5")
True
>>> repl.feed("lam*2 + 1")
True
>>> out.getvalue()
'Scalar: 2\\n'
>>> repl.feed("lam2 + 1")
True
>>> print(err.getvalue().strip())
<repl>:1:1: error: unknown name 'lam2'; did you mean 'lam'?
  lam2 + 1
  ^^^^
"""

from tvlang.faces.repl.commands import COMMANDS, Repl
from tvlang.faces.repl.loop import HISTORY_ENV, history_path, interact, open_parens

__all__ = ["Repl", "COMMANDS", "HISTORY_ENV", "history_path", "open_parens", "interact"]
