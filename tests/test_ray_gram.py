"""`tvlang similarity` and `tvlang bases` on Ray: the Gram matrix as partial sums per task.

One local Ray instance (2 CPUs, loopback only) serves the module. The similarity
matrices on Ray equal the local ones to 1e-12 (the issue's must-hold), and the
partial sums do not depend on the split at all (checked bit for bit without Ray).
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

import tvlang
from tvlang.bases import gram_ray
from tvlang.bases.build import build_bases
from tvlang.bases.gram import similarity
from tvlang.bases.gram_stream import GramInputs, open_inputs, partial_gram, plan_gram
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.testing.synth import write_checkpoint

SHAPES = {"embed.weight": (96, 40), "layers.0.w": (40, 40), "layers.0.b": (40,), "layers.1.w": (40, 40),
          "layers.1.b": (40,), "head.weight": (96, 40)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """pre, and two pairs of fine-tunes that share a direction each (a1, a2 and b1, b2), plus an int buffer."""
    root = tmp_path_factory.mktemp("gram")
    g = torch.Generator().manual_seed(0)

    def rand(scale=1.0):
        return {name: scale * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}

    pre = rand()
    directions = {"a": rand(0.1), "b": rand(0.1)}
    paths = {"pre": write_checkpoint(root / "pre", {**pre, "position_ids": torch.arange(8)})}
    for family, direction in directions.items():
        for member in (1, 2):
            noise = rand(0.03)
            state = {name: pre[name] + direction[name] + noise[name] for name in SHAPES}
            paths[f"{family}{member}"] = write_checkpoint(root / f"{family}{member}",
                                                          {**state, "position_ids": torch.arange(8)})
    return paths


def inputs_of(models) -> list[tuple[str, str]]:
    return [(name, path) for name, path in models.items() if name != "pre"]


def assert_close(local, remote) -> None:
    assert remote.names == local.names and remote.tensors == local.tensors and remote.elements == local.elements
    scale = float(np.abs(local.gram).max())
    assert float(np.abs(remote.gram - local.gram).max()) <= 1e-12 * scale
    assert float(np.abs(remote.cosine - local.cosine).max()) <= 1e-12


def test_similarity_on_ray_equals_the_local_matrix(ray_instance, models):
    calls = []
    local = similarity(inputs_of(models), base=models["pre"])
    remote = similarity(inputs_of(models), base=models["pre"], executor="ray", workers=2,
                        progress=lambda *args: calls.append(args))
    assert_close(local, remote)
    assert len(remote.tensors) == 6  # the int buffer is skipped
    # One call per task as it ends (two ranges per worker here), the last saying every tensor is in.
    assert 2 <= len(calls) <= 4 and calls[-1][1:] == (5, 6)
    assert sorted(i for _, i, _ in calls) == [i for _, i, _ in calls]  # cumulative counts


def test_small_chunks_deltas_and_filters(ray_instance, models, tmp_path):
    """Task vector files (no base), an include filter and chunks smaller than a tensor."""
    deltas = []
    for name in ("a1", "b1", "b2"):
        path = str(tmp_path / f"tau_{name}.safetensors")
        tvlang.compile(f"{name} - pre").run({"pre": models["pre"], name: models[name]}, path)
        deltas.append((name, path))
    for options in ({}, {"include": ["layers.*"]}):
        local = similarity(deltas, chunk_bytes=3000, **options)
        remote = similarity(deltas, chunk_bytes=3000, executor="ray", workers=2, **options)
        assert_close(local, remote)
    assert remote.tensors == ["layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b"]


def test_partial_sums_do_not_depend_on_the_split(models):
    """The parts of any split, added in any order, give the whole's matrix bit for bit."""
    opened = open_inputs(GramInputs(tuple(inputs_of(models)), models["pre"], frozenset()))
    try:
        plan = plan_gram(opened, (), (), None, chunk_bytes=5000)  # several chunks per big tensor
        names = [name for name, _ in plan.tensors]
        whole = partial_gram(opened, plan, names).value()
        for split in ([names[:1], names[1:]], [[n] for n in names][::-1], [names[:4], names[4:]]):
            total = partial_gram(opened, plan, split[0])
            for part in split[1:]:
                total.merge(partial_gram(opened, plan, part))
            assert np.array_equal(total.value(), whole)
    finally:
        opened.close()
    # ... and the local similarity is that matrix.
    assert np.array_equal(similarity(inputs_of(models), base=models["pre"], chunk_bytes=5000).gram, whole)


def test_bases_on_ray_write_the_local_bases(ray_instance, models, tmp_path):
    pytest.importorskip("sklearn")
    pairs = inputs_of(models)
    local = build_bases(models["pre"], pairs, str(tmp_path / "local"), k=2, merge="ties", density=0.5)
    remote = build_bases(models["pre"], pairs, str(tmp_path / "ray"), k=2, merge="ties", density=0.5,
                         executor="ray", workers=2)
    assert remote == local  # the manifest: clusters, cosines, eigenvalues, storage
    assert [[m["name"] for m in b["members"]] for b in remote["bases"]] == [["a1", "a2"], ["b1", "b2"]]
    for name in sorted(os.listdir(tmp_path / "local")):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path / "ray")) == sorted(os.listdir(tmp_path / "local"))


def test_command_line(ray_instance, models, tmp_path, capsys):
    args = ["--base", models["pre"], *[f"{name}={path}" for name, path in inputs_of(models)]]
    assert main(["similarity", *args, "--json", "-q"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["similarity", *args, "--json", "-q", "--executor", "ray", "--workers", "2"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["names"] == local["names"]
    assert np.abs(np.array(remote["cosine"]) - np.array(local["cosine"])).max() <= 1e-12
    assert main(["similarity", *args, "--workers", "2"]) == 2
    assert "--address and --workers go with --executor ray" in capsys.readouterr().err
    out = tmp_path / "bases"
    assert main(["bases", *args, "-o", str(out), "--k", "2", "-q", "--executor", "ray", "--workers", "1"]) == 0
    assert sorted(os.listdir(out)) == ["basis_0.safetensors", "basis_1.safetensors", "manifest.json"]
    assert main(["bases", *args, "-o", str(tmp_path / "b2"), "--task-timeout", "5"]) == 2
    assert "--task-timeout goes with --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def test_options_of_the_local_executor_are_refused(models):
    with pytest.raises(TvlangError, match="options of executor='ray'"):
        similarity(inputs_of(models), base=models["pre"], workers=2)
    with pytest.raises(TvlangError, match="unknown executor 'dask'"):
        similarity(inputs_of(models), base=models["pre"], executor="dask")


def test_a_failing_task_names_the_earliest_range_and_its_worker(ray_instance, models, tmp_path, monkeypatch):
    """Every task fails (its worker cannot see the relative paths); the first range is the one reported,
    whichever task failed first."""
    real = gram_ray.gram_part

    def elsewhere(job, names):
        import dataclasses

        return real(dataclasses.replace(job, cwd="/nonexistent"), names)

    monkeypatch.setattr(gram_ray, "gram_part", elsewhere)
    monkeypatch.chdir(os.path.dirname(models["pre"]))
    relative = [(name, os.path.basename(path)) for name, path in inputs_of(models)]
    with pytest.raises(TvlangError) as info:
        similarity(relative, base=os.path.basename(models["pre"]), executor="ray", workers=2)
    message = str(info.value)
    assert message.startswith("error: similarity over tensors embed.weight .. ")
    assert f"failed on worker {socket.gethostname()} (pid " in message
    assert message.endswith(": pre: no such file or directory")  # the first input it could not open
