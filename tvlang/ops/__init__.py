"""Tensor kernels, their chunk forms and whole-model reducers.

The operators' rows are in :mod:`tvlang.language.builtins`; :mod:`tvlang.ops.registry`
derives from them the tables the evaluator reads (``KERNELS``, ``CHUNKED``, ...).
"""
