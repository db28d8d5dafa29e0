"""Readers: every format round-trips exactly; malformed files give errors naming the file."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from tvlang.errors import TvlangError
from tvlang.io import (
    DTYPE_FROM_SAFETENSORS,
    SafetensorsReader,
    ShardedReader,
    StateDictReader,
    TensorInfo,
    TorchFileReader,
    open_reader,
)
from tvlang.io import safetensors_file

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def sample(dtype: torch.dtype, shape=(3, 5), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (float8 has no torch.equal kernel on every build)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    sd = {f"t.{str(d).replace('torch.', '')}": sample(d, seed=i) for i, d in enumerate(DTYPES)}
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 4)
    sd["big"] = torch.randn(300, 1000)  # > 1 MiB: read through a file map
    return sd


def raw_safetensors(path, header, data: bytes = b"", length: int | None = None) -> str:
    """Write a safetensors file byte by byte, so tests can make it lie. A dict header is
    padded with spaces to 8 bytes, as real writers do, so the data is aligned."""
    if isinstance(header, bytes):
        text = header
    else:
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if length is None else length))
        f.write(text)
        f.write(data)
    return str(path)


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("use_mmap", [True, False])
def test_safetensors_file_round_trips_every_dtype(tmp_path, use_mmap):
    sd = all_dtypes_state_dict()
    path = str(tmp_path / "m.safetensors")
    save_file(sd, path, metadata={"note": "hello"})
    with SafetensorsReader(path, use_mmap=use_mmap) as reader:
        assert sorted(reader.names()) == sorted(sd)
        assert reader.metadata == {"note": "hello"}
        assert reader.kind is None
        for name, tensor in sd.items():
            info = reader.info(name)
            assert info == TensorInfo(name, tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size(), path)
            assert same(reader.read(name), tensor), name


def test_dtype_table_covers_the_required_codes():
    for code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"):
        assert code in DTYPE_FROM_SAFETENSORS


def test_names_are_in_file_order_not_header_order(tmp_path):
    # Header lists 'z' first but its bytes come second.
    header = {
        "z": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    path = raw_safetensors(tmp_path / "m.safetensors", header, struct.pack("<ff", 1.5, -2.0))
    reader = open_reader(path)
    assert reader.names() == ["a", "z"]
    assert reader.read("a").tolist() == [1.5]
    assert reader.read("z").tolist() == [-2.0]


def test_read_returns_memory_the_caller_owns(tmp_path):
    sd = {"big": torch.ones(512, 1024), "small": torch.ones(3)}
    path = str(tmp_path / "m.safetensors")
    save_file(sd, path)
    reader = open_reader(path)
    for name in sd:
        first = reader.read(name)
        first.zero_()
        assert torch.equal(reader.read(name), sd[name])
    # the file itself is untouched
    assert torch.equal(open_reader(path).read("big"), sd["big"])


def test_model_directory_with_single_file(tmp_path):
    save_file({"w": torch.arange(4.0)}, str(tmp_path / "model.safetensors"), metadata={"tvlang.kind": "delta"})
    (tmp_path / "config.json").write_text("{}")
    label = str(tmp_path)
    reader = open_reader(label)
    assert reader.label == label
    assert reader.kind == "delta"
    assert reader.root == os.path.realpath(label)
    assert reader.info("w").file == os.path.join(label, "model.safetensors")
    assert reader.read("w").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_kind_model_and_unknown_values(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "a.safetensors"), metadata={"tvlang.kind": "model"})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"), metadata={"tvlang.kind": "banana"})
    assert open_reader(str(tmp_path / "a.safetensors")).kind == "model"
    assert open_reader(str(tmp_path / "b.safetensors")).kind is None


def make_sharded(tmp_path, sd):
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: sd[n] for n in members}, str(tmp_path / shard), metadata={"tvlang.kind": "delta"})
        weight_map.update({n: shard for n in members})
    # Index order is alphabetical, as Hugging Face writes it.
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def test_sharded_index_and_directory(tmp_path):
    sd = {"layer.b": torch.randn(2, 2), "layer.a": torch.arange(3), "z": torch.randn(4).half(), "a": torch.ones(1)}
    shards = make_sharded(tmp_path, sd)
    for given in (str(tmp_path), str(tmp_path / "model.safetensors.index.json")):
        reader = open_reader(given)
        assert isinstance(reader, ShardedReader)
        assert reader.label == given
        # shard 1 then shard 2, each in its own file order (save_file orders by dtype, then name)
        first = open_reader(str(tmp_path / "model-00001-of-00002.safetensors")).names()
        second = open_reader(str(tmp_path / "model-00002-of-00002.safetensors")).names()
        assert reader.names() == first + second
        assert sorted(first) == sorted(shards["model-00001-of-00002.safetensors"])
        assert reader.kind == "delta"
        assert reader.info("a").file == os.path.join(os.path.dirname(given) if given.endswith(".json") else given, "model-00002-of-00002.safetensors")
        for name, tensor in sd.items():
            assert same(reader.read(name), tensor)
        reader.close()


def test_sharded_missing_shard_names_index_and_shard(tmp_path):
    make_sharded(tmp_path, {"a": torch.ones(1), "b": torch.ones(1)})
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(TvlangError) as err:
        open_reader(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    assert "model-00002-of-00002.safetensors" in str(err.value)
    assert "does not exist" in str(err.value)


def test_sharded_index_points_at_tensor_the_shard_lacks(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    with pytest.raises(TvlangError, match=r"index puts tensor 'b' in 's.safetensors' but that shard has no such tensor"):
        open_reader(str(tmp_path))


def test_sharded_index_refuses_paths_outside_its_directory(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(TvlangError, match="outside the index's directory"):
        open_reader(str(tmp_path))


def test_bin_state_dict_round_trips_every_dtype(tmp_path):
    sd = all_dtypes_state_dict()
    path = str(tmp_path / "weights.pt")
    torch.save(sd, path)
    reader = open_reader(path)
    assert isinstance(reader, TorchFileReader)
    assert reader.names() == list(sd)
    for name, tensor in sd.items():
        assert same(reader.read(name), tensor), name


def test_bin_legacy_format_is_loaded_without_mmap(tmp_path):
    sd = {"w": torch.randn(3, 3), "i": torch.arange(3)}
    path = str(tmp_path / "old.bin")
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    reader = open_reader(path)
    assert all(same(reader.read(n), t) for n, t in sd.items())


def test_bin_directory_and_sharded_bin_index(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    torch.save({"w": torch.ones(2)}, str(single / "pytorch_model.bin"))
    assert open_reader(str(single)).read("w").tolist() == [1.0, 1.0]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"a": torch.zeros(2)}, str(sharded / "pytorch_model-00001-of-00002.bin"))
    torch.save({"b": torch.arange(2)}, str(sharded / "pytorch_model-00002-of-00002.bin"))
    index = {"weight_map": {"b": "pytorch_model-00002-of-00002.bin", "a": "pytorch_model-00001-of-00002.bin"}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    reader = open_reader(str(sharded))
    assert reader.names() == ["a", "b"]
    assert reader.read("b").tolist() == [0, 1]


def test_directory_prefers_safetensors_over_bin(tmp_path):
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(1)}, str(tmp_path / "pytorch_model.bin"))
    assert open_reader(str(tmp_path)).read("w").tolist() == [1.0]


def test_bin_nested_state_dict_is_unwrapped(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert open_reader(path).names() == ["w"]


def test_bin_that_is_not_a_state_dict(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save([torch.ones(1)], path)
    with pytest.raises(TvlangError, match=r"list.pt: is not a state dict: it holds a list"):
        open_reader(path)


_SIDE_EFFECTS: list[str] = []


def _record_side_effect(tag):
    _SIDE_EFFECTS.append(tag)
    return tag


class Payload:
    """Unpickling this would run code: weights_only must refuse it."""

    def __reduce__(self):
        return (_record_side_effect, ("ran",))


def test_weights_only_refuses_pickled_code(tmp_path):
    path = str(tmp_path / "evil.bin")
    torch.save({"w": torch.ones(1), "payload": Payload()}, path)
    _SIDE_EFFECTS.clear()
    with pytest.raises(TvlangError) as err:
        open_reader(path)
    assert _SIDE_EFFECTS == []
    message = str(err.value)
    assert path in message
    assert "refusing to load" in message
    assert "weights_only" in message


def test_bin_garbage_names_the_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(TvlangError, match=r"junk.bin: cannot load as a PyTorch checkpoint"):
        open_reader(str(path))


def test_state_dict_reader_reads_in_place_and_keeps_order():
    """A contiguous tensor is read as the caller's own (no copy: the executor never changes a
    borrowed source's tensor); one that is not contiguous, as a contiguous copy."""
    source = {"b": torch.ones(2, 2).t(), "a": torch.arange(3)}  # a non-contiguous view
    reader = open_reader(source, label="<state dict 'pre'>")
    assert isinstance(reader, StateDictReader)
    assert reader.label == "<state dict 'pre'>"
    assert reader.names() == ["b", "a"]
    out = reader.read("b")
    assert out.is_contiguous() and out.data_ptr() != source["b"].data_ptr()
    out.add_(1)
    assert torch.equal(source["b"], torch.ones(2, 2))
    assert reader.read("a").data_ptr() == source["a"].data_ptr()
    assert reader.info("a") == TensorInfo("a", (3,), torch.int64, 24, "<state dict 'pre'>")


def test_torch_file_reader_copies(tmp_path):
    """A ``.pt`` file's tensors are the reader's, not the caller's: a read is a copy to change."""
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    reader = open_reader(str(tmp_path / "m.pt"))
    reader.read("w").add_(1)
    assert torch.equal(reader.read("w"), torch.ones(3))


def test_state_dict_with_a_non_tensor_value():
    with pytest.raises(TvlangError, match=r"<state dict>: entry 'x' is a int, not a tensor"):
        open_reader({"w": torch.ones(1), "x": 3})


def test_module_reader_includes_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    reader = open_reader(module)
    assert reader.label == "<module Sequential>"
    assert reader.names() == list(module.state_dict())
    assert reader.info("1.num_batches_tracked").dtype == torch.int64
    assert torch.equal(reader.read("0.weight"), module[0].weight.detach())


def test_unknown_tensor_name_is_an_error_naming_both(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(1)}, path)
    with pytest.raises(TvlangError, match=r"m.safetensors: has no tensor named 'nope'"):
        open_reader(path).read("nope")


def test_unknown_extension_is_sniffed(tmp_path):
    st = str(tmp_path / "weights.data")
    save_file({"w": torch.ones(1)}, st)
    assert isinstance(open_reader(st), SafetensorsReader)
    pt = str(tmp_path / "weights.other")
    torch.save({"w": torch.ones(1)}, pt)
    assert isinstance(open_reader(pt), TorchFileReader)


def test_open_reader_rejects_other_objects():
    with pytest.raises(TvlangError, match="cannot read weights from a int"):
        open_reader(3)


# -- malformed files ------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"layers.0.w": torch.ones(16, 16)}, path)  # 1024 data bytes
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(TvlangError) as err:
        open_reader(path)
    assert str(err.value) == (
        f"error: {path}: file is truncated: tensor 'layers.0.w' ends at byte {size} but the file has {size - 100} bytes"
    )
    assert err.value.tensor == "layers.0.w"


def test_file_truncated_after_opening(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(600, 600)}, path)
    reader = open_reader(path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(TvlangError, match=r"m.safetensors: file is truncated: tensor 'w' ends at byte \d+ but the file has 1000 bytes"):
        reader.read("w")


def test_header_lies_about_size(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    path = raw_safetensors(tmp_path / "lies.safetensors", header, bytes(24))
    with pytest.raises(TvlangError) as err:
        open_reader(path)
    assert str(err.value) == (
        f"error: {path}: header lies about tensor 'w': shape [2, 3] of F32 needs 24 bytes"
        " but its data offsets [0, 20] span 20"
    )


def test_header_with_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    path = raw_safetensors(tmp_path / "overlap.safetensors", header, bytes(24))
    with pytest.raises(TvlangError, match=r"overlap.safetensors: header lies about offsets: tensors 'a' and 'b' overlap"):
        open_reader(path)


def test_header_with_offsets_past_the_end(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [1000, 1016]}}
    path = raw_safetensors(tmp_path / "far.safetensors", header, bytes(16))
    with pytest.raises(TvlangError, match=r"far.safetensors: file is truncated: tensor 'a' ends at byte"):
        open_reader(path)


@pytest.mark.parametrize(
    "offsets", [[8, 4], [-4, 0], [0], "0-4", [0.0, 4.0]], ids=["reversed", "negative", "short", "string", "floats"]
)
def test_header_with_malformed_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(16))
    with pytest.raises(TvlangError, match=r"bad.safetensors: tensor 'a' has malformed data offsets"):
        open_reader(path)


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}
    path = raw_safetensors(tmp_path / "odd.safetensors", header, bytes(1))
    with pytest.raises(TvlangError, match=r"odd.safetensors: tensor 'a' has unknown dtype 'F4' \(known: F64, F32"):
        open_reader(path)


def test_malformed_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}
    path = raw_safetensors(tmp_path / "shape.safetensors", header, bytes(8))
    with pytest.raises(TvlangError, match=r"shape.safetensors: tensor 'a' has a malformed shape \[2, -1\]"):
        open_reader(path)


def test_missing_header_keys(tmp_path):
    path = raw_safetensors(tmp_path / "keys.safetensors", {"a": {"dtype": "F32"}}, b"")
    with pytest.raises(TvlangError, match=r"keys.safetensors: tensor 'a' header entry lacks shape, data_offsets"):
        open_reader(path)


def test_non_json_header(tmp_path):
    path = raw_safetensors(tmp_path / "text.safetensors", b"{not json at all", b"")
    with pytest.raises(TvlangError, match=r"text.safetensors: header is not valid JSON \(.* at header byte 1\)"):
        open_reader(path)


def test_header_not_utf8(tmp_path):
    path = raw_safetensors(tmp_path / "bin.safetensors", b"\xff\xfe{}", b"")
    with pytest.raises(TvlangError, match=r"bin.safetensors: header is not UTF-8 text \(bad byte at 8\)"):
        open_reader(path)


def test_header_not_an_object(tmp_path):
    path = raw_safetensors(tmp_path / "list.safetensors", b"[1, 2]", b"")
    with pytest.raises(TvlangError, match=r"list.safetensors: header is a JSON list, not an object"):
        open_reader(path)


def test_metadata_must_be_strings(tmp_path):
    path = raw_safetensors(tmp_path / "meta.safetensors", {"__metadata__": {"n": 3}}, b"")
    with pytest.raises(TvlangError, match=r"meta.safetensors: header '__metadata__' value of 'n' is not a string"):
        open_reader(path)


def test_absurd_header_length(tmp_path):
    path = raw_safetensors(tmp_path / "huge.safetensors", b"{}", b"", length=10**12)
    with pytest.raises(TvlangError, match=r"huge.safetensors: not a safetensors file: header length 1000000000000 is absurd"):
        open_reader(path)


def test_header_longer_than_file(tmp_path):
    path = raw_safetensors(tmp_path / "short.safetensors", b"{}", b"", length=5000)
    with pytest.raises(TvlangError, match=r"short.safetensors: file is truncated: the header says it is 5000 bytes but the file has 10 bytes"):
        open_reader(path)


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(TvlangError, match=r"tiny.safetensors: not a safetensors file: it has 3 bytes"):
        open_reader(str(path))


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere" / "model.safetensors")
    with pytest.raises(TvlangError) as err:
        open_reader(path)
    assert str(err.value) == f"error: {path}: no such file or directory"


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TvlangError) as err:
        open_reader(str(tmp_path))
    assert err.value.message == f"{tmp_path}: directory holds no model weights"
    assert "model.safetensors" in err.value.notes[0]


def test_bad_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(TvlangError, match=r"model.safetensors.index.json: index has no 'weight_map' object"):
        open_reader(str(tmp_path))


# -- memory ---------------------------------------------------------------------------


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("use_mmap", [True, False])
def test_reading_tensor_by_tensor_keeps_private_memory_flat(tmp_path, use_mmap):
    # A 200 MB file made cheaply: a real header, then a sparse (all-zero) data region.
    count, per = 8, 25 * 1024 * 1024
    header = {f"w{i}": {"dtype": "F32", "shape": [per // 4], "data_offsets": [i * per, (i + 1) * per]} for i in range(count)}
    path = raw_safetensors(tmp_path / "big.safetensors", header)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + count * per)
    reader = SafetensorsReader(path, use_mmap=use_mmap)
    before = _rss_anon_bytes()
    peak = 0
    total = 0.0
    for name in reader.names():
        tensor = reader.read(name)
        total += float(tensor[:: 4096].sum())  # touch every page
        peak = max(peak, _rss_anon_bytes() - before)
        del tensor
    assert total == 0.0
    file_size = count * per
    # Keeping the tensors would grow by the whole 200 MB; one tensor at a time stays near 25 MB.
    assert peak < file_size // 4, f"private memory grew by {peak / 2**20:.0f} MiB"
    reader.close()


def test_small_tensors_skip_the_map(tmp_path, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    save_file({"small": torch.ones(4), "big": torch.ones(safetensors_file.MMAP_MIN_BYTES // 4)}, path)
    reader = SafetensorsReader(path)
    mapped = []
    original = reader._map
    monkeypatch.setattr(reader, "_map", lambda fd, offset, nbytes: mapped.append(nbytes) or original(fd, offset, nbytes))
    reader.read("small")
    reader.read("big")
    assert mapped == [safetensors_file.MMAP_MIN_BYTES]


def test_directory_lookup_order_and_fallbacks(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    save_file({"single": torch.ones(1)}, str(both / "model.safetensors"))
    save_file({"sharded": torch.ones(1)}, str(both / "s.safetensors"))
    (both / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"sharded": "s.safetensors"}}))
    assert open_reader(str(both)).names() == ["single"]  # model.safetensors first, as from_pretrained

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file({"w": torch.ones(1)}, str(renamed / "weights.safetensors"))
    assert open_reader(str(renamed)).info("w").file == os.path.join(str(renamed), "weights.safetensors")

    save_file({"w": torch.ones(1)}, str(renamed / "other.safetensors"))
    with pytest.raises(TvlangError, match="directory holds no model weights") as err:
        open_reader(str(renamed))
    assert err.value.notes[1] == "found several: other.safetensors, weights.safetensors; name the file to load"


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_release_unmaps_used_pages_and_keeps_the_values(tmp_path):
    """release() drops the pages of a mapped tensor from the process (they stay in the page
    cache): the process's file-backed resident memory falls, the values read back the same."""
    from tvlang.io import release

    values = torch.arange(4 << 20, dtype=torch.float32)  # 16 MiB
    save_file({"w": values}, str(tmp_path / "m.safetensors"))
    reader = SafetensorsReader(str(tmp_path / "m.safetensors"))
    tensor = reader.read("w")
    assert hasattr(tensor, "_tvlang_map")  # mapped, not copied
    assert float(tensor.sum()) == float(values.sum())  # touch every page
    before = _rss_file_kib()
    release(tensor, 0, 12 << 20)  # the first 12 MiB
    after = _rss_file_kib()
    assert before - after >= 11 * 1024, (before, after)
    assert torch.equal(tensor, values)  # mapped again from the file on access
    release(values, 0, 100)  # not a mapped tensor: nothing happens
    assert torch.equal(values, torch.arange(4 << 20, dtype=torch.float32))
    reader.close()


def test_kind_peek_reads_only_the_metadata(tmp_path, monkeypatch):
    """Typing a free name by its file's metadata must not parse every tensor's entry
    (issue 18, case 9: a 1.4-million-entry header was parsed three times per file)."""
    from safetensors.torch import save_file

    import tvlang.io.safetensors_format as fmt
    from tvlang.io import peek_kind

    delta = str(tmp_path / "tau.safetensors")
    model = str(tmp_path / "m.safetensors")
    save_file({f"w{i}": torch.zeros(1) for i in range(50)}, delta, metadata={"tvlang.kind": "delta"})
    save_file({f"w{i}": torch.zeros(1) for i in range(50)}, model)

    def no_full_parse(*args, **kwargs):
        raise AssertionError("the whole header was parsed")

    monkeypatch.setattr(fmt, "parse_header", no_full_parse)
    assert peek_kind(delta) == "delta"
    assert peek_kind(model) == "model"
    # a tensor name that spells the metadata key: the peek gives up and the full parse decides
    monkeypatch.undo()
    tricky = str(tmp_path / "tricky.safetensors")
    save_file({'"__metadata__": {"tvlang.kind": "delta"}': torch.zeros(1)}, tricky)
    assert peek_kind(tricky) == "model"


def test_a_header_of_too_many_tensors_is_refused_before_parsing(tmp_path, monkeypatch):
    """Issue 18, case 9: a valid header of 1.67 million one-float tensors took a minute and
    2 GB to check. More than MAX_TENSORS_PER_FILE entries is refused from a count of the
    raw bytes, before the JSON is parsed; a sharded index over MAX_TENSORS_PER_MODEL too."""
    import hostile_corpus

    import tvlang.io.base as base
    from tvlang.io import open_reader
    from tvlang.io.base import MAX_TENSORS_PER_FILE, MAX_TENSORS_PER_MODEL

    assert (MAX_TENSORS_PER_FILE, MAX_TENSORS_PER_MODEL) == (262_144, 1_048_576)
    path = tmp_path / "many.safetensors"
    path.write_bytes(hostile_corpus.many_entries_header(MAX_TENSORS_PER_FILE + 1))

    def no_parse(*args, **kwargs):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(base.json, "loads", no_parse)
    with pytest.raises(TvlangError) as info:
        open_reader(str(path))
    assert str(info.value) == (
        f"error: {path}: header holds 262145 tensors, more than the 262144 tvlang reads from one file"
        " (real checkpoints hold a few thousand per file); split it into shards under an index"
    )
    monkeypatch.undo()
    # exactly at the limit: read
    path.write_bytes(hostile_corpus.many_entries_header(MAX_TENSORS_PER_FILE))
    with open_reader(str(path)) as reader:
        assert len(reader.names()) == MAX_TENSORS_PER_FILE

    # an index: counted after parsing (its entries have no fixed key to count)
    import tvlang.io.sharded as sharded

    monkeypatch.setattr(sharded, "MAX_TENSORS_PER_MODEL", 3)
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({f"w{i}": torch.zeros(1) for i in range(4)}, str(folder / "s1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"w{i}": "s1.safetensors" for i in range(4)}}))
    with pytest.raises(TvlangError, match=r"index lists 4 tensors, more than the 3 tvlang reads from one model"):
        open_reader(str(folder))
