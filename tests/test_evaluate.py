"""Differential tests of the streaming evaluator.

Every output is compared with a naive eager evaluation: each input loaded whole
with ``safetensors.torch.load_file``, the expression computed by hand in
float32 (or float64), tensor by tensor, and cast to the output dtype.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tvlang
from tvlang.faces.cli import main
from tvlang.plan.schedule import Step, TensorProgram
from tvlang.run import chunked, evaluate
from tvlang.run.buffers import OutputBuffers
from tvlang.run.evaluate import validate
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

SPEC = llama_spec(hidden=16, layers=2, vocab=32, intermediate=24)
INT_NAME = "model.position_ids"
CARD = "pre + 0.4*(a - b) + 0.7*(c - pre)"
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}\n', "tokenizer_config.json": '{"model_max_length": 32}\n'}


def card(t):
    return t["pre"] + 0.4 * (t["a"] - t["b"]) + 0.7 * (t["c"] - t["pre"])


@pytest.fixture(autouse=True, params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Every test runs twice: tensors whole, and linear programs in chunks of 100 elements
    (with a remainder, and tensors below the threshold still whole)."""
    if request.param == "chunked":
        monkeypatch.setattr(chunked, "CHUNK_MIN", 200)
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 100)
    return request.param


# -- checkpoints -------------------------------------------------------------------------


def state_dicts(dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    pre = make_state_dict(SPEC, seed=0, dtype=dtype)
    return {"pre": pre, **{name: finetune_like(pre, seed=i + 1, scale=0.05) for i, name in enumerate("abc")}}


def write_all(folder, sds, layout: str) -> dict[str, str]:
    """Write each state dict as a .safetensors file, a directory, or a sharded directory."""
    paths = {}
    for name, sd in sds.items():
        if layout == "file":
            path = str(folder / f"{name}.safetensors")
            write_checkpoint(path, sd)
        else:
            path = str(folder / name)
            write_checkpoint(path, sd, shard_size=4000 if layout == "sharded" else None)
            for file, text in TOKENIZER.items():
                (folder / name / file).write_text(text)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """float32 checkpoints in every layout: {layout: {name: path}}, plus the state dicts."""
    root = tmp_path_factory.mktemp("ckpts")
    sds = state_dicts(torch.float32)
    out = {}
    for layout in ("file", "dir", "sharded"):
        (root / layout).mkdir()
        out[layout] = write_all(root / layout, sds, layout)
    return out, sds


def load_any(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint loaded whole: a file, a model directory, or a sharded one."""
    if path.endswith(".safetensors"):
        return load_file(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        merged = {}
        for file in files:
            merged.update(load_file(os.path.join(path, file)))
        return merged
    return load_file(os.path.join(path, "model.safetensors"))


def naive(paths: dict[str, str], fn, compute=torch.float32, out_dtype=None) -> dict[str, torch.Tensor]:
    """The reference: load everything, compute per float tensor, cast; ints from pre."""
    loaded = {name: load_any(path) for name, path in paths.items()}
    base = loaded["pre"]
    result = {}
    for name, tensor in base.items():
        if not tensor.dtype.is_floating_point:
            result[name] = tensor
            continue
        value = fn({k: sd[name].to(compute) for k, sd in loaded.items()})
        result[name] = value.to(out_dtype or tensor.dtype)
    return result


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        if tensor.dtype.is_floating_point:
            # The plan computes 0.3*pre + 0.4*a - 0.4*b + 0.7*c: float32 rounding differs
            # from the hand computation by an ulp or two, never more.
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], tensor), name


def check_index(out: str) -> None:
    """A Hugging Face sharded index: every tensor mapped to a file that holds it, total size right."""
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    total = 0
    for name, file in index["weight_map"].items():
        with safe_open(os.path.join(out, file), "pt") as handle:
            assert name in handle.keys()
            tensor = handle.get_tensor(name)
            total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert files == sorted(set(index["weight_map"].values()))
    assert len(files) > 1


# -- the differential tests ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_layout,out_layout", [("file", "dir"), ("dir", "sharded"), ("sharded", "file")])
def test_card_equals_naive(tmp_path, dtype, in_layout, out_layout):
    (tmp_path / "in").mkdir()
    paths = write_all(tmp_path / "in", state_dicts(dtype), in_layout)
    out = str(tmp_path / ("out.safetensors" if out_layout == "file" else "out"))
    summary = tvlang.compile(CARD).run(paths, out, shard_size=4000 if out_layout == "sharded" else None)
    assert summary.tensors == len(SPEC)
    got = load_any(out)
    want = naive(paths, card)
    if dtype == torch.float32:
        assert_same(got, want)
    else:
        # Half-precision outputs: the same float32 result rounded once; allow one rounding step.
        assert list(got) == list(want)
        for name, tensor in want.items():
            assert got[name].dtype == dtype or not tensor.dtype.is_floating_point
            rtol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
            torch.testing.assert_close(got[name].float(), tensor.float(), rtol=rtol,
                                       atol=1e-6, msg=name)
    if out_layout == "sharded":
        check_index(out)
    if out_layout != "file":
        assert sorted(os.listdir(out)) == sorted(  # weights, index, config; a model's card (README.md)
            [f for f in os.listdir(out) if f.endswith((".safetensors", ".json")) or f == "README.md"])
        assert not [f for f in os.listdir(tmp_path) if "tvtmp" in f]


def test_every_output_layout_from_a_sharded_input(ckpts, tmp_path):
    paths, _ = ckpts
    want = naive(paths["sharded"], card)
    for layout, out in [("file", "o.safetensors"), ("dir", "o_dir"), ("sharded", "o_sharded")]:
        target = str(tmp_path / out)
        tvlang.compile(CARD).run(paths["sharded"], target, shard_size=3000 if layout == "sharded" else None)
        assert_same(load_any(target), want)
        if layout == "sharded":
            check_index(target)
        elif layout == "dir":
            assert os.listdir(target) and not os.path.exists(os.path.join(target, "model.safetensors.index.json"))


def test_output_keeps_the_base_order_and_integer_buffers(ckpts, tmp_path):
    paths, sds = ckpts
    out = str(tmp_path / "o.safetensors")
    tvlang.compile(CARD).run(paths["file"], out)
    with safe_open(out, "pt") as handle:
        names = list(handle.keys())
    with open(out, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    assert order == list(sds["pre"])
    assert sorted(names) == sorted(sds["pre"])
    got = load_file(out)
    assert got[INT_NAME].dtype == torch.int64
    assert torch.equal(got[INT_NAME], sds["pre"][INT_NAME])


RECIPE = """\
param lam = 0.4
tau = a - pre
out merged = pre + lam*tau + 0.7*(c - pre)
out tau_a = tau
out half = 0.5*a + 0.5*b
"""


def test_several_outputs_in_one_pass(ckpts, tmp_path):
    paths, sds = ckpts
    plan = tvlang.compile(RECIPE)
    outs = {"merged": str(tmp_path / "merged"), "tau_a": str(tmp_path / "tau.safetensors"),
            "half": str(tmp_path / "half.safetensors")}
    summary = plan.run(paths["dir"], outs)
    assert summary.passes == 1
    assert summary.outputs == outs
    merged = naive(paths["dir"], lambda t: t["pre"] + 0.4 * (t["a"] - t["pre"]) + 0.7 * (t["c"] - t["pre"]))
    assert_same(load_any(outs["merged"]), merged)
    assert_same(load_any(outs["half"]), naive(paths["dir"], lambda t: 0.5 * t["a"] + 0.5 * t["b"]))
    tau = naive(paths["dir"], lambda t: t["a"] - t["pre"])
    del tau[INT_NAME]  # integer buffers are left out of task vectors
    assert_same(load_any(outs["tau_a"]), tau)
    # Every tensor of every output counted once.
    assert summary.tensors == 2 * len(SPEC) + len(SPEC) - 1


@pytest.mark.parametrize("existing", [False, True])
def test_several_outputs_appear_together_or_not_at_all(ckpts, tmp_path, existing):
    """A failure while renaming the outputs into place withdraws those already renamed:
    the output paths are left as they were (absent, or the old outputs with force)."""
    from tvlang.io import StreamingWriter

    paths, _ = ckpts
    outs = {"merged": str(tmp_path / "merged"), "tau_a": str(tmp_path / "tau.safetensors"),
            "half": str(tmp_path / "half.safetensors")}
    if existing:
        os.mkdir(outs["merged"])
        (tmp_path / "merged" / "config.json").write_text("old merged")
        save_file({"old": torch.zeros(1)}, str(tmp_path / "tau.safetensors"))
        save_file({"old": torch.ones(1)}, str(tmp_path / "half.safetensors"))
        old_tau = (tmp_path / "tau.safetensors").read_bytes()
        old_half = (tmp_path / "half.safetensors").read_bytes()
    real = StreamingWriter.publish

    def publish(self):
        if self.out == outs["half"]:
            raise KeyboardInterrupt  # Ctrl-C after two of the three renames
        real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StreamingWriter, "publish", publish)
        with pytest.raises(KeyboardInterrupt):
            tvlang.compile(RECIPE).run(paths["dir"], outs, force=existing)
    if existing:
        assert sorted(os.listdir(tmp_path)) == ["half.safetensors", "merged", "tau.safetensors"]
        assert (tmp_path / "merged" / "config.json").read_text() == "old merged"
        assert os.listdir(tmp_path / "merged") == ["config.json"]
        assert (tmp_path / "tau.safetensors").read_bytes() == old_tau
        assert (tmp_path / "half.safetensors").read_bytes() == old_half
    else:
        assert os.listdir(tmp_path) == []
    tvlang.compile(RECIPE).run(paths["dir"], outs, force=True)  # and then it works
    assert_same(load_any(outs["half"]), naive(paths["dir"], lambda t: 0.5 * t["a"] + 0.5 * t["b"]))
    assert sorted(os.listdir(tmp_path)) == ["half.safetensors", "merged", "tau.safetensors"]


def test_metadata_and_copied_files(ckpts, tmp_path):
    paths, _ = ckpts
    plan = tvlang.compile(RECIPE, lam=0.25)
    outs = {"merged": str(tmp_path / "merged"), "tau_a": str(tmp_path / "tau.safetensors"),
            "half": str(tmp_path / "half")}
    plan.run(paths["dir"], outs)
    with safe_open(os.path.join(outs["merged"], "model.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["tvlang.recipe"] == RECIPE
    assert json.loads(meta["tvlang.params"]) == {"lam": 0.25}
    assert meta["tvlang.version"] == tvlang.__version__
    assert meta["tvlang.kind"] == "model"
    assert meta["tvlang.output"] == "merged"
    assert json.loads(meta["tvlang.inputs"]) == {k: paths["dir"][k] for k in ("pre", "a", "c")}
    with safe_open(outs["tau_a"], "pt") as handle:
        assert handle.metadata()["tvlang.kind"] == "delta"
    for out in (outs["merged"], outs["half"]):
        assert sorted(os.listdir(out)) == sorted(["README.md", "config.json", "model.safetensors", *TOKENIZER])
        for file, text in TOKENIZER.items():
            assert open(os.path.join(out, file)).read() == text
    # One base for the whole run (the first model read: pre), even for half, which reads a and b:
    # its integer buffers and config come from pre, and its metadata says so.
    with safe_open(os.path.join(outs["half"], "model.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["tvlang.inputs"]) == {k: paths["dir"][k] for k in ("a", "b", "pre")}
    with safe_open(outs["tau_a"], "pt") as handle:
        assert json.loads(handle.metadata()["tvlang.inputs"]) == {k: paths["dir"][k] for k in ("a", "pre")}
    merged = naive(paths["dir"], lambda t: t["pre"] + 0.25 * (t["a"] - t["pre"]) + 0.7 * (t["c"] - t["pre"]))
    assert_same(load_any(outs["merged"]), merged)


def test_state_dict_and_module_bindings_are_not_modified(ckpts):
    paths, sds = ckpts
    module = torch.nn.Module()
    for name, tensor in sds["a"].items():
        parts = name.split(".")
        owner = module
        for part in parts[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if tensor.dtype.is_floating_point:
            owner.register_parameter(parts[-1], torch.nn.Parameter(tensor.clone()))
        else:
            owner.register_buffer(parts[-1], tensor.clone())
    pre = {k: v.clone() for k, v in sds["pre"].items()}
    before_module = {k: v.detach().clone() for k, v in module.state_dict().items()}
    bindings = {"pre": pre, "a": module, "b": paths["file"]["b"], "c": sds["c"]}
    got = tvlang.compile(CARD).evaluate(bindings)
    assert_same(got, naive(paths["file"], card))
    for name, tensor in sds["pre"].items():
        assert torch.equal(pre[name], tensor), name
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before_module[name]), name
    # The returned tensors are fresh memory, not the caller's.
    assert got[INT_NAME].data_ptr() != pre[INT_NAME].data_ptr()


def test_stream_yields_base_order_one_at_a_time(ckpts):
    paths, sds = ckpts
    plan = tvlang.compile("pre + 0.5*(a - pre)")
    stream = plan.stream(paths["file"], allow_unused=True)
    first = next(stream)
    assert first[0] == next(iter(sds["pre"]))
    rest = list(stream)
    assert [first[0]] + [n for n, _ in rest] == list(sds["pre"])


# -- task vectors as inputs -------------------------------------------------------------------


def test_delta_bindings(ckpts, tmp_path):
    paths, sds = ckpts
    tau = {k: (sds["c"][k] - sds["pre"][k]) for k in sds["pre"] if sds["pre"][k].dtype.is_floating_point}
    want = naive(paths["file"], lambda t: t["pre"] + 0.7 * (t["c"] - t["pre"]))
    plan = tvlang.compile("pre + 0.7*tau", sources={"pre": "model", "tau": "delta"})
    got = plan.evaluate({"pre": paths["file"]["pre"], "tau": tvlang.delta(tau)})
    assert_same(got, want)
    # A Delta file written by tvlang binds as a task vector by itself.
    delta_file = str(tmp_path / "tau.safetensors")
    tvlang.compile("c - pre").run(paths["file"], delta_file, allow_unused=True)
    assert_same(plan.evaluate({"pre": paths["file"]["pre"], "tau": delta_file}), want)
    assert_same(plan.evaluate({"pre": paths["file"]["pre"], "tau": tvlang.delta(delta_file)}), want)


def test_design_card_one_liner_from_the_cli(ckpts, tmp_path, capsys):
    """amazon_sent is a Delta file written by `tvlang run -e "ft - pre"`, bound with no marker."""
    paths, _ = ckpts
    p = paths["dir"]
    sent = str(tmp_path / "amazon_sent.safetensors")
    assert main(["run", "-e", "ft - pre", "--bind", f"pre={p['pre']}", "--bind", f"ft={p['c']}", "-o", sent, "-q"]) == 0
    out = str(tmp_path / "yelp_sent")
    code = main(["run", "-e", "pre + 0.4*(yelp_lm - amazon_lm) + 0.7*amazon_sent",
                 "--bind", f"pre={p['pre']}", "--bind", f"yelp_lm={p['a']}", "--bind", f"amazon_lm={p['b']}",
                 "--bind", f"amazon_sent={sent}", "-o", out, "-q"])
    assert code == 0, capsys.readouterr().err
    assert_same(load_any(out), naive(p, card))
    # The same with the explicit delta: prefix.
    out2 = str(tmp_path / "yelp_sent2.safetensors")
    assert main(["run", "-e", "pre + 0.4*(yelp_lm - amazon_lm) + 0.7*amazon_sent",
                 "--bind", f"pre={p['pre']}", "--bind", f"yelp_lm={p['a']}", "--bind", f"amazon_lm={p['b']}",
                 "--bind", f"amazon_sent=delta:{sent}", "-o", out2, "-q"]) == 0
    assert_same(load_file(out2), naive(p, card))


# -- policies and dtypes -------------------------------------------------------------------------


@pytest.fixture()
def lacking(ckpts, tmp_path):
    """`a` without one float tensor."""
    paths, sds = ckpts
    dropped = "model.layers.1.mlp.up_proj.weight"
    a = {k: v for k, v in sds["a"].items() if k != dropped}
    path = write_checkpoint(str(tmp_path / "a_lacking.safetensors"), a)
    return {"pre": paths["file"]["pre"], "a": path}, dropped, sds


def test_missing_base_copies_the_base_tensor(lacking, tmp_path):
    bindings, dropped, sds = lacking
    plan = tvlang.compile("pre + 0.5*(a - pre)")
    got = plan.evaluate(bindings, missing="base")
    assert list(got) == list(sds["pre"])
    assert torch.equal(got[dropped], sds["pre"][dropped])
    other = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(got[other], 0.5 * sds["pre"][other] + 0.5 * sds["a"][other])
    # With an output dtype, the copied tensor is cast like the others.
    half = plan.evaluate(bindings, missing="base", out_dtype="float16")
    assert half[dropped].dtype == torch.float16
    assert torch.equal(half[dropped], sds["pre"][dropped].half())
    # A task vector leaves the tensor out (a missing tensor is no change).
    tau = tvlang.compile("a - pre").evaluate(bindings, missing="base")
    assert dropped not in tau and INT_NAME not in tau
    out = str(tmp_path / "m.safetensors")
    tvlang.compile("pre + 0.5*(a - pre)").run(bindings, out, missing="base", out_dtype="bfloat16")
    assert load_file(out)[dropped].dtype == torch.bfloat16


def test_missing_skip_leaves_the_tensor_out(lacking):
    bindings, dropped, sds = lacking
    got = tvlang.compile("pre + 0.5*(a - pre)").evaluate(bindings, missing="skip")
    assert list(got) == [n for n in sds["pre"] if n != dropped]


def test_missing_error_names_tensor_and_both_files(lacking):
    bindings, dropped, _ = lacking
    with pytest.raises(tvlang.TvlangError) as info:
        tvlang.compile("pre + 0.5*(a - pre)").evaluate(bindings)
    message = info.value.message
    assert f"tensor '{dropped}'" in message
    assert bindings["pre"] in message and bindings["a"] in message
    assert "--missing base|skip" in info.value.render()


def test_out_dtype_and_float64_compute(ckpts, tmp_path):
    paths, _ = ckpts
    plan = tvlang.compile(CARD)
    got = plan.evaluate(paths["file"], out_dtype="bfloat16")
    want = naive(paths["file"], card, out_dtype=torch.bfloat16)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype
        if tensor.dtype.is_floating_point:
            torch.testing.assert_close(got[name].float(), tensor.float(), rtol=2 ** -7, atol=1e-6)
    assert got[INT_NAME].dtype == torch.int64
    got64 = plan.evaluate(paths["file"], dtype="float64", out_dtype="float64")
    want64 = naive(paths["file"], card, compute=torch.float64, out_dtype=torch.float64)
    for name, tensor in want64.items():
        assert got64[name].dtype == tensor.dtype
        torch.testing.assert_close(got64[name], tensor, rtol=1e-12, atol=1e-14)
    # float64 compute, output in the base's dtype (float32): rounded once at the end, so
    # within one float32 ulp of the float64 reference.
    out = str(tmp_path / "o.safetensors")
    assert main(["run", "-e", CARD, *[f"--bind={k}={v}" for k, v in paths["file"].items()],
                 "--dtype", "float64", "-o", out, "-q"]) == 0
    got32 = load_file(out)
    for name, tensor in want64.items():
        if tensor.dtype.is_floating_point:
            assert got32[name].dtype == torch.float32
            torch.testing.assert_close(got32[name], tensor.float(), rtol=2 ** -23, atol=1e-12)


def test_reduction_in_a_coefficient(ckpts):
    paths, sds = ckpts
    got = tvlang.compile("pre + (1/norm(a - pre))*(a - pre)").evaluate(paths["dir"], allow_unused=True)
    floats = [n for n, t in sds["pre"].items() if t.dtype.is_floating_point]
    total = sum(float(((sds["a"][n].double() - sds["pre"][n].double()) ** 2).sum()) for n in floats)
    norm = total ** 0.5
    assert abs(norm - 1.0) > 0.1  # the scaling is visible
    for name in floats:
        want = sds["pre"][name] + (sds["a"][name] - sds["pre"][name]) / norm
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[INT_NAME], sds["pre"][INT_NAME])
    # The task vector now has norm 1.
    unit = sum(float(((got[n].double() - sds["pre"][n].double()) ** 2).sum()) for n in floats)
    assert abs(unit - 1.0) < 1e-4


# -- validate: the checks of run, without computing -----------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_validate_accepts_and_closes(ckpts):
    paths, sds = ckpts
    before = open_fds()
    result = validate(tvlang.compile(CARD), paths["sharded"])
    assert result.names == [n for n in sds["pre"] if n != INT_NAME]
    assert result.passthrough == [INT_NAME]
    assert open_fds() == before


def test_validate_reports_what_run_reports(ckpts, tmp_path):
    paths, sds = ckpts
    a = dict(sds["a"])
    a["lm_head.weight"] = torch.zeros(3, 16)
    bad = write_checkpoint(str(tmp_path / "bad.safetensors"), a)
    bindings = {**paths["file"], "a": bad}
    before = open_fds()
    with pytest.raises(tvlang.TvlangError) as info:
        validate(tvlang.compile(CARD), bindings)
    assert open_fds() == before
    assert info.value.message == (f"tensor 'lm_head.weight' has shape (32, 16) in {paths['file']['pre']} "
                                  f"but (3, 16) in {bad}")
    assert info.value.tensor == "lm_head.weight"
    with pytest.raises(tvlang.TvlangError) as again:
        tvlang.compile(CARD).run(bindings, str(tmp_path / "o.safetensors"))
    assert again.value.message == info.value.message
    assert not os.path.exists(tmp_path / "o.safetensors")
    # The policy applies: a tensor missing from one input passes with missing="skip".
    lacking = {k: v for k, v in sds["b"].items() if k != "model.norm.weight"}
    path = write_checkpoint(str(tmp_path / "lacking.safetensors"), lacking)
    with pytest.raises(tvlang.TvlangError, match="missing from"):
        validate(tvlang.compile(CARD), {**paths["file"], "b": path})
    skipped = validate(tvlang.compile(CARD), {**paths["file"], "b": path}, missing="skip")
    assert "model.norm.weight" not in skipped.names


# -- chunked execution details ------------------------------------------------------------------


def test_a_value_changed_after_it_is_written(ckpts):
    """A hand-written program that writes a buffer, then scales it for a second output:
    the first output must keep the value it was written with."""
    paths, sds = ckpts
    plan = tvlang.compile("out o1 = a - pre\nout o2 = 2*(a - pre)")
    plan.schedule.main = TensorProgram([
        Step("read", 0, name="a"), Step("read", 1, name="pre"),
        Step("axpy", 0, (1,), coef=-1.0),
        Step("write", None, (0,), name="o1"),
        Step("scale", 0, coef=2.0),
        Step("write", None, (0,), name="o2"),
    ], 2, ["a", "pre"], ["o1", "o2"])
    o1 = plan.evaluate(paths["file"], output="o1", allow_unused=True)
    o2 = plan.evaluate(paths["file"], output="o2", allow_unused=True)
    for name, pre in sds["pre"].items():
        if pre.dtype.is_floating_point:
            assert torch.equal(o1[name], sds["a"][name] - pre), name
            assert torch.equal(o2[name], 2 * (sds["a"][name] - pre)), name


def test_linear_program_analysis():
    program = TensorProgram([
        Step("read", 0, name="a"), Step("read", 1, name="b"),
        Step("add", 2, (0, 1), coef=(0.5, 0.5)),
        Step("write", None, (2,), name="x"),
        Step("axpy", 2, (0,), coef=1.0),
        Step("write", None, (2,), name="y"),
        Step("write", None, (2,), name="z"),
    ], 3, ["a", "b"], ["x", "y", "z"])
    linear = chunked.linear_program(program)
    assert linear.values == [0, 1, 2, 2, 3, 3, 3]
    assert linear.written == {2: "x", 3: "y"}
    # kernels with a chunk form take part; lowrank (an SVD) needs whole tensors
    calls = TensorProgram([Step("read", 0, name="a"), Step("call", 1, (0,), name="ties")], 2, ["a"], [])
    assert chunked.linear_program(calls).values == [0, 1]
    calls = TensorProgram([Step("read", 0, name="a"), Step("call", 1, (0,), name="lowrank")], 2, ["a"], [])
    assert chunked.linear_program(calls) is None
    # a kernel that looks at its whole input first cannot take its input from another one: the
    # forms' passes decide, with their options (chunk_kernels; tests/test_chunk_forms_l1.py)
    nested = TensorProgram([Step("read", 0, name="a"), Step("call", 1, (0,), name="topk"),
                            Step("axpy", 1, (0,), coef=1.0), Step("call", 2, (1,), name="ties")], 3, ["a"], [])
    assert chunked.passes_feed_passes(nested, lambda index, step: step.op == "call")
    assert not chunked.passes_feed_passes(nested, lambda index, step: step.name == "ties")
    after_dare = TensorProgram([Step("read", 0, name="a"), Step("call", 1, (0,), name="dare"),
                                Step("call", 2, (1,), name="ties")], 3, ["a"], [])
    assert chunked.linear_program(after_dare) is not None


def test_run_recycles_output_buffers(ckpts, tmp_path, chunking, monkeypatch):
    """run() reuses result buffers once written: the pool stays small, results stay right.

    Chunked, a large tensor goes to the writer in chunk-sized pieces: no buffer of the
    pool is ever larger than one chunk, however large the tensor. (The local executor's
    pool: the torch-free one, tvlang.run.direct, would take this linear recipe.)
    """
    monkeypatch.setenv("TVLANG_DIRECT", "0")
    paths, _ = ckpts
    pools = []
    given = []
    real = OutputBuffers.give_back

    def spy(self, tensor):
        given.append(tensor.numel())
        real(self, tensor)
        pools.append([b.numel() for b in self.pool])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OutputBuffers, "give_back", spy)
        outs = {"merged": str(tmp_path / "m.safetensors"), "tau_a": str(tmp_path / "t.safetensors"),
                "half": str(tmp_path / "h.safetensors")}
        tvlang.compile(RECIPE).run(paths["file"], outs)
    assert max(len(pool) for pool in pools) <= (evaluate.IN_FLIGHT + 1) * 3
    sizes = {n: torch.Size(e[0] if isinstance(e[0], tuple) else e).numel() for n, e in SPEC.items()}
    large = [n for n, size in sizes.items() if size >= chunked.CHUNK_MIN and n != INT_NAME]
    if chunking == "chunked":
        assert large  # the spec has tensors that run in chunks
        assert max(n for pool in pools for n in pool) == chunked.CHUNK_ELEMENTS * 4  # float32 bytes
        assert max(given) == chunked.CHUNK_ELEMENTS
        # every piece and every whole tensor written goes back, once
        pieces = sum(-(-sizes[n] // chunked.CHUNK_ELEMENTS) for n in large)
        assert len(given) == 3 * (pieces + len(SPEC) - len(large)) - 1  # tau_a has no integer tensor
    else:
        assert len(given) == 3 * len(SPEC) - 1
    assert_same(load_file(outs["half"]), naive(paths["file"], lambda t: 0.5 * t["a"] + 0.5 * t["b"]))


def test_run_restores_torch_threads(ckpts, tmp_path):
    before = torch.get_num_threads()
    tvlang.compile(CARD).run(ckpts[0]["file"], str(tmp_path / "o.safetensors"))
    assert torch.get_num_threads() == before


# -- property: random task-arithmetic expressions ---------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODELS = ("pre", "a", "b", "c")
COEFS = st.sampled_from([0.5, 2.0, 0.25, 3.0, 1.5, 0.1, -0.7])


@st.composite
def deltas(draw, depth=0):
    """(text, function of the models) of a task-vector expression."""
    kind = draw(st.integers(0, 5 if depth < 3 else 0))
    if kind == 0:
        x, y = draw(st.sampled_from([(p, q) for p in MODELS for q in MODELS if p != q]))
        return f"({x} - {y})", lambda t, x=x, y=y: t[x] - t[y]
    if kind == 1:
        c = draw(COEFS)
        text, fn = draw(deltas(depth + 1))
        return f"{c}*{text}", lambda t: c * fn(t)
    if kind == 2:
        (lt, lf), (rt, rf) = draw(deltas(depth + 1)), draw(deltas(depth + 1))
        return f"({lt} + {rt})", lambda t: lf(t) + rf(t)
    if kind == 3:
        (lt, lf), (rt, rf) = draw(deltas(depth + 1)), draw(deltas(depth + 1))
        return f"({lt} - {rt})", lambda t: lf(t) - rf(t)
    if kind == 4:
        text, fn = draw(deltas(depth + 1))
        return f"-{text}", lambda t: -fn(t)
    c = draw(st.sampled_from([2.0, 4.0, 0.5]))
    text, fn = draw(deltas(depth + 1))
    return f"{text}/{c}", lambda t: fn(t) / c


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delta=deltas(), base=st.sampled_from(MODELS + (None,)))
def test_random_expressions_equal_direct_computation(ckpts, delta, base):
    """Any task-arithmetic expression, optimized and streamed, equals computing it directly
    (in float64) from the same tensors."""
    _, sds = ckpts
    text, fn = delta
    expr = text if base is None else f"{base} + {text}"
    got = tvlang.compile(expr).evaluate({m: sds[m] for m in MODELS}, allow_unused=True)
    for name, pre in sds["pre"].items():
        if not pre.dtype.is_floating_point:
            continue
        want = fn({m: sds[m][name].double() for m in MODELS})
        if base is not None:
            want = want + sds[base][name].double()
        scale = float(want.abs().max()) + 1e-3
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-5 * scale, msg=f"{expr}: {name}")
