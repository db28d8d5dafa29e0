"""Ranged reads (``read_range``, ``read_into``) in every reader, and the open files of a
sharded checkpoint: a shard is open only while it is read (issue 18, case 17)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.io import SafetensorsReader, ShardedReader, StateDictReader, TensorReader, open_reader
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"w.{str(d)[6:]}": torch.randn(7, 9, generator=g).to(d) for d in FLOAT_DTYPES}
    sd["ints"] = torch.arange(30, dtype=torch.int64).reshape(5, 6)
    sd["flags"] = torch.rand(11, generator=g) > 0.5
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 3)
    return sd


def write_sharded(folder, sd: dict[str, torch.Tensor], shards: int) -> str:
    """A model directory of ``shards`` safetensors shards and an index."""
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        members = names[i::shards]
        save_file({n: sd[n].contiguous() for n in members}, os.path.join(folder, file))
        weight_map.update({n: file for n in members})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return str(folder)


def readers(tmp_path, sd) -> dict[str, TensorReader]:
    single = str(tmp_path / "m.safetensors")
    save_file(sd, single)
    torch.save(sd, str(tmp_path / "m.pt"))
    return {
        "safetensors": open_reader(single),
        "safetensors (pread)": SafetensorsReader(single, use_mmap=False),
        "sharded": open_reader(write_sharded(tmp_path / "sharded", sd, 3)),
        "torch file": open_reader(str(tmp_path / "m.pt")),
        "state dict": open_reader(sd),
    }


RANGES = [(0, 0), (0, 1), (3, 17), (50, 63), (0, 63)]


def test_read_range_is_the_flat_slice_in_every_reader(tmp_path):
    sd = tensors()
    for kind, reader in readers(tmp_path, sd).items():
        for name, tensor in sd.items():
            flat = tensor.reshape(-1)
            for start, stop in [(0, flat.numel()), (0, 0), (flat.numel() // 3, flat.numel() // 2)]:
                got = reader.read_range(name, start, stop)
                assert got.dtype == tensor.dtype and got.device.type == "cpu", (kind, name)
                assert torch.equal(got, flat[start:stop]), (kind, name, start, stop)
        reader.close()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_read_into_fills_and_converts_in_every_reader(tmp_path, dtype):
    sd = tensors()
    for kind, reader in readers(tmp_path, sd).items():
        for stored in FLOAT_DTYPES:
            name = f"w.{str(stored)[6:]}"
            flat = sd[name].reshape(-1)
            for start, stop in RANGES:
                block = torch.full((3, 70), -1.0, dtype=dtype)
                reader.read_into(name, start, stop, block[1, : stop - start])  # a row of a block
                assert torch.equal(block[1, : stop - start], flat[start:stop].to(dtype)), (kind, name, start)
                assert (block[0] == -1).all() and (block[2] == -1).all() and (block[1, stop - start:] == -1).all()
        reader.close()


def test_read_into_a_non_contiguous_out(tmp_path):
    sd = tensors()
    for reader in readers(tmp_path, sd).values():
        out = torch.zeros(20, dtype=torch.float32)[::2]
        reader.read_into("w.float32", 5, 15, out)
        assert torch.equal(out, sd["w.float32"].reshape(-1)[5:15])


def test_ranges_of_a_transposed_state_dict_tensor():
    base = torch.arange(12.0).reshape(3, 4)
    reader = StateDictReader({"t": base.t(), "u": base})
    flat = base.t().reshape(-1)
    out = torch.empty(5)
    reader.read_into("t", 2, 7, out)
    assert torch.equal(out, flat[2:7])
    assert torch.equal(reader.read_range("t", 7, 12), flat[7:12])
    reader.read_into("u", 0, 5, out)
    assert torch.equal(out, base.reshape(-1)[:5])


def test_read_range_returns_memory_the_caller_owns(tmp_path):
    sd = {"w": torch.arange(10.0)}
    for reader in readers(tmp_path, sd).values():
        piece = reader.read_range("w", 2, 5)
        piece.zero_()
        assert reader.read_range("w", 2, 5).tolist() == [2.0, 3.0, 4.0]
    assert sd["w"][2] == 2.0


def test_ranged_reads_of_a_safetensors_file_read_only_the_range(tmp_path, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.arange(1000.0)}, path)
    reader = SafetensorsReader(path)

    def whole(self, name):
        raise AssertionError("read the whole tensor")

    reads = []
    real = os.preadv

    def counting(fd, buffers, offset):
        reads.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(SafetensorsReader, "read", whole)
    monkeypatch.setattr(os, "preadv", counting)
    out = torch.empty(10)
    reader.read_into("w", 990, 1000, out)
    assert out.tolist() == [float(i) for i in range(990, 1000)]
    assert reader.read_range("w", 0, 3).tolist() == [0.0, 1.0, 2.0]
    reader.prefetch("w", 0, 1000)  # a hint: no error, nothing read
    assert reads == [40, 12]


def test_ranges_outside_the_tensor_are_refused(tmp_path):
    sd = {"w": torch.arange(6.0)}
    for reader in readers(tmp_path, sd).values():
        for start, stop in [(-1, 2), (4, 3), (0, 7)]:
            with pytest.raises(ValueError, match=r"is not inside tensor 'w' of 6 elements"):
                reader.read_range("w", start, stop)
        with pytest.raises(ValueError, match=r"out has shape \[4\], expected \[3\]"):
            reader.read_into("w", 0, 3, torch.empty(4))
        with pytest.raises(TvlangError, match="has no tensor named 'x'"):
            reader.read_range("x", 0, 1)


def test_truncated_file_in_a_ranged_read_names_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(100.0)}, str(path))
    reader = SafetensorsReader(str(path))
    os.truncate(path, os.path.getsize(path) - 80)
    with pytest.raises(TvlangError, match=r"m.safetensors: file is truncated: tensor 'w' ends at byte \d+"):
        reader.read_into("w", 90, 100, torch.empty(10))


# -- open files of sharded checkpoints ------------------------------------------------------


def open_files() -> set[str]:
    """What this process has open: the targets of /proc/self/fd."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor of the listing itself, closed meanwhile
            pass
    return found


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd (Linux)")


@needs_proc
def test_a_sharded_reader_holds_at_most_one_shard_open(tmp_path):
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(24)}
    folder = write_sharded(tmp_path / "m", sd, 8)
    reader = open_reader(folder)
    shard_files = lambda: {f for f in open_files() if f.startswith(folder)}  # noqa: E731
    assert shard_files() == set()  # headers read, files closed
    for name in reader.names():
        assert reader.read(name)[0] == float(name[1:])
        assert len(shard_files()) == 1
    reader.read_into("t5", 1, 3, torch.empty(2))
    assert len(shard_files()) == 1
    reader.close()
    assert shard_files() == set()


def test_a_shard_replaced_after_its_header_was_read_is_an_error(tmp_path):
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(4)}
    folder = write_sharded(tmp_path / "m", sd, 2)
    reader = open_reader(folder)
    assert isinstance(reader, ShardedReader)
    shard = os.path.join(folder, "model-00002-of-00002.safetensors")
    os.remove(shard)
    save_file({"t1": torch.zeros(4), "t3": torch.zeros(4)}, shard)  # same size, perhaps the same inode
    os.utime(shard, ns=(1, 1))
    with pytest.raises(TvlangError, match=r"model-00002-of-00002.safetensors: changed \(was replaced or rewritten\)"
                                          r" after its header was read \(reading tensor 't1'\)"):
        reader.read("t1")
    assert reader.read("t0").tolist() == [0.0] * 4  # the other shard is still the one it read


@needs_proc
@pytest.mark.parametrize("executor", ["local", "direct"])
def test_a_run_over_many_sharded_inputs_keeps_few_files_open(tmp_path, monkeypatch, executor):
    """Issue 18, case 17: 6 inputs of 9 shards each must not hold 54 open files at once; on the
    local executor (its readers) and on the torch-free one (tvlang.run.direct: one file per input)."""
    from tvlang.run import direct

    spec = llama_spec(hidden=16, layers=4, vocab=32, intermediate=24)
    pre = make_state_dict(spec, seed=0)
    models = {"pre": pre} | {f"ft{i}": finetune_like(pre, seed=i + 1) for i in range(5)}
    folders = {name: write_sharded(tmp_path / name, sd, 9) for name, sd in models.items()}
    peak = []
    if executor == "local":
        monkeypatch.setenv(direct.DISABLE, "0")
        real = SafetensorsReader.read

        def sampling(self, name):
            tensor = real(self, name)
            peak.append(sum(f.startswith(str(tmp_path)) for f in open_files()))
            return tensor

        monkeypatch.setattr(SafetensorsReader, "read", sampling)
    else:
        from tvlang.ops.native import linear_steps

        if linear_steps() is None:
            pytest.skip("the compiled helper is not built, or this CPU lacks AVX2, FMA and F16C")
        view = direct._Input.view

        def sampling(self, file, position, nbytes):
            found = view(self, file, position, nbytes)
            peak.append(sum(f.startswith(str(tmp_path)) for f in open_files()))
            return found

        monkeypatch.setattr(direct._Input, "view", sampling)
    terms = " + ".join(f"0.1 * ({name} - pre)" for name in models if name != "pre")
    plan = tvlang.compile(f"out = pre + {terms}")
    plan.run(folders, out=str(tmp_path / "out"))
    assert peak, "no tensor was read"
    # One shard per input, another while the read-ahead thread overlaps a shard boundary,
    # the output file: far below the 54 shards the inputs have.
    inputs = len(folders)
    assert max(peak) <= 2 * inputs + 2, f"{max(peak)} files open at once"
    if executor == "direct":  # MAPS_HELD maps per input, one let go whose last view lives on, the output
        assert max(peak) <= direct.MAPS_HELD * inputs + 2, f"{max(peak)} files open at once"
    merged = open_reader(str(tmp_path / "out"))
    name = merged.names()[0]
    expected = pre[name] + sum(0.1 * (models[f"ft{i}"][name] - pre[name]) for i in range(5))
    assert torch.allclose(merged.read(name), expected, atol=1e-6)
