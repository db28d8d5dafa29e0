"""``lowrank(d, rank)``: the truncated SVD of each matrix of a task vector; adapters as
inputs of ``tvlang similarity`` and ``tvlang bases``."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang.ops.context import TensorContext
from tvlang.ops.lowrank import lowrank, truncated


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(40, 30, generator=g), "wide": torch.randn(8, 300, generator=g),
           "norm": torch.ones(30), "steps": torch.arange(4)}
    ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v.clone())
          for k, v in pre.items()}
    return pre, ft


def naive_lowrank(x: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize("rank", [1, 3, 8, 30, 100])
def test_lowrank_equals_a_naive_truncated_svd(rank):
    pre, ft = _pair()
    got = tvlang.compile(f"pre + lowrank(ft - pre, {rank})").evaluate({"pre": pre, "ft": ft})
    for name in ("w", "wide"):
        delta = ft[name] - pre[name]
        want = pre[name] + naive_lowrank(delta, min(rank, min(delta.shape)))
        assert (got[name] - want).abs().max() <= 1e-5, name
        assert torch.linalg.matrix_rank(got[name] - pre[name], atol=1e-4) == min(rank, min(delta.shape))
    # 1-D tensors are kept as they are; integer buffers come from the base
    assert torch.allclose(got["norm"], ft["norm"], atol=1e-6)
    assert torch.equal(got["steps"], pre["steps"])


def test_lowrank_is_the_best_approximation_and_keeps_the_stated_energy():
    x = torch.randn(50, 20, generator=torch.Generator().manual_seed(1))
    top = truncated(x, 5)
    residual = float((x.double() - top.product()).square().sum())
    total = float(x.double().square().sum())
    assert top.total == pytest.approx(total, rel=1e-12)
    assert abs(top.kept - (1 - residual / total)) < 1e-9
    assert top.kept == pytest.approx(float(torch.linalg.svdvals(x.double())[:5].square().sum()) / total, rel=1e-12)
    # another rank-5 matrix is farther (Eckart-Young): x projected on a perturbed 5-D row space
    q, _ = torch.linalg.qr((top.vh + 0.01 * torch.randn(5, 20, dtype=torch.float64)).T)
    other = x.double() @ q @ q.T
    assert torch.linalg.matrix_rank(other) == 5
    assert float((x.double() - other).square().sum()) > residual
    assert truncated(x, 20).kept == pytest.approx(1.0)
    assert truncated(torch.zeros(3, 4), 1).kept == 1.0


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
def test_the_gram_path_equals_the_svd(monkeypatch, shape):
    import tvlang.ops.lowrank as module

    generator = torch.Generator().manual_seed(2)
    # a decaying spectrum, as task vectors have, plus noise
    x = (torch.randn(shape[0], 40, generator=generator) * torch.logspace(0, -2, 40)) @ \
        torch.randn(40, shape[1], generator=generator) + 1e-3 * torch.randn(shape, generator=generator)
    exact = truncated(x, 16)
    monkeypatch.setattr(module, "GRAM_ELEMENTS", 1000)
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 50_000)  # several column blocks
    gram = truncated(x, 16)
    assert gram.s.shape == (16,) and gram.u.shape == (shape[0], 16) and gram.vh.shape == (16, shape[1])
    assert torch.allclose(gram.s, exact.s, rtol=1e-9, atol=1e-12)
    assert (gram.product() - exact.product()).abs().max() < 1e-9
    assert gram.kept == pytest.approx(exact.kept, rel=1e-12)
    # a rank-3 matrix: components beyond its rank are rounding, and dropped
    low = torch.randn(shape[0], 3, generator=generator, dtype=torch.float64) @ \
        torch.randn(3, shape[1], generator=generator, dtype=torch.float64)
    top = truncated(low, 8)
    assert top.s.numel() == 3 and (top.product() - low).abs().max() < 1e-9


def test_full_rank_and_non_matrices_are_unchanged():
    ctx = TensorContext("w")
    x = torch.randn(6, 4)
    assert torch.allclose(lowrank([x], ctx, rank=4), x)
    v = torch.randn(7)
    assert torch.equal(lowrank([v], ctx, rank=1), v)
    k = torch.randn(2, 3, 4)
    assert torch.equal(lowrank([k], ctx, rank=1), k)


def test_explain_shows_lowrank_and_a_model_argument_is_an_error():
    text = tvlang.compile("pre + lowrank(ft - pre, 16)").explain()
    assert "lowrank(b1, rank=16)" in text
    with pytest.raises(tvlang.TvlangError) as info:
        tvlang.compile("lowrank(ft, 16)", sources={"ft": "model"})
    assert "lowrank(ft - pre, 16)" in info.value.render()
    with pytest.raises(tvlang.TvlangError, match="rank"):
        tvlang.compile("pre + lowrank(ft - pre, 0)")


def test_lowrank_streams_a_checkpoint_like_a_naive_evaluation(tmp_path):
    from tvlang.testing.synth import llama_spec, write_synthetic

    spec = llama_spec(hidden=32, layers=2, vocab=64, intermediate=48)
    write_synthetic(tmp_path / "pre", spec, seed=0)
    write_synthetic(tmp_path / "ft", spec, seed=1, finetune_of=0)
    tvlang.compile("pre + lowrank(ft - pre, 4)").run({"pre": str(tmp_path / "pre"), "ft": str(tmp_path / "ft")},
                                                     str(tmp_path / "out"))
    pre = load_file(str(tmp_path / "pre" / "model.safetensors"))
    ft = load_file(str(tmp_path / "ft" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in pre.items():
        if not tensor.dtype.is_floating_point:
            assert torch.equal(out[name], tensor)
        elif tensor.dim() == 2:
            assert (out[name] - (tensor + naive_lowrank(ft[name] - tensor, 4))).abs().max() <= 1e-5
        else:
            assert torch.allclose(out[name], ft[name], atol=1e-6)


# -- adapters as inputs of similarity and bases ------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    pytest.importorskip("peft")
    from lora_models import make_adapter, tiny_llama

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama(str(root / "base"))
    merged = {}
    for seed, name in enumerate("abc", start=1):
        modules = ["q_proj", "v_proj"] if name != "c" else ["q_proj", "o_proj"]
        merged[name] = make_adapter(base, str(root / name), seed=seed, r=4, lora_alpha=8, target_modules=modules)
    pre = load_file(os.path.join(base, "model.safetensors"))
    deltas = {n: {k: merged[n][k] - pre[k] for k in pre if pre[k].dtype.is_floating_point} for n in merged}
    return base, {n: str(root / n) for n in "abc"}, deltas


def test_similarity_of_adapters_equals_that_of_their_dense_deltas(adapters):
    from tvlang.bases import similarity

    base, paths, deltas = adapters
    got = similarity([(n, "lora:" + p) for n, p in paths.items()], base=base)
    dense = similarity(list(deltas.items()), deltas=list(deltas))
    assert got.names == dense.names
    assert abs(got.gram - dense.gram).max() <= 1e-6 * abs(dense.gram).max()
    # without a base the first adapter's names are the reference: b adapts the same modules
    # as a, c adapts one that a leaves alone, which is an error naming it
    alone = similarity([(n, "lora:" + paths[n]) for n in "ab"])
    assert abs(alone.cosine - dense.cosine[:2, :2]).max() <= 1e-6
    with pytest.raises(tvlang.TvlangError, match="o_proj.lora_A.weight' changes"):
        similarity([(n, "lora:" + paths[n]) for n in "ac"])


def test_similarity_and_bases_commands_take_lora_inputs(adapters, tmp_path, capsys):
    from tvlang.faces.cli import main

    base, paths, _ = adapters
    inputs = [f"{n}=lora:{p}" for n, p in paths.items()]
    assert main(["similarity", *inputs, "--base", base, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"names"' in out and '"a"' in out
    assert main(["bases", *inputs, "--base", base, "-o", str(tmp_path / "bases"), "--k", "2"]) == 0
    assert (tmp_path / "bases" / "manifest.json").exists()
