"""StreamingWriter: layouts on disk, index files, copied files, and failure leaving nothing behind."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tvlang.errors import TvlangError
from tvlang.io import StreamingWriter, TensorInfo, open_reader, shard_name
from tvlang.io import writer as writer_module


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 8, generator=g),  # 320 bytes
        "layers.0.w": torch.randn(8, 8, generator=g),  # 256
        "layers.0.b": torch.randn(8, generator=g).half(),  # 16
        "layers.1.w": torch.randn(8, 8, generator=g).bfloat16(),  # 128
        "position_ids": torch.arange(6).reshape(1, 6),  # 48
        "mask": torch.tensor([True, False, True]),  # 3
        "scalar": torch.tensor(1.25, dtype=torch.float64),  # 8
        "empty": torch.empty(0, 3),  # 0
        "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),  # 4
    }


def layout_of(sd) -> list[TensorInfo]:
    return [TensorInfo.of(name, t, "") for name, t in sd.items()]


def write(out, sd, **kwargs) -> str:
    with StreamingWriter(str(out), layout_of(sd), **kwargs) as w:
        for name, tensor in sd.items():
            w.write(name, tensor)
    return str(out)


def same(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if "tvtmp" in n)


def test_single_file_loads_with_safetensors_and_carries_metadata(tmp_path):
    sd = state_dict()
    out = write(tmp_path / "merged.safetensors", sd, metadata={"tvlang.kind": "delta", "tvlang.recipe": "out = a - b"})
    loaded = load_file(out)
    assert list(loaded) == list(sd) or sorted(loaded) == sorted(sd)
    for name, tensor in sd.items():
        assert same(loaded[name], tensor), name
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"tvlang.kind": "delta", "tvlang.recipe": "out = a - b", "format": "pt"}
    reader = open_reader(out)
    assert reader.names() == list(sd)  # written in layout order
    assert reader.kind == "delta"
    assert leftovers(tmp_path) == []


def test_header_is_padded_so_data_is_aligned(tmp_path):
    out = write(tmp_path / "m.safetensors", {"w": torch.ones(3)}, metadata={"k": "v"})
    with open(out, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    assert length % 8 == 0


def test_directory_output_without_sharding(tmp_path):
    sd = state_dict()
    out = write(tmp_path / "merged", sd, metadata={"a": "b"})
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    loaded = load_file(os.path.join(out, "model.safetensors"))
    assert all(same(loaded[n], t) for n, t in sd.items())


def test_sharded_directory_output_has_valid_index(tmp_path):
    sd = state_dict()
    sizes = {n: t.numel() * t.element_size() for n, t in sd.items()}
    shard_size = 400
    out = write(tmp_path / "merged", sd, shard_size=shard_size, metadata={"tvlang.kind": "model"})
    # Greedy in layout order: [embed 320] [w 256, b 16, l1 128 -> 400] [pos 48, mask 3, scalar 8, empty 0, fp8 4]
    files = [shard_name(i, 3) for i in (1, 2, 3)]
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert sorted(os.listdir(out)) == sorted(files + ["model.safetensors.index.json"])
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(sizes.values())}
    assert set(index["weight_map"]) == set(sd)
    assert index["weight_map"]["embed.weight"] == files[0]
    assert index["weight_map"]["layers.1.w"] == files[1]
    assert index["weight_map"]["fp8"] == files[2]
    for file in files:
        with safe_open(os.path.join(out, file), "pt") as f:
            assert f.metadata()["tvlang.kind"] == "model"
            names = list(f.keys())
        assert sum(sizes[n] for n in names) <= shard_size
        loaded = load_file(os.path.join(out, file))
        for name in names:
            assert index["weight_map"][name] == file
            assert same(loaded[name], sd[name])
    reader = open_reader(out)
    assert reader.names() == list(sd)
    assert all(same(reader.read(n), t) for n, t in sd.items())


def test_tensor_larger_than_shard_size_gets_its_own_shard(tmp_path):
    sd = {"a": torch.ones(2), "big": torch.ones(100), "c": torch.ones(2)}
    out = write(tmp_path / "m", sd, shard_size=16)
    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    assert index["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors",
    }


def test_single_file_target_ignores_shard_size(tmp_path):
    sd = state_dict()
    out = write(tmp_path / "one.safetensors", sd, shard_size=16)
    assert sorted(os.listdir(tmp_path)) == ["one.safetensors"]
    assert sorted(load_file(out)) == sorted(sd)


def test_empty_layout_writes_a_valid_file(tmp_path):
    out = write(tmp_path / "none.safetensors", {}, metadata={"k": "v"})
    assert load_file(out) == {}


def test_copy_from_copies_config_and_tokenizer_files(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    copied = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "spiece.model",
              "tokenizer.model", "added_tokens.json", "modules.json", "sentence_bert_config.json",
              "config_sentence_transformers.json"]
    for name in copied:
        (base / name).write_text(f"contents of {name}")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text("pooling")
    (base / "README.md").write_text("not copied")
    save_file({"w": torch.zeros(1)}, str(base / "model.safetensors"))
    (base / "optimizer.pt").write_bytes(b"not copied")

    out = write(tmp_path / "merged", {"w": torch.ones(1)}, copy_from=str(base), inputs=[str(base)])
    assert sorted(os.listdir(out)) == sorted(copied + ["1_Pooling", "model.safetensors"])
    for name in copied:
        assert (tmp_path / "merged" / name).read_text() == f"contents of {name}"
    assert (tmp_path / "merged" / "1_Pooling" / "config.json").read_text() == "pooling"
    assert load_file(os.path.join(out, "model.safetensors"))["w"].tolist() == [1.0]


def test_copy_from_a_reader_uses_its_root(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(base / "model.safetensors"))
    reader = open_reader(str(base))
    out = write(tmp_path / "merged", {"w": torch.ones(1)}, copy_from=reader, inputs=[reader])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_copy_from_is_ignored_for_a_single_file(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    write(tmp_path / "out.safetensors", {"w": torch.ones(1)}, copy_from=str(base))
    assert sorted(os.listdir(tmp_path)) == ["base", "out.safetensors"]


# -- refusing outputs -----------------------------------------------------------------


def test_output_that_is_an_input_file_is_refused(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(1)}, path)
    with pytest.raises(TvlangError, match=r"model.safetensors: refusing to write: the output is an input") as err:
        StreamingWriter(path, layout_of({"w": torch.ones(1)}), inputs=[path], force=True)
    assert load_file(path)["w"].tolist() == [0.0]
    assert "model.safetensors" in str(err.value)


def test_output_spelled_differently_is_still_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    other = os.path.join(str(tmp_path), ".", "sub", "..", "model.safetensors")
    (tmp_path / "sub").mkdir()
    with pytest.raises(TvlangError, match="the output is an input"):
        StreamingWriter(other, [], inputs=[str(path)], force=True)


def test_output_directory_containing_an_input_is_refused(tmp_path):
    model = tmp_path / "base" / "model.safetensors"
    model.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(model))
    with pytest.raises(TvlangError, match=r"refusing to write: the output contains an input"):
        StreamingWriter(str(tmp_path / "base"), [], inputs=[str(model)], force=True)
    # and an input inside a directory that would be replaced
    with pytest.raises(TvlangError, match=r"the output contains an input"):
        StreamingWriter(str(tmp_path), [], inputs=[str(tmp_path / "base")], force=True)


def test_output_that_is_the_weights_of_an_input_directory_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(1)}, str(base / "model.safetensors"))
    with pytest.raises(TvlangError, match="the output is an input"):
        StreamingWriter(str(base / "model.safetensors"), [], inputs=[str(base)], force=True)
    reader = open_reader(str(base))
    with pytest.raises(TvlangError, match="the output is an input"):
        StreamingWriter(str(base / "model.safetensors"), [], inputs=[reader], force=True)


def test_output_next_to_an_input_is_allowed(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(1)}, str(base / "model.safetensors"))
    out = write(base / "merged.safetensors", {"w": torch.ones(1)}, inputs=[str(base)])
    assert load_file(out)["w"].tolist() == [1.0]


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(TvlangError) as err:
        StreamingWriter(str(out), [])
    assert err.value.message == f"{out}: output already exists"
    assert "force" in err.value.notes[0]
    assert (out / "config.json").read_text() == "old"


def test_force_replaces_directory_only_at_commit(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    sd = {"w": torch.ones(2)}
    with StreamingWriter(str(out), layout_of(sd), force=True) as w:
        w.write("w", sd["w"])
        assert (out / "config.json").exists()  # not replaced until commit
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_force_replaces_a_file(tmp_path):
    out = tmp_path / "m.safetensors"
    save_file({"old": torch.zeros(1)}, str(out))
    write(out, {"w": torch.ones(1)}, force=True)
    assert list(load_file(str(out))) == ["w"]
    assert leftovers(tmp_path) == []


def test_failed_forced_write_keeps_the_old_output(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with StreamingWriter(str(out), layout_of({"w": torch.ones(1)}), force=True) as w:
            raise RuntimeError("kernel failed")
    assert sorted(os.listdir(out)) == ["config.json"]
    assert leftovers(tmp_path) == []


def test_missing_parent_directories_are_created(tmp_path):
    target = tmp_path / "new" / "dirs" / "m.safetensors"
    with StreamingWriter(str(target), layout_of({"w": torch.ones(2)})) as w:
        w.write("w", torch.ones(2))
    assert torch.equal(load_file(target)["w"], torch.ones(2))


def test_parent_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(TvlangError, match=r"cannot create directory .*file"):
        StreamingWriter(str(tmp_path / "file" / "m.safetensors"), [])


# -- layout checks --------------------------------------------------------------------


def test_write_checks_shape_dtype_and_order(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.ones(3)}
    w = StreamingWriter(str(tmp_path / "m.safetensors"), layout_of(sd))
    with pytest.raises(TvlangError, match=r"m.safetensors: tensor 'b' comes out of order; expected 'a' next"):
        w.write("b", sd["b"])
    with pytest.raises(TvlangError, match=r"tensor 'x' is not in the output layout; expected 'a' next"):
        w.write("x", sd["a"])
    with pytest.raises(TvlangError, match=r"tensor 'a' is \[3\] torch.float32 but the output layout says \[2\] torch.float32"):
        w.write("a", torch.ones(3))
    with pytest.raises(TvlangError, match=r"tensor 'a' is \[2\] torch.float64 but the output layout says \[2\] torch.float32"):
        w.write("a", torch.ones(2, dtype=torch.float64))
    w.write("a", sd["a"])
    w.write("b", sd["b"])
    w.commit()
    assert load_file(str(tmp_path / "m.safetensors"))["b"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_tensors_written_in_pieces_equal_whole_writes(tmp_path, piece):
    """write_part: any split of each tensor into pieces gives the same bytes as write(), sharded too."""
    sd = state_dict()
    whole = write(tmp_path / "whole", sd, shard_size=400)
    out = tmp_path / "pieces"
    with StreamingWriter(str(out), layout_of(sd), shard_size=400) as w:
        for name, tensor in sd.items():
            flat = tensor.reshape(-1)
            if flat.numel() == 0:
                w.write_part(name, flat)
            for start in range(0, flat.numel(), piece):
                w.write_part(name, flat[start:start + piece])
    assert sorted(os.listdir(out)) == sorted(os.listdir(whole))
    for file in os.listdir(out):
        assert (out / file).read_bytes() == (tmp_path / "whole" / file).read_bytes(), file


def test_write_part_checks_dtype_size_and_completion(tmp_path):
    sd = {"a": torch.arange(4.0), "b": torch.ones(3)}
    w = StreamingWriter(str(tmp_path / "m.safetensors"), layout_of(sd))
    with pytest.raises(TvlangError, match=r"m.safetensors: tensor 'b' comes out of order; expected 'a' next"):
        w.write_part("b", sd["b"])
    with pytest.raises(TvlangError, match=r"a piece of tensor 'a' is torch.float64 but the output layout says torch.float32"):
        w.write_part("a", torch.ones(2, dtype=torch.float64))
    w.write_part("a", sd["a"][:3])
    with pytest.raises(TvlangError, match=r"the pieces of tensor 'a' come to more than its 16 bytes"):
        w.write_part("a", sd["a"][:2])
    with pytest.raises(TvlangError, match=r"tensor 'b' comes out of order; expected 'a' next"):
        w.write("b", sd["b"])
    with pytest.raises(TvlangError, match=r"tensor 'a' is half written in pieces \(12 of 16 bytes\): write the rest with write_part"):
        w.write("a", sd["a"])
    w.write_part("a", sd["a"][3:])
    w.write("b", sd["b"])
    w.commit()
    assert load_file(str(tmp_path / "m.safetensors"))["a"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_commit_with_a_half_written_tensor_writes_nothing(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.ones(3)}
    w = StreamingWriter(str(tmp_path / "m"), layout_of(sd))
    w.write("a", sd["a"])
    w.write_part("b", sd["b"][:1])
    with pytest.raises(TvlangError, match=r"m: output incomplete: 1 tensors were never written "
                                          r"\(first: 'b', 4 of its 12 bytes written\); nothing was written"):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_commit_with_missing_tensors_writes_nothing(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.ones(3)}
    w = StreamingWriter(str(tmp_path / "m"), layout_of(sd))
    w.write("a", sd["a"])
    with pytest.raises(TvlangError, match=r"m: output incomplete: 1 tensors were never written \(first: 'b'\)"):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_non_contiguous_and_non_string_metadata(tmp_path):
    t = torch.arange(6.0).reshape(2, 3).t()
    out = write(tmp_path / "m.safetensors", {"t": t})
    assert torch.equal(load_file(out)["t"], t)
    with pytest.raises(TvlangError, match="metadata must map strings to strings; 'n' is int"):
        StreamingWriter(str(tmp_path / "x.safetensors"), [], metadata={"n": 3})


def test_abort_removes_temporary(tmp_path):
    sd = {"a": torch.ones(2)}
    w = StreamingWriter(str(tmp_path / "m"), layout_of(sd))
    w.write("a", sd["a"])
    assert leftovers(tmp_path) == [f".m.tvtmp-{os.getpid()}"]
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(TvlangError, match="the writer is already aborted"):
        w.write("a", sd["a"])


# -- faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["m.safetensors", "m"])
def test_disk_full_aborts_cleanly(tmp_path, monkeypatch, target):
    sd = {f"w{i}": torch.ones(64) for i in range(6)}
    calls = []
    real = writer_module._write_all

    def failing(f, data):
        calls.append(len(data))
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(writer_module, "_write_all", failing)
    out = tmp_path / target
    w = StreamingWriter(str(out), layout_of(sd), shard_size=512)
    with pytest.raises(TvlangError) as err:
        for name, tensor in sd.items():
            w.write(name, tensor)
    assert str(err.value) == f"error: {out}: write failed: the disk is full; nothing was written to the output"
    assert os.listdir(tmp_path) == []


def test_other_write_errors_name_the_output(tmp_path, monkeypatch):
    def failing(f, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module, "_write_all", failing)
    with pytest.raises(TvlangError, match=r"m.safetensors: write failed: Input/output error"):
        write(tmp_path / "m.safetensors", {"w": torch.ones(1)})
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_in_a_with_block_leaves_nothing(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.ones(3)}
    with pytest.raises(KeyboardInterrupt):
        with StreamingWriter(str(tmp_path / "m"), layout_of(sd)) as w:
            w.write("a", sd["a"])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_inside_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(f, data):
        raise KeyboardInterrupt

    sd = {"a": torch.ones(2)}
    w = StreamingWriter(str(tmp_path / "m.safetensors"), layout_of(sd))
    monkeypatch.setattr(writer_module, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.write("a", sd["a"])
    assert os.listdir(tmp_path) == []


def test_layout_with_wrong_byte_count_is_refused(tmp_path):
    bad = [TensorInfo("w", (2, 3), torch.float32, 20, "")]
    with pytest.raises(TvlangError, match=r"layout entry 'w' says 20 bytes but \[2, 3\] torch.float32 is 24 bytes"):
        StreamingWriter(str(tmp_path / "m.safetensors"), bad)
    assert os.listdir(tmp_path) == []


def test_output_that_is_a_shard_of_an_input_index_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(1)}, str(base / "model-00001-of-00001.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    shard = str(base / "model-00001-of-00001.safetensors")
    for given in (str(base), str(base / "model.safetensors.index.json")):
        with pytest.raises(TvlangError, match="the output is an input"):
            StreamingWriter(shard, [], inputs=[given], force=True)


def test_forced_output_through_a_symlink_is_refused(tmp_path):
    # --force replaces what tvlang wrote, never what a link points at (issue 18, case 1)
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.safetensors").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(TvlangError, match=r"link: refusing to replace it: it is a symbolic link \(to "):
        write(link, {"w": torch.ones(1)}, force=True)
    assert link.is_symlink()
    assert sorted(os.listdir(real)) == ["model.safetensors"]
    assert (real / "model.safetensors").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_sharded_output_loads_with_transformers_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tvlang.testing.synth import llama_spec, make_state_dict

    spec = {k: v for k, v in llama_spec(32, 2, 64, 48).items() if k != "model.position_ids"}
    sd = make_state_dict(spec, seed=0)
    base = tmp_path / "base"
    base.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64,
              "max_position_embeddings": 32, "tie_word_embeddings": False}
    (base / "config.json").write_text(json.dumps(config))
    out = write(tmp_path / "out", sd, shard_size=20000, metadata={"tvlang.kind": "model"}, copy_from=str(base))
    assert "model.safetensors.index.json" in os.listdir(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in sd.items())


def _wait_for(condition, seconds: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_writeback_syncs_in_a_thread_every_writeback_bytes(tmp_path, monkeypatch):
    """Writeback starts its thread at the first WRITEBACK_BYTES written (not before) and
    syncs the file's descriptor from it; close() stops the thread."""
    import threading

    calls = []
    monkeypatch.setattr(writer_module, "_SYNC_DATA", lambda fd: calls.append((fd, threading.current_thread().name)))
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 100)
    with open(tmp_path / "f", "wb") as f:
        sync = writer_module.Writeback(f.fileno())
        sync.wrote(99)
        assert sync._thread is None and calls == []
        sync.wrote(100)
        assert _wait_for(lambda: calls), "no sync within 10 s"
        assert calls[0] == (f.fileno(), "tvlang-writeback")
        sync.close()
        assert sync._thread is None
        count = len(calls)
        sync.wrote(150)  # under WRITEBACK_BYTES past the last request: nothing more
        assert len(calls) == count and sync._thread is None


def test_writeback_reports_a_failed_sync_at_close(tmp_path, monkeypatch):
    """Linux reports a failed writeback to one sync only: the thread's error is raised by close()."""
    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module, "_SYNC_DATA", failing)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 100)
    with open(tmp_path / "f", "wb") as f:
        sync = writer_module.Writeback(f.fileno())
        sync.wrote(100)
        assert _wait_for(lambda: sync._error is not None)
        with pytest.raises(OSError) as info:
            sync.close()
        assert info.value.errno == errno.EIO


def test_a_failed_background_sync_fails_the_commit(tmp_path, monkeypatch):
    """An error of the thread's sync is the writer's 'write failed' at commit: nothing at the
    output path, no temporary left."""
    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module, "_SYNC_DATA", failing)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 100)
    sd = state_dict()
    out = tmp_path / "m.safetensors"
    writer = StreamingWriter(str(out), layout_of(sd))
    for name, tensor in sd.items():
        writer.write(name, tensor)
    assert _wait_for(lambda: writer._writeback._error is not None)
    with pytest.raises(TvlangError) as info:
        writer.commit()
    assert info.value.message == f"{out}: write failed: Input/output error; nothing was written to the output"
    assert os.listdir(tmp_path) == []


def test_writes_with_background_syncs_give_the_same_file(tmp_path, monkeypatch):
    """With a sync every 100 bytes the output is byte for byte the one written without."""
    sd = state_dict()
    plain = write(tmp_path / "plain.safetensors", sd)
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 100)
    synced = write(tmp_path / "synced.safetensors", sd)
    with open(plain, "rb") as a, open(synced, "rb") as b:
        assert a.read() == b.read()
    loaded = load_file(synced)
    assert all(same(loaded[n], t) for n, t in sd.items())


def _reserves(directory) -> bool:
    """Whether this file system reserves blocks with fallocate (ext4, XFS, tmpfs, btrfs do)."""
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        writer_module._reserve(f.fileno(), 1 << 20)
        blocks = os.fstat(f.fileno()).st_blocks
    os.remove(probe)
    return blocks * 512 >= 1 << 20


def test_each_shard_is_reserved_on_disk_before_its_bytes_are_written(tmp_path):
    """The writer reserves a shard's whole size when it starts it, and the file's size is still
    the bytes written so far: a temporary looks as it did, and the output is the same bytes."""
    if not _reserves(tmp_path):
        pytest.skip("this file system does not reserve blocks")
    big = {"a": torch.arange(300_000.0), "b": torch.ones(300_000)}  # 1.2 MB each
    out = tmp_path / "m.safetensors"
    with StreamingWriter(str(out), layout_of(big)) as w:
        w.write("a", big["a"])
        (temporary,) = leftovers(tmp_path)
        status = os.stat(tmp_path / temporary)
        w.write("b", big["b"])
    total = os.path.getsize(out)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left, nothing else written
    assert status.st_size == total - 1_200_000  # the header and "a": as written so far
    assert status.st_blocks * 512 >= total  # "b"'s bytes reserved too
    assert torch.equal(load_file(str(out))["a"], big["a"]) and torch.equal(load_file(str(out))["b"], big["b"])


def test_a_refused_reservation_writes_the_same_output(tmp_path, monkeypatch):
    """Where fallocate fails (a file system without it, a full disk), the writes go on as before:
    a full disk is then reported by the write that meets it."""
    sd = state_dict()
    reserved = write(tmp_path / "reserved", sd, shard_size=400)
    calls = []

    def refused(fd, mode, offset, nbytes):
        calls.append((mode, offset, nbytes))
        return -1

    monkeypatch.setattr(writer_module, "_FALLOCATE", refused)
    out = write(tmp_path / "refused", sd, shard_size=400)
    assert sorted(os.listdir(tmp_path)) == ["refused", "reserved"]  # no temporary left, nothing else written
    assert sorted(os.listdir(out)) == sorted(os.listdir(reserved))
    for file in os.listdir(out):
        assert (tmp_path / "refused" / file).read_bytes() == (tmp_path / "reserved" / file).read_bytes(), file
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(calls) == len(shards) > 1  # one reservation a shard: its whole size, the size kept
    assert sorted(nbytes for _, _, nbytes in calls) == sorted(os.path.getsize(os.path.join(out, f)) for f in shards)
    assert {(mode, offset) for mode, offset, _ in calls} == {(1, 0)}


def test_the_recipe_text_is_stored_once_not_in_every_shard(tmp_path):
    """Issue 18, case 17: an 11 MB recipe made 23 MB of headers, a copy per shard."""
    import json
    import struct

    import tvlang
    from tvlang.io import open_reader

    pre = {f"w{i}": torch.zeros(64) for i in range(6)}
    ft = {f"w{i}": torch.ones(64) for i in range(6)}
    recipe = "# " + "x" * 100_000 + "\nout = pre + 0.5*(ft - pre)\n"
    out = tmp_path / "merged"
    tvlang.compile(recipe).run({"pre": pre, "ft": ft}, str(out), shard_size=600)
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(shards) == 3
    metadata = []
    for shard in shards:
        with open(out / shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            metadata.append(json.loads(f.read(length))["__metadata__"])
    assert metadata[0]["tvlang.recipe"] == recipe
    assert all("tvlang.recipe" not in m for m in metadata[1:])
    assert all(m["tvlang.kind"] == "model" and m["format"] == "pt" for m in metadata)
    with open_reader(str(out)) as reader:  # the directory reads as one model, recipe included
        assert reader.metadata["tvlang.recipe"] == recipe


def test_many_small_tensors_are_handed_over_in_batches(tmp_path, monkeypatch):
    """Issue 18, case 9: a million tiny tensors took 1 ms each in thread hand-overs. Small
    tensors go to the writer thread (and come from the reading thread) in batches; large
    ones alone; the file is the same, in the base's order."""
    from safetensors.torch import load_file

    import tvlang
    import tvlang.run.outputs as outputs
    import tvlang.run.session as session

    gen = torch.Generator().manual_seed(0)
    pre, ft = {}, {}
    for i in range(2000):
        shape = (300, 300) if i % 700 == 5 else (3,)  # a few large tensors among the small ones
        pre[f"t{i}"] = torch.randn(shape, generator=gen)
        ft[f"t{i}"] = torch.randn(shape, generator=gen)
    batches, reads = [], []
    real_batch, real_read = outputs._write_batch, session.Session._read_batch
    monkeypatch.setattr(outputs, "_write_batch", lambda batch: (batches.append(len(batch)), real_batch(batch)))
    monkeypatch.setattr(session.Session, "_read_batch",
                        lambda self, program, names: (reads.append(len(names)), real_read(self, program, names))[1])
    out = tmp_path / "o.safetensors"
    tvlang.compile("pre + 0.5*(ft - pre)").run({"pre": pre, "ft": ft}, str(out))
    got = load_file(str(out))
    assert set(got) == set(pre)  # the writer itself refuses a tensor out of the layout order
    for name in pre:
        torch.testing.assert_close(got[name], pre[name] + 0.5 * (ft[name] - pre[name]), rtol=1e-6, atol=1e-6)
    assert sum(batches) == 2000 - 3 and len(batches) <= 12  # 1997 small tensors in a few hand-overs
    assert sum(reads) == 2000 and len(reads) <= 12
