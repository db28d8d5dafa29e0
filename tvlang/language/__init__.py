"""The language layer: text to a checked program. Imports no torch.

``syntax`` parses (Lark LALR) into the frozen ``ast`` with spans, ``printer``
turns any AST back into canonical text, ``builtins`` holds the operator
signatures, and ``checker`` types a program (Scalar, Model, Delta; the affine
rule). Nothing here imports the plan, run or faces layers.
"""
