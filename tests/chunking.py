"""Forcing the chunked path in tests: small tensors run in chunks, and we see which did."""

from __future__ import annotations

from tvlang.run import chunked as chunk_module
from tvlang.run import evaluate


def chunk_in(monkeypatch, elements: int, minimum: int = 7) -> list[str]:
    """Tensors of ``minimum`` entries or more run in chunks of ``elements`` from now on; the
    returned list gets the name of each tensor computed in chunks."""
    names: list[str] = []
    real = evaluate.Session._execute_chunked

    def spy(self, program, linear, name, raw, kernels, *, pieces):
        names.append(name)
        return real(self, program, linear, name, raw, kernels, pieces=pieces)

    monkeypatch.setattr(evaluate.Session, "_execute_chunked", spy)
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", minimum)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", elements)
    return names
