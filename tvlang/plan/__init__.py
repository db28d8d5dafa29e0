"""The plan layer: a checked program to an inspectable plan. Imports no torch.

``ir`` builds hash-consed nodes, ``optimize`` runs one pass per module,
``schedule`` turns the optimized IR into reduction passes and a per-tensor
program, and ``compiler`` holds ``compile()`` and ``Plan`` (explain, params,
variants). Running a plan reaches the run layer only through ``Plan.run``,
``Plan.evaluate`` and ``Plan.stream``, which import it when called.
"""
