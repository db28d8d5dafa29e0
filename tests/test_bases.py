"""Spectral clustering, eigengap k, the bases builder and ``tvlang bases``."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tvlang.bases.clustering import affinity_matrix, cluster, eigengap_k, laplacian_eigenvalues
from tvlang.bases.gram import similarity
from tvlang.bases.build import TaskVectorInput, recipe_for
from tvlang.faces.cli import main
from tvlang.errors import TvlangError

SHAPES = {"enc.0.weight": (8, 6), "enc.0.bias": (6,), "enc.1.weight": (5, 4), "head.weight": (3, 5)}
FLOAT_BYTES = 4 * sum(int(np.prod(s)) for s in SHAPES.values())  # of one float32 task vector


def planted(clusters=3, members=4, noise=0.35, seed=0):
    """A base and task vectors = cluster direction + noise, over several tensors."""
    gen = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    pre["pos"] = torch.arange(4)
    directions = [{n: torch.randn(s, generator=gen) for n, s in SHAPES.items()} for _ in range(clusters)]
    fts, truth = {}, []
    for c in range(clusters):
        for m in range(members):
            ft = {n: pre[n] + directions[c][n] + noise * torch.randn(s, generator=gen) for n, s in SHAPES.items()}
            ft["pos"] = torch.arange(4)
            fts[f"c{c}m{m}"] = ft
            truth.append(c)
    return pre, fts, truth


def same_partition(labels, truth) -> bool:
    return len({(a, b) for a, b in zip(labels, truth)}) == len(set(truth)) == len(set(labels))


# -- affinity, Laplacian, eigengap (no scikit-learn needed) ----------------------------

def test_affinity_clips_negative_cosines_and_keeps_a_unit_diagonal():
    cos = np.array([[1.0, 0.5, -0.7], [0.5, 1.0, 0.0], [-0.7, 0.0, 0.0]])  # the last is a zero vector
    assert affinity_matrix(cos).tolist() == [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_laplacian_eigenvalues_of_two_blocks_by_hand():
    # blockdiag(J2, J2): D = 2I, L = I - A/2, each block has eigenvalues {0, 1}
    a = np.kron(np.eye(2), np.ones((2, 2)))
    np.testing.assert_allclose(laplacian_eigenvalues(a), [0.0, 0.0, 1.0, 1.0], atol=1e-12)
    k, values = eigengap_k(a)
    assert k == 2 and len(values) == 4


def test_eigengap_of_unrelated_vectors_is_n_and_of_one_clique_is_one():
    assert eigengap_k(np.eye(5))[0] == 5  # all eigenvalues 0: five components
    assert eigengap_k(np.ones((4, 4)))[0] == 1  # eigenvalues 0, 1, 1, 1
    assert eigengap_k(np.ones((1, 1)))[0] == 1


def test_eigengap_with_two_vectors_merges_unless_not_positively_correlated():
    assert eigengap_k(affinity_matrix(np.array([[1.0, 0.01], [0.01, 1.0]])))[0] == 1
    assert eigengap_k(affinity_matrix(np.array([[1.0, -0.5], [-0.5, 1.0]])))[0] == 2


def test_planted_clusters_eigengap_finds_three():
    pre, fts, truth = planted()
    sim = similarity(fts, base=pre)
    k, values = eigengap_k(affinity_matrix(sim.cosine))
    assert k == 3
    gaps = np.diff(values)
    assert gaps[2] == gaps.max() and gaps[2] > 0.5  # lambda_4 - lambda_3 dominates


# -- clustering (scikit-learn) --------------------------------------------------------

def test_planted_clusters_are_recovered_exactly():
    pytest.importorskip("sklearn")
    pre, fts, truth = planted()
    result = cluster(similarity(fts, base=pre).cosine, "auto")
    assert result.k == 3 and result.k_auto == 3
    assert same_partition(result.labels, truth)
    # clusters numbered by first member, members in input order
    assert result.clusters == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert result.order() == list(range(12))


def test_clustering_is_deterministic_and_label_order_canonical():
    pytest.importorskip("sklearn")
    pre, fts, truth = planted(seed=3)
    # shuffle the inputs: labels follow the input order, not k-means' numbering
    names = list(fts)
    order = [5, 0, 9, 1, 6, 10, 2, 7, 11, 3, 8, 4]
    shuffled = {names[i]: fts[names[i]] for i in order}
    cos = similarity(shuffled, base=pre).cosine
    first = cluster(cos, "auto")
    second = cluster(cos, "auto")
    assert first.labels == second.labels
    assert first.labels[0] == 0 and first.labels[1] == 1 and first.labels[2] == 2
    assert same_partition(first.labels, [truth[i] for i in order])


def test_anti_correlated_clusters_are_kept_apart():
    """Cluster 1 is the negation of cluster 0: cos ~ -0.8 between them. With the clipped
    affinity they are unrelated, so they become two bases (a mean would cancel them)."""
    pytest.importorskip("sklearn")
    gen = torch.Generator().manual_seed(11)
    pre = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    u = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    v = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    fts, truth = {}, []
    for c, (direction, sign) in enumerate([(u, 1.0), (u, -1.0), (v, 1.0)]):
        for m in range(3):
            fts[f"g{c}_{m}"] = {n: pre[n] + sign * direction[n] + 0.3 * torch.randn(s, generator=gen)
                                for n, s in SHAPES.items()}
            truth.append(c)
    sim = similarity(fts, base=pre)
    assert sim.cosine[0, 3] < -0.7  # really anti-correlated
    assert affinity_matrix(sim.cosine)[0, 3] == 0.0
    result = cluster(sim.cosine, "auto")
    assert result.k == 3
    assert same_partition(result.labels, truth)


def test_given_k_merges_whole_planted_clusters():
    pytest.importorskip("sklearn")
    pre, fts, truth = planted()
    cos = similarity(fts, base=pre).cosine
    two = cluster(cos, 2)
    assert two.k == 2 and two.k_auto == 3
    for c in range(3):  # no planted cluster is split
        assert len({two.labels[i] for i in range(12) if truth[i] == c}) == 1
    assert cluster(cos, 12).clusters == [[i] for i in range(12)]
    assert cluster(cos, 1).clusters == [list(range(12))]
    with pytest.raises(TvlangError, match=r"--k 13 is out of range: there are 12 task vectors"):
        cluster(cos, 13)


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    cos = np.kron(np.eye(3), np.ones((2, 2)))
    with pytest.raises(TvlangError, match=r"scikit-learn; install the 'bases' extra: pip install tvlang\[bases\]"):
        cluster(cos, "auto")


# -- recipes ---------------------------------------------------------------------------

def _tv(name, kind="model"):
    return TaskVectorInput(name, f"/ck/{name}", kind, 0)


def test_recipes_per_merge_method():
    a, b = _tv("mnist"), _tv("svhn")
    assert recipe_for([a, b], "mean", None).text.splitlines()[1] == "out = mean(mnist - pre, svhn - pre)"
    assert recipe_for([a, b], "ties", None).text.splitlines()[1] == "out = ties(mnist - pre, svhn - pre)"
    assert recipe_for([a, b], "ties", 0.3).text.splitlines()[1] == "out = ties(mnist - pre, svhn - pre, density=0.3)"
    assert (recipe_for([a, b], "topk", None).text.splitlines()[1]
            == "out = mean(topk(mnist - pre, 0.05), topk(svhn - pre, 0.05))")
    single = recipe_for([a], "ties", 0.3, base="/ck/pre")
    assert single.text.splitlines()[1] == "out = mnist - pre"
    assert single.bindings == {"mnist": "/ck/mnist", "pre": "/ck/pre"}
    assert single.sources == {"mnist": "model", "pre": "model"}


def test_recipe_names_that_are_not_identifiers_and_delta_members():
    odd = [_tv("my-task"), _tv("pre"), _tv("mean"), _tv("tau", "delta")]
    recipe = recipe_for(odd, "mean", None, base="/ck/pre")
    assert recipe.text.splitlines()[0] == "# tvlang bases: members my-task, pre, mean, tau (merge: mean)"
    assert recipe.text.splitlines()[1] == "out = mean(t0 - pre, t1 - pre, t2 - pre, tau)"
    assert recipe.sources == {"t0": "model", "t1": "model", "t2": "model", "tau": "delta", "pre": "model"}
    assert type(recipe.bindings["tau"]).__name__ == "DeltaBinding"
    with pytest.raises(TvlangError, match="unknown merge method 'avg'"):
        recipe_for(odd, "avg", None)


# -- tvlang bases, end to end ----------------------------------------------------------

@pytest.fixture()
def planted_files(tmp_path):
    pre, fts, truth = planted()
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file(pre, str(ck / "pre.safetensors"))
    paths = {}
    for name, ft in fts.items():
        paths[name] = str(ck / f"{name}.safetensors")
        save_file(ft, paths[name])
    return str(ck / "pre.safetensors"), paths, pre, fts


def _read(path):
    from tvlang.io import open_reader

    reader = open_reader(path)
    try:
        return {n: reader.read(n) for n in reader.names()}, dict(reader.metadata), reader.kind
    finally:
        reader.close()


def test_cli_bases_writes_bases_and_manifest(planted_files, tmp_path, capsys):
    pytest.importorskip("sklearn")
    base, paths, pre, fts = planted_files
    out = tmp_path / "bases"
    code = main(["bases", "--base", base, *[f"{n}={p}" for n, p in paths.items()], "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(out)) == ["basis_0.safetensors", "basis_1.safetensors", "basis_2.safetensors",
                                       "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "tvlang.bases/1"
    assert manifest["k"] == 3 and manifest["k_requested"] == "auto" and manifest["k_eigengap"] == 3
    assert len(manifest["eigenvalues"]) == 12 and manifest["eigenvalues"] == sorted(manifest["eigenvalues"])
    assert manifest["merge"] == {"method": "mean", "density": None}
    assert manifest["affinity"] == "clip"
    assert manifest["similarity"]["tensors"] == 4 and manifest["similarity"]["parameters"] == FLOAT_BYTES // 4
    assert manifest["base"] == os.path.abspath(base)
    names = list(paths)
    assert [[m["name"] for m in b["members"]] for b in manifest["bases"]] == [names[0:4], names[4:8], names[8:12]]
    assert manifest["bases"][1]["members"][0] == {"name": "c1m0", "path": paths["c1m0"], "kind": "model"}
    storage = manifest["storage"]
    assert storage["before_bytes"] == 12 * FLOAT_BYTES
    assert storage["after_bytes"] == 3 * FLOAT_BYTES
    assert storage["saved_bytes"] == 9 * FLOAT_BYTES
    assert storage["saved_percent"] == 75.0
    assert storage["after_file_bytes"] == sum(os.path.getsize(out / f"basis_{i}.safetensors") for i in range(3))
    # basis 1 is the mean of its members' task vectors
    tensors, metadata, kind = _read(str(out / "basis_1.safetensors"))
    assert kind == "delta"
    assert metadata["tvlang.recipe"] == manifest["bases"][1]["recipe"]
    assert "c1m0, c1m1, c1m2, c1m3" in metadata["tvlang.recipe"]
    for name in SHAPES:
        expected = sum(fts[f"c1m{m}"][name] - pre[name] for m in range(4)) / 4
        torch.testing.assert_close(tensors[name], expected, rtol=1e-5, atol=1e-6)
    assert "k = 3 (largest eigengap; the eigengap suggests 3)" in stdout
    assert "saved 75.00%" in stdout


def test_cli_bases_refuses_to_overwrite_and_force_replaces(planted_files, tmp_path, capsys):
    pytest.importorskip("sklearn")
    base, paths, _, _ = planted_files
    out = tmp_path / "bases"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["bases", "--base", base, *[f"{n}={p}" for n, p in list(paths.items())[:8]], "-o", str(out), "--quiet"]
    assert main(args) == 1
    assert f"{out}: output already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier bases directory, never a folder with other files
    assert main(args + ["--force", "--k", "2"]) == 1
    assert f"{out}: refusing to replace it: it is a directory that holds 'keep.txt'" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    os.unlink(out / "keep.txt")
    (out / "basis_7.safetensors").write_bytes(b"old")
    (out / "manifest.json").write_text("{}")
    assert main(args + ["--force", "--k", "2"]) == 0
    assert sorted(os.listdir(out)) == ["basis_0.safetensors", "basis_1.safetensors", "manifest.json"]
    assert [p for p in os.listdir(tmp_path) if "tvtmp" in p] == []  # no temporary left behind
    # an input inside the output directory is never replaced
    inside = out / "x.safetensors"
    shutil.copy(paths["c0m0"], inside)
    code = main(["bases", "--base", base, f"x={inside}", f"y={paths['c0m1']}", "-o", str(out), "--force"])
    assert code == 1
    assert f"{out}: refusing to write: the output contains an input ({inside})" in capsys.readouterr().err
    assert inside.exists()


def test_cli_bases_usage_errors(planted_files, tmp_path, capsys):
    base, paths, _, _ = planted_files
    two = [f"{n}={p}" for n, p in list(paths.items())[:2]]
    assert main(["bases", "--base", base, *two]) == 2
    assert "-o DIR" in capsys.readouterr().err
    assert main(["bases", "--base", base, two[0], "-o", str(tmp_path / "o")]) == 2
    assert main(["bases", "--base", base, *two, "-o", str(tmp_path / "o"), "--k", "zero"]) == 2
    assert "--k expects a positive integer or 'auto'" in capsys.readouterr().err
    assert main(["bases", "--base", base, *two, "-o", str(tmp_path / "o"), "--density", "0.3"]) == 2
    assert "--density applies to --merge ties or topk" in capsys.readouterr().err


def test_ties_and_topk_bases_and_singletons(planted_files, tmp_path, capsys):
    pytest.importorskip("sklearn")
    base, paths, pre, fts = planted_files
    chosen = {n: paths[n] for n in ("c0m0", "c0m1", "c2m0")}
    out = tmp_path / "ties"
    assert main(["bases", "--base", base, *[f"{n}={p}" for n, p in chosen.items()], "-o", str(out),
                 "--merge", "ties", "--density", "0.5", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["merge"] == {"method": "ties", "density": 0.5}
    assert [b["recipe"].splitlines()[1] for b in manifest["bases"]] == [
        "out = ties(c0m0 - pre, c0m1 - pre, density=0.5)", "out = c2m0 - pre"]
    single, _, _ = _read(str(out / "basis_1.safetensors"))
    for name in SHAPES:  # a singleton cluster is its task vector
        torch.testing.assert_close(single[name], fts["c2m0"][name] - pre[name])
    out = tmp_path / "topk"
    assert main(["bases", "--base", base, *[f"{n}={p}" for n, p in chosen.items()], "-o", str(out),
                 "--merge", "topk", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merge"] == {"method": "topk", "density": 0.05}
    tensors, _, _ = _read(str(out / "basis_0.safetensors"))
    w = tensors["enc.0.weight"]  # 48 entries: each member keeps its top 5% (3 entries)
    assert 0 < int((w != 0).sum()) <= 6


def test_against_bases_and_bases_in_recipes(planted_files, tmp_path, capsys):
    pytest.importorskip("sklearn")
    base, paths, pre, fts = planted_files
    out = tmp_path / "bases"
    stored = {n: p for n, p in paths.items() if not n.endswith("m3")}  # keep one member of each out
    assert main(["bases", "--base", base, *[f"{n}={p}" for n, p in stored.items()], "-o", str(out), "--quiet"]) == 0
    new = [f"new1={paths['c1m3']}", f"new2={paths['c2m3']}"]
    assert main(["similarity", "--against", str(out / "manifest.json"), *new, "--threshold", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["names"] == ["new1", "new2"] and data["bases"] == ["basis_0", "basis_1", "basis_2"]
    assert data["most_similar"] == ["basis_1", "basis_2"]
    assert data["above"] == [["basis_1"], ["basis_2"]]
    # the reported cosine is that of the new task vector with the stored basis file
    b1, _, _ = _read(str(out / "basis_1.safetensors"))
    tau = np.concatenate([(fts["c1m3"][n] - pre[n]).reshape(-1).double().numpy() for n in SHAPES])
    basis = np.concatenate([b1[n].reshape(-1).double().numpy() for n in SHAPES])
    expected = tau @ basis / np.linalg.norm(tau) / np.linalg.norm(basis)
    assert data["cosine"][0][1] == pytest.approx(expected, abs=1e-6)
    # table form names the members of the most similar basis
    assert main(["similarity", "--against", str(out), *new]) == 0
    text = capsys.readouterr().out
    assert "# new1: most similar basis basis_1 (cosine" in text and "members c1m0, c1m1, c1m2)" in text
    # bases load like any task vector in a recipe: negate the most similar one
    import tvlang

    recipe = f'out = pre - 0.5*load_delta("{out / "basis_1.safetensors"}")'
    result = tvlang.compile(recipe).evaluate({"pre": base})
    for name in SHAPES:
        torch.testing.assert_close(result[name], pre[name] - 0.5 * b1[name])


def test_example_recipes_run(tmp_path, capsys):
    """examples/bases: the demo builds 3 bases and the three recipes compute what they say."""
    pytest.importorskip("sklearn")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    examples = tmp_path / "examples"
    shutil.copytree(os.path.join(repo, "examples", "bases"), examples / "bases")
    sys.path.insert(0, str(examples / "bases"))
    try:
        import make_demo
    finally:
        sys.path.remove(str(examples / "bases"))
    root = examples / "checkpoints" / "bases-demo"
    assert make_demo.main(["--root", str(root)]) == 0
    manifest = json.loads((root / "bases" / "manifest.json").read_text())
    assert [[m["name"] for m in b["members"]] for b in manifest["bases"]] == [
        ["mnist", "svhn"], ["eurosat", "resisc45"], ["dtd", "sun397"]]
    capsys.readouterr()
    assert main(["similarity", "--against", str(root / "bases"), f"gtsrb={root / 'ft' / 'gtsrb.safetensors'}",
                 "--threshold", "0.3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["above"] == [["basis_0"]]  # what ood.tv uses
    pre, _, _ = _read(str(root / "pre.safetensors"))
    b = [_read(str(root / "bases" / f"basis_{i}.safetensors"))[0] for i in range(3)]
    expected = {
        "addition": lambda n: pre[n] + 0.5 * (b[0][n] + b[1][n] + b[2][n]),
        "negation": lambda n: pre[n] - 1.0 * b[0][n],
        "ood": lambda n: pre[n] + 0.8 * b[0][n],
    }
    for name, formula in expected.items():
        out = tmp_path / f"{name}.safetensors"
        assert main(["run", str(examples / "bases" / f"{name}.tv"), "-o", str(out)]) == 0
        got, _, _ = _read(str(out))
        for tensor in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
            torch.testing.assert_close(got[tensor], formula(tensor), rtol=1e-5, atol=1e-6)


def test_bases_from_task_vector_files_without_base(planted_files, tmp_path, capsys):
    pytest.importorskip("sklearn")
    _, paths, pre, fts = planted_files
    deltas = {}
    for name in ("c0m0", "c0m1", "c1m0", "c1m1"):
        deltas[name] = str(tmp_path / f"tau_{name}.safetensors")
        save_file({n: fts[name][n] - pre[n] for n in SHAPES}, deltas[name], metadata={"tvlang.kind": "delta"})
    out = tmp_path / "bases"
    assert main(["bases", *[f"{n}={p}" for n, p in deltas.items()], "-o", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"] is None
    assert [b["recipe"].splitlines()[1] for b in manifest["bases"]] == ["out = mean(c0m0, c0m1)",
                                                                        "out = mean(c1m0, c1m1)"]
    assert {m["kind"] for b in manifest["bases"] for m in b["members"]} == {"delta"}
    basis, _, kind = _read(str(out / "basis_0.safetensors"))
    assert kind == "delta"
    for name in SHAPES:
        expected = (fts["c0m0"][name] + fts["c0m1"][name]) / 2 - pre[name]
        torch.testing.assert_close(basis[name], expected, rtol=1e-5, atol=1e-6)


def test_auto_k_of_one_for_weakly_related_vectors_prints_a_note(tmp_path, capsys):
    gen = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(4000, generator=gen)}
    common = torch.randn(4000, generator=gen)
    save_file(pre, str(tmp_path / "pre.safetensors"))
    args = []
    for i in range(3):  # cosines about 0.08: weakly related, no structure
        save_file({"w": pre["w"] + 0.3 * common + torch.randn(4000, generator=gen)}, str(tmp_path / f"t{i}.safetensors"))
        args.append(f"t{i}={tmp_path / f't{i}.safetensors'}")
    assert main(["bases", "--base", str(tmp_path / "pre.safetensors"), *args, "-o", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "k = 1 (largest eigengap; the eigengap suggests 1)" in captured.out
    assert "the eigengap rule's blind spot: pass --k to choose" in captured.err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["k"] == 1 and manifest["storage"]["saved_percent"] == pytest.approx(66.67)


def test_a_failed_merge_leaves_nothing_behind(planted_files, tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    import tvlang.bases.build as build

    base, paths, _, _ = planted_files
    calls = []

    def failing(recipe, out, distributed):
        calls.append(out)
        if len(calls) == 2:
            raise TvlangError("disk full (simulated)")
        return real(recipe, out, distributed)

    real = build._run_recipe
    monkeypatch.setattr(build, "_run_recipe", failing)
    out = tmp_path / "bases"
    code = main(["bases", "--base", base, *[f"{n}={p}" for n, p in paths.items()], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "disk full (simulated)" in err and "while writing basis 1 from c1m0, c1m1, c1m2, c1m3" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "tvtmp" in p.name] == []


def test_bases_output_is_synced_before_it_is_renamed_into_place(planted_files, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names descriptors through /proc/self/fd")
    from tvlang.bases.build import build_bases

    base, paths, _, _ = planted_files
    out = tmp_path / "bases"
    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    manifest = build_bases(base, list(paths.items())[:8], str(out), k=2)
    files = ["manifest.json"] + [b["file"] for b in manifest["bases"]]
    assert sorted(os.listdir(out)) == sorted(files)
    for name in files + [f".bases.tvtmp-{os.getpid()}"]:  # every file, and the folder's entries
        assert name in synced, name


def test_a_failure_between_the_renames_puts_the_old_bases_back(planted_files, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from tvlang.bases.build import build_bases

    base, paths, _, _ = planted_files
    out = tmp_path / "bases"
    pairs = list(paths.items())[:8]
    first = build_bases(base, pairs, str(out), k=2)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    real = os.rename

    def failing(src, dst):
        if os.path.basename(src) == f".bases.tvtmp-{os.getpid()}":  # the new bases; the old ones are aside
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(TvlangError, match=r"bases: write failed: No space left on device; nothing was written"):
        build_bases(base, pairs, str(out), k=1, force=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert json.loads((out / "manifest.json").read_text())["k"] == first["k"] == 2
    assert [p.name for p in tmp_path.iterdir() if "tvtmp" in p.name] == []
