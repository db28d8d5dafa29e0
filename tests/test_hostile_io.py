"""Hostile inputs, through the CLI: every one is refused with one clear message that
names the file, exit 1, no traceback, nothing raw from the file on the terminal, and
no hang. Each test here failed (or hung, or crashed) before the readers were made
strict; see "What the readers refuse" in docs/io.md."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import tvlang
from tvlang.cli import main
from tvlang.errors import TvlangError
from tvlang.io import open_reader

EXPR = "pre + 0.5*(a - pre)"
F32 = {"dtype": "F32", "shape": [1]}  # one float: 4 bytes


@pytest.fixture()
def pre(tmp_path):
    path = str(tmp_path / "pre.safetensors")
    save_file({"w": torch.zeros(1)}, path)
    return path


def run_cli(capsys, pre: str, a: str, out) -> tuple[int, str]:
    """``tvlang run`` with ``a`` as the hostile input: exit code and stderr."""
    code = main(["run", "-e", EXPR, "--bind", f"pre={pre}", "--bind", f"a={a}", "-o", str(out)])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def refused(capsys, tmp_path, pre: str, a: str, fragment: str) -> str:
    """Run the CLI on ``a``, check it is refused cleanly with ``fragment``; the message."""
    out = tmp_path / "out.safetensors"
    code, err = run_cli(capsys, pre, a, out)
    assert code == 1, err
    assert "Traceback" not in err
    assert fragment in err, err
    assert err.count("error:") == 1, err
    assert "\x1b" not in err  # no terminal escape reaches the terminal
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not os.path.lexists(out)
    return err


def raw_safetensors(path, header, data: bytes) -> str:
    """A safetensors file with exactly this header text (str/bytes) or dict, and data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


# -- 1. safetensors headers: the safetensors library's rules --------------------------------


def test_duplicate_tensor_name(capsys, tmp_path, pre):
    header = '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},' \
             ' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(8))
    refused(capsys, tmp_path, pre, a, f"{a}: header has the key 'w' twice in one object")


def test_duplicate_key_inside_an_entry(tmp_path):
    header = '{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(4))
    with pytest.raises(TvlangError, match="header has the key 'dtype' twice in one object"):
        open_reader(a)


def test_gap_between_tensors(capsys, tmp_path, pre):
    header = {"w": {**F32, "data_offsets": [0, 4]}, "v": {**F32, "data_offsets": [8, 12]}}
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(12))
    refused(capsys, tmp_path, pre, a,
            f"{a}: header leaves a gap: data bytes [4, 8) after tensor 'w' belong to no tensor"
            " (tensor 'v' starts at 8)")


def test_gap_before_the_first_tensor(capsys, tmp_path, pre):
    a = raw_safetensors(tmp_path / "a.safetensors", {"w": {**F32, "data_offsets": [4, 8]}}, bytes(8))
    refused(capsys, tmp_path, pre, a,
            "header leaves a gap: data bytes [0, 4) at the start of the data belong to no tensor")


def test_overlapping_offsets(capsys, tmp_path, pre):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(12))
    refused(capsys, tmp_path, pre, a, "header lies about offsets: tensors 'w' and 'v' overlap")


def test_offsets_out_of_order_empty_tensor_inside_another(capsys, tmp_path, pre):
    # An empty tensor at byte 4 of a tensor that spans [0, 8): sorted, the offsets do not chain.
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(8))
    refused(capsys, tmp_path, pre, a, "header lies about offsets: empty tensor 'z' at byte 4 lies inside tensor 'w'")


def test_data_that_does_not_cover_the_file(capsys, tmp_path, pre):
    a = raw_safetensors(tmp_path / "a.safetensors", {"w": {**F32, "data_offsets": [0, 4]}}, bytes(4) + b"junk")
    refused(capsys, tmp_path, pre, a, f"{a}: file has 4 bytes after the data: the last tensor, 'w', ends at byte")


def test_valid_layouts_still_read(tmp_path):
    """Header order need not be file order; empty tensors may sit at a tensor boundary."""
    header = {"v": {**F32, "data_offsets": [4, 8]}, "w": {**F32, "data_offsets": [0, 4]},
              "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}, "__metadata__": {"k": "v"}}
    text = json.dumps(header)
    text += " " * (-len(text) % 8)
    path = raw_safetensors(tmp_path / "ok.safetensors", text, struct.pack("<2f", 1.0, 2.0))
    reader = open_reader(path)
    assert reader.names() == ["w", "v", "z"]
    assert reader.read("v").tolist() == [2.0]
    assert reader.read("z").shape == (0, 3)


def test_nesting_bomb_in_a_header(capsys, tmp_path, pre):
    deep = "[" * 100_000 + "]" * 100_000
    header = '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": %s}}' % deep
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(4))
    refused(capsys, tmp_path, pre, a, f"{a}: header JSON is nested more than 64 levels deep")


def test_5000_digit_number(capsys, tmp_path, pre):
    header = '{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 4]}}' % ("1" * 5000)
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(4))
    refused(capsys, tmp_path, pre, a, f"{a}: header has a number of 5000 digits (at most 100 are allowed)")


def test_lone_surrogate_in_a_tensor_name(capsys, tmp_path, pre):
    header = '{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(4))
    refused(capsys, tmp_path, pre, a,
            "tensor name 'w\\ud800' contains a lone surrogate (\\ud800), which is not Unicode text")


def test_terminal_escape_in_a_tensor_name(capsys, tmp_path, pre):
    header = '{"w\\u001b[2J\\u001b]0;pwned\\u0007": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    a = raw_safetensors(tmp_path / "a.safetensors", header, bytes(4))
    refused(capsys, tmp_path, pre, a, "tensor name 'w\\x1b[2J\\x1b]0;pwned\\x07' contains a control character (\\x1b)")


def test_escapes_in_other_fields_are_not_printed_raw(tmp_path):
    a = raw_safetensors(tmp_path / "a.safetensors", '{"w": {"dtype": "F\\u001b[31m", "shape": [1], '
                        '"data_offsets": [0, 4]}}', bytes(4))
    with pytest.raises(TvlangError) as err:
        open_reader(a)
    assert "unknown dtype 'F\\\\x1b[31m'" in str(err.value)
    assert "\x1b" not in str(err.value)


def test_zero_size_dimension_of_2_to_the_70(capsys, tmp_path, pre):
    a = raw_safetensors(tmp_path / "a.safetensors",
                        {"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"")
    refused(capsys, tmp_path, pre, a,
            f"{a}: tensor 'w' has shape [0, {2**70}], too large for any tensor (at most 2**63-1 elements)")


# -- 2. only regular files -------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_is_not_read(capsys, tmp_path, pre):
    refused(capsys, tmp_path, pre, "/dev/zero",
            "/dev/zero: not a regular file (a character device); checkpoints are read only from regular files")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("name", ["pipe", "pipe.safetensors", "pipe.bin"])
def test_named_pipe_does_not_hang(tmp_path, pre, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    out = tmp_path / "out.safetensors"
    args = ["run", "-e", EXPR, "--bind", f"pre={pre}", "--bind", f"a={fifo}", "-o", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(tvlang.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", f"import sys; from tvlang.cli import main; sys.exit(main({args!r}))"],
                          capture_output=True, text=True, timeout=20, cwd=root, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{fifo}: not a regular file (a named pipe)" in proc.stderr
    assert not os.path.lexists(out)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_socket_is_not_read(capsys, tmp_path, pre):
    path = str(tmp_path / "s.safetensors")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path)
    except OSError:  # pragma: no cover - a path too long for a socket
        pytest.skip("cannot bind a Unix socket here")
    try:
        refused(capsys, tmp_path, pre, path, f"{path}: not a regular file (a socket)")
    finally:
        sock.close()


# -- 3. zip entries are checked before anything is inflated -----------------------------------


def rezip(src: str, dst: str, method: int) -> str:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", method) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))
    return dst


def test_compressed_bin_entry_is_a_possible_zip_bomb(capsys, tmp_path, pre):
    plain = str(tmp_path / "plain.bin")
    torch.save({"w": torch.zeros(4 * 1024 * 1024)}, plain)  # 16 MiB of zeros
    a = rezip(plain, str(tmp_path / "a.bin"), zipfile.ZIP_DEFLATED)
    assert os.path.getsize(a) < 1024 * 1024  # what it would inflate to is 16 times the file
    err = refused(capsys, tmp_path, pre, a, f"{a}: refusing to load: zip entry ")
    assert "is compressed (deflate" in err
    assert "a compressed entry may be a zip bomb" in err


def test_zip_entry_declaring_more_than_the_file(capsys, tmp_path, pre):
    a = str(tmp_path / "a.bin")
    torch.save({"w": torch.zeros(1)}, a)
    data = bytearray(open(a, "rb").read())
    # Patch the uncompressed size of the tensor's entry in the central directory to 1 GB.
    at = data.find(b"PK\x01\x02")
    while not bytes(data[at + 46: at + 46 + struct.unpack_from("<H", data, at + 28)[0]]).endswith(b"/data/0"):
        at = data.find(b"PK\x01\x02", at + 4)
        assert at >= 0
    struct.pack_into("<I", data, at + 24, 10**9)
    open(a, "wb").write(bytes(data))
    err = refused(capsys, tmp_path, pre, a, f"{a}: refusing to load: zip entry ")
    assert "declares 1000000000 bytes, more than the whole file" in err


def test_zip_that_is_not_a_torch_checkpoint(capsys, tmp_path, pre):
    a = str(tmp_path / "a.bin")
    with zipfile.ZipFile(a, "w") as archive:
        archive.writestr("arr_0.npy", b"\x93NUMPY")
    refused(capsys, tmp_path, pre, a, f"{a}: is a zip archive but not a PyTorch checkpoint: it has no data.pkl")


# -- 4. tensors that hold no dense data ------------------------------------------------------


@pytest.mark.parametrize("kind,tensor,fragment", [
    ("sparse", lambda: torch.randn(3, 3).to_sparse(), "tensor 'w' is sparse (sparse_coo)"),
    ("csr", lambda: torch.randn(3, 3).to_sparse_csr(), "tensor 'w' is sparse (sparse_csr)"),
    ("meta", lambda: torch.empty(2, device="meta"), "tensor 'w' is on the meta device: it has a shape but no data"),
    ("nested", lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "tensor 'w' is a nested tensor"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tensor_without_dense_data(capsys, tmp_path, pre, kind, tensor, fragment):
    a = str(tmp_path / f"{kind}.bin")
    torch.save({"w": tensor()}, a)
    refused(capsys, tmp_path, pre, a, f"{a}: {fragment}")


# -- 5. files that are not checkpoints -------------------------------------------------------


@pytest.mark.parametrize("kind,content,fragment", [
    ("random", os.urandom(4096), "is binary data in no format tvlang reads (random bytes?)"),
    ("json", json.dumps({"hidden_size": 16}).encode(), "is JSON text, not a checkpoint"),
    ("recipe", b"out = pre + 0.5*(a - pre)\n", "is a text file, not a checkpoint"),
    ("pickle", pickle.dumps({"w": [1.0, 2.0]}), "is a plain Python pickle, not a checkpoint saved with torch.save"),
    ("pickle0", pickle.dumps([1, 2], protocol=0), "is a plain Python pickle"),
    ("empty", b"", "is empty (0 bytes), not a checkpoint"),
])
def test_not_a_checkpoint_says_what_it_looks_like(capsys, tmp_path, pre, kind, content, fragment):
    a = tmp_path / f"{kind}.bin"
    a.write_bytes(content if kind != "random" else b"\x01" + content)  # never by chance a pickle or zip
    err = refused(capsys, tmp_path, pre, str(a), f"{a}: cannot load as a PyTorch checkpoint: it {fragment}")
    if kind != "empty":
        assert "convert other weights to safetensors" in err
    if kind == "recipe":
        assert "tvlang run RECIPE" in err


def test_pickle_needing_code_names_the_global_not_torchs_advice(capsys, tmp_path, pre):
    a = str(tmp_path / "evil.bin")
    torch.save({"w": torch.zeros(1), "f": io.BytesIO}, a)
    err = refused(capsys, tmp_path, pre, a, f"{a}: refusing to load: the pickle needs more than plain tensors")
    assert "the pickle needs '_io.BytesIO', which is not a tensor or a plain container" in err
    assert "add_safe_globals" not in err and "trust" not in err.replace("trusted environment", "")


# -- 6. index shards stay inside the model directory -----------------------------------------


def sharded(directory, weight_map: dict[str, str]) -> str:
    directory.mkdir(exist_ok=True)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(directory)


def test_index_shard_linked_outside_the_directory(capsys, tmp_path, pre):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"w": torch.ones(1)}, str(elsewhere / "secret.safetensors"))
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(elsewhere, model / "sub")
    a = sharded(model, {"w": "sub/secret.safetensors"})
    refused(capsys, tmp_path, pre, a, "shard 'sub/secret.safetensors' resolves to "
            f"{os.path.realpath(elsewhere / 'secret.safetensors')}, outside the model directory")


def test_index_shard_with_dot_dot(capsys, tmp_path, pre):
    save_file({"w": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    a = sharded(tmp_path / "model", {"w": "../x.safetensors"})
    refused(capsys, tmp_path, pre, a, "index puts tensor 'w' in '../x.safetensors', outside the index's directory")


def test_index_nesting_bomb(capsys, tmp_path, pre):
    model = tmp_path / "model"
    model.mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (model / "model.safetensors.index.json").write_text('{"weight_map": {}, "x": ' + deep + "}")
    refused(capsys, tmp_path, pre, str(model),
            "model.safetensors.index.json: index JSON is nested more than 64 levels deep")


def test_index_duplicate_tensor(capsys, tmp_path, pre):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(1)}, str(model / "s.safetensors"))
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"w": "s.safetensors", "w": "t.safetensors"}}')
    refused(capsys, tmp_path, pre, str(model), "index has the key 'w' twice in one object")


def test_index_larger_than_the_cap(capsys, tmp_path, pre):
    model = tmp_path / "model"
    model.mkdir()
    index = model / "model.safetensors.index.json"
    with open(index, "wb") as f:
        f.write(b"{")
        f.truncate(100_000_001)  # sparse: costs no disk
    refused(capsys, tmp_path, pre, str(model), "index is 100000001 bytes, more than the 100000000 allowed")


def test_hub_cache_layout_is_allowed(tmp_path):
    """snapshots/<rev>/<file> links to ../../blobs/<hash> in the Hugging Face cache."""
    repo = tmp_path / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file({"w": torch.ones(1)}, str(blobs / "1111"))
    (blobs / "2222").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    os.symlink("../../blobs/1111", snapshot / "model-00001-of-00001.safetensors")
    os.symlink("../../blobs/2222", snapshot / "model.safetensors.index.json")
    assert open_reader(str(snapshot)).read("w").tolist() == [1.0]
