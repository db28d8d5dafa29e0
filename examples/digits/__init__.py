"""Task arithmetic at small scale: the three edits of Ilharco et al. (2023) on sklearn digits.

Run ``python -m examples.digits`` from the repository root; see docs/digits.md.
"""
