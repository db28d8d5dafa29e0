"""Input pages are unmapped after every pass over a tensor, the passes before the main one
included (issue 19): a kernel with a pass first (slerp, model_stock, random_like, ties, topk,
breadcrumbs, rescale_by="l1" of dare, dare_ties and della) and a recipe with whole-model passes
(norm/cos, scope="model") never hold more than a chunk or two of each input mapped, where they
held the whole tensor of every input between its first pass and the main pass (private memory
growing with the tensor; rescale_by="l1" ran on whole tensors).

Measured in the process itself: before each chunk is computed, the resident pages of the
input files' mappings (their ``Rss`` in /proc/self/smaps).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

import tvlang
from tvlang.run import chunked

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")

ROWS, COLUMNS = 1024, 4096  # 16 MiB per input: 4 chunks of 1M entries


def mapped_bytes(paths: set[str]) -> int:
    """Resident bytes of this process's mappings of ``paths``."""
    total = 0
    counting = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header: range perms ... path
                counting = line.split()[-1] in paths
            elif counting and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pass-memory")
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(ROWS, COLUMNS, generator=g)
    paths = {}
    for name in ("pre", "a", "b", "c"):
        tensor = pre if name == "pre" else pre + 0.01 * torch.randn(pre.shape, generator=g)
        paths[name] = str(folder / f"{name}.safetensors")
        save_file({"w": tensor, "v": torch.ones(16)}, paths[name])
    return paths


@pytest.mark.parametrize("recipe", [
    "pre + slerp(a - pre, b - pre, 0.3)",
    "model_stock(pre, a, b, c)",
    "pre + random_like(a - pre, seed=1)",
    "pre + ties(a - pre, b - pre, c - pre, density=0.2)",
    "pre + topk(a - pre, 0.2)",
    "pre + breadcrumbs(a - pre, 0.2, gamma=0.01)",
    "pre + cos(a - pre, b - pre)*(a - pre) + norm(b - pre)*(b - pre)",
    'pre + ties(a - pre, b - pre, c - pre, density=0.2, scope="model")',
    'pre + dare(a - pre, 0.5, rescale_by="l1", seed=1)',
    'pre + dare_ties(a - pre, b - pre, p=0.5, rescale_by="l1")',
    'pre + della(a - pre, b - pre, density=0.5, epsilon=0.1, rescale_by="l1")',
    "pre + sce(a - pre, b - pre, c - pre, select_topk=0.1)",
])
def test_no_pass_keeps_an_input_tensor_mapped(models, tmp_path, monkeypatch, recipe):
    files = {os.path.realpath(p) for p in models.values()}
    peaks = []
    passes = set()
    real = chunked.run_chunk

    def watched(*args, **kwargs):
        peaks.append(mapped_bytes(files))
        passes.add(kwargs.get("pass_index", 0) if kwargs.get("observing") else "main")
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "run_chunk", watched)
    monkeypatch.setenv("TVLANG_DIRECT", "0")  # the local executor's chunks (the torch-free one maps no input)
    names = [n for n in models if re.search(rf"\b{n}\b", recipe)]
    tvlang.compile(recipe).run({n: models[n] for n in names}, str(tmp_path / "out.safetensors"))
    assert "main" in passes and len(peaks) >= 8  # a pass first, then the main pass, in chunks
    # a chunk of every input at most (4 MiB each), against 16 MiB per input held before
    chunk = 4 * chunked.CHUNK_ELEMENTS
    assert max(peaks) <= len(names) * chunk, (max(peaks), recipe)
