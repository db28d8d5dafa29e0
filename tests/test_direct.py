"""The torch-free executor (tvlang.run.direct): the local executor's files, byte for byte, without torch.

Every run here is made twice, by ``Plan.run`` as it is (the direct executor where it applies) and
with ``TVLANG_DIRECT=0`` (the local executor), and every file of the two outputs is compared byte
for byte; the values are also checked against a naive eager computation.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.ops import magprune
from tvlang.ops.native import linear_steps
from tvlang.run import direct
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

pytestmark = pytest.mark.skipif(linear_steps() is None,
                                reason="the compiled helper is not built, or this CPU lacks AVX2 and FMA")

SPEC = llama_spec(hidden=16, layers=2, vocab=40, intermediate=24)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """pre, a, b as model directories (with config.json); an integer tensor, a 0-dim tensor and
    an empty one among the float tensors; values with a sign, ties and a -0.0."""
    root = tmp_path_factory.mktemp("direct")
    pre = make_state_dict(SPEC, seed=0)
    pre["position_ids"] = torch.arange(7, dtype=torch.int64)
    pre["scale"] = torch.tensor(0.5)
    pre["empty"] = torch.zeros(0, 3)
    pre["model.norm.weight"][0] = -0.0
    tensors = {"pre": pre, "a": finetune_like(pre, seed=1), "b": finetune_like(pre, seed=2)}
    for sd in tensors.values():
        sd["position_ids"] = pre["position_ids"].clone()
    paths = {name: write_checkpoint(str(root / name), sd) for name, sd in tensors.items()}
    return root, paths, tensors


def files_of(path) -> dict[str, bytes]:
    """Every file of an output (a file, or a directory's files), by name."""
    if os.path.isfile(path):
        return {"": Path(path).read_bytes()}
    return {name: Path(path, name).read_bytes() for name in sorted(os.listdir(path))}


def results_of(monkeypatch, owner, name: str) -> list:
    """What each call of ``owner.name`` returns from now on, in order (the function still runs)."""
    returned = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(owner, name, spy)
    return returned


def both(monkeypatch, tmp_path, text, bindings, out_names, **options):
    """(direct summary, local summary, direct files, local files): the recipe run by each executor."""
    ran = []
    real = direct.attempt

    def spy(*args, **kwargs):
        summary = real(*args, **kwargs)
        ran.append(summary is not None)
        return summary

    monkeypatch.setattr(direct, "attempt", spy)
    results = []
    for executor in ("direct", "local"):
        if executor == "local":
            monkeypatch.setenv(direct.DISABLE, "0")
        out = {name: str(tmp_path / executor / path) for name, path in out_names.items()}
        summary = tvlang.compile(text).run(bindings, out if len(out) > 1 else next(iter(out.values())), **options)
        results.append((summary, {name: files_of(path) for name, path in out.items()}))
    monkeypatch.delenv(direct.DISABLE)
    assert ran == [True, False]  # the direct executor ran the first, and let the second go
    (fast, fast_files), (local, local_files) = results
    return fast, local, fast_files, local_files


def same_report(fast, local, tmp_path) -> None:
    a, b = fast.to_dict(), local.to_dict()
    a.pop("seconds"), b.pop("seconds")
    text = json.dumps(a).replace(str(tmp_path / "direct"), "OUT")
    assert text == json.dumps(b).replace(str(tmp_path / "local"), "OUT")


def test_task_arithmetic_directory_same_bytes_as_the_local_executor(models, tmp_path, monkeypatch):
    root, paths, sd = models
    fast, local, fast_files, local_files = both(
        monkeypatch, tmp_path, "pre + 0.4*(a - b) + 0.7*(b - pre)", paths, {"out": "merged"})
    assert fast_files == local_files
    assert sorted(fast_files["out"]) == ["README.md", "config.json", "model.safetensors"]
    same_report(fast, local, tmp_path)
    got = load_file(str(tmp_path / "direct" / "merged" / "model.safetensors"))
    for name, p in sd["pre"].items():  # against a naive eager computation (fused: as torch's CPU kernels)
        if p.dtype.is_floating_point:
            expected = torch.add(torch.add(torch.mul(p, 0.3), sd["a"][name], alpha=0.4), sd["b"][name], alpha=0.3)
            assert torch.equal(got[name], expected), name
        else:
            assert torch.equal(got[name], p)
    assert got["model.norm.weight"].dtype == torch.float32 and got["empty"].shape == (0, 3)


def test_the_helpers_kernels_same_bytes(models, tmp_path, monkeypatch):
    """nearswap and ram run here too (the local executor calls the same helper loops)."""
    root, paths, sd = models
    text = "pre + ram(a - pre, b - pre, epsilon=0.01) + 0.5*nearswap(pre, a, 0.005) - 0.5*pre"
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged"})
    assert fast_files == local_files
    same_report(fast, local, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_models_same_bytes(models, tmp_path, monkeypatch, dtype):
    """bfloat16 and float16 inputs are computed in float32 and written in the base's dtype (or
    float32 with out_dtype), rounded as torch rounds them; a float32 input among them is read as it is."""
    root, _, sd = models
    half = {}
    for name in ("pre", "a"):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd[name].items()}
        half[name] = write_checkpoint(str(tmp_path / f"{name}16"), tensors)
    bound = {**half, "b": models[1]["b"]}  # float32
    text = "pre + 0.4*(a - b) + 0.7*(b - pre)"
    for out_dtype in (None, "float32"):
        fast, local, fast_files, local_files = both(monkeypatch, tmp_path / str(out_dtype), text, bound,
                                                    {"out": "merged"}, out_dtype=out_dtype)
        assert fast_files == local_files
        same_report(fast, local, tmp_path / str(out_dtype))
    got = load_file(str(tmp_path / "None" / "direct" / "merged" / "model.safetensors"))
    assert got["lm_head.weight"].dtype == dtype and got["position_ids"].dtype == torch.int64


def test_sharded_inputs_same_bytes(models, tmp_path, monkeypatch):
    """A sharded model (an index and its shards) is read shard by shard, in the local executor's order."""
    _, paths, sd = models
    sharded = write_checkpoint(str(tmp_path / "pre-sharded"), sd["pre"], shard_size=3000)
    assert "model.safetensors.index.json" in os.listdir(sharded)
    index = os.path.join(sharded, "model.safetensors.index.json")
    for pre in (sharded, index):
        fast, local, fast_files, local_files = both(
            monkeypatch, tmp_path / os.path.basename(pre), "pre + 0.5*(a - pre)", {"pre": pre, "a": paths["a"]},
            {"out": "merged"})
        assert fast_files == local_files
        same_report(fast, local, tmp_path / os.path.basename(pre))


def test_several_outputs_a_delta_and_a_file(models, tmp_path, monkeypatch):
    root, paths, sd = models
    text = "out tau = a - pre\nout merged = pre + 0.5*tau + 0.25*(b - pre)\n"
    fast, local, fast_files, local_files = both(
        monkeypatch, tmp_path, text, paths, {"tau": "tau.safetensors", "merged": "merged"})
    assert fast_files == local_files
    same_report(fast, local, tmp_path)
    tau = load_file(str(tmp_path / "direct" / "tau.safetensors"))
    assert "position_ids" not in tau  # a Delta holds the computed tensors only
    assert torch.equal(tau["lm_head.weight"], sd["a"]["lm_head.weight"] - sd["pre"]["lm_head.weight"])


def test_chunk_boundaries_and_shards(models, tmp_path, monkeypatch):
    root, paths, _ = models
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", 100)  # every large tensor in several chunks, a short last one
    fast, local, fast_files, local_files = both(
        monkeypatch, tmp_path, "(a + b)/2", {"a": paths["a"], "b": paths["b"]}, {"out": "soup"}, shard_size=4000)
    assert fast_files == local_files
    assert "model.safetensors.index.json" in fast_files["out"]


def test_recipe_file_with_load_paths_records_them_relative(models, tmp_path, monkeypatch):
    root, paths, _ = models
    recipe = root / "soup.tv"
    recipe.write_text('a = load("a")\nraw = load_delta("a")\nout = a - 0.5*raw\n')
    plan = tvlang.compile(recipe.read_text(), filename=str(recipe))
    outs = {}
    for executor in ("direct", "local"):
        if executor == "local":
            monkeypatch.setenv(direct.DISABLE, "0")
        plan.run({}, str(tmp_path / executor))
        outs[executor] = files_of(tmp_path / executor)
    assert outs["direct"] == outs["local"]
    data = outs["direct"]["model.safetensors"]
    metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert json.loads(metadata["tvlang.inputs"]) == {"a": "a", "raw": "a"}  # relative to the recipe's folder


@pytest.mark.parametrize("text", ["pre + 0.5*(a - pre)", "pre + dare(a - pre, 0.9, seed=2)",
                                  "pre + dare_ties(a - pre, a - pre, p=0.5)",
                                  "pre + ties(a - pre, a - pre, density=0.3)", "slerp(pre, a, t=0.3)",
                                  "model_stock(pre, a, a, a)", "pre + sce(a - pre, 0.5*(a - pre), select_topk=0.5)",
                                  "pre + random_like(a - pre, seed=1)",
                                  "pre + dare_ties(a - pre, a - pre, p=0.5, rescale_by='l1')",
                                  "pre + della(a - pre, a - pre, density=0.3, epsilon=0.1)",
                                  "pre + della(a - pre, a - pre, density=0.3, epsilon=0.1, rescale_by='l1')",
                                  "pre + cos(a - pre, 0.5*(a - pre))*(a - pre)"])
def test_the_command_imports_no_torch(models, tmp_path, text):
    _, paths, _ = models
    out = tmp_path / "merged"
    code = textwrap.dedent(f"""
        import sys
        from tvlang.faces.cli import main
        code = main(["run", "-e", "{text}", "--bind", "pre={paths['pre']}", "--bind",
                     "a={paths['a']}", "-o", "{out}", "-q"])
        print(code, "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "False"]
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["f64", "nonfinite-bf16", "kernel", "reduction", "prefixed", "device", "dare-l1",
                                  "dare_ties-weights", "per-tensor-weights", "ties-l1", "ties-and-dare",
                                  "filter_wise", "nuslerp-rows", "slerp-and-ties", "sce-and-dare", "sce-nested"])
def test_what_it_leaves_to_the_local_executor(models, tmp_path, case):
    root, paths, sd = models
    bindings = dict(paths)
    text, options = "pre + 0.5*(a - pre)", {}
    if case == "f64":
        bindings["a"] = write_checkpoint(str(tmp_path / "a64"), {k: v.double() if v.is_floating_point()
                                                                 else v for k, v in sd["a"].items()})
    elif case == "nonfinite-bf16":  # a NaN written in bfloat16 would have to be torch's NaN
        bindings["a"] = write_checkpoint(str(tmp_path / "a16"), {k: v.to(torch.bfloat16) if v.is_floating_point()
                                                                 else v for k, v in sd["a"].items()})
        options["allow_nonfinite"] = True
    elif case == "kernel":
        text = "pre + topk(a - pre, 0.5)"
    elif case == "ties-l1":  # its norms are a pass of their own
        text = 'pre + ties(a - pre, b - pre, density=0.5, rescale_by="l1")'
    elif case == "filter_wise":  # a ratio per row: the local executor's
        text = "model_stock(pre, a, b, filter_wise=true)"
    elif case == "nuslerp-rows":
        text = "nuslerp(a, b, 0.5, flatten=false)"
    elif case == "sce-and-dare":  # one kind of pass before the main one
        text = "pre + sce(a - pre, b - pre, select_topk=0.5) + dare(a - pre, 0.5)"
    elif case == "sce-nested":  # its passes would run the call before it
        text = "pre + sce(nearswap(a, b, 0.1) - pre, b - pre, select_topk=0.5)"
    elif case == "slerp-and-ties":  # one kind of pass before the main one
        text = "slerp(pre, a, t=0.5) + ties(a - pre, b - pre, density=0.5)"
    elif case == "ties-and-dare":  # the thresholds' passes would draw the masks again
        text = "pre + ties(a - pre, b - pre, density=0.5) + dare(b - pre, 0.5)"
    elif case == "reduction":  # a whole-model scalar of a kernel's result: the kernel would run in its pass
        text = "pre + 0.1*(a - pre)/norm(topk(a - pre, 0.5))"
    elif case == "per-tensor-weights":  # ties' sign merge in the helper: unit weights, known before the run
        text = "pre + ties(a - pre, b - pre, density=0.5, weights=[layers(0, 1), 1])"
    elif case == "dare-l1":  # its norms' pass would run the call before it (its masks are the main pass's)
        text = 'pre + dare(dare(a - pre, 0.5), 0.5, rescale_by="l1")'
    elif case == "dare_ties-weights":  # the helper's sign merge takes unit weights only
        text = "pre + dare_ties(a - pre, b - pre, p=0.5, weights=[0.5, 1])"
    elif case == "prefixed":
        bindings["a"] = write_checkpoint(str(tmp_path / "pa"), {f"module.{k}": v for k, v in sd["a"].items()})
    else:
        options["device"] = "meta"
    plan = tvlang.compile(text)
    used = {k: v for k, v in bindings.items() if k in plan.checked.sources}
    assert direct.attempt(plan, used, str(tmp_path / "out"), dtype="float32", out_dtype=None, shard_size=None,
                          force=False, missing="error", progress=False, executor="local", address=None,
                          workers=None, lock=None, model_card=True, task_timeout=None, config=None,
                          **{"device": "cpu", "allow_nonfinite": False, **options}) is None
    assert not (tmp_path / "out").exists()
    assert not [e for e in os.listdir(tmp_path) if "tvtmp" in e]


def test_a_nonfinite_result_is_the_local_executors_error(models, tmp_path):
    _, paths, sd = models
    big = dict(sd["a"])
    big["model.norm.weight"] = big["model.norm.weight"].clone()
    big["model.norm.weight"][1] = 3e38  # twice that is beyond float32
    bound = {"pre": paths["pre"], "a": write_checkpoint(str(tmp_path / "big"), big)}
    with pytest.raises(TvlangError) as err:
        tvlang.compile("pre + 2*(a - pre)").run(bound, str(tmp_path / "out"))
    assert err.value.message == "output 'out': tensor 'model.norm.weight' has a non-finite value (inf) at index (1,)"
    assert sorted(os.listdir(tmp_path)) == ["big"]


@pytest.mark.skipif(linear_steps() is None, reason="the fused loops are the torch-free executor's (AVX2, FMA)")
@pytest.mark.parametrize("text", ["pre + 2*dare(a - pre, 0.5, seed=1) + 2*dare(b - pre, 0.5, seed=2)",
                                  "pre + 2*breadcrumbs(a - pre, density=0.5, gamma=0.01)",
                                  "pre + 2*ties(a - pre, b - pre, density=0.5)",
                                  "pre + 2*dare_ties(a - pre, b - pre, p=0.5)",
                                  "pre + 2*della(a - pre, b - pre, density=0.5, epsilon=0.1, seed=1)",
                                  "pre + 2*dare_ties(a - pre, b - pre, p=0.5, rescale_by='l1')",
                                  "pre + 2*della(a - pre, b - pre, density=0.5, epsilon=0.1, rescale_by='l1')"])
def test_the_fused_loops_check_what_they_write(models, tmp_path, monkeypatch, text):
    """A chain of DARE or breadcrumbs calls, one fused call, a whole ties or dare_ties call, a della
    call's rows, dare_ties and della with the L1 rule (their main pass in the fused loop): the
    helper's loop says whether an entry it wrote is not finite, so the writes make no check of their
    own (``tv_nonfinite_f32`` is not called; before, once a tensor); the same files as the local
    executor. An entry beyond float32 (every entry of a's model.norm.weight 3e38, twice that kept) is
    the local executor's error all the same, naming the output, the tensor and the entry."""
    _, paths, sd = models
    lib = linear_steps()
    calls = []
    real = lib.tv_nonfinite_f32
    monkeypatch.setattr(lib, "tv_nonfinite_f32", lambda at, n: calls.append(n) or real(at, n))
    plan = tvlang.compile(text)
    plan.run(paths, str(tmp_path / "fast"), allow_unused=True)
    assert calls == []
    monkeypatch.setenv(direct.DISABLE, "0")
    plan.run(paths, str(tmp_path / "slow"), allow_unused=True)
    assert files_of(tmp_path / "fast") == files_of(tmp_path / "slow")
    big = dict(sd["a"])
    big["model.norm.weight"] = torch.full_like(big["model.norm.weight"], 3e38)
    bound = {**paths, "a": write_checkpoint(str(tmp_path / "big"), big)}
    messages = []
    for executor in ("local", "direct"):
        if executor == "direct":
            monkeypatch.delenv(direct.DISABLE)
        with pytest.raises(TvlangError) as err:
            plan.run(bound, str(tmp_path / f"out-{executor}"), allow_unused=True)
        messages.append(err.value.message)
    assert messages[0] == messages[1]
    assert messages[0].startswith("output 'out': tensor 'model.norm.weight' has a non-finite value (inf) at")
    assert sorted(os.listdir(tmp_path)) == ["big", "fast", "slow"]


def test_an_output_that_is_an_input_is_refused(models, tmp_path, monkeypatch):
    root, paths, _ = models
    before = files_of(paths["a"])
    messages = []
    for executor in ("direct", "local"):
        if executor == "local":
            monkeypatch.setenv(direct.DISABLE, "0")
        with pytest.raises(TvlangError) as err:
            tvlang.compile("pre + 0.5*(a - pre)").run({"pre": paths["pre"], "a": paths["a"]}, paths["a"],
                                                      force=True)
        messages.append(err.value.message)
    assert messages[0] == messages[1] and "input" in messages[0]
    assert files_of(paths["a"]) == before


@pytest.mark.parametrize("text", ["pre + 0.5*(a - pre)", "pre + dare(a - pre, 0.5)",
                                  "pre + ties(a - pre, b - pre, density=0.3)", "slerp(pre, a, t=0.5)",
                                  "pre + della(a - pre, b - pre, density=0.3, epsilon=0.1)"])
@pytest.mark.parametrize("at", [2, 5])
def test_ctrl_c_leaves_nothing(models, tmp_path, monkeypatch, text, at):
    """Interrupted on the main thread (as a chunk starts; ``della``: while the rows of the chunk
    before are sampled) or (ties) on the thread that finds the next tensor's thresholds: nothing
    written is left, and no thread of the run outlives it."""
    _, paths, _ = models
    calls = []
    real = direct._steps

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(direct, "_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tvlang.compile(text).run(paths, str(tmp_path / "out"), allow_unused=True)
    assert os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith(("tvlang-masks", "tvlang-ahead",
                                                                       "tvlang-writes"))]


def test_steps_equal_torch_bit_for_bit():
    lib = linear_steps()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100_003, generator=generator) * 3
    y = torch.randn(100_003, generator=generator)
    x[:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 1e-40, -1e-40, 3.4e38])
    y[:8] = torch.tensor([1.0, float("inf"), 2.0, -0.0, -0.0, 1e-40, 1e38, 3.4e38])
    for c in (0.4, -0.4, 0.7, 1 / 3, 1.0, 0.30000000000000004):
        out = torch.empty_like(x)
        lib.tv_scale_f32(x.data_ptr(), c, x.numel(), out.data_ptr())
        assert torch.equal(out.view(torch.int32), torch.mul(x, c).view(torch.int32)), c
        acc = x.clone()
        lib.tv_axpy_f32(acc.data_ptr(), y.data_ptr(), c, x.numel())
        expected = torch.add(x, y, alpha=c)
        same = (acc.view(torch.int32) == expected.view(torch.int32)) | (acc.isnan() & expected.isnan())
        assert bool(same.all()), c
    assert lib.tv_nonfinite_f32(x[3:].data_ptr(), x.numel() - 3) == 0
    assert lib.tv_nonfinite_f32(x.data_ptr(), 1) == 1 and lib.tv_nonfinite_f32(x[2:].data_ptr(), 1) == 1


@pytest.mark.parametrize("text, thread", [("pre + 0.5*(a - pre)", "tvlang-writes"),
                                          ("pre + dare(a - pre, 0.5) + dare(b - pre, 0.3)", "tvlang-masks")])
def test_the_writing_thread_starts_before_any_temporary_exists(models, tmp_path, monkeypatch, text, thread):
    """A program that writes from another thread (one of its own; a DARE program's, its masks'
    thread) starts that thread before it makes any output's temporary: a Ctrl-C that lands while an
    executor starts its thread leaves the thread running a task its shutdown does not wait for,
    which must not be one that writes there. The writes run on that thread."""
    import tvlang.io.writer as writer_module

    _, paths, _ = models
    monkeypatch.setattr(direct.os, "cpu_count", lambda: 2)
    seen, writing = [], set()
    real, real_emit = writer_module.StreamingWriter.__init__, direct._emit

    def init(self, *args, **kwargs):
        seen.append(any(t.name.startswith(thread) for t in threading.enumerate()))
        real(self, *args, **kwargs)

    def emit(writes):
        writing.add(threading.current_thread().name.split("_")[0])
        real_emit(writes)

    monkeypatch.setattr(writer_module.StreamingWriter, "__init__", init)
    monkeypatch.setattr(direct, "_emit", emit)
    tvlang.compile(text).run(paths, str(tmp_path / "out"), allow_unused=True)
    assert seen == [True]
    assert writing == {thread}
    assert not [t for t in threading.enumerate() if t.name.startswith(thread)]


@pytest.mark.parametrize("copy", [0, 1])
@pytest.mark.parametrize("n", [1, 1023, 1024, 3007])
def test_a_linear_run_equals_its_steps_bit_for_bit(copy, n):
    """tv_linear_run_f32 (blocks of 1,024 entries): ``first * c0`` (or ``first`` itself) and then
    one ``add(alpha=)`` per input, as torch computes the steps one at a time; its result says
    whether an entry is not finite; it may write over ``first``."""
    lib = linear_steps()
    generator = torch.Generator().manual_seed(n)
    first = torch.randn(n, generator=generator) * 3
    xs = [torch.randn(n, generator=generator) for _ in range(3)]
    if n > 8:
        first[:4] = torch.tensor([-0.0, 1e-40, 3.4e38, -3.4e38])
        xs[0][:4] = torch.tensor([-0.0, -1e-40, 3.4e38, -1.0])
    coefs = [0.4, -0.4, 0.7]
    c0 = 1.0 if copy else 0.3
    expected = first.clone() if copy else torch.mul(first, c0)
    for x, c in zip(xs, coefs):
        expected = torch.add(expected, x, alpha=c)
    pointers = direct._pointers([x.numpy() for x in xs])
    cs = (direct.ctypes.c_float * 3)(*coefs)
    out = torch.empty(n)
    bad = lib.tv_linear_run_f32(first.data_ptr(), c0, copy, pointers, cs, 3, n, out.data_ptr())
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert bad == int(not bool(expected.isfinite().all()))
    in_place = first.clone()  # out may be first
    lib.tv_linear_run_f32(in_place.data_ptr(), c0, copy, pointers, cs, 3, n, in_place.data_ptr())
    assert torch.equal(in_place.view(torch.int32), expected.view(torch.int32))
    # an infinity past the first block is found
    if n > 1024:
        xs[2][1500] = float("inf")
        assert lib.tv_linear_run_f32(first.data_ptr(), c0, copy, pointers, cs, 3, n, out.data_ptr()) == 1


def test_the_design_cards_recipe_is_one_linear_run():
    """explain's program of ``pre + 0.4*(a - b) + 0.7*(c - pre)``: ``b0 *= 0.3`` and the three
    ``axpy`` steps, with the reads between them, are one run; its write is not in it."""
    program = tvlang.compile("pre + 0.4*(a - b) + 0.7*(c - pre)").schedule.main
    ops = [step.op for step in program.steps]
    assert ops == ["read", "scale", "read", "axpy", "read", "axpy", "read", "axpy", "write"]
    assert direct._fusions(program).runs == {1: 7}
    assert direct._linear_runs(program, {5}) == {1: 3}  # a step another fusion takes ends the run before it


def test_aligned_views_sit_where_the_file_offset_does():
    """A read step's buffer is read into from the entry whose address agrees with the bytes' file
    offset modulo 64 (a read into memory 1 to 31 bytes further into its page copies about four
    times slower here), where that is a whole number of entries; else from its start."""
    buffer = direct.numpy.empty(1000 + direct.ALIGN_SLACK // 4, dtype=direct.numpy.float32)
    for position in (0, 4, 8, 60, 8488, 4096 * 3 + 16):
        view = direct._aligned(buffer, position, 1000)
        assert view.ctypes.data % 64 == position % 64 and len(view) == 1000
        assert buffer.ctypes.data <= view.ctypes.data <= buffer.ctypes.data + direct.ALIGN_SLACK - 4
    view = direct._aligned(buffer, 2, 1000)  # not a whole number of float32 entries away
    assert view.ctypes.data == buffer.ctypes.data


@pytest.mark.parametrize("beside", [False, True])
@pytest.mark.parametrize("text, mapped", [
    ("pre + 0.5*(a - pre) - 0.25*(b - pre)", True),
    ("pre + ram(a - pre, b - pre, epsilon=0.01) + 0.5*nearswap(pre, a, 0.005) - 0.5*pre", True),
    ("0.5*a + 0.5*b", True),  # pre, copied: its integer tensor read as a view too
    ("pre + dare(a - pre, 0.5)", False), ("pre + ties(a - pre, b - pre, density=0.3)", False),
    ("pre + slerp(a - pre, b - pre, t=0.3)", False),
    ("pre + della(a - pre, b - pre, density=0.4, epsilon=0.1, seed=2)", None),  # never views
])
def test_reads_into_buffers_write_the_same_bytes_as_views_of_the_mapped_files(models, tmp_path, monkeypatch,
                                                                               text, mapped, beside):
    """With ``MAP_READS`` off, the chunks are read into the steps' buffers (``pread``) instead of
    viewed in the mapped files: the same files, byte for byte, as with it on and as the local
    executor's. A program whose calls leave the second core idle reads views (and writes from a
    thread of its own); the others read views only with ``VIEWS_BESIDE_CALLS``
    (:func:`direct._views_beside_calls`), else into buffers."""
    _, paths, _ = models
    monkeypatch.setattr(direct, "VIEWS_BESIDE_CALLS", beside)
    monkeypatch.setattr(direct, "MAP_READS", False)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path / "read", text, paths, {"out": "merged"},
                                                allow_unused=True)
    assert fast_files == local_files
    monkeypatch.setattr(direct, "MAP_READS", True)
    viewed = []
    real = direct._Input.view

    def spy(self, file, position, nbytes):
        viewed.append(threading.current_thread().name)
        return real(self, file, position, nbytes)

    monkeypatch.setattr(direct._Input, "view", spy)
    tvlang.compile(text).run(paths, str(tmp_path / "mapped"), allow_unused=True)
    assert files_of(tmp_path / "mapped") == fast_files["out"]
    assert bool(viewed) == (mapped or beside and mapped is not None)
    # the pass before the main one (ties' thresholds, slerp's sums) reads as the main pass does
    ahead = any(name.startswith("tvlang-ahead") for name in viewed)
    assert ahead == (beside and ("ties" in text or "slerp" in text))


@pytest.mark.parametrize(("vendor", "family", "model", "suits"), [
    ("GenuineIntel", "6", "167", True), ("AuthenticAMD", "25", "1", False), ("AuthenticAMD", "25", "33", False),
    ("AuthenticAMD", "25", "80", False), ("AuthenticAMD", "25", "15", False), ("AuthenticAMD", "25", "16", True),
    ("AuthenticAMD", "25", "17", True), ("AuthenticAMD", "25", "31", True), ("AuthenticAMD", "25", "32", False),
    ("AuthenticAMD", "25", "97", True), ("AuthenticAMD", "25", "116", True), ("AuthenticAMD", "25", "160", True),
    ("AuthenticAMD", "25", "176", False), ("AuthenticAMD", "25", None, False), ("AuthenticAMD", "23", "49", False),
    ("AuthenticAMD", "26", "2", True), ("AuthenticAMD", "27", "2", True), ("AuthenticAMD", "", "17", False),
    ("HygonGenuine", "24", "2", False), (None, None, None, False),
])
def test_views_suit_an_intel_processor_and_an_amd_one_from_zen_4(vendor, family, model, suits):
    """``views_suit`` reads the first processor's ``vendor_id``, ``cpu family`` and ``model`` lines
    of /proc/cpuinfo: views beside the calls on Intel processors and AMD ones of Zen 4 (family 25,
    models 0x10-0x1f, 0x60-0x7f, 0xa0-0xaf) or later (family 26 and on), where they were measured
    faster; not on earlier AMD ones (Zen 3: family 25's other models; Zen 2: family 23), nor on any
    other. The ``model name`` line does not count as the ``model``."""
    first = ["processor\t: 0\n"]
    if vendor is not None:
        first += [f"vendor_id\t: {vendor}\n", f"cpu family\t: {family}\n"]
        first += [f"model\t\t: {model}\n"] if model is not None else []
        first += ["model name\t: AMD EPYC 9R14 17-Core Processor\n"]
    # a second processor of another kind (a Zen 4), which the answer does not read
    second = ["processor\t: 1\n", "vendor_id\t: AuthenticAMD\n", "cpu family\t: 25\n",
              "model\t\t: 17\n"] if vendor else []
    assert direct.views_suit(first + ["\n"] + second) is suits


def test_views_beside_calls_as_the_processor_says(models, tmp_path, monkeypatch):
    """Unset, ``VIEWS_BESIDE_CALLS`` is the processor's kind (``views_suit`` of /proc/cpuinfo): a
    ``ties`` run reads views of the mapped files where it suits, into buffers elsewhere."""
    _, paths, _ = models
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            suits = direct.views_suit(info)
    except OSError:
        suits = False
    ties = tvlang.compile("pre + ties(a - pre, b - pre, density=0.3)")
    assert direct.VIEWS_BESIDE_CALLS is None and direct._views_beside_calls(ties.schedule.main) == suits
    viewed = []
    real = direct._Input.view
    monkeypatch.setattr(direct._Input, "view", lambda self, *args: viewed.append(args) or real(self, *args))
    ties.run(paths, str(tmp_path / "out"), allow_unused=True)
    assert bool(viewed) == suits


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads the process's memory from /proc")
@pytest.mark.parametrize("copies", [1, 2])
def test_a_mapped_input_holds_no_more_than_the_release_bytes(tmp_path, monkeypatch, copies):
    """Viewing a 48 MiB file a MiB at a time, every page read: the process's private memory never
    grows by more than RELEASE_BYTES (8 MiB here), the MiB in use and some slack: 12 MiB in all
    (10.2 MiB measured; 48 MiB when the pages are not dropped). Private_Clean and Private_Dirty
    both: a page of the file just written may still be dirty. The same when the views alternate
    between the source and a copy of it as _Ahead makes one (``dataclasses.replace``): the copy
    shares its maps and counts with it (with a count of its own, the two held 16 MiB)."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1 << 20) * 48)
    monkeypatch.setattr(direct, "RELEASE_BYTES", 8 << 20)

    def private() -> int:  # a page of the file just written may still be dirty: Private_Dirty then
        return sum(int(line.split()[1]) << 10 for line in open("/proc/self/smaps_rollup")
                   if line.startswith(("Private_Clean:", "Private_Dirty:")))

    source = direct._Input("x", str(path), (str(path),), None, "model", files=[str(path)],
                           identities=[direct.file_identity(os.stat(path))])
    sources = [source] + [dataclasses.replace(source, _open=None) for _ in range(copies - 1)]
    before = private()
    total, peak = 0, 0
    for i, start in enumerate(range(0, 48 << 20, 1 << 20)):
        view = sources[i % copies].view(0, start, 1 << 20)
        total += int(view[::4096].astype(direct.numpy.int64).sum())  # every page touched
        peak = max(peak, private() - before)
    assert total == sum(path.read_bytes()[::4096])
    assert peak <= 12 << 20, peak
    assert source.view(0, (48 << 20) - 8, 16) is None  # past the end: read, and found short
    source.close()


def test_the_hub_prefix_is_the_hub_modules():
    from tvlang.faces.commands.args import HUB_PREFIX
    from tvlang.io.hub import PREFIX

    assert HUB_PREFIX == PREFIX


def test_a_failed_read_hands_the_run_to_the_local_executor(models, tmp_path, monkeypatch):
    """An input that cannot be read as its header says (here: the seventh chunk) withdraws what
    the direct executor wrote, and the local executor runs the recipe (and reports, if it fails too)."""
    _, paths, _ = models
    calls = []
    real = direct._read_into
    monkeypatch.setattr(direct, "MAP_READS", False)  # read into buffers, not as views of the mapped files

    def failing(source, offset, target):
        calls.append(1)
        if len(calls) == 7:
            raise direct._Fallback
        return real(source, offset, target)

    monkeypatch.setattr(direct, "_read_into", failing)
    bound = {"pre": paths["pre"], "a": paths["a"]}
    tvlang.compile("pre + 0.5*(a - pre)").run(bound, str(tmp_path / "out"))
    monkeypatch.setenv(direct.DISABLE, "0")
    tvlang.compile("pre + 0.5*(a - pre)").run(bound, str(tmp_path / "local"))
    assert len(calls) == 7
    assert files_of(tmp_path / "out") == files_of(tmp_path / "local")
    assert sorted(os.listdir(tmp_path)) == ["local", "out"]


def test_progress_events_are_the_local_executors(models, tmp_path, monkeypatch):
    _, paths, _ = models
    seen = {}
    for executor in ("direct", "local"):
        if executor == "local":
            monkeypatch.setenv(direct.DISABLE, "0")
        events = seen[executor] = []
        tvlang.compile("pre + 0.5*(a - pre)").run({"pre": paths["pre"], "a": paths["a"]},
                                                  str(tmp_path / executor), progress=events.append)
    assert seen["direct"] == seen["local"] and len(seen["direct"]) == len(SPEC) + 3


def test_an_input_replaced_after_its_header_was_read(models, tmp_path, monkeypatch):
    """The direct executor reads a file only if it is the one whose header it read; one replaced in
    between (here, between opening and the first read) goes to the local executor, which reads it anew."""
    _, paths, sd = models
    a = write_checkpoint(str(tmp_path / "a"), sd["a"])
    real = direct._run

    def replacing(*args, **kwargs):
        # a new file renamed into place (another inode), its tensors at other offsets
        changed = {"aaa.first": torch.ones(5), **{k: v + 1 if v.is_floating_point() else v for k, v in sd["a"].items()}}
        write_checkpoint(a, changed, force=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(direct, "_run", replacing)
    tvlang.compile("pre + 0.5*(a - pre)").run({"pre": paths["pre"], "a": a}, str(tmp_path / "out"), missing="skip")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = torch.add(torch.mul(sd["pre"]["lm_head.weight"], 0.5), sd["a"]["lm_head.weight"] + 1, alpha=0.5)
    assert torch.equal(got["lm_head.weight"], expected)


def test_force_replaces_only_the_output(models, tmp_path, monkeypatch):
    """Without force an existing output is refused and left byte for byte; with force the direct
    executor replaces it whole (nothing of the old one stays, no temporary is left beside it);
    a folder holding a file tvlang does not write is refused even with force, untouched."""
    _, paths, _ = models
    bound = {"pre": paths["pre"], "a": paths["a"]}
    out = tmp_path / "merged"
    tvlang.compile("pre + 0.2*(a - pre)").run(bound, str(out))  # an earlier output, of another recipe
    before = files_of(out)
    with pytest.raises(TvlangError, match="exists"):
        tvlang.compile("pre + 0.5*(a - pre)").run(bound, str(out))
    assert files_of(out) == before and sorted(os.listdir(tmp_path)) == ["merged"]
    ran = []
    real = direct.attempt
    monkeypatch.setattr(direct, "attempt", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    tvlang.compile("pre + 0.5*(a - pre)").run(bound, str(out), force=True)
    monkeypatch.setenv(direct.DISABLE, "0")
    tvlang.compile("pre + 0.5*(a - pre)").run(bound, str(tmp_path / "local"))
    assert ran[0] is not None and files_of(out) == files_of(tmp_path / "local") != before
    assert sorted(os.listdir(tmp_path)) == ["local", "merged"]
    monkeypatch.delenv(direct.DISABLE)
    (out / "notes.txt").write_text("mine")
    kept = files_of(out)
    with pytest.raises(TvlangError, match="notes.txt"):
        tvlang.compile("pre + 0.5*(a - pre)").run(bound, str(out), force=True)
    assert files_of(out) == kept and sorted(os.listdir(tmp_path)) == ["local", "merged"]


DARE_RECIPES = [
    "pre + dare(a - pre, 0.9, seed=1) + dare(b - pre, 0.5, seed=2, rescale=false)",
    "pre + dare(a - pre, 0.0) + dare(b - pre, 1.0) + dare(a - b, 0.3, rescale_by=\"l1\", rescale=false)",
    "pre + dare_ties(a - pre, b - pre, p=0.7)",
    "pre + dare_ties(a - pre, b - pre, a - b, p=0.4, elect=\"frequency\", merge=\"sum\", seed=3, weights=[1, 1, 1])",
    "pre + dare_linear(a - pre, b - pre, p=0.6, weights=[0.3, 0.9], merge=\"weighted_mean\")",
    "pre + dare_linear(a - pre, b - pre, p=0.6, merge=\"mean\", seed=5) + dare_linear(a - pre, b - pre, p=0.2)",
    # rescale_by="l1": the norms and keep flags in a pass before the main one
    'pre + dare(a - pre, 0.5, rescale_by="l1")',
    'pre + dare_ties(a - pre, b - pre, p=0.7, rescale_by="l1")',
    'pre + dare_linear(a - pre, b - pre, p=0.6, weights=[0.3, 0.9], rescale_by="l1") + dare(a - b, 0.3)'
    ' + dare(b - pre, 0.0, rescale_by="l1") + dare(a - pre, 1.0, rescale_by="l1")',
]


def big_models(tmp_path) -> dict[str, str]:
    """pre, a, b with one tensor of 2**18 + 2**17 + 5 entries (a block of dare's words and an odd
    part of the next) beside small ones."""
    pre = {"big": torch.randn(393221, generator=torch.Generator().manual_seed(0)),
           "small": torch.randn(3, 7, generator=torch.Generator().manual_seed(1))}
    return {name: write_checkpoint(str(tmp_path / name), finetune_like(pre, seed=seed) if seed else pre)
            for name, seed in (("pre", 0), ("a", 1), ("b", 2), ("c", 3))}


@pytest.mark.parametrize("text", DARE_RECIPES)
def test_dare_kernels_same_bytes(models, tmp_path, monkeypatch, text):
    """dare, dare_ties (unit weights) and dare_linear with probability rescaling run here: the same
    masks (tvlang.ops.drops), products, sign merge and divisions as the local executor's."""
    _, paths, _ = models
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged"},
                                                allow_unused=True)
    assert fast_files == local_files
    same_report(fast, local, tmp_path)


@pytest.mark.parametrize("cores", [1, 2])
def test_the_next_tensors_masks_are_asked_for_once_this_ones_are(tmp_path, monkeypatch, cores):
    """The masks' thread draws the next tensor's first blocks while this tensor's last chunks run: its
    streams are made as soon as every mask of this tensor is asked for (not before: its blocks would
    then wait behind the next tensor's), once each; the bytes of the local executor and the eager
    evaluation's tensors. On one core the main thread writes; on two the masks' thread does
    (_overlapped), which makes the streams the same way."""
    monkeypatch.setattr(direct.os, "cpu_count", lambda: cores)
    emitted = results_of(monkeypatch, direct, "_emit")
    g = torch.Generator().manual_seed(5)
    pre = {"big": torch.randn(600_001, generator=g), "layers.0.w": torch.randn(40, 9, generator=g),
           "layers.1.w": torch.randn(40, 9, generator=g)}
    paths = {name: write_checkpoint(str(tmp_path / "in" / name), sd)
             for name, sd in (("pre", pre), ("a", finetune_like(pre, seed=1)), ("b", finetune_like(pre, seed=2)))}
    events = []
    real_streams, real_chunk = direct._streams, direct._chunk

    def streams(program, name, *args, **kwargs):
        events.append(("streams", name))
        return real_streams(program, name, *args, **kwargs)

    def chunk(program, bound, info, start, count, *args, **kwargs):
        events.append(("chunk", info.name, start, count))
        return real_chunk(program, bound, info, start, count, *args, **kwargs)

    monkeypatch.setattr(direct, "_streams", streams)
    monkeypatch.setattr(direct, "_chunk", chunk)
    # "big" has three blocks of masks; with one ahead of the one in use, the third is asked for once
    # the second is taken
    monkeypatch.setattr(direct, "MASKS_AHEAD", 1)
    text = "pre + dare(a - pre, 0.9, seed=1) + dare(b - pre, 0.5, seed=2)"
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, 10_007)
    order = [event for event in events if event[0] == "streams"]
    assert sorted(order) == sorted(("streams", name) for name in pre)  # each tensor's streams made once
    big = [i for i, event in enumerate(events) if event[:2] == ("chunk", "big")]
    following = events.index(order[order.index(("streams", "big")) + 1])  # the next tensor's streams
    crossing = next(i for i in big if events[i][2] + events[i][3] > direct.DROP_CHUNK)  # asks the last block
    assert crossing < following < big[-1]  # made after the last block is asked, before big's last chunk
    assert events[following - 1] == events[crossing]  # as soon as it is
    assert len(emitted) == (len(big) + 2 if cores == 2 else 0)  # a chunk's writes a task (one chunk a small tensor)


@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 7])
def test_plain_dare_runs_fused_with_the_steps_around_it(tmp_path, monkeypatch, chunk):
    """``pre + c1*dare(a - pre) + c2*dare(b - pre)``: each call runs in one helper loop with the
    axpy that makes its input and the step that takes its result (``_drop_fusions``); -0.0 and
    cancelling entries, a coefficient, a tensor where p is 0 (no masks: the steps one by one);
    the bytes of the local executor and the eager evaluation's tensors."""
    g = torch.Generator().manual_seed(3)
    pre = {"big": torch.randn(300_001, generator=g), "small": torch.randn(6, 5, generator=g),
           "layers.0.w": torch.randn(40, 9, generator=g), "layers.1.w": torch.randn(40, 9, generator=g)}
    pre["big"][:1000] = -0.0
    a = finetune_like(pre, seed=1)
    a["big"][:500] = -0.0  # a - pre: -0.0 - -0.0 = 0.0
    a["big"][500:1000] = pre["big"][500:1000]
    b = finetune_like(pre, seed=2)
    paths = {name: write_checkpoint(str(tmp_path / "in" / name), sd) for name, sd in (("pre", pre), ("a", a), ("b", b))}
    fused = results_of(monkeypatch, direct, "_fused_drop")
    monkeypatch.setattr(direct, "CHAIN_MOST", 1)  # no chains (test_a_chain_of_drop_calls_runs_in_one_loop)
    text = ('pre + 0.5*dare(a - pre, where("layers.1.*", 0.0, 0.9), seed=4)'
            " - dare(b - pre, 0.6, seed=7, rescale=false)")
    assert list(direct._drop_fusions(tvlang.compile(text).schedule.main).values()) == [(3, 4), (7, 8)]
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)
    assert True in fused and False in fused  # fused where p draws, the steps one by one where p is 0


CHAIN_RECIPES = [  # (recipe, the chains' lengths)
    ("pre + dare(a - pre, 0.9, seed=1) + dare(b - pre, 0.9, seed=2) + dare(c - pre, 0.9, seed=3)", [3]),
    ('pre + 0.5*dare(a - pre, where("layers.1.*", 0.0, 0.9), seed=4) - dare(b - pre, 0.6, seed=7, rescale=false)'
     " + 0.3*dare(c - pre, 0.2, seed=5)", [3]),  # p 0 in layer 1: no masks there, the calls one by one
    ("pre + dare(a - pre, 0.9) + dare(c - b, 0.2, seed=5) + dare(b - pre, 0.6, seed=7)", [3]),  # b read once
    ("pre + 3*dare(a - pre, 0.5) + 2*dare(b - pre, 0.5, seed=1)", [2]),
    ("pre + dare(a - pre, 0.5) + 0.4*(b - pre) + dare(c - pre, 0.3) + dare(b - pre, 0.6, seed=2)", [2]),
    ("pre + breadcrumbs(a - pre, density=0.2, gamma=0.01) + breadcrumbs(b - pre, density=0.3, gamma=0.01)"
     " + breadcrumbs(c - pre, density=0.4, gamma=0.02)", [3]),  # a band each, tie windows
    ("pre + breadcrumbs(a - pre, density=1.0, gamma=0.0) - 0.5*breadcrumbs(b - pre, density=0.1, gamma=0.0)", [2]),
    ('pre + 0.5*breadcrumbs(a - pre, density=0.9, gamma=0.1, count="mergekit")'
     " - breadcrumbs(c - b, density=0.3, gamma=0.05)", [2]),  # (dare and breadcrumbs never share a recipe here)
]


@pytest.mark.parametrize("dtype, views", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, None)],
                         ids=["views", "reads", "bfloat16"])
@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 7])
@pytest.mark.parametrize("text, lengths", CHAIN_RECIPES)
def test_a_chain_of_drop_calls_runs_in_one_loop(tmp_path, monkeypatch, chunk, text, lengths, dtype, views):
    """``pre + dare(a - pre) + dare(b - pre) + ...`` (or ``breadcrumbs``): the calls, the axpy steps
    that make their inputs, the steps that take their results and the reads between them in one
    helper loop (``_drop_chains``, ``tv_drop_chain_f32``), each input and the base read once; where
    a call draws no masks (p 0), the calls one by one. float32 models read as views of the mapped
    files and into buffers (the reads between the calls into buffers of their own, not over an
    earlier call's input), bfloat16 models, chunks that cut the blocks of keep bits at any place
    within a byte: the local executor's bytes and the eager evaluation's tensors."""
    monkeypatch.setattr(direct, "VIEWS_BESIDE_CALLS", views)
    g = torch.Generator().manual_seed(11)
    pre = {"big": torch.randn(393_221, generator=g), "small": torch.randn(6, 5, generator=g),
           "layers.0.w": torch.randn(40, 9, generator=g), "layers.1.w": torch.randn(40, 9, generator=g)}
    pre["big"][:1000] = -0.0
    models = {"pre": pre, **{name: finetune_like(pre, seed=seed) for seed, name in enumerate("abc", start=1)}}
    models["a"]["big"][:500] = -0.0
    paths = {name: write_checkpoint(str(tmp_path / "in" / name), {k: v.to(dtype) for k, v in sd.items()})
             for name, sd in models.items()}
    program = tvlang.compile(text).schedule.main
    assert [len(chain) for chain in direct._fusions(program).chains.values()] == lengths
    ran = results_of(monkeypatch, direct, "_drop_chain")
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)
    assert True in ran and (False in ran) == ("layers.1" in text)


@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 7])
def test_a_chain_of_breadcrumbs_calls_counts_the_tied_entries_across_chunks(tmp_path, monkeypatch, chunk):
    """A chain of breadcrumbs calls on data with thousands of entries tied at each cut: each input's
    tie windows counted in the chain's loop from chunk to chunk (``seen`` carried back into its
    ``_TieWindow``): the local executor's bytes and the eager evaluation's tensors."""
    text = CHAIN_RECIPES[5][0]
    windows = results_of(monkeypatch, direct._Trims, "ties")
    ran = results_of(monkeypatch, direct, "_drop_chain")
    same_as_local_and_eager(monkeypatch, tmp_path / "t", text, tied_models(tmp_path / "tied"), chunk)
    assert any(w for found in windows for w in found) and ran and all(ran)


@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 7])
@pytest.mark.parametrize("text", [
    "pre + dare_ties(a - pre, b - pre, c - pre, p=0.8, seed=2)",  # every input made in the drop's loop
    'pre + dare_linear(a - pre, b - pre, p=0.6, weights=[0.3, 0.9], merge="weighted_mean") + 0.2*(b - pre)',
    "pre + dare_ties(a - pre, b - c, a - b, p=0.4, seed=6)",  # only the input nothing else reads
])
def test_dare_inputs_made_in_the_drops_loop(tmp_path, monkeypatch, chunk, text):
    """The ``axpy`` that makes a DARE call's input waits for the call where nothing else needs it
    (``_Fusions.subs``), and the call makes ``fma(b, c, a) * mask`` in one loop (keep bits where every
    input does): the local executor's bytes and the eager evaluation's tensors, in chunks that cut
    the blocks of words anywhere."""
    paths = big_models(tmp_path / "in")
    program = tvlang.compile(text).schedule.main
    fusions = direct._fusions(program)
    assert fusions.subs and (("c - pre" in text) == bool(fusions.packed))
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)


@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 7])
@pytest.mark.parametrize("text", [
    'pre + 0.5*ties(a - pre, b - pre, c - pre, density=0.3, elect="frequency", merge="sum")',
    "0.5*(pre + b) + 2*ties(a - pre, c - pre, density=0.2)",
    'pre + dare_ties(a - pre, b - pre, c - pre, p=0.8, merge="sum", seed=9)',
])
def test_sign_merges_write_the_step_that_takes_them(tmp_path, monkeypatch, chunk, text):
    """A ``ties`` or ``dare_ties`` call followed by the ``axpy`` or ``add`` that takes its result: the
    merge writes that step's result in one helper loop (``_Fusions.merges``, tv_sign_merge_add_f32),
    with a coefficient: the local executor's bytes, the eager tensors."""
    paths = big_models(tmp_path / "in")
    assert direct._fusions(tvlang.compile(text).schedule.main).merges
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)


FUSED_RECIPES = [  # and the inputs of each call
    ("pre + ties(a - pre, b - pre, c - pre, density=0.2)", 3),  # every input made in the loop, the add after it
    ('pre + dare_ties(a - pre, b - pre, c - pre, p=0.9, elect="frequency", merge="sum")', 3),
    ("pre + breadcrumbs(a - pre, density=0.2, gamma=0.01) + 0.5*breadcrumbs(b - pre, density=0.3, gamma=0.02)", 1),
    ("ties(a - pre, b - c, a - b, density=0.4)", 3),  # one input made in the loop, no step after it
    ("dare_ties(a - pre, b - pre, p=0.4, seed=6)", 2),  # no step after it
    ("pre + breadcrumbs(a - pre, density=1.0, gamma=0.0) - breadcrumbs(b - pre, density=0.1, gamma=0.0)", 1),
]


@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 7])
@pytest.mark.parametrize("text, inputs", FUSED_RECIPES)
def test_whole_calls_run_in_one_fused_loop(tmp_path, monkeypatch, chunk, text, inputs):
    """``ties``, ``dare_ties`` and ``breadcrumbs`` with the ``axpy`` steps that make their inputs and
    the step that takes their result, in the helper's fused loop (``_whole_call``, tv_fused_merge_f32):
    the local executor's bytes and the eager evaluation's tensors, in chunks that cut the blocks of
    keep bits anywhere; and on data with thousands of entries tied at each cut, whose tie windows
    the loop counts from chunk to chunk."""
    calls = []
    real = direct._whole_call

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(direct, "_whole_call", counting)
    monkeypatch.setattr(direct, "CHAIN_MOST", 1)  # no chains (test_a_chain_of_drop_calls_runs_in_one_loop)
    same_as_local_and_eager(monkeypatch, tmp_path, text, big_models(tmp_path / "in"), chunk)
    assert calls and set(calls) == {inputs}
    if "dare" in text:
        return
    calls.clear()
    windows = []
    real_ties = direct._Trims.ties

    def ties(self):
        found = real_ties(self)
        windows.extend(w for w in found if w)
        return found

    monkeypatch.setattr(direct._Trims, "ties", ties)
    same_as_local_and_eager(monkeypatch, tmp_path / "t", text, tied_models(tmp_path / "tied"), chunk)
    assert calls and set(calls) == {inputs}
    assert windows  # entries tied at a cut, kept or not by their place


@pytest.mark.parametrize("unmade", [True, False], ids=["unmade", "made"])
def test_breadcrumbs_gathers_both_windows_in_one_pass(tmp_path, monkeypatch, unmade):
    """breadcrumbs' two cuts on one input: both windows gathered in the same pass, with the local
    executor's bytes: window_gather_axpy of two windows where the input (``a - pre``) is left
    unmade (_Axpy), window_gather2 of the input made in a buffer where not."""
    pairs = {"made": [], "unmade": []}
    real, real_axpy = direct.window_gather2, direct.window_gather_axpy

    def counting(raw, windows, scratch):
        pairs["made"].append(windows)
        return real(raw, windows, scratch)

    def counting_axpy(a, x, c, windows, scratch):
        pairs["unmade"].append(windows)
        return real_axpy(a, x, c, windows, scratch)

    monkeypatch.setattr(direct, "window_gather2", counting)
    monkeypatch.setattr(direct, "window_gather_axpy", counting_axpy)
    if not unmade:
        monkeypatch.setattr(direct, "_unmade", lambda program, needed, observing: set())
    text = "pre + breadcrumbs(a - pre, density=0.2, gamma=0.01) + breadcrumbs(0.5*(b - pre), density=0.3, gamma=0.05)"
    same_as_local_and_eager(monkeypatch, tmp_path, text, big_models(tmp_path / "in"), 100_003)
    used, unused = ("unmade", "made") if unmade else ("made", "unmade")
    two = [pair for pair in pairs[used] if len(pair) == 2]  # (window_gather_axpy takes one window too)
    assert two and all(pair[0] != pair[1] for pair in two)
    assert pairs[unused] == []


@pytest.mark.parametrize("chunk", [1 << 18, 100_003, 1 << 19])
def test_dare_across_blocks_of_words(tmp_path, monkeypatch, chunk):
    """A tensor longer than a block of dare's words, in chunks that cut blocks anywhere: the same
    masks as the local executor's, and as the whole-tensor kernel's (naive eager computation)."""
    paths = big_models(tmp_path / "in")
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", chunk)
    text = "pre + dare(a - pre, 0.9, seed=4) + dare_ties(a - pre, b - pre, p=0.5)"
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged.safetensors"},
                                                allow_unused=True)
    assert fast_files == local_files
    got = load_file(str(tmp_path / "direct" / "merged.safetensors"))
    sd = {name: load_file(os.path.join(path, "model.safetensors")) for name, path in paths.items()}
    from tvlang.ops.context import TensorContext
    from tvlang.ops.dare import dare
    from tvlang.ops.ties import dare_ties
    for name, p in sd["pre"].items():
        da, db = sd["a"][name] - p, sd["b"][name] - p
        ctx = TensorContext(name)
        expected = p + dare([da], ctx, p=0.9, seed=4, rescale=True, rescale_by="probability")
        expected = expected + dare_ties([da, db], ctx, p=0.5, seed=0, rescale=True, rescale_by="probability",
                                        elect="total", merge="mean", weights=(), elect_on="weighted")
        assert torch.equal(got[name], expected), name
    kept = (got["big"] - sd["pre"]["big"]).ne(0).double().mean().item()
    assert 0.76 < kept < 0.79  # where dare keeps a's entry or either of dare_ties' is kept: 1 - 0.9 * 0.25


def fine_tunes(tmp_path, pre: dict, g: torch.Generator, tied: bool) -> dict[str, str]:
    """pre and a, b, c made from it, as checkpoints: ``tied``, deltas of multiples of 1/64 in a small
    range drawn from ``g`` (thousands of entries tied at every magnitude); else finetune_like's."""
    tensors = {"pre": pre}
    for seed, name in enumerate(("a", "b", "c"), 1):
        if tied:
            tensors[name] = {k: v + torch.randint(-20, 21, v.shape, generator=g).float() / 64 for k, v in pre.items()}
        else:
            tensors[name] = finetune_like(pre, seed=seed)
    return {name: write_checkpoint(str(tmp_path / name), sd) for name, sd in tensors.items()}


def tied_models(tmp_path) -> dict[str, str]:
    """pre, a, b, c whose deltas are multiples of 1/64 in a small range: thousands of entries tied at
    every magnitude, so the k-th largest is shared by many and only the first ones are kept."""
    g = torch.Generator().manual_seed(3)
    pre = {"big": torch.randn(393221, generator=g), "small": torch.randn(3, 7, generator=g)}
    return fine_tunes(tmp_path, pre, g, tied=True)


TIES_RECIPES = [
    "pre + ties(a - pre, b - pre, density=0.2)",
    "pre + ties(a - pre, b - pre, density=0.5, elect=\"frequency\", merge=\"sum\", weights=[1, 1])",
    "pre + 0.5*ties(a - pre, b - pre, a - b, density=0.013, count=\"mergekit\", merge=\"weighted_mean\")",
    "pre + ties(a - pre, b - pre, density=0.0) - 0.25*(nearswap(pre, a, 0.01) - pre)",
    "pre + ties(a - pre, b - pre, density=1.0)",
    "pre + breadcrumbs(a - pre, density=0.2, gamma=0.01) + breadcrumbs(b - pre, density=0.5, gamma=0.0)",
    "pre + breadcrumbs(a - pre, density=0.9, gamma=0.1, count=\"mergekit\") + 0.5*breadcrumbs(b - pre, 1.0, 0.0)",
    "pre + ties(breadcrumbs(a - pre, density=0.5, gamma=0.1), b - pre, density=0.3)",
    # three calls searched in the same passes, the third's input read into the slot of the second's
    "pre + breadcrumbs(a - pre, density=0.2, gamma=0.01) + breadcrumbs(b - pre, density=0.3, gamma=0.01)"
    " + breadcrumbs(c - pre, density=0.4, gamma=0.02)",
    "pre + 0.5*ties(a - pre, b - pre, density=0.2) + 0.5*ties(c - pre, b - pre, density=0.4)",
    "pre + ties(a - pre, b - pre, density=0.3) + 0.5*breadcrumbs(a - b, density=0.99, gamma=0.01)",
    # b - pre observed by the first call, then read by the step that makes a - b (so it is made: _unmade)
    "pre + 0.5*ties(a - pre, b - pre, density=0.2) + 0.5*ties(b - pre, c - pre, a - b, density=0.7)",
]


@pytest.mark.parametrize("data", ["random", "tied"])
@pytest.mark.parametrize("text", TIES_RECIPES)
def test_ties_same_bytes(tmp_path, monkeypatch, text, data):
    """ties (unit weights, an election, per-tensor scope) and breadcrumbs run here, alone, several, or
    one's trim the other's input: their thresholds found by a window and a pass before the main one,
    on a second thread a tensor ahead; the same bytes as the local executor, in chunks that cut the
    tie windows, and (one ties of a and b) the whole-tensor kernel's values."""
    paths = (big_models if data == "random" else tied_models)(tmp_path / "in")
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", 100_003)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged.safetensors"},
                                                allow_unused=True)
    assert fast_files == local_files
    same_report(fast, local, tmp_path)
    if "nearswap" in text or "a - b" in text or "breadcrumbs" in text or text.count("ties(") > 1:
        return  # the eager check below is one ties of a and b (breadcrumbs: tests/test_ops_*.py hold
        # its kernel to a sort-based reference)
    from tvlang.ops.context import TensorContext
    from tvlang.ops.ties import ties
    options = dict(elect="total", merge="mean", weights=(), elect_on="weighted", scope="tensor", count="floor",
                   rescale_by="none")
    options.update(density=float(text.split("density=")[1].split(")")[0].split(",")[0]))
    if "frequency" in text:
        options.update(elect="frequency", merge="sum")
    got = load_file(str(tmp_path / "direct" / "merged.safetensors"))
    sd = {name: load_file(os.path.join(path, "model.safetensors")) for name, path in paths.items()}
    for name, p in sd["pre"].items():
        expected = p + ties([sd["a"][name] - p, sd["b"][name] - p], TensorContext(name), **options)
        assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("text", [TIES_RECIPES[0], TIES_RECIPES[5]], ids=["ties", "breadcrumbs"])
def test_thresholds_of_unmade_differences_on_bfloat16(tmp_path, monkeypatch, text):
    """ties and breadcrumbs over bfloat16 models, many entries tied at the threshold: the pass before
    the main one gathers from ``a - pre`` without making it (window_gather_axpy, over the float32
    values the bfloat16 entries are read as), in chunks that cut the windows: the local executor's
    bytes."""
    half = {}
    for name, path in tied_models(tmp_path / "in").items():
        tensors = load_file(os.path.join(path, "model.safetensors"))
        half[name] = write_checkpoint(str(tmp_path / f"{name}16"),
                                      {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    calls = []
    real = direct.window_gather_axpy

    def counting(*args):
        calls.append(len(args[3]))
        return real(*args)

    monkeypatch.setattr(direct, "window_gather_axpy", counting)
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", 100_003)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, half, {"out": "merged.safetensors"},
                                                allow_unused=True)
    assert fast_files == local_files
    assert load_file(str(tmp_path / "direct" / "merged.safetensors"))["big"].dtype == torch.bfloat16
    assert calls and max(calls) == (2 if "breadcrumbs" in text else 1)


@pytest.mark.parametrize("path", ["window", "no-window", "window-missed", "too-many"])
def test_ties_every_way_to_its_threshold(tmp_path, monkeypatch, path):
    """The threshold's search takes each of its ways (a window that holds the k-th largest; no window
    from the sample; a window that misses it; one that gathers too many), and each gives the local
    executor's bytes."""
    paths = tied_models(tmp_path / "in")
    real_window = direct.window_of
    if path == "no-window":
        monkeypatch.setattr(direct, "window_of", lambda *args: None)
    elif path == "window-missed":
        monkeypatch.setattr(direct, "window_of", lambda *args: (0x7F000000, None))
    elif path == "too-many":
        monkeypatch.setattr(direct, "window_of", lambda *args: (0, None))
    stages = []
    real_end = direct._Select.end_pass

    def end_pass(self):
        if self.numel > 1000:  # the big tensor's (the small one has no window: its sample is all of it)
            stages.append(self.stage)
        real_end(self)

    monkeypatch.setattr(direct._Select, "end_pass", end_pass)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, "pre + ties(a - pre, b - pre, density=0.3)",
                                                paths, {"out": "merged.safetensors"}, allow_unused=True)
    assert fast_files == local_files
    expected = {"window": ["window"] * 2, "no-window": ["high", "low"] * 2}.get(path, ["window", "high", "low"] * 2)
    assert sorted(stages) == sorted(expected)  # for each of the two inputs
    assert real_window is not None


PER_TENSOR_RECIPES = [
    'pre + 0.5*(nearswap(pre, a, where("*norm*", 0.1, 0.01)) - pre)',
    "pre + ties(a - pre, b - pre, density=layers(0.1, 0.5, 1))",
    'pre + dare(a - pre, layers(0.2, 0.9), seed=where("*mlp*", 1, 2))',
    "pre + dare_linear(a - pre, b - pre, p=0.5, weights=[layers(0, 1), 0.5], merge=\"weighted_mean\")",
    "slerp(pre, a, t=layers(0, 0.5, 1))",
    'nuslerp(a, b, where("*norm*", 0.2, 0.9))',
]


@pytest.mark.parametrize("text", PER_TENSOR_RECIPES)
def test_per_tensor_options_same_bytes(models, tmp_path, monkeypatch, text):
    """Options given per tensor (layers(), where(): a mergekit gradient) are resolved for each tensor
    as the local executor resolves them (the base's layer count; non-layer tensors take the first
    value): the same bytes."""
    _, paths, _ = models
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged"},
                                                allow_unused=True)
    assert fast_files == local_files
    same_report(fast, local, tmp_path)


GRAM_RECIPES = [
    "slerp(pre, a, t=0.3)",
    "model_stock(pre, a, b, c)",
    "nuslerp(a, b, 0.4)",
    "pre + nuslerp(a - pre, b - pre, 0.7)",
    "pre + multislerp(a - pre, b - pre, c - pre, weights=[1, 2, 3])",
    "pre + multislerp(a - pre, b - pre, normalize_weights=false, weights=[0.5, 0.25])",
    "pre + karcher(a - pre, b - pre, c - pre)",
    "slerp(slerp(pre, a, t=0.3), b, t=0.6)",  # a call's result is another's input: a second pass
    "slerp(pre, z, t=0.3) + slerp(z - pre, b - pre, t=0.5)",  # z is pre: colinear (linear); a zero norm
    "pre + random_like(a - pre, seed=3) + 0.5*random_like(z - pre)",  # noise of a's norm; of a zero norm: 0
    "pre + random_like(slerp(a - pre, b - pre, t=0.4), seed=1)",  # a second pass: after slerp's sums
    # a random_like's result taken by a later pass and by the main pass: its noise drawn again for
    # the main pass (_Noise.rewind; before, the second taking ran past the stream's end: IndexError)
    "pre + slerp(random_like(a - pre, seed=1), b - pre, t=0.3)",
    "pre + random_like(random_like(a - pre, seed=1), seed=2) + random_like(a - pre, seed=1)",
    "pre + random_like(slerp(random_like(a - pre, seed=1), b - pre, t=0.3), seed=4) + 0.5*random_like(a - pre, seed=1)",
]


@pytest.mark.parametrize("chunk", [1 << 18, 3 * (1 << 14)])
@pytest.mark.parametrize("text", GRAM_RECIPES)
def test_gram_merges_same_bytes(tmp_path, monkeypatch, text, chunk):
    """slerp, model_stock, nuslerp, multislerp and karcher run here: the block sums of
    tvlang.ops.sums (the helper's, as the local executor sums), the kernels' own coefficients and
    torch's mul and add. The same bytes as the local executor's, and the same tensors as the
    whole-tensor kernels (a naive eager evaluation), over a tensor of several blocks and chunks."""
    paths = big_models(tmp_path / "in")
    paths["z"] = paths["pre"]
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)


@pytest.mark.parametrize("unmade", [True, False], ids=["unmade", "made"])
@pytest.mark.parametrize("text", ["pre + nuslerp(a - pre, b - pre, 0.7)", "pre + karcher(a - pre, b - pre, c - pre)",
                                  "pre + slerp(a - pre, b - pre, t=0.5) + 0.4*(c - pre)",
                                  "pre + random_like(a - pre, seed=3)"])
def test_sums_of_unmade_differences(tmp_path, monkeypatch, text, unmade):
    """The sums' pass before the main one leaves ``m - pre`` unmade (_Axpy): the Gram merges and
    random_like sum the differences a block at a time (tv_gram_sums_f32 with ``pre`` as its base,
    as model_stock's offsets); made in buffers (``_unmade`` empty), the same. Either way the local
    executor's bytes, and the eager evaluation's tensors."""
    bases = []
    real = direct._differences

    def differences(pieces):
        base = real(pieces)
        bases.append(base is not None)
        return base

    monkeypatch.setattr(direct, "_differences", differences)
    if not unmade:
        monkeypatch.setattr(direct, "_unmade", lambda program, needed, observing: set())
    same_as_local_and_eager(monkeypatch, tmp_path, text, big_models(tmp_path / "in"), 3 * (1 << 14))
    assert bases and any(bases) == unmade


@pytest.mark.parametrize("text, main_reads", [
    ("pre + random_like(a - pre, seed=3) + 0.4*(b - pre)", {"pre", "b"}),
    ("pre + random_like(slerp(a - pre, b - pre, t=0.4), seed=1) + 0.5*(c - pre)", {"pre", "c"}),
    ("pre + random_like(a - pre, seed=3) + 0.5*random_like(c - pre) + (a - pre)", {"pre", "a"}),
])
def test_the_main_pass_reads_nothing_only_random_like_takes(tmp_path, monkeypatch, text, main_reads):
    """random_like's main pass takes nothing of its input (its noise times the scale found before),
    so the main pass leaves out what only that input needs (_unread): the models read only for it
    are read by the pass before the main one alone. The bytes stay the local executor's."""
    reads = {"main": set(), "ahead": set()}
    real = direct._read_step

    def reading(bound, step, *args):
        reads["main" if threading.current_thread() is threading.main_thread() else "ahead"].add(step.name)
        return real(bound, step, *args)

    monkeypatch.setattr(direct, "_read_step", reading)
    same_as_local_and_eager(monkeypatch, tmp_path, text, big_models(tmp_path / "in"), 3 * (1 << 14))
    assert reads["main"] == main_reads
    assert "a" in reads["ahead"]


@pytest.mark.parametrize("text", ["model_stock(pre, a, b, c)", "slerp(pre, a, t=0.3)",
                                  "pre + multislerp(a - pre, b - pre, c - pre, weights=[1, 2, 3])"])
def test_gram_sums_pair_by_pair_past_the_helpers_limit(tmp_path, monkeypatch, text):
    """A call of more inputs than tv_gram_sums_f32 takes sums its pairs one by one (the limit set to
    one input here): the same bytes as the local executor and the eager evaluation."""
    monkeypatch.setattr(direct, "GRAM_VECTORS", 1)
    calls = []
    real = direct._pointers
    monkeypatch.setattr(direct, "_pointers", lambda parts: calls.append(len(parts)) or real(parts))
    paths = big_models(tmp_path / "in")
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, 3 * (1 << 14))
    assert [n for n in calls if n > 1] == []  # no sweep of all the pairs at once (an axpy out of place takes one)


REDUCTION_RECIPES = [
    "pre + cos(a - pre, b - pre)*(a - pre) + 0.4*(b - pre)",
    "pre + (norm(b - pre)/norm(a - pre))*(a - pre)",
    "pre + dot(a - pre, b - pre)/dot(b - pre, b - pre)*(b - pre) - norm(pre)/1000*(c - pre)",
    "pre + norm(a - pre - cos(a - pre, b - pre)*(b - pre))*(c - pre)",  # a scalar of a scalar: two passes
    "pre + cos(z - pre, a - pre)*(a - pre) + (a - pre)",  # a zero vector: cos 0
]


@pytest.mark.parametrize("chunk", [1 << 18, 3 * (1 << 14)])
@pytest.mark.parametrize("text", REDUCTION_RECIPES)
def test_whole_model_reductions_same_bytes(tmp_path, monkeypatch, text, chunk):
    """norm, dot and cos coefficients: their passes here (tv_gram_sums_f32's blocks, added exactly, the
    reducers' results), then the main pass with the coefficients as numbers. The same bytes and report
    as the local executor's, and every tensor the eager evaluation's."""
    paths = big_models(tmp_path / "in")
    paths["z"] = paths["pre"]
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)


def test_whole_model_reductions_on_bfloat16_and_with_progress(models, tmp_path, monkeypatch):
    """A cos coefficient over bfloat16 models (read as float32, exactly), with a progress callback:
    the local executor's bytes and report, and its passes' labels and tensor counts."""
    _, _, sd = models
    half = {}
    for name in ("pre", "a", "b"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd[name].items()}
        half[name] = write_checkpoint(str(tmp_path / f"{name}16"), tensors)
    events: dict[str, list] = {"direct": [], "local": []}
    text = "pre + cos(a - pre, b - pre)*(a - pre) + 0.5*(b - pre)"
    run = [0]

    def progress(event):
        events["direct" if run[0] == 0 else "local"].append((event.label, event.tensors_total))

    real = tvlang.Plan.run

    def counted(self, *args, **kwargs):
        try:
            return real(self, *args, progress=progress, **kwargs)
        finally:
            run[0] += 1

    monkeypatch.setattr(tvlang.Plan, "run", counted)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, half, {"out": "merged"})
    assert fast_files == local_files
    same_report(fast, local, tmp_path)
    assert fast.passes == 2
    labels = lambda got: [label for label, _ in dict.fromkeys(got)]  # noqa: E731
    assert labels(events["direct"]) == labels(events["local"]) == ["pass 1 of 2: cos", "pass 2 (main)"]


def test_a_division_by_a_zero_norm_is_the_local_executors_error(models, tmp_path):
    """1/norm of an all-zero task vector: the local executor's error, and nothing written."""
    _, paths, _ = models
    bound = {"pre": paths["pre"], "a": paths["a"], "z": paths["pre"]}
    with pytest.raises(TvlangError) as err:
        tvlang.compile("pre + (a - pre)/norm(z - pre)").run(bound, str(tmp_path / "out"))
    assert "division by zero" in err.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block, ahead", [(1000, 2), (1 << 17, 1), (1 << 20, 3)])
def test_random_likes_main_pass_noise_is_drawn_ahead_on_the_drawing_thread(tmp_path, monkeypatch, block, ahead):
    """The main pass's noise comes in blocks drawn on the masks' thread, NOISE_AHEAD ahead: of 1,000
    entries (each chunk of 49,152 spans blocks), of 2**17 and of 2**20 (one block a tensor). The same
    bytes as the local executor and the eager evaluation; each tensor's noise drawn twice in all,
    the second time on the drawing thread only, in blocks of at most NOISE_BLOCK entries."""
    paths = big_models(tmp_path / "in")
    monkeypatch.setattr(direct, "NOISE_BLOCK", block)
    monkeypatch.setattr(direct, "NOISE_AHEAD", ahead)
    draws: list[tuple[str, int]] = []
    real = direct.normal_f32

    def recorded(bits, n, out=None):
        draws.append((threading.current_thread().name, n))
        return real(bits, n, out)

    monkeypatch.setattr(direct, "normal_f32", recorded)
    sd = same_as_local_and_eager(monkeypatch, tmp_path, "pre + random_like(a - pre, seed=4) + 0.5*(b - pre)", paths,
                                 3 * (1 << 14))
    floats = sum(t.numel() for t in sd["pre"].values())
    drawn = [n for name, n in draws if name.startswith("tvlang-masks")]
    assert sum(n for _, n in draws) == 2 * floats and sum(drawn) == floats
    assert max(drawn) == min(block, sd["pre"]["big"].numel())
    assert all(name.startswith(("tvlang-masks", "tvlang-ahead")) for name, _ in draws)


@pytest.mark.parametrize("text", ["pre + random_like(a - pre, seed=4) + 0.5*(b - pre)",
                                  "pre + dare(a - pre, 0.5, seed=3) + dare(b - pre, 0.3, seed=5)"])
def test_each_tensors_drawn_blocks_are_freed_without_the_cycle_collector(tmp_path, monkeypatch, text):
    """Every stream of blocks drawn ahead (random_like's noise, DARE's masks: :class:`direct._Drawn`)
    is freed once its tensor is done, by reference counting alone (the cyclic garbage collector off
    here): when one held a bound method of itself, each tensor's buffers lived on until a
    collection, and a random_like run at 1.5 GB held 170 MiB, not 38."""
    paths = big_models(tmp_path / "in")
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", 3 * (1 << 14))
    made: list[weakref.ref] = []
    real = direct._Drawn.__init__

    def recorded(self, *args):
        real(self, *args)
        made.append(weakref.ref(self))

    monkeypatch.setattr(direct._Drawn, "__init__", recorded)
    gc.collect()
    gc.disable()
    try:
        tvlang.compile(text).run(paths, str(tmp_path / "out.safetensors"), allow_unused=True)
        assert made and [ref() for ref in made] == [None] * len(made)
    finally:
        gc.enable()


def same_as_local_and_eager(monkeypatch, tmp_path, text: str, paths: dict[str, str], chunk: int) -> dict:
    """Run ``text`` over the models in ``paths`` with both executors in chunks of ``chunk`` entries:
    the same bytes and report, and every tensor the eager evaluation's; the models' tensors."""
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", chunk)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged.safetensors"},
                                                allow_unused=True)
    assert fast_files == local_files
    same_report(fast, local, tmp_path)
    sd = {name: load_file(os.path.join(path, "model.safetensors")) for name, path in paths.items()}
    eager = tvlang.compile(text).evaluate(sd, allow_unused=True)
    got = load_file(str(tmp_path / "direct" / "merged.safetensors"))
    for name in sd["pre"]:
        assert torch.equal(got[name], eager[name]), name
    return sd


def test_gram_merges_by_hand(tmp_path, monkeypatch):
    """slerp of two orthogonal tensors at t=0.5: both times sin(pi/4)/sin(pi/2); model_stock of two
    fine-tunes at 60 degrees (c = 0.5, t = 2/3) around a zero base: 1/3 of their sum."""
    x = torch.zeros(40_000)
    x[:20_000] = 1.0
    y = 1.0 - x
    z = torch.zeros(40_000)
    u = x.clone()
    u[20_000:] = 1.0
    paths = {name: write_checkpoint(str(tmp_path / name), {"w": t}) for name, t in
             (("x", x), ("y", y), ("z", z), ("u", u))}
    out = tmp_path / "slerp.safetensors"
    tvlang.compile("slerp(x, y, t=0.5)").run(paths, str(out), allow_unused=True)
    half = torch.tensor(math.sin(math.pi / 4), dtype=torch.float32)
    assert torch.equal(load_file(str(out))["w"], torch.full((40_000,), half.item()))
    # u makes 45 degrees with x; with x itself the pair mean of cosines is (1 + 2*cos45)/3: take x, u
    out = tmp_path / "stock.safetensors"
    tvlang.compile("model_stock(z, x, u)").run(paths, str(out), allow_unused=True)
    c = math.sqrt(0.5)
    t = 2 * c / (1 + c)
    expected = torch.mul(z, 1 - t).add_(x, alpha=t / 2).add_(u, alpha=t / 2)
    assert torch.equal(load_file(str(out))["w"], expected)


def test_exact_block_total_is_the_local_executors():
    """math.fsum of the block values (this executor) and ExactSum (the local one) round the same
    exact sum: the same float, with cancellation, huge and tiny values."""
    from tvlang.ops.sums import ExactSum

    g = torch.Generator().manual_seed(5)
    for scale in (1e-300, 1.0, 1e200):
        values = (torch.randn(5000, generator=g, dtype=torch.float64) * scale).tolist()
        values += [1e16 * scale, -1e16 * scale, 2.0 ** -1074, 3 * 2.0 ** -1075 * 2]
        exact = ExactSum()
        exact.add_all(values)
        assert math.fsum(values) == exact.value()
    halves = [0.5, 2.0 ** 53, 0.5 + 2.0 ** -52]  # a tie at the rounding point: to even
    exact = ExactSum()
    exact.add_all(halves)
    assert math.fsum(halves) == exact.value() == 2.0 ** 53 + 2.0


@pytest.mark.parametrize("chunk", [1 << 18, 1 << 19, 3 * (1 << 14)])
def test_dare_l1_across_blocks(tmp_path, monkeypatch, chunk):
    """rescale_by="l1" over a tensor of several blocks of words and of sums, in chunks that cut
    them: the same bytes as the local executor, the same tensors as the whole-tensor kernels, and
    each input's drop restored to its L1 norm (to float32 rounding)."""
    text = 'pre + dare(a - pre, 0.9, seed=4, rescale_by="l1") + dare_ties(b - pre, c - pre, p=0.5, rescale_by="l1")'
    sd = same_as_local_and_eager(monkeypatch, tmp_path, text, big_models(tmp_path / "in"), chunk)
    one = tvlang.compile('dare(a - pre, 0.9, seed=4, rescale_by="l1")').evaluate(sd, allow_unused=True)["big"]
    delta = sd["a"]["big"] - sd["pre"]["big"]
    assert one.abs().double().sum().item() == pytest.approx(delta.abs().double().sum().item(), rel=1e-6)
    assert 0.09 < one.ne(0).double().mean().item() < 0.11


SCE_RECIPES = [
    "pre + sce(a - pre, b - pre, c - pre, select_topk=0.1)",
    'pre + sce(a - pre, b - pre, c - pre, select_topk=0.5, count="mergekit")',
    "pre + sce(a - pre, b - pre, select_topk=1)",
    "pre + sce(a - pre, b - pre, c - pre, select_topk=0)",
    "pre + sce(a - pre, select_topk=0.3)",  # one input: no variance is nonzero, nothing selected
    "pre + 0.5*sce(a - pre, b - pre, select_topk=0.2) + 0.5*sce(b - pre, c - pre, a - b, select_topk=0.7)",
]


@pytest.mark.parametrize("chunk", [1 << 18, 3 * (1 << 14)])
@pytest.mark.parametrize("data", ["random", "tied"])
@pytest.mark.parametrize("text", SCE_RECIPES)
def test_sce_same_bytes(tmp_path, monkeypatch, text, data, chunk):
    """sce runs here: the variances (the helper's Welford loop, sce.variance's bits), the k largest
    of them with ties by flat index (thousands tied in the tied data), the squares' block sums and
    the erase loop: the same bytes as the local executor, the same tensors as the whole kernel."""
    paths = (big_models if data == "random" else tied_models)(tmp_path / "in")
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)


def test_sce_keeps_exactly_k_by_hand(tmp_path):
    """select_topk=0.25 of 8 entries whose variances are 4, 1, 1, 1, 1, 0, 0, 0 (five nonzero: k = 1):
    the entry of variance 4 only; the erase of two inputs with weights from their mean squares."""
    a = torch.tensor([2.0, 1.0, 1.0, -1.0, 1.0, 0.0, 3.0, 0.0])
    b = torch.tensor([-2.0, -1.0, 3.0, 1.0, 3.0, 0.0, 3.0, 0.0])
    zero = torch.zeros(8)
    paths = {name: write_checkpoint(str(tmp_path / name), {"w": t}) for name, t in (("pre", zero), ("a", a), ("b", b))}
    out = tmp_path / "sce.safetensors"
    tvlang.compile("pre + sce(a - pre, b - pre, select_topk=0.25)").run(paths, str(out))
    # selected: entry 0 only (a=2, b=-2): squares 4 and 4, weights 1/2; the sum 0 elects +, a agrees
    assert load_file(str(out))["w"].tolist() == [2.0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("text", ["model_stock(pre, a, b)", "pre + multislerp(a - pre, b - pre, weights=[2, 1])",
                                  "pre + random_like(a - pre, seed=2)",
                                  "pre + karcher(a - pre, b - pre)", "pre + sce(a - pre, b - pre, select_topk=0.5)",
                                  'pre + sce(a - pre, b - pre, select_topk=0.9, count="mergekit")'])
def test_odd_tensors_same_bytes(models, tmp_path, monkeypatch, text):
    """The sums' and sce's passes over a 0-dim tensor, an empty one, an integer one and a -0.0:
    the local executor's bytes."""
    _, paths, _ = models
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, paths, {"out": "merged"},
                                                allow_unused=True)
    assert fast_files == local_files
    same_report(fast, local, tmp_path)


@pytest.mark.parametrize("text", ["slerp(pre, a, t=0.3)", "model_stock(pre, a, b)", "nuslerp(a, b, 0.6)",
                                  "pre + random_like(a - pre, seed=5)",
                                  "pre + sce(a - pre, b - pre, select_topk=0.3)",
                                  "pre + dare_ties(a - pre, b - pre, p=0.5, rescale_by='l1')",
                                  "pre + della(a - pre, b - pre, density=0.3, epsilon=0.2, seed=2)",
                                  "pre + della(a - pre, b - pre, density=0.3, epsilon=0.2, rescale_by='l1')"])
def test_passes_before_the_main_one_on_bfloat16(models, tmp_path, monkeypatch, text):
    """The sums', L1 norms' and sce's passes over bfloat16 models (read as float32, exactly; the
    result rounded back to bfloat16 as torch rounds it): the local executor's bytes."""
    _, _, sd = models
    half = {}
    for name in ("pre", "a", "b"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd[name].items()}
        half[name] = write_checkpoint(str(tmp_path / f"{name}16"), tensors)
    fast, local, fast_files, local_files = both(monkeypatch, tmp_path, text, half, {"out": "merged"},
                                                allow_unused=True)
    assert fast_files == local_files
    same_report(fast, local, tmp_path)
    got = load_file(str(tmp_path / "direct" / "merged" / "model.safetensors"))
    assert got["lm_head.weight"].dtype == torch.bfloat16


def row_models(tmp_path, tied: bool = False) -> dict[str, str]:
    """pre, a, b, c with matrices of rows of 1,288 and 300 entries, a vector, a 0-dim tensor and an
    empty one (della ranks within rows); ``tied``: deltas of multiples of 1/64 (many equal
    magnitudes in each row, ranked by position)."""
    g = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(203, 1288, generator=g), "v": torch.randn(70, 300, generator=g),
           "bias": torch.randn(1288, generator=g), "scalar": torch.tensor(0.25), "empty": torch.zeros(0, 4)}
    return fine_tunes(tmp_path, pre, g, tied)


DELLA_RECIPES = [
    "pre + della(a - pre, b - pre, c - pre, density=0.2, epsilon=0.1, seed=1)",
    'pre + della(a - pre, b - pre, density=0.5, epsilon=0.3, seed=4, elect="frequency", merge="sum")',
    "pre + 0.5*della(a - pre, b - pre, c - pre, density=0.7, epsilon=0.2, rescale=false, lambda=1.5)",
    "pre + della_linear(a - pre, b - pre, density=0.4, epsilon=0.1, seed=2, weights=[1, 1])",
    "pre + della_linear(a - pre, b - pre, c - pre, density=0.3, epsilon=0.2, seed=5, lambda=0.7)",
    # a - pre read again after the call: its axpy does not wait for the row loop, b - pre's does
    "pre + della(a - pre, b - pre, density=0.3, epsilon=0.1, seed=7) + 0.25*(a - pre)",
    "pre + della(a - pre, b - pre, density=1.0, epsilon=0.0) - della(c - pre, density=0.3, epsilon=0.05, seed=9)",
    "pre + della(a - pre, b - pre, c - pre, density=0.0, epsilon=0.0)",
    'pre + della(a - pre, b - pre, density=layers(0.2, 0.6), epsilon=0.1, seed=3, merge="weighted_mean")',
    # rescale_by="l1": each input's norms before and after its sample in a pass before the main one
    'pre + della(a - pre, b - pre, c - pre, density=0.2, epsilon=0.1, seed=1, rescale_by="l1")',
    'pre + della_linear(a - pre, b - pre, density=0.4, epsilon=0.1, seed=2, rescale_by="l1", lambda=0.7)',
    'pre + della(a - pre, b - pre, density=0.3, epsilon=0.1, seed=7, rescale_by="l1") + 0.25*(a - pre)',
    'pre + 2*della(a - pre, b - pre, density=layers(0.3, 1.0), epsilon=0.2, seed=3, rescale_by="l1",'
    ' elect="frequency")',
    'pre + della(a - pre, b - pre, c - pre, density=0.4, epsilon=0.3, seed=6, rescale_by="l1", lambda=1.5,'
    ' merge="sum")',
]


@pytest.mark.parametrize("chunk", [1 << 18, 3000, 2 * 1288])
@pytest.mark.parametrize("data", ["random", "tied"])
@pytest.mark.parametrize("text", DELLA_RECIPES)
def test_della_same_bytes(tmp_path, monkeypatch, text, data, chunk):
    """della and della_linear run here: each input's MAGPRUNE by the helper in chunks of whole rows (a
    chunk of 3,000 entries holds two rows of 1,288, ten of 300), the words of each input where the
    last's end, the rows split between two threads, the sign merge with the step that takes it:
    the same bytes as the local executor, the same tensors as the eager evaluation."""
    paths = row_models(tmp_path / "in", tied=data == "tied")
    same_as_local_and_eager(monkeypatch, tmp_path, text, paths, chunk)


@pytest.mark.parametrize("block", [1, 1 << 15])
def test_della_reads_a_chunk_while_the_one_before_is_sampled(tmp_path, monkeypatch, block):
    """A recipe with one della call runs its main pass pipelined (direct._pipelined): each chunk read
    while the rows of the one before are sampled, in blocks of whole rows that both threads take.
    Integer, empty and 0-dim tensors between the computed ones wait for the chunk before them; in
    chunks of 3,000 entries and blocks of one row (or of 32,768 entries) every row is sampled once:
    the local executor's bytes and the eager evaluation's tensors."""
    g = torch.Generator().manual_seed(8)
    pre = {"a_w": torch.randn(40, 300, generator=g), "b_steps": torch.arange(6, dtype=torch.int64),
           "c_empty": torch.zeros(0, 3), "d_w": torch.randn(9, 1288, generator=g), "e_scalar": torch.tensor(0.5),
           "f_v": torch.randn(300, generator=g)}
    tensors = {"pre": pre}
    for name in ("a", "b", "c"):
        tensors[name] = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                         for k, v in pre.items()}
    paths = {name: write_checkpoint(str(tmp_path / "in" / name), sd) for name, sd in tensors.items()}
    monkeypatch.setattr(magprune, "ROW_BLOCK", block)
    pipelined, rows = [], []
    real_pipelined, real_fused = direct._pipelined, direct._Della._fused
    monkeypatch.setattr(direct, "_pipelined", lambda *a, **k: pipelined.append(1) or real_pipelined(*a, **k))

    def fused(self, *a):
        start, count = a[-3:-1]
        rows.append((start, start + count))
        return real_fused(self, *a)

    monkeypatch.setattr(direct._Della, "_fused", fused)
    text = "pre + della(a - pre, b - pre, c - pre, density=0.2, epsilon=0.1, seed=1)"
    sd = same_as_local_and_eager(monkeypatch, tmp_path, text, paths, 3000)
    assert pipelined == [1]
    # per tensor, chunk by chunk: the blocks of whole rows; each block's (start, stop) within its chunk
    expected = []
    for shape in ((40, 300), (9, 1288), (1, 1), (1, 300)):
        m = shape[1]
        chunk = 3000 // m * m
        step = max(1, block // m) * m
        for start in range(0, shape[0] * m, chunk):
            count = min(shape[0] * m - start, chunk)
            expected += [(b, min(count, b + step)) for b in range(0, count, step)]
    assert sorted(rows) == sorted(expected)
    assert torch.equal(load_file(str(tmp_path / "direct" / "merged.safetensors"))["b_steps"], sd["pre"]["b_steps"])


def test_a_nonfinite_della_result_in_a_pipelined_run_is_the_local_executors_error(tmp_path, monkeypatch):
    """A chunk whose result is not finite, found while the next chunk's rows are being sampled: the
    local executor's error, and nothing written."""
    g = torch.Generator().manual_seed(9)
    pre = {"w": torch.randn(40, 300, generator=g), "x": torch.randn(20, 300, generator=g)}
    a = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    a["w"][25, 7] = 3e38  # its delta, doubled, is beyond float32: in the third chunk of ten rows
    paths = {"pre": write_checkpoint(str(tmp_path / "in" / "pre"), pre),
             "a": write_checkpoint(str(tmp_path / "in" / "a"), a)}
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", 3000)
    pipelined = []
    real = direct._pipelined
    monkeypatch.setattr(direct, "_pipelined", lambda *args, **kw: pipelined.append(1) or real(*args, **kw))
    with pytest.raises(TvlangError) as err:
        tvlang.compile("pre + 2*della(a - pre, density=1.0, epsilon=0.0)").run(paths, str(tmp_path / "out"))
    assert pipelined == [1]
    assert err.value.message == "output 'out': tensor 'w' has a non-finite value (inf) at index (25, 7)"
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("text", [DELLA_RECIPES[0], DELLA_RECIPES[4]])
def test_della_on_bfloat16_in_the_row_loop(tmp_path, monkeypatch, text):
    """della and della_linear over bfloat16 models (read as float32, exactly), each block of rows in
    the helper's row loop, which makes every input's ``a - pre``: the local executor's bytes (the result
    rounded back to bfloat16 as torch rounds it) and the eager evaluation's tensors, in chunks of
    two rows of 1,288."""
    paths = row_models(tmp_path / "in32")
    halves = {}
    for name, path in paths.items():
        tensors = load_file(os.path.join(path, "model.safetensors"))
        halves[name] = write_checkpoint(str(tmp_path / "in16" / name),
                                        {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                         for k, v in tensors.items()})
    fused = []
    real = direct._Della._fused
    monkeypatch.setattr(direct._Della, "_fused", lambda self, *a: fused.append(sorted(a[1])) or real(self, *a))
    same_as_local_and_eager(monkeypatch, tmp_path, text, halves, 2 * 1288)
    assert fused and all(waiting == [0, 1, 2] for waiting in fused)  # each input's a - pre made in the loop
    assert load_file(str(tmp_path / "direct" / "merged.safetensors"))["w"].dtype == torch.bfloat16


@pytest.mark.parametrize("limit", [None, 0])
def test_della_l1_keeps_its_flags_or_samples_again(tmp_path, monkeypatch, limit):
    """della with rescale_by="l1": its pass samples every chunk once and keeps the keep flags, so the
    main pass takes each block of rows from them, in the helper's fused merge loop; past
    SAVED_BITS_LIMIT (0 here) it keeps none and the main pass samples each block of rows again. Both:
    the local executor's bytes (which keeps its flags), the eager evaluation's tensors."""
    chunks, blocks = [], []
    real_observe, real_rows, real_fused = direct._Della.observe, direct._Della._rows, direct._Della._l1_fused

    def observe(self, pieces, *args):
        chunks.append(len(pieces[0]))
        return real_observe(self, pieces, *args)

    def rows(self, *args, **kwargs):
        blocks.append(("again", kwargs.get("packed", args[8] if len(args) > 8 else None)))
        return real_rows(self, *args, **kwargs)

    def fused(self, *args, **kwargs):
        blocks.append(("flags", args[2]))
        return real_fused(self, *args, **kwargs)

    monkeypatch.setattr(direct._Della, "observe", observe)
    monkeypatch.setattr(direct._Della, "_rows", rows)
    monkeypatch.setattr(direct._Della, "_l1_fused", fused)
    if limit is not None:
        monkeypatch.setattr(direct, "SAVED_BITS_LIMIT", limit)
    text = 'pre + della(a - pre, b - pre, density=0.3, epsilon=0.1, seed=3, rescale_by="l1")'
    same_as_local_and_eager(monkeypatch, tmp_path, text, row_models(tmp_path / "in"), 3000)
    # chunks of two rows of 1,288 (102 of w), ten of 300 (7 of v), the vector and the scalar: 111
    assert len(chunks) == 111 and sum(chunks) == 203 * 1288 + 70 * 300 + 1288 + 1
    assert len(blocks) == 111  # a chunk is one block of the main pass (at most ROW_BLOCK entries)
    if limit is None:
        assert all(way == "flags" and len(packed) == 2 for way, packed in blocks)
    else:
        assert all(way == "again" and packed is None for way, packed in blocks)


@pytest.mark.parametrize("cores", [1, 2])
def test_della_l1_pass_samples_a_chunk_while_the_next_is_read(tmp_path, monkeypatch, cores):
    """della with rescale_by="l1": its pass hands a chunk's jobs (each input's block sums, its rows in
    blocks of one row here, its flags) to the second thread and reads the next chunk into the other
    workspace, then takes what is left and waits (_Della.settle), so every block is sampled once, in
    the buffers of its own chunk; on one core the jobs run at once, in one workspace. Both: the local
    executor's bytes and the eager evaluation's tensors."""
    monkeypatch.setattr(direct.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(magprune, "ROW_BLOCK", 1)
    settled, blocks = [], []
    real_settle, real_block = direct._Della.settle, direct._PassJobs._block

    def settle(self):
        settled.append(self.pending is not None)
        return real_settle(self)

    def block(self, della, lib, i, st, x, kept, flags, start, stop, done):
        blocks.append((i, x.ctypes.data, len(x), start, stop))
        return real_block(self, della, lib, i, st, x, kept, flags, start, stop, done)

    monkeypatch.setattr(direct._Della, "settle", settle)
    monkeypatch.setattr(direct._PassJobs, "_block", block)
    text = 'pre + della(a - pre, b - pre, c - pre, density=0.3, epsilon=0.1, seed=3, rescale_by="l1")'
    same_as_local_and_eager(monkeypatch, tmp_path, text, row_models(tmp_path / "in"), 3000)
    # chunks of two rows of 1,288 (102 of w), ten of 300 (7 of v), the vector and the scalar: 111 a
    # tensor's pass, each input's rows once, a block a row
    rows = sorted((i, n, start, stop) for i, _, n, start, stop in blocks)
    expected = sorted((i, n, start, start + m) for i in range(3)
                      for n, m, times in [(2576, 1288, 101), (1288, 1288, 1), (3000, 300, 7), (1288, 1288, 1),
                                          (1, 1, 1)]
                      for _ in range(times) for start in range(0, n, m))
    assert rows == expected
    # with a second thread, the chunks' inputs lie in two workspaces in turn, and each chunk's jobs are
    # still running (or waited for) when the next one comes; on one core, one workspace
    assert len({at for i, at, n, _, _ in blocks if i == 0 and n == 2576}) == cores
    if cores == 2:
        assert settled.count(True) == 111
    else:
        assert len(settled) >= 111 and not any(settled)


@pytest.mark.parametrize("cuts", [[], [1, 5000, 16383, 16385, 30000], [16384, 32768], [7] * 40])
def test_abs_sums_of_pieces_are_the_block_sums_of_the_whole(cuts):
    """_AbsSums over pieces cut anywhere (inside a block, at its end, pieces shorter than a block):
    the local executor's L1 norm (BlockSums with l1) of the whole tensor, bit for bit."""
    from tvlang.ops.native import library
    from tvlang.ops.sums import BlockSums

    g = torch.Generator().manual_seed(11)
    x = torch.randn(3 * (1 << 14) + 100, generator=g) * torch.logspace(-20, 20, 3 * (1 << 14) + 100)
    whole = BlockSums(False, l1=True)
    whole.add("", [x])
    sums = direct._AbsSums(x.numel())
    values, at = x.numpy(), 0
    for cut in cuts:
        sums.add(values[at:at + cut], library())
        at += cut
    sums.add(values[at:], library())
    assert sums.total() == whole.value()


def test_a_nonfinite_della_l1_norm_is_the_local_executors(tmp_path, monkeypatch):
    """An infinite input entry makes della's L1 norm infinite in its pass: this executor gives the run
    to the local one (nothing written), whose result and error are its own."""
    g = torch.Generator().manual_seed(9)
    pre = {"w": torch.randn(40, 300, generator=g)}
    a = {"w": pre["w"] + 0.01 * torch.randn(40, 300, generator=g)}
    a["w"][25, 7] = math.inf
    paths = {"pre": write_checkpoint(str(tmp_path / "in" / "pre"), pre),
             "a": write_checkpoint(str(tmp_path / "in" / "a"), a)}
    ran = []
    real = direct.attempt
    monkeypatch.setattr(direct, "attempt", lambda *args, **kw: ran.append(real(*args, **kw)) or ran[-1])
    text = 'pre + della(a - pre, density=0.5, epsilon=0.1, rescale_by="l1")'
    with pytest.raises(TvlangError) as err:
        tvlang.compile(text).run(paths, str(tmp_path / "out"))
    assert ran == [None]
    assert err.value.message.startswith("output 'out': tensor 'w' has a non-finite value")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_della_rows_longer_than_a_chunk_are_the_local_executors(tmp_path, monkeypatch):
    """A row of 1,288 entries does not fit chunks of 1,000: the local executor runs the recipe
    (nothing written by this one), the same tensors as the eager evaluation."""
    paths = row_models(tmp_path / "in")
    monkeypatch.setattr(direct, "CHUNK_ELEMENTS", 1000)
    out = tmp_path / "merged.safetensors"
    text = "pre + della(a - pre, b - pre, density=0.2, epsilon=0.1, seed=1)"
    ran = []
    real = direct.attempt
    monkeypatch.setattr(direct, "attempt", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    tvlang.compile(text).run(paths, str(out), allow_unused=True)
    assert ran == [None]
    sd = {name: load_file(os.path.join(path, "model.safetensors")) for name, path in paths.items()}
    eager = tvlang.compile(text).evaluate(sd, allow_unused=True)
    got = load_file(str(out))
    assert all(torch.equal(got[name], eager[name]) for name in sd["pre"])
