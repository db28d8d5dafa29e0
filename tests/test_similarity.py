"""Streaming similarity (tvlang.bases.gram.similarity) and the ``tvlang similarity`` command."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tvlang.bases.gram import Similarity, similarity
from tvlang.faces.cli import main
from tvlang.errors import TvlangError

SHAPES = {"enc.0.weight": (6, 5), "enc.0.bias": (5,), "enc.1.weight": (7, 3), "head.weight": (2, 4, 3)}


def _state(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    sd = {name: scale * torch.randn(shape, generator=gen, dtype=torch.float64).float() for name, shape in SHAPES.items()}
    sd["steps"] = torch.tensor([3, 1, 4], dtype=torch.int64)  # an integer buffer: skipped
    return sd


def _flat(sd, names=None) -> np.ndarray:
    names = names or [n for n in SHAPES]
    return np.concatenate([sd[n].double().reshape(-1).numpy() for n in names])


@pytest.fixture()
def models():
    gen = torch.Generator().manual_seed(7)
    pre = _state(gen)
    fts = {}
    for name in ("a", "b", "c"):
        delta = _state(gen, 0.1)
        fts[name] = {n: (pre[n] + delta[n]) if n in SHAPES else pre[n].clone() for n in pre}
    # b shares a's direction: a non-trivial cosine
    fts["b"] = {n: (fts["b"][n] + (fts["a"][n] - pre[n])) if n in SHAPES else pre[n].clone() for n in pre}
    return pre, fts


def _direct_cosine(pre, fts, names=None):
    vectors = [_flat(ft, names) - _flat(pre, names) for ft in fts.values()]
    gram = np.array([[u @ v for v in vectors] for u in vectors])
    norms = np.sqrt(np.diag(gram))
    return gram, gram / np.outer(norms, norms)


def test_hand_computed_gram_norms_and_cosine():
    pre = {"w": torch.zeros(3)}
    a = {"w": torch.tensor([1.0, 0.0, 0.0])}
    b = {"w": torch.tensor([1.0, 1.0, 0.0])}
    sim = similarity({"a": a, "b": b}, base=pre)
    assert sim.gram.tolist() == [[1.0, 1.0], [1.0, 2.0]]
    assert sim.norms.tolist() == [1.0, math.sqrt(2.0)]
    assert sim.cosine[0, 1] == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert sim.to_dict()["names"] == ["a", "b"]


def test_streamed_cosine_equals_direct_cosine_of_concatenation(models):
    pre, fts = models
    sim = similarity(fts, base=pre)
    gram, cos = _direct_cosine(pre, fts)
    np.testing.assert_allclose(sim.cosine, cos, atol=1e-6, rtol=0)
    np.testing.assert_allclose(sim.gram, gram, rtol=1e-6)
    assert sim.tensors == list(SHAPES)  # base file order, integer buffer skipped
    assert sim.elements == sum(math.prod(s) for s in SHAPES.values())
    assert 0.5 < sim.cosine[0, 1] < 0.9  # the planted shared direction shows


def _save_all(tmp_path, pre, fts, dtype=torch.float32, delta_names=()):
    paths = {}
    save_file({n: (t.to(dtype) if t.is_floating_point() else t) for n, t in pre.items()}, str(tmp_path / "pre.safetensors"))
    for name, ft in fts.items():
        path = str(tmp_path / f"{name}.safetensors")
        if name in delta_names:
            tensors = {n: (ft[n] - pre[n]).to(dtype) for n in SHAPES}
            save_file(tensors, path, metadata={"tvlang.kind": "delta"})
        else:
            save_file({n: (t.to(dtype) if t.is_floating_point() else t) for n, t in ft.items()}, path)
        paths[name] = path
    return str(tmp_path / "pre.safetensors"), paths


def test_files_read_in_ranges_match_state_dicts(tmp_path, models):
    pre, fts = models
    base, paths = _save_all(tmp_path, pre, fts)
    from_files = similarity(paths, base=base)
    from_memory = similarity(fts, base=pre)
    np.testing.assert_allclose(from_files.gram, from_memory.gram, rtol=1e-12)


def test_safetensors_inputs_are_never_read_whole(tmp_path, models, monkeypatch):
    """Memory stays one chunk per input: safetensors tensors are read in ranges, not whole."""
    from tvlang.io import SafetensorsReader

    pre, fts = models
    base, paths = _save_all(tmp_path, pre, fts)

    def whole_read(self, name):
        raise AssertionError(f"read whole tensor {name}")

    monkeypatch.setattr(SafetensorsReader, "read", whole_read)
    _, cos = _direct_cosine(pre, fts)
    np.testing.assert_allclose(similarity(paths, base=base, chunk_bytes=256).cosine, cos, atol=1e-6)


@pytest.mark.parametrize("n_inputs", [2, 12])
def test_chunk_buffers_stay_within_the_budget_whatever_n(tmp_path, models, monkeypatch, n_inputs):
    pre, fts = models
    base, paths = _save_all(tmp_path, pre, fts)
    inputs = {f"t{i}": paths["abc"[i % 3]] for i in range(n_inputs)}
    allocated = []
    real_empty = torch.empty

    def recording_empty(*shape, **kwargs):
        tensor = real_empty(*shape, **kwargs)
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("tvlang", "bases", "gram_stream.py")):
            allocated.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    budget = 1024
    sim = similarity(inputs, base=base, chunk_bytes=budget)
    assert len(allocated) == 2 and sum(allocated) <= budget  # two chunk buffers, nothing per input
    assert sum(allocated) > budget // 2  # and the budget is used: chunks are as wide as it allows
    _, cos = _direct_cosine(pre, fts)
    assert sim.cosine[0, 1] == pytest.approx(cos[0, 1], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunking_gives_the_same_gram(tmp_path, models, dtype):
    pre, fts = models
    base, paths = _save_all(tmp_path, pre, fts, dtype=dtype)
    whole = similarity(paths, base=base, dtype=torch.float64)
    # 3 inputs + base rows of float64, two buffers: 192 bytes -> 3 elements per chunk
    tiny = similarity(paths, base=base, chunk_bytes=192, dtype=torch.float64)
    np.testing.assert_allclose(tiny.gram, whole.gram, rtol=1e-13, atol=1e-15)
    # float32 products (the default): the same up to float32 rounding of each product
    f32 = similarity(paths, base=base, chunk_bytes=96)
    np.testing.assert_allclose(f32.gram, whole.gram, rtol=1e-6)


def test_delta_files_without_base_and_mixed_inputs(tmp_path, models):
    pre, fts = models
    base, paths = _save_all(tmp_path, pre, fts, delta_names=("a", "b", "c"))
    _, cos = _direct_cosine(pre, fts)
    only_deltas = similarity(paths)  # metadata says delta: no base needed
    np.testing.assert_allclose(only_deltas.cosine, cos, atol=1e-6)
    mixed_dir = tmp_path / "mixed"
    mixed_dir.mkdir()
    base, mixed = _save_all(mixed_dir, pre, fts, delta_names=("b",))
    np.testing.assert_allclose(similarity(mixed, base=base).cosine, cos, atol=1e-6)


def test_forced_delta_for_state_dicts(models):
    pre, fts = models
    deltas = {name: {n: ft[n] - pre[n] for n in SHAPES} for name, ft in fts.items()}
    _, cos = _direct_cosine(pre, fts)
    np.testing.assert_allclose(similarity(deltas, deltas=list(deltas)).cosine, cos, atol=1e-6)


def test_include_and_exclude_globs(models):
    pre, fts = models
    enc = similarity(fts, base=pre, include=["enc.*"])
    _, cos = _direct_cosine(pre, fts, ["enc.0.weight", "enc.0.bias", "enc.1.weight"])
    np.testing.assert_allclose(enc.cosine, cos, atol=1e-6)
    assert enc.tensors == ["enc.0.weight", "enc.0.bias", "enc.1.weight"]
    no_bias = similarity(fts, base=pre, include=["enc.*"], exclude=["*.bias"])
    assert no_bias.tensors == ["enc.0.weight", "enc.1.weight"]
    with pytest.raises(TvlangError, match=r"no floating-point tensors matching the filters"):
        similarity(fts, base=pre, include=["decoder.*"])


def test_zero_task_vector_has_cosine_zero(models):
    pre, fts = models
    fts = dict(fts, z={n: t.clone() for n, t in pre.items()})
    sim = similarity(fts, base=pre)
    assert sim.norms[3] == 0.0
    assert sim.cosine[3].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert sim.cosine[:, 3].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert [sim.cosine[i, i] for i in range(3)] == [1.0, 1.0, 1.0]


def test_nan_in_a_task_vector_is_an_error_naming_it(models):
    pre, fts = models
    nan = {n: t.clone() for n, t in fts["b"].items()}
    nan["enc.1.weight"][2, 1] = float("nan")
    with pytest.raises(TvlangError, match=r"task vector 'b' has NaN or infinite entries"):
        similarity({"a": fts["a"], "b": nan}, base=pre)


def test_errors_name_the_tensor_and_the_input(models):
    pre, fts = models
    broken = {n: t for n, t in fts["a"].items() if n != "enc.1.weight"}
    with pytest.raises(TvlangError, match=r"tensor 'enc.1.weight' is in .* but missing from <state dict 'bad'>") as err:
        similarity({"a": fts["a"], "bad": broken}, base=pre)
    assert err.value.tensor == "enc.1.weight"
    wrong = dict(fts["a"], **{"head.weight": torch.zeros(3, 4, 2)})
    with pytest.raises(TvlangError, match=r"'head.weight' has shape \[3, 4, 2\] in <state dict 'w'>.* but \[2, 4, 3\]"):
        similarity({"w": wrong}, base=pre)
    ints = dict(fts["a"], **{"enc.0.bias": torch.zeros(5, dtype=torch.int32)})
    with pytest.raises(TvlangError, match=r"'enc.0.bias' is torch.int32 in <state dict 'i'> \('i'\) but floating point"):
        similarity({"i": ints}, base=pre)
    with pytest.raises(TvlangError, match=r"'a' is a model, not a task vector, and no base was given"):
        similarity(fts)
    with pytest.raises(TvlangError, match=r"given twice"):
        similarity([("a", fts["a"]), ("a", fts["b"])], base=pre)


def test_progress_reports_each_tensor_once_in_file_order(models):
    pre, fts = models
    calls = []
    similarity(fts, base=pre, chunk_bytes=64, progress=lambda *a: calls.append(a))
    assert calls == [(name, i, len(SHAPES)) for i, name in enumerate(SHAPES)]


def test_extra_float_tensor_in_an_input_is_an_error(models):
    pre, fts = models
    extra = dict(fts["a"], **{"enc.2.weight": torch.ones(2)})
    with pytest.raises(TvlangError, match=r"tensor 'enc.2.weight' is in <state dict 'x'> \('x'\) but not in"):
        similarity({"x": extra}, base=pre)
    # outside the filters it does not matter
    assert similarity({"x": extra}, base=pre, include=["enc.0.*"]).tensors == ["enc.0.weight", "enc.0.bias"]


def test_sharded_directories_and_torch_files(tmp_path, models, monkeypatch):
    """Every reader is read in ranges (read_into), whatever its format: no tensor is read whole."""
    from tvlang.io import SafetensorsReader, ShardedReader, StateDictReader
    from tvlang.testing.synth import write_checkpoint

    def whole_read(self, name):
        raise AssertionError(f"{type(self).__name__} read whole tensor {name}")

    for reader_class in (SafetensorsReader, ShardedReader, StateDictReader):
        monkeypatch.setattr(reader_class, "read", whole_read)
    pre, fts = models
    write_checkpoint(str(tmp_path / "pre"), pre, shard_size=200)
    write_checkpoint(str(tmp_path / "a"), fts["a"], shard_size=300)
    write_checkpoint(str(tmp_path / "b"), fts["b"])
    torch.save(fts["c"], str(tmp_path / "c.bin"))
    assert len([f for f in os.listdir(tmp_path / "a") if f.endswith(".safetensors")]) > 1
    paths = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "c": str(tmp_path / "c.bin")}
    _, cos = _direct_cosine(pre, fts)
    np.testing.assert_allclose(similarity(paths, base=str(tmp_path / "pre"), chunk_bytes=256).cosine, cos, atol=1e-6)


def test_format_table_aligns_names_and_three_decimals():
    sim = Similarity(names=["mnist", "svhn"], gram=np.array([[4.0, -1.0], [-1.0, 1.0]]))
    assert sim.format_table() == (
        "        mnist    svhn\n"
        "mnist   1.000  -0.500\n"
        "svhn   -0.500   1.000"
    )


# -- the command ------------------------------------------------------------------------

@pytest.fixture()
def files(tmp_path, models):
    pre, fts = models
    return _save_all(tmp_path, pre, fts)


def test_cli_table(files, capsys, models):
    base, paths = files
    code = main(["similarity", "--base", base, *[f"{n}={p}" for n, p in paths.items()]])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    _, cos = _direct_cosine(*models)
    assert out[0].split() == ["a", "b", "c"]
    assert out[1].split() == ["a", "1.000", f"{cos[0, 1]:.3f}", f"{cos[0, 2]:.3f}"]
    assert out[3].split()[0] == "c"
    assert out[4].startswith("# 4 tensors, 80 parameters per task vector")


def test_cli_json(files, capsys, models):
    base, paths = files
    code = main(["similarity", "--base", base, "--json", "--exclude", "head.*", *[f"{n}={p}" for n, p in paths.items()]])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["names"] == ["a", "b", "c"]
    _, cos = _direct_cosine(*models, names=["enc.0.weight", "enc.0.bias", "enc.1.weight"])
    np.testing.assert_allclose(np.array(data["cosine"]), cos, atol=1e-6)
    assert len(data["norms"]) == 3 and all(n > 0 for n in data["norms"])


def test_cli_usage_and_data_errors(files, capsys):
    base, paths = files
    assert main(["similarity", "--base", base, "noequals"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert main(["similarity", "--base", base]) == 2
    assert "at least one task vector" in capsys.readouterr().err
    assert main(["similarity", f"a={paths['a']}", f"a={paths['b']}"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["similarity", f"a={paths['a']}"]) == 1
    assert "'a' is a model, not a task vector, and no base was given" in capsys.readouterr().err
    assert main(["similarity", "--base", base, "a=/nonexistent/x.safetensors"]) == 1
    assert "/nonexistent/x.safetensors" in capsys.readouterr().err
    assert main(["similarity", "--base", base, f"a={paths['a']}", "--threshold", "0.5"]) == 2


def test_cli_delta_prefix(tmp_path, models, capsys):
    pre, fts = models
    for name, ft in fts.items():  # task vectors written without tvlang metadata
        save_file({n: ft[n] - pre[n] for n in SHAPES}, str(tmp_path / f"{name}.safetensors"))
    args = [f"{n}=delta:{tmp_path / n}.safetensors" for n in fts]
    assert main(["similarity", "--json", *args]) == 0
    _, cos = _direct_cosine(pre, fts)
    np.testing.assert_allclose(np.array(json.loads(capsys.readouterr().out)["cosine"]), cos, atol=1e-6)


def test_cli_plot_writes_png(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    base, paths = files
    out = tmp_path / "sim.png"
    assert main(["similarity", "--base", base, "--plot", str(out), *[f"{n}={p}" for n, p in paths.items()]]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"# heatmap written to {out}" in capsys.readouterr().out


def test_cli_plot_without_matplotlib_says_which_extra(files, monkeypatch, capsys, tmp_path):
    base, paths = files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    code = main(["similarity", "--base", base, "--plot", str(tmp_path / "x.png"), f"a={paths['a']}"])
    assert code == 1
    assert "pip install tvlang[bases]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_without_scikit_learn_keeps_input_order(files, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    base, paths = files
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    out = tmp_path / "sim.png"
    code = main(["similarity", "--base", base, "--plot", str(out), *[f"{n}={p}" for n, p in paths.items()]])
    assert code == 0 and out.exists()
    assert "scikit-learn is not installed; heatmap in input order" in capsys.readouterr().err
