"""Small values the API hands in and out: a task-vector binding marker and a run's summary.

Kept apart from ``compiler`` so the run layer can use them without importing the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EXAMPLES", "DeltaBinding", "LoraBinding", "RunSummary", "delta", "input_report", "lora"]


@dataclass(frozen=True)
class DeltaBinding:
    """A binding marked as a task vector (see :func:`delta`)."""

    value: Any


def delta(value: Any) -> DeltaBinding:
    """Mark a state dict, module or path bound to a name as a task vector (a Delta)."""
    return DeltaBinding(value)


@dataclass(frozen=True)
class LoraBinding:
    """A binding to a PEFT LoRA adapter directory, read as a task vector (see :func:`lora`)."""

    path: Any


def lora(path: Any) -> LoraBinding:
    """Bind a name to a PEFT LoRA adapter directory: a task vector over the base's names
    (the API's spelling of ``--bind NAME=lora:DIR``; docs/adapters.md)."""
    return LoraBinding(path)


@dataclass
class RunSummary:
    outputs: dict[str, str]  # output name -> path written
    tensors: int
    bytes_written: int
    seconds: float
    passes: int
    notes: list[str] = field(default_factory=list)  # what happened to names: renamed, missing, left out
    # The structured report of ``tvlang run --json`` (docs/cli-json.md): per output
    # {name, path, kind, format, tensors, bytes}; per input {name, path, base, rules, matched,
    # renamed, missing, from_base, skipped, left_out, tied, examples}; the --missing policy.
    written: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    missing: str = "error"

    def to_dict(self) -> dict[str, Any]:
        """The run as ``tvlang run --json`` prints it (docs/cli-json.md).

        >>> RunSummary({"out": "m.pt"}, 2, 16, 0.5, 1).to_dict()["passes"]
        1
        """
        return {"ok": True, "outputs": self.written, "inputs": self.inputs, "missing_policy": self.missing,
                "tensors": self.tensors, "bytes": self.bytes_written, "passes": self.passes,
                "seconds": round(self.seconds, 6), "notes": list(self.notes)}

    def line(self) -> str:
        size = self.bytes_written / 2**20
        rate = size / self.seconds if self.seconds > 0 else 0.0
        where = ", ".join(self.outputs.values())
        line = (f"wrote {self.tensors} tensors ({size:.1f} MiB) to {where} in {self.seconds:.2f} s "
                f"({rate:.0f} MiB/s, {self.passes} pass{'es' if self.passes != 1 else ''})")
        return "\n".join([line, *(f"  {note}" for note in self.notes)])


EXAMPLES = 5  # names listed per count in an input's report (the summary line shows 3)


def input_report(name: str, path: str, is_base: bool, rules: list[str], matched: int, renamed: int,
                 missing: list[str], from_base: list[str], skipped: list[str], left_out: list[str],
                 tied: list[str]) -> dict[str, Any]:
    """One input's entry in ``RunSummary.inputs`` (tvlang.run.layout.input_reports says what each count is)."""
    return {"name": name, "path": path, "base": is_base, "rules": list(rules), "matched": matched,
            "renamed": renamed, "missing": len(missing), "from_base": len(from_base), "skipped": len(skipped),
            "left_out": len(left_out), "tied": len(tied),
            "examples": {"missing": missing[:EXAMPLES], "left_out": left_out[:EXAMPLES], "tied": tied[:EXAMPLES]}}
