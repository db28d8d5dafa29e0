"""The model card (``README.md``) of a model output directory: Hub front matter, the recipe, the inputs.

The front matter is what the Hugging Face Hub reads (``huggingface_hub.ModelCard``):

- ``base_model``: the Hub repository ids of the model inputs of the output (the
  base first, then in the order the plan reads them), when there are any; left
  out when every input is a local path or in memory (a local path means nothing
  on the Hub);
- ``library_name: transformers`` when the base has a ``config.json`` (copied
  into the output, so ``from_pretrained`` loads it), else left out;
- ``tags: [merge, tvlang]``.

The body has the recipe in a code block, the inputs (a Hub input pinned to its
commit, with the revision the recipe asked for; a local one by its path relative to
the recipe file), the sha256 of each input file when the run was checked against a
lockfile, and the parameter values. Nothing in it depends on where or when the run
happened, so the same recipe over the same inputs writes the same card.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tvlang.language.printer import format_signed
from tvlang.version import __version__

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan
    from tvlang.run.bindings import Bound

__all__ = ["CARD_NAME", "TAGS", "model_card"]

CARD_NAME = "README.md"
TAGS = ("merge", "tvlang")


def model_card(plan: Plan, bound: Bound, output: str, metadata: Mapping[str, str], copy_from: str | None,
               lock: Mapping[str, Any] | None = None) -> str:
    """The README.md of model output ``output``; ``metadata`` is its files' (``tvlang.inputs`` names the inputs)."""
    inputs: dict[str, str] = json.loads(metadata["tvlang.inputs"])
    keys = sorted(inputs, key=lambda key: (key != bound.base, plan.sources_read().index(key)
                                           if key in plan.sources_read() else len(inputs)))
    sources = plan.optimized.sources
    hub_ids = []
    for key in keys:
        source = bound.readers[key].hub
        if source is not None and sources[key].kind == "model" and source.reference.repo_id not in hub_ids:
            hub_ids.append(source.reference.repo_id)
    lines = ["---"]
    if hub_ids:
        lines += ["base_model:", *(f"- {json.dumps(repo)}" for repo in hub_ids)]
    if copy_from is not None and os.path.isfile(os.path.join(copy_from, "config.json")):
        lines.append("library_name: transformers")
    lines += ["tags:", *(f"- {tag}" for tag in TAGS), "---", ""]
    lines += [f"# {output}", "",
              f"This model was made with tvlang {__version__} from the recipe below: task arithmetic over"
              " the inputs listed after it, computed tensor by tensor. The same recipe, inputs and parameters"
              " are in the metadata of its safetensors files (`tvlang show` prints them).", ""]
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", plan.text)), default=0))
    lines += ["## Recipe", "", f"{fence}tvlang", plan.text.rstrip("\n"), fence, ""]
    lines += ["## Inputs", ""]
    locked = lock["inputs"] if lock is not None else {}
    for key in keys:
        source = bound.readers[key].hub
        asked = f" (revision `{source.revision}`)" if source is not None and source.revision != source.commit else ""
        lines.append(f"- {_code(key)}: {_code(inputs[key])}{asked}")
        for name, entry in sorted(locked.get(key, {}).get("files", {}).items()):
            lines.append(f"  - {_code(name)}: sha256 `{entry['sha256']}`, {entry['size']} bytes")
    if lock is None:
        lines += ["", "The run was not checked against a lockfile (`tvlang lock`, `tvlang run --locked`),"
                  " so no file hashes are recorded."]
    lines += [""]
    params = json.loads(metadata["tvlang.params"])
    if params:
        lines += ["## Parameters", "", "| param | value |", "|---|---|"]
        lines += [f"| {_code(name)} | {format_signed(value)} |" for name, value in sorted(params.items())]
        lines += [""]
    return "\n".join(lines)


def _code(text: str) -> str:
    """``text`` as inline code, whatever backticks it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


