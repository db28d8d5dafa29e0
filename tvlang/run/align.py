"""Name alignment: each input's tensor names matched to the base's before anything is computed.

Fine-tunes rarely store their tensors under the base's names: a task-head model
saved by ``transformers`` nests the encoder under ``bert.`` (and adds a
``classifier.*`` head), DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.``,
PEFT adds ``base_model.model.``, and a model saved with its ``model.`` wrapper meets
one saved without it. ``align`` matches names exactly first, then tries removing or
adding a prefix (the wrappers above, and the leading one to three components that
unmatched names share), keeping the rule that matches the most tensors, as long as it
matches more than before and maps no two names to one; up to four rules in turn. What it did is reported per input
(``Alignment``), and an input none of whose tensors matches is an error.

>>> mapping, rules = align(["embeddings.w", "encoder.0.w"], ["bert.embeddings.w", "bert.encoder.0.w", "classifier.w"])
>>> rules, sorted(mapping)
(["removed the prefix 'bert.'"], ['classifier.w', 'embeddings.w', 'encoder.0.w'])
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorReader

__all__ = ["WRAPPERS", "AlignedReader", "Alignment", "align", "align_inputs"]

# Prefixes that training and saving code adds, tried first (docs/io.md has the table).
WRAPPERS = ("module.", "_orig_mod.", "base_model.model.", "model.", "bert.", "roberta.", "transformer.")
MAX_RULES = 4  # e.g. module. then _orig_mod. then base_model.model.


@dataclass
class Alignment:
    """How one input's names were matched to the base's."""

    key: str  # the binding name
    label: str  # the input, as errors name it
    rules: list[str] = field(default_factory=list)
    matched: int = 0  # float tensors of the base found in the input (after the rules)
    renamed: int = 0  # of those, found under another name
    missing: list[str] = field(default_factory=list)  # base float tensors the input lacks
    extra: list[str] = field(default_factory=list)  # input float tensors the base lacks

    def line(self, leave: set[str] = frozenset()) -> str:
        """One line for the run's summary, or "" when every name matched as it is; names in ``leave``
        (tied heads, which have a line of their own) are not counted as missing or extra."""
        parts = []
        missing = [n for n in self.missing if n not in leave]
        extra = [n for n in self.extra if n not in leave]
        if self.rules:
            parts.append(f"{self.renamed} tensors matched after {' and '.join(self.rules)}")
        if missing:
            parts.append(f"{len(missing)} of the base's tensors missing ({few(missing)})")
        if extra:
            parts.append(f"{len(extra)} tensors only in this input, left out ({few(extra)})")
        return f"{self.key} ({self.label}): " + "; ".join(parts) if parts else ""


class AlignedReader(TensorReader):
    """A reader whose tensors carry the base's names (``mapping``: new name -> the inner reader's)."""

    def __init__(self, inner: TensorReader, mapping: dict[str, str]) -> None:
        super().__init__(inner.label)
        self.inner = inner
        self.metadata, self.kind, self.root, self.paths = inner.metadata, inner.kind, inner.root, inner.paths
        self.hub = inner.hub
        self._map = mapping
        self._infos = {new: dataclasses.replace(inner.info(old), name=new) for new, old in mapping.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(self._map.get(name, name))

    def close(self) -> None:
        self.inner.close()


def align(base: list[str], names: list[str]) -> tuple[dict[str, str], list[str]]:
    """A renaming of ``names`` onto ``base``'s (new name -> old name, in ``names``' order) and its rules."""
    targets = set(base)
    current = {name: name for name in names}
    rules: list[str] = []
    for _ in range(MAX_RULES):
        score = sum(new in targets for new in current)
        if score == len(targets) or score == len(current):
            # Every base name found, or every input name already one of the base's: no rule
            # can match more (a renaming is one-to-one, so matches never exceed the input's
            # names), and names that line up cost one pass instead of one per candidate rule.
            break
        best = None
        ambiguous = False
        for rule, rename in _candidates(current, targets):
            renamed = {rename(new): old for new, old in current.items()}
            if len(renamed) < len(current):  # two names onto one: not a renaming
                continue
            count = sum(new in targets for new in renamed)
            if count <= score or (best is not None and count < best[0]):
                continue
            matched = {old for new, old in renamed.items() if new in targets}
            if best is not None and count == best[0]:
                # Two rules as good as each other that match different tensors (x.a.w or
                # y.a.w as a.w): no guess.
                ambiguous = ambiguous or matched != best[3]
                continue
            best, ambiguous = (count, rule, renamed, matched), False
        if best is None or ambiguous:
            break
        _, rule, current, _ = best
        rules.append(rule)
    return current, rules


def _candidates(current: dict[str, str], targets: set[str]):
    unmatched = [n for n in current if n not in targets]
    wanted = [t for t in targets if t not in current]
    strip = Counter(head for n in unmatched for head in _heads(n))
    add = Counter(head for t in wanted for head in _heads(t))
    prefixes = list(WRAPPERS) + [p for p, _ in strip.most_common(6)] + [p for p, _ in add.most_common(6)]
    for prefix in dict.fromkeys(p for p in prefixes if p):
        if any(n.startswith(prefix) for n in unmatched):
            yield f"removed the prefix '{prefix}'", lambda n, p=prefix: n[len(p):] if n.startswith(p) else n
        if any(t.startswith(prefix) for t in wanted):
            yield f"added the prefix '{prefix}'", lambda n, p=prefix: n if n in targets else p + n


def _heads(name: str, depth: int = 3) -> list[str]:
    """The name's first one, two and three dotted components, each with its dot."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) + "." for i in range(1, min(depth, len(parts)) + 1)]


def few(names: list[str], count: int = 3) -> str:
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names) - count} more)" if len(names) > count else "")


def renamed(reader: TensorReader, strip_prefix: str | None, add_prefix: str | None) -> tuple[dict[str, str], list[str]]:
    """The explicit renaming a recipe asks for (``load(..., strip_prefix=, add_prefix=)``): new name -> the
    reader's, and its rules. A prefix no tensor carries, or a renaming that makes two names one, is an error."""
    names = reader.names()
    if strip_prefix and not any(name.startswith(strip_prefix) for name in names):
        raise TvlangError(f"strip_prefix='{strip_prefix}': no tensor of {reader.label} starts with it",
                          notes=(f"its names look like '{_example(names)}'",))
    rules = [f"removed the prefix '{strip_prefix}' (strip_prefix)"] if strip_prefix else []
    rules += [f"added the prefix '{add_prefix}' (add_prefix)"] if add_prefix else []
    mapping: dict[str, str] = {}
    for name in names:
        new = _after(name, strip_prefix, add_prefix)
        if new in mapping:
            raise TvlangError(f"{' and '.join(rules)} makes '{mapping[new]}' and '{name}' of {reader.label}"
                              f" one name, '{new}'")
        mapping[new] = name
    return mapping, rules


def _after(name: str, strip_prefix: str | None, add_prefix: str | None) -> str:
    if strip_prefix and name.startswith(strip_prefix):
        name = name[len(strip_prefix):]
    return (add_prefix or "") + name


def align_inputs(base: TensorReader, readers: dict[str, TensorReader], base_key: str,
                 renames: dict[str, tuple[str | None, str | None]] | None = None) -> list[Alignment]:
    """Wrap every non-base reader of ``readers`` whose names need renaming; report each input.

    ``renames`` holds the explicit renamings (key -> (strip_prefix, add_prefix)), applied
    first, the base's included; automatic alignment then works on the renamed names.
    """
    renames = renames or {}
    explicit: dict[str, tuple[dict[str, str], list[str]]] = {}
    for key, (strip_prefix, add_prefix) in renames.items():
        if key in readers:
            explicit[key] = renamed(readers[key], strip_prefix, add_prefix)
    if base_key in explicit:
        base = readers[base_key] = AlignedReader(base, explicit[base_key][0])
    base_float = [n for n in base.names() if base.info(n).dtype.is_floating_point]
    report = []
    for key, reader in list(readers.items()):
        if key == base_key:
            continue
        first, before = explicit.get(key, ({name: name for name in reader.names()}, []))
        names = list(first)
        mapping, rules = align(base_float, names)
        mapping = {new: first[old] for new, old in mapping.items()}  # back to the reader's own names
        rules = before + rules
        if rules:
            reader = readers[key] = AlignedReader(reader, mapping)
        # Names count whatever their dtype: an integer tensor where a float one is expected is
        # the layout's error to name, not a name that failed to match.
        entry = Alignment(key, reader.label, rules)
        entry.matched = sum(n in mapping for n in base_float)
        entry.renamed = sum(1 for new, old in mapping.items() if new != old and new in base_float)
        entry.missing = [n for n in base_float if n not in mapping]
        base_names = set(base.names())
        entry.extra = [n for n in mapping if n not in base_names and reader.info(n).dtype.is_floating_point]
        if base_float and entry.matched == 0:
            raise TvlangError(
                f"{reader.label} ('{key}') contributes nothing: none of its {len(names)} tensors matches a tensor"
                f" of the base {base.label}",
                notes=(f"'{key}' names look like '{_example(names)}'; the base's look like '{_example(base_float)}'",
                       "rename them on the binding or in the recipe (docs/io.md, 'Names that do not line up')"),
            )
        report.append(entry)
    return report


def _example(names: list[str]) -> str:
    return names[0] if names else "(no tensors)"
