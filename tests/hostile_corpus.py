"""A hostile-input corpus for the whole tool (issue 18): generated files, recipes, paths and
options, each a ``tvlang`` command that must end with exit 1 or 2, one clear message, no
traceback, bounded time and memory, and every file that was there unchanged.

``build(root)`` writes every case into its own directory under ``root`` and returns the
manifest; ``python tests/hostile_corpus.py MANIFEST RESULTS`` runs them one after another in
one process (the CLI's ``main``, in the case's directory, under a 10 s alarm) and writes
what each did. ``tests/test_hostile_corpus.py`` runs it in a subprocess and checks every case.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import resource
import signal
import socket
import stat
import struct
import sys
import time
import zipfile
from collections.abc import Callable

F32 = "F32"
RUN = ["run", "-e", "pre + 0.5*(a - pre)", "--bind", "pre=pre.safetensors"]
OUT = ["-o", "out.safetensors"]
LOADS = 'pre = load("pre.safetensors")\nft = load("ft.safetensors")\n'

CASES: list[tuple[str, str, Callable[[str], list[str]]]] = []  # (category, name, make(dir) -> argv)


def case(category: str, name: str):
    def register(make):
        CASES.append((category, name, make))
        return make
    return register


# -- files --------------------------------------------------------------------------------------


def _tensor_bytes(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def safetensors_bytes(tensors: dict[str, tuple[list[int], list[float]]], metadata=None) -> bytes:
    header: dict = {}
    data = b""
    for name, (shape, values) in tensors.items():
        raw = _tensor_bytes(values)
        header[name] = {"dtype": F32, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def good(values: float) -> bytes:
    return safetensors_bytes({"w": ([2, 3], [values] * 6), "b": ([3], [values] * 3)})


def raw(header, data: bytes = b"\0" * 36, length: int | None = None) -> bytes:
    """A safetensors file with this header (text, bytes or a dict) and data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(header) if length is None else length) + header + data


W = {"dtype": F32, "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": F32, "shape": [3], "data_offsets": [24, 36]}


def write(path: str, content: bytes | str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return path


def bind_a(target: str) -> list[str]:
    return [*RUN, "--bind", f"a={target}", *OUT]


# -- 1. safetensors headers ---------------------------------------------------------------------

HEADERS = {
    "duplicate_name": '{"w": %s, "b": %s, "w": %s}' % (json.dumps(W), json.dumps(B), json.dumps(W)),
    "gap": {"w": W, "b": {**B, "data_offsets": [28, 40]}},
    "overlap": {"w": W, "b": {**B, "data_offsets": [20, 32]}},
    "beyond_the_file": {"w": W, "b": {**B, "data_offsets": [24, 400]}},
    "negative_offset": {"w": {**W, "data_offsets": [-4, 20]}, "b": B},
    "float_offsets": {"w": {**W, "data_offsets": [0.0, 24.0]}, "b": B},
    "one_offset": {"w": {**W, "data_offsets": [0]}, "b": B},
    "no_offsets": {"w": {"dtype": F32, "shape": [2, 3]}, "b": B},
    "unknown_dtype": {"w": {**W, "dtype": "F33"}, "b": B},
    "lowercase_dtype": {"w": {**W, "dtype": "f32"}, "b": B},
    "no_dtype": {"w": {"shape": [2, 3], "data_offsets": [0, 24]}, "b": B},
    "shape_and_bytes_disagree": {"w": {**W, "shape": [2, 4]}, "b": B},
    "negative_dimension": {"w": {**W, "shape": [-2, -3]}, "b": B},
    "shape_not_a_list": {"w": {**W, "shape": "2x3"}, "b": B},
    "zero_size_dimension_2_to_the_70": {"w": {**W, "shape": [0, 2 ** 70], "data_offsets": [0, 0]},
                                        "b": {**B, "data_offsets": [0, 12]}},
    "entry_not_an_object": {"w": [1, 2, 3], "b": B},
    "metadata_not_strings": {"w": W, "b": B, "__metadata__": {"format": 1}},
    "metadata_not_an_object": {"w": W, "b": B, "__metadata__": ["format", "pt"]},
    "not_json": "{not json",
    "json_array": "[1, 2, 3]",
    "json_string": '"hello"',
    "trailing_garbage": json.dumps({"w": W, "b": B}) + "xyz",
    "byte_order_mark": "\ufeff" + json.dumps({"w": W, "b": B}),
    "nesting_bomb": "[" * 100_000 + "]" * 100_000,
    "nesting_bomb_in_metadata": '{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "5000_digit_number": '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 24]}}',
    "lone_surrogate_name": '{"w\\ud800": %s, "b": %s}' % (json.dumps(W), json.dumps(B)),
    "terminal_escape_in_a_name": {"w\x1b[2J\x1b[31m": W, "b": B},
    "invalid_utf8": b'{"w\xff\xfe": ' + json.dumps(W).encode() + b"}",
    "no_tensors": {},
    "nul_in_a_name": {"w\x00x": W, "b": B},
    "bidi_override_in_a_name": {"w\u202e": W, "b": B},
}

for _name, _header in HEADERS.items():
    def _make(d, header=_header):
        write(os.path.join(d, "a.safetensors"), raw(header))
        return bind_a("a.safetensors")
    case("safetensors header", _name)(_make)


@case("safetensors header", "declared_length_past_the_end")
def _(d):
    write(os.path.join(d, "a.safetensors"), raw({"w": W}, length=10 ** 6))
    return bind_a("a.safetensors")


@case("safetensors header", "declared_length_2_to_the_63")
def _(d):
    write(os.path.join(d, "a.safetensors"), raw({"w": W}, length=2 ** 63))
    return bind_a("a.safetensors")


@case("safetensors header", "declared_length_0")
def _(d):
    write(os.path.join(d, "a.safetensors"), raw(b"", data=b"", length=0))
    return bind_a("a.safetensors")


@case("safetensors header", "seven_bytes")
def _(d):
    write(os.path.join(d, "a.safetensors"), b"\x08\0\0\0\0\0\0")
    return bind_a("a.safetensors")


@case("safetensors header", "empty_file")
def _(d):
    write(os.path.join(d, "a.safetensors"), b"")
    return bind_a("a.safetensors")


@case("safetensors header", "shape_differs_from_the_base")
def _(d):
    write(os.path.join(d, "a.safetensors"),
          safetensors_bytes({"w": ([3, 2], [1.0] * 6), "b": ([3], [1.0] * 3)}))
    return bind_a("a.safetensors")


@case("safetensors header", "truncated_data")
def _(d):
    write(os.path.join(d, "a.safetensors"), good(1.0)[:-10])
    return bind_a("a.safetensors")


def many_entries_header(count: int) -> bytes:
    """A safetensors file of ``count`` one-float tensors: a valid file, only too many of them
    (issue 18, case 9: 1.67 million entries in a 100 MB header)."""
    entries = b",".join(b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}' % (i, 4 * i, 4 * i + 4)
                         for i in range(count))
    header = b"{" + entries + b"}"
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * count)


@case("safetensors header", "1.3_million_entries_in_97_MB")
def _(d):
    write(os.path.join(d, "a.safetensors"), many_entries_header(1_300_000))
    return bind_a("a.safetensors")


# -- 2. sharded indexes -------------------------------------------------------------------------

def _model_dir(d: str, index, shards: dict[str, bytes] | None = None) -> list[str]:
    folder = os.path.join(d, "a")
    os.makedirs(folder, exist_ok=True)
    for name, content in (shards if shards is not None else {"s1.safetensors": good(1.0)}).items():
        write(os.path.join(folder, name), content)
    write(os.path.join(folder, "model.safetensors.index.json"),
          index if isinstance(index, (str, bytes)) else json.dumps(index))
    return bind_a("a")


INDEXES = {
    "index_not_json": "{weight_map: nope",
    "index_without_weight_map": {"metadata": {}},
    "weight_map_a_list": {"weight_map": ["w", "b"]},
    "weight_map_value_an_int": {"weight_map": {"w": 1, "b": "s1.safetensors"}},
    "shard_missing": {"weight_map": {"w": "s1.safetensors", "b": "s2.safetensors"}},
    "shard_outside_with_dot_dot": {"weight_map": {"w": "../pre.safetensors", "b": "s1.safetensors"}},
    "shard_absolute_path": {"weight_map": {"w": "/etc/passwd", "b": "s1.safetensors"}},
    "index_nesting_bomb": "[" * 100_000 + "]" * 100_000,
    "index_duplicate_tensor": '{"weight_map": {"w": "s1.safetensors", "w": "s1.safetensors", "b": "s1.safetensors"}}',
    "index_lists_a_tensor_the_shard_lacks": {"weight_map": {"w": "s1.safetensors", "b": "s1.safetensors",
                                                            "c": "s1.safetensors"}},
    "index_lone_surrogate": '{"weight_map": {"w\\udc00": "s1.safetensors"}}',
    "index_empty": "",
}

for _name, _index in INDEXES.items():
    def _make(d, index=_index):
        return _model_dir(d, index)
    case("sharded index", _name)(_make)


@case("sharded index", "shard_is_a_directory")
def _(d):
    argv = _model_dir(d, {"weight_map": {"w": "s1.safetensors", "b": "sub"}})
    os.makedirs(os.path.join(d, "a", "sub"))
    return argv


@case("sharded index", "shard_symlinked_outside")
def _(d):
    argv = _model_dir(d, {"weight_map": {"w": "link.safetensors", "b": "link.safetensors"}}, {})
    os.symlink(os.path.join(d, "ft.safetensors"), os.path.join(d, "a", "link.safetensors"))
    return argv


@case("sharded index", "directory_without_weights")
def _(d):
    write(os.path.join(d, "a", "config.json"), "{}")
    return bind_a("a")


# -- 3. pickles and .bin files --------------------------------------------------------------------


def _torch_save(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _bins() -> dict[str, Callable[[], bytes]]:
    import torch

    def zipped(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression) as z:
            for name, data in entries.items():
                z.writestr(name, data)
        return buffer.getvalue()

    def declared_too_large() -> bytes:
        data = bytearray(zipped({"archive/data.pkl": b"\0" * 64}))
        # patch the central directory's uncompressed size of the entry to 1 TB
        at = data.rfind(b"PK\x01\x02")
        struct.pack_into("<I", data, at + 24, 0xFFFFFFF0)
        return bytes(data)

    return {
        "random_bytes": lambda: os.urandom(4096),
        "text": lambda: b"this is a README, not a checkpoint\n" * 20,
        "json": lambda: json.dumps({"w": [1, 2, 3]}).encode(),
        "raw_pickle_calling_os_system": lambda: pickle.dumps({"w": _Evil()}, protocol=2),
        "torch_pickle_calling_os_system": lambda: _torch_save({"w": _Evil()}),
        "a_whole_module": lambda: _torch_save(torch.nn.Linear(3, 2)),
        "a_tensor_not_a_dict": lambda: _torch_save(torch.zeros(3)),
        "a_list": lambda: _torch_save([torch.zeros(3)]),
        "compressed_entry": lambda: zipped({"archive/data.pkl": b"\0" * 10_000_000}, zipfile.ZIP_DEFLATED),
        "entry_declared_larger_than_the_file": declared_too_large,
        "zip_not_a_torch_checkpoint": lambda: zipped({"notes.txt": b"hello"}),
        "truncated_torch_zip": lambda: _torch_save({"w": torch.zeros(2, 3), "b": torch.zeros(3)})[:300],
        "sparse_tensor": lambda: _torch_save({"w": torch.zeros(2, 3).to_sparse(), "b": torch.zeros(3)}),
        "meta_tensor": lambda: _torch_save({"w": torch.empty(2, 3, device="meta"), "b": torch.zeros(3)}),
        "empty_bin": lambda: b"",
        "a_pickled_string": lambda: pickle.dumps("w"),
    }


for _name in ("random_bytes", "text", "json", "raw_pickle_calling_os_system", "torch_pickle_calling_os_system",
              "a_whole_module", "a_tensor_not_a_dict", "a_list", "compressed_entry",
              "entry_declared_larger_than_the_file", "zip_not_a_torch_checkpoint", "truncated_torch_zip",
              "sparse_tensor", "meta_tensor", "empty_bin", "a_pickled_string"):
    def _make(d, name=_name):
        write(os.path.join(d, "a.bin"), _bins()[name]())
        return bind_a("a.bin")
    case("pickle", _name)(_make)


# -- 4. recipes --------------------------------------------------------------------------------

RECIPES = {
    "unbalanced_paren": LOADS + "out = pre + 0.5*((ft - pre)\n",
    "unknown_function": LOADS + "out = pre + tiez(ft - pre)\n",
    "affine_rule_broken": LOADS + "out = pre + 0.4*ft\n",
    # 20k deep: far past any recursion limit (0.2 crashed at ~330), inside the 10 s budget
    "nesting_20k_parens": LOADS + "out = " + "(" * 20_000 + "pre" + ")" * 20_000 + " + ft\n",
    "50k_unary_minus_on_a_model": LOADS + "out = " + "-" * 50_001 + "pre\n",
    "5000_digit_literal": LOADS + "out = pre + " + "9" * 5000 + "*(ft - pre)\n",
    "number_1e400": LOADS + "out = pre + 1e400*(ft - pre)\n",
    "coefficient_overflow": LOADS + "out = pre + 1e200*(1e200*(ft - pre))\n",
    "coefficient_underflow": LOADS + "out = pre + 1e-200*(1e-200*(ft - pre))\n",
    "nul_byte": LOADS + "out = pre\x00 + 0.5*(ft - pre)\n",
    "recipe_not_utf8": (LOADS + "out = pre + 0.5*(ft - pre) # ").encode() + b"\xff\xfe\n",
    "escape_codes_in_a_name": LOADS + "out = pre + 0.5*(ft\x1b[2J - pre)\n",
    "bidi_override_in_a_recipe": LOADS + "out = pre + 0.5*(ft - pre\u202e)\n",
    "escape_codes_in_a_string": LOADS + 'x = load("\x1b[31mred.safetensors")\nout = x\n',
    "empty": "",
    "comments_only": "# nothing here\n# at all\n",
    "python_code": LOADS + 'out = __import__("os").system("touch pwned")\n',
    "python_eval_in_a_string": 'out = load("__import__(\'os\').system(\'touch pwned\')")\n',
    "load_empty_path": 'out = load("")\n',
    "load_dev_zero": 'pre = load("/dev/zero")\nout = pre\n',
    "load_the_working_directory": 'pre = load(".")\nout = pre\n',
    "ties_density_1_5": LOADS + "out = pre + ties(ft - pre, density=1.5)\n",
    "dare_p_a_string": LOADS + 'out = pre + dare(ft - pre, p="x")\n',
    "unknown_option": LOADS + "out = pre + ties(ft - pre, densty=0.2)\n",
    "division_by_zero": LOADS + "out = pre + (ft - pre)/0\n",
    "output_named_twice": LOADS + "out a = pre\nout a = ft\n",
    "two_bare_outs": LOADS + "out = pre\nout = ft\n",
    "used_before_defined": LOADS + "t = u + (ft - pre)\nu = t\nout = pre + t\n",
    "cyrillic_confusable": LOADS + "out = pre + 0.5*(ft - рre)\n",
    "assignment_to_a_builtin": LOADS + "ties = ft - pre\nout = pre + ties\n",
    "model_times_model": LOADS + "out = pre * ft\n",
    "a_megabyte_identifier": LOADS + "out = pre + 0.5*(" + "x" * 1_000_000 + " - pre)\n",
    "keyword_as_a_name": LOADS + "param = ft - pre\nout = pre + param\n",
    "param_set_to_text": LOADS + "param lam = 0.5\nout = pre + lam*(ft - pre)\n",
}

for _name, _text in RECIPES.items():
    def _make(d, text=_text, name=_name):
        write(os.path.join(d, "r.tv"), text)
        argv = ["run", "r.tv", *OUT]
        if name == "param_set_to_text":
            argv += ["--set", "lam=abc"]
        return argv
    case("recipe", _name)(_make)


@case("recipe", "recipe_is_a_directory")
def _(d):
    os.makedirs(os.path.join(d, "r.tv"))
    return ["run", "r.tv", *OUT]


@case("recipe", "recipe_does_not_exist")
def _(d):
    return ["run", "nowhere.tv", *OUT]


@case("recipe", "empty_expression")
def _(d):
    return ["run", "-e", "", "--bind", "pre=pre.safetensors", *OUT]


# -- 5. outputs: what --force may replace ---------------------------------------------------------

FT = ["run", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre=pre.safetensors", "--bind", "ft=ft.safetensors"]


@case("output", "empty_output_path_with_force")
def _(d):
    return [*FT, "-o", "", "--force"]


@case("output", "working_directory_with_force")
def _(d):
    return [*FT, "-o", ".", "--force"]


@case("output", "an_input_with_force")
def _(d):
    return [*FT, "-o", "pre.safetensors", "--force"]


@case("output", "a_cancelled_input_with_force")
def _(d):
    return ["run", "-e", "pre + (ft - pre)", "--bind", "pre=pre.safetensors", "--bind", "ft=ft.safetensors",
            "-o", "pre.safetensors", "--force"]


@case("output", "an_input_through_dot_dot")
def _(d):
    os.makedirs(os.path.join(d, "sub"))
    return [*FT, "-o", "sub/../ft.safetensors", "--force"]


@case("output", "the_same_output_twice")
def _(d):
    write(os.path.join(d, "two.tv"), LOADS + "out x = pre + 0.5*(ft - pre)\nout y = ft\n")
    return ["run", "two.tv", "-o", "x=K", "-o", "y=./K", "--force"]


@case("output", "a_directory_of_documents")
def _(d):
    write(os.path.join(d, "docs", "thesis.tex"), "years of work\n")
    return [*FT, "-o", "docs", "--force"]


@case("output", "a_symlink_to_a_directory_of_documents")
def _(d):
    write(os.path.join(d, "docs", "thesis.tex"), "years of work\n")
    os.symlink("docs", os.path.join(d, "link"))
    return [*FT, "-o", "link", "--force"]


@case("output", "a_device")
def _(d):
    return [*FT, "-o", "/dev/null", "--force"]


@case("output", "an_input_directory")
def _(d):
    write(os.path.join(d, "base", "model.safetensors"), good(0.0))
    return ["run", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre=base", "--bind", "ft=ft.safetensors",
            "-o", "base", "--force"]


@case("output", "a_directory_holding_an_input")
def _(d):
    write(os.path.join(d, "models", "base", "model.safetensors"), good(0.0))
    return ["run", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre=models/base", "--bind", "ft=ft.safetensors",
            "-o", "models", "--force"]


@case("output", "existing_output_without_force")
def _(d):
    write(os.path.join(d, "out.safetensors"), good(7.0))
    return [*FT, *OUT]


# -- 6. bindings, options and odd inputs --------------------------------------------------------


@case("binding", "missing_file")
def _(d):
    return bind_a("missing.safetensors")


@case("binding", "no_equals_sign")
def _(d):
    return [*RUN, "--bind", "a", *OUT]


@case("binding", "a_name_the_recipe_does_not_use")
def _(d):
    return [*RUN, "--bind", "a=ft.safetensors", "--bind", "zz=ft.safetensors", *OUT]


@case("binding", "dev_zero")
def _(d):
    return bind_a("/dev/zero")


@case("binding", "named_pipe")
def _(d):
    os.mkfifo(os.path.join(d, "pipe.safetensors"))
    return bind_a("pipe.safetensors")


@case("binding", "unix_socket")
def _(d):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(d, "sock.safetensors"))
    sock.close()
    return bind_a("sock.safetensors")


@case("binding", "symlink_loop")
def _(d):
    os.symlink("loop2.safetensors", os.path.join(d, "loop1.safetensors"))
    os.symlink("loop1.safetensors", os.path.join(d, "loop2.safetensors"))
    return bind_a("loop1.safetensors")


@case("binding", "empty_directory")
def _(d):
    os.makedirs(os.path.join(d, "empty"))
    return bind_a("empty")


@case("binding", "a_recipe_as_a_checkpoint")
def _(d):
    write(os.path.join(d, "r.tv"), LOADS + "out = pre\n")
    return bind_a("r.tv")


@case("binding", "delta_prefix_on_a_missing_file")
def _(d):
    return bind_a("delta:missing.safetensors")


@case("binding", "lora_prefix_on_a_model_file")
def _(d):
    return bind_a("lora:ft.safetensors")


@case("option", "unknown_compute_dtype")
def _(d):
    return [*FT, *OUT, "--dtype", "float13"]


@case("option", "unknown_device")
def _(d):
    return [*FT, *OUT, "--device", "tpu"]


@case("option", "negative_shard_size")
def _(d):
    return [*FT, "-o", "outdir", "--shard-size", "-5"]


@case("option", "shard_size_garbage")
def _(d):
    return [*FT, "-o", "outdir", "--shard-size", "lots"]


@case("option", "unknown_missing_policy")
def _(d):
    return [*FT, *OUT, "--missing", "ignore"]


@case("option", "set_an_undeclared_param")
def _(d):
    return [*FT, *OUT, "--set", "lam=0.3"]


@case("option", "unknown_flag")
def _(d):
    return [*FT, *OUT, "--turbo"]


# -- 7. values -----------------------------------------------------------------------------------


@case("values", "nan_in_an_input")
def _(d):
    write(os.path.join(d, "a.safetensors"),
          safetensors_bytes({"w": ([2, 3], [1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), "b": ([3], [1.0] * 3)}))
    return bind_a("a.safetensors")


@case("values", "inf_in_an_input")
def _(d):
    write(os.path.join(d, "a.safetensors"),
          safetensors_bytes({"w": ([2, 3], [1.0] * 6), "b": ([3], [float("-inf"), 1.0, 1.0])}))
    return bind_a("a.safetensors")


@case("values", "float16_output_overflow")
def _(d):
    return ["run", "-e", "pre + 1e20*(ft - pre)", "--bind", "pre=pre.safetensors", "--bind",
            "ft=ft.safetensors", *OUT, "--out-dtype", "float16"]


@case("values", "coefficient_beyond_float32")
def _(d):
    return ["run", "-e", "pre + 1e30*(1e30*(ft - pre))", "--bind", "pre=pre.safetensors", "--bind",
            "ft=ft.safetensors", *OUT]


# -- building and running ------------------------------------------------------------------------

OUTPUT_NAMES = ("out.safetensors", "outdir", "K", "merged")


def build(root: str) -> list[dict]:
    """Write every case under ``root``; the manifest (one dict per case)."""
    manifest = []
    for index, (category, name, make) in enumerate(CASES):
        d = os.path.join(root, f"{index:03d}-{name}")
        os.makedirs(d)
        write(os.path.join(d, "pre.safetensors"), good(0.0))
        write(os.path.join(d, "ft.safetensors"), good(1.0))
        write(os.path.join(d, "unrelated", "notes.txt"), "a file no run may touch\n")
        argv = make(d)
        manifest.append({"category": category, "name": name, "dir": d, "argv": argv})
    return manifest


def snapshot(d: str) -> dict[str, str]:
    """Every path under ``d``: a file's sha256, a link's target, or its kind."""
    found: dict[str, str] = {}
    for top, dirs, files in os.walk(d):
        for entry in dirs + files:
            path = os.path.join(top, entry)
            rel = os.path.relpath(path, d)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                found[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    found[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[rel] = "dir" if stat.S_ISDIR(mode) else "special"
    return found


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (Linux)
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Timeout(BaseException):
    pass


def run_case(entry: dict) -> dict:
    from tvlang.faces.cli import main

    d = entry["dir"]
    before = snapshot(d)
    err, out = io.StringIO(), io.StringIO()
    previous = os.getcwd()

    def alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(10)
    started = time.perf_counter()
    _peak_rss_reset()
    code: object
    try:
        os.chdir(d)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(list(entry["argv"]))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    except _Timeout:
        code = "timeout"
    except BaseException as exc:  # noqa: BLE001 - what escaped main is the finding
        import traceback

        code = "escaped"
        err.write("Traceback (escaped main):\n" + "".join(traceback.format_exception(exc)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        os.chdir(previous)
    seconds = time.perf_counter() - started
    after = snapshot(d)
    return {**entry, "code": code, "stderr": err.getvalue(), "stdout": out.getvalue(), "seconds": seconds,
            "peak_rss": _peak_rss(), "before": before, "after": after}


def main(argv: list[str]) -> int:
    manifest_path, results_path = argv
    with open(manifest_path) as f:
        manifest = json.load(f)
    # Imported before the first case (the CLI imports the run layer and torch lazily):
    # import time is not a case's.
    import tvlang.faces.cli  # noqa: F401
    import tvlang.run.driver  # noqa: F401
    import tvlang.run.evaluate  # noqa: F401

    results = [run_case(entry) for entry in manifest]
    with open(results_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
