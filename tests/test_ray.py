"""The Ray executor writes the local executor's bytes, one task per output shard.

One local Ray instance (2 CPUs, loopback only, no dashboard) serves the module; each
test runs a recipe with both executors and compares the files byte for byte.
Without Ray installed, only the install hint is tested.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch

import tvlang
from tvlang.errors import TvlangError
from tvlang.run import distributed
from tvlang.testing.synth import write_checkpoint, write_synthetic

SPEC = {
    "embed.weight": (64, 32),
    "layers.0.w": (32, 32),
    "layers.0.b": (32,),
    "layers.1.w": (32, 32),
    "layers.1.b": (32,),
    "position_ids": ((16,), torch.int64),
    "head.weight": (64, 32),
}
SHARD = 10_000  # bytes: the float32 tensors above make 3 or 4 shards


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "pre": write_synthetic(root / "pre", SPEC, seed=0),
        "a": write_synthetic(root / "a", SPEC, seed=1, finetune_of=0),
        "b": write_synthetic(root / "b", SPEC, seed=2, finetune_of=0),
    }


def without_b(models) -> dict[str, str]:
    """The bindings of a recipe that reads pre and a only (a binding it does not read is an error)."""
    return {name: path for name, path in models.items() if name != "b"}


def files_of(path) -> dict[str, bytes]:
    """Every file under an output (or the one file), by relative name."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    found = {}
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            found[os.path.relpath(full, path)] = open(full, "rb").read()
    return found


def assert_same_bytes(local, remote) -> None:
    mine, theirs = files_of(local), files_of(remote)
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        assert mine[name] == theirs[name], name


def no_temporaries(directory) -> bool:
    return not [e for e in os.listdir(directory) if ".tvtmp-" in e]


def both(recipe: str, bindings, tmp_path, outs, **options):
    """Run ``recipe`` locally and on Ray; (local outputs, Ray outputs) as name -> path."""
    plan = tvlang.compile(recipe)
    local = {name: tmp_path / "local" / path for name, path in outs.items()}
    remote = {name: tmp_path / "ray" / path for name, path in outs.items()}
    plan.run(bindings, {k: str(v) for k, v in local.items()}, **options)
    plan.run(bindings, {k: str(v) for k, v in remote.items()}, executor="ray", **options)
    return local, remote


RECIPES = {
    "plain": "pre + 0.5*(a - pre) + 0.3*(b - pre)",
    "ties": "pre + ties(a - pre, b - pre, density=0.3)",
    "ties-model": 'pre + ties(a - pre, b - pre, density=0.3, scope="model")',
    "dare": "pre + dare(a - pre, 0.5, seed=3) + dare(b - pre, 0.5, seed=4)",
    "norm": "pre + (norm(b - pre) / norm(a - pre)) * (a - pre)",
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_byte_identical_sharded(ray_instance, models, tmp_path, name):
    local, remote = both(RECIPES[name], models, tmp_path, {"out": "merged"}, shard_size=SHARD)
    assert "model.safetensors.index.json" in files_of(remote["out"])  # several shards, one index
    assert "config.json" in files_of(remote["out"])  # the base's files copied
    assert_same_bytes(local["out"], remote["out"])
    assert no_temporaries(tmp_path / "ray")


def test_byte_identical_single_file_and_one_shard(ray_instance, models, tmp_path):
    recipe = "pre + 0.7*(a - pre)"
    local, remote = both(recipe, without_b(models), tmp_path, {"out": "merged.safetensors"})
    assert_same_bytes(local["out"], remote["out"])
    local, remote = both(recipe, without_b(models), tmp_path / "dir", {"out": "merged"})  # one model.safetensors
    assert sorted(files_of(remote["out"])) == ["README.md", "config.json", "model.safetensors"]  # the same card
    assert_same_bytes(local["out"], remote["out"])


def test_two_outputs_in_one_pass(ray_instance, models, tmp_path):
    """A Model and a Delta output (no integer buffer, other shard boundaries) and a second Model output."""
    recipe = "out merged = pre + 0.5*(a - pre)\nout tau = b - pre\nout other = pre + cos(a - pre, b - pre)*(b - pre)\n"
    outs = {"merged": "m", "tau": "t", "other": "o.safetensors"}
    events = []
    plan = tvlang.compile(recipe)
    local = {k: str(tmp_path / "local" / v) for k, v in outs.items()}
    remote = {k: str(tmp_path / "ray" / v) for k, v in outs.items()}
    local_summary = plan.run(models, local, shard_size=SHARD)
    summary = plan.run(models, remote, shard_size=SHARD, executor="ray", progress=events.append)
    for name in outs:
        assert_same_bytes(local[name], remote[name])
    assert summary.outputs == remote
    # The --json report (docs/cli-json.md) is the local run's but for the paths and the time.
    ours, theirs = local_summary.to_dict(), summary.to_dict()
    assert [o["path"] for o in theirs["outputs"]] == list(remote.values())
    for key in ("seconds", "outputs"):
        ours.pop(key), theirs.pop(key)
    assert theirs == ours
    assert [(o["name"], o["kind"], o["format"]) for o in summary.written] == \
        [("merged", "model", "directory"), ("tau", "delta", "directory"), ("other", "model", "safetensors")]
    assert [o["tensors"] for o in summary.written] == [o["tensors"] for o in local_summary.written]
    # merged's shards and tau's hold different tensors (tau has no position_ids); other is one file.
    shards = {name: len([f for f in files_of(remote[name]) if f.startswith("model-")]) for name in ("merged", "tau")}
    tasks = {e.tensors_total for e in events if "on Ray" in e.label}
    assert tasks and tasks.pop() <= shards["merged"] + shards["tau"] + 1


def test_outputs_with_the_same_shards_share_tasks(ray_instance, models, tmp_path):
    recipe = "out x = pre + 0.5*(a - pre)\nout y = pre + 0.25*(b - pre)\n"
    events = []
    plan = tvlang.compile(recipe)
    local = {"x": str(tmp_path / "l" / "x"), "y": str(tmp_path / "l" / "y")}
    remote = {"x": str(tmp_path / "r" / "x"), "y": str(tmp_path / "r" / "y")}
    plan.run(models, local, shard_size=SHARD)
    plan.run(models, remote, shard_size=SHARD, executor="ray", workers=2, progress=events.append)
    for name in local:
        assert_same_bytes(local[name], remote[name])
    shards = len([f for f in files_of(remote["x"]) if f.startswith("model-")])
    assert {e.tensors_total for e in events if "on Ray" in e.label} == {shards}  # one task per shard, not two


def test_data_error_in_a_task_is_the_tvlang_message(ray_instance, models, tmp_path):
    """A non-finite result found by a worker: the tvlang message, the shard and the worker, no Ray traceback."""
    state = {name: torch.ones(shape) for name, shape in SPEC.items() if name != "position_ids"}
    state["layers.1.w"][0, 0] = float("inf")
    state["position_ids"] = torch.arange(16)
    bad = write_checkpoint(tmp_path / "bad", state)
    out = tmp_path / "o" / "merged"
    with pytest.raises(TvlangError) as info:
        tvlang.compile("pre + 0.5*(a - pre)").run({"pre": models["pre"], "a": bad}, str(out), shard_size=SHARD,
                                                  executor="ray")
    message = str(info.value)
    assert f"of output 'out' failed on worker {socket.gethostname()} (pid " in message
    assert "layers.1.w" in message and "Traceback" not in message and "RayTaskError" not in message
    assert not out.exists() and os.listdir(tmp_path / "o") == []


def test_input_a_worker_cannot_read_names_the_worker_and_path(ray_instance, models, tmp_path, monkeypatch):
    """Relative paths that the driver reads from its directory, which (here) the workers lack."""
    real = distributed.compute_shards

    def elsewhere(job, task):
        import dataclasses

        return real(dataclasses.replace(job, cwd="/nonexistent"), task)

    monkeypatch.setattr(distributed, "compute_shards", elsewhere)
    monkeypatch.chdir(os.path.dirname(models["pre"]))
    relative = {k: os.path.basename(v) for k, v in models.items()}
    out = tmp_path / "merged"
    with pytest.raises(TvlangError) as info:
        tvlang.compile(RECIPES["plain"]).run(relative, str(out), executor="ray")
    message = str(info.value)
    assert f"failed on worker {socket.gethostname()} (pid " in message and "pre" in message
    assert not out.exists()


def test_without_ray_the_error_says_how_to_install(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(TvlangError) as info:
        tvlang.compile("pre + 0.5*(a - pre)").run(without_b(models), str(tmp_path / "m"), executor="ray")
    assert "pip install 'tvlang[ray]'" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_executor_options_are_checked(models, tmp_path):
    plan = tvlang.compile("pre + 0.5*(a - pre)")
    with pytest.raises(TvlangError, match="unknown executor 'dask'"):
        plan.run(without_b(models), str(tmp_path / "m"), executor="dask")
    with pytest.raises(TvlangError, match="options of executor='ray'"):
        plan.run(without_b(models), str(tmp_path / "m"), workers=2)


def test_command_line(ray_instance, models, tmp_path, capsys):
    from tvlang.faces.cli import main

    binds = [arg for name, path in models.items() for arg in ("--bind", f"{name}={path}")]
    recipe = ["-e", RECIPES["ties-model"], *binds, "--shard-size", str(SHARD), "-q"]
    assert main(["run", *recipe, "-o", str(tmp_path / "local")]) == 0
    assert main(["run", *recipe, "-o", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert_same_bytes(tmp_path / "local", tmp_path / "ray")
    assert main(["run", *recipe, "-o", str(tmp_path / "x"), "--workers", "2"]) == 2
    assert "--address and --workers go with --executor ray" in capsys.readouterr().err
    assert main(["run", *recipe, "-o", str(tmp_path / "x"), "--executor", "ray", "--workers", "0"]) == 2
    assert "--workers expects a positive number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shards_planned_as_the_writer_plans_them(tmp_path):
    """plan_shards's boundaries and file names are the StreamingWriter's."""
    from tvlang.io import StreamingWriter, TensorInfo

    layout = [TensorInfo(f"t{i}", (n,), torch.float32, 4 * n, "") for i, n in enumerate([5, 300, 7, 1, 900, 2, 2])]
    for shard_size in (None, 1, 30, 1200, 1204, 3600, 10**9):
        writer = StreamingWriter(tmp_path / f"o{shard_size}", layout, shard_size=shard_size)
        try:
            planned = distributed.plan_shards(layout, shard_size)
            assert [s.file for s in planned] == writer.files
            for info in layout:
                writer.write(info.name, torch.zeros(info.shape))
            writer.commit()
        finally:
            writer.abort()
        index = files_of(tmp_path / f"o{shard_size}").get("model.safetensors.index.json")
        if index is not None:
            import json

            weight_map = json.loads(index)["weight_map"]
            assert weight_map == {i.name: s.file for s in planned for i in s.layout}


def test_ctrl_c_on_the_driver_cancels_and_cleans_up(ray_instance, models, tmp_path):
    def interrupt(event):
        if "on Ray" in event.label:
            raise KeyboardInterrupt  # as Ctrl-C would, once the first shard is in

    out = tmp_path / "out" / "merged"
    with pytest.raises(KeyboardInterrupt):
        tvlang.compile(RECIPES["plain"]).run(models, str(out), shard_size=SHARD, executor="ray", workers=1,
                                             progress=interrupt)
    assert not out.exists() and os.listdir(tmp_path / "out") == []


# -- reduction passes as map tasks -----------------------------------------------------------

REDUCING = (
    "tau_a = a - pre\ntau_b = b - pre\n"
    "out x = pre + (norm(tau_b) / norm(tau_a))*tau_a + ties(tau_a, tau_b, density=0.3, scope=\"model\")\n"
    "out y = pre + cos(tau_a, tau_b)*tau_b"
    " + 0.01*norm(ties(tau_a, tau_b, density=0.5, scope=\"model\"))*tau_a\n"
)


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory):
    """The models above, each written as several safetensors shards with an index."""
    root = tmp_path_factory.mktemp("sharded")
    return {
        "pre": write_synthetic(root / "pre", SPEC, seed=0, shard_size=SHARD),
        "a": write_synthetic(root / "a", SPEC, seed=1, finetune_of=0, shard_size=SHARD),
        "b": write_synthetic(root / "b", SPEC, seed=2, finetune_of=0, shard_size=SHARD),
    }


def reduction_events(events) -> dict[str, int]:
    """Reduction passes that ran as Ray tasks: label -> number of tasks."""
    return {e.label: e.tensors_total for e in events if "on Ray" in e.label and "(main)" not in e.label}


def test_reduction_passes_run_as_map_tasks_with_the_local_bytes(ray_instance, sharded_models, tmp_path):
    """norm, cos and model-scope thresholds over sharded inputs, two levels of reductions, two workers."""
    assert "model.safetensors.index.json" in os.listdir(sharded_models["pre"])
    plan = tvlang.compile(REDUCING)
    # level 1: the norms, cos and both thresholds (two passes); level 2: norm(ties(...)); then the main pass
    assert plan.schedule.passes == 4 and len(plan.schedule.levels) == 2
    local = {"x": str(tmp_path / "local" / "x"), "y": str(tmp_path / "local" / "y.safetensors")}
    remote = {"x": str(tmp_path / "ray" / "x"), "y": str(tmp_path / "ray" / "y.safetensors")}
    plan.run(sharded_models, local, shard_size=SHARD)
    events = []
    plan.run(sharded_models, remote, shard_size=SHARD, executor="ray", workers=2, progress=events.append)
    for name in local:
        assert_same_bytes(local[name], remote[name])
    passes = reduction_events(events)
    assert sorted(label.split(":")[0] for label in passes) == [f"pass {i} of 4" for i in range(1, 4)]
    assert all(count >= 2 for count in passes.values()), passes  # at least one task per worker
    assert no_temporaries(tmp_path / "ray")


def test_the_values_do_not_depend_on_the_split(ray_instance, models, tmp_path):
    """One reduction task, or one per range of tensors of about equal bytes (at least one per
    shard or per worker, whichever is more): the same values as the local run."""
    recipe = "pre + (norm(b - pre) / norm(a - pre))*(a - pre) + ties(a - pre, b - pre, scope=\"model\")"
    plan = tvlang.compile(recipe)
    plan.run(models, str(tmp_path / "local"))
    for shard_size, workers in ((None, 1), (1, 2)):
        out = tmp_path / f"ray-{shard_size}"
        events = []
        plan.run(models, str(out), shard_size=shard_size, executor="ray", workers=workers, progress=events.append)
        counts = set(reduction_events(events).values())
        assert counts == {1} if shard_size is None else (len(counts) == 1 and 2 <= counts.pop() <= 6)  # 6 float tensors
        local = files_of(tmp_path / "local")["model.safetensors"] if shard_size is None else None
        if local is not None:
            assert files_of(out)["model.safetensors"] == local
        else:  # one tensor per shard: compare tensors with the local single file
            from safetensors.torch import load_file

            merged = {}
            for name in files_of(out):
                if name.endswith(".safetensors"):
                    merged.update(load_file(str(out / name)))
            expected = load_file(str(tmp_path / "local" / "model.safetensors"))
            assert merged.keys() == expected.keys()
            assert all(torch.equal(merged[k], expected[k]) for k in merged)


def test_a_reducer_without_merge_runs_on_the_driver(ray_instance, models, tmp_path, monkeypatch):
    from tvlang.ops.reduce import NormReducer

    monkeypatch.delattr(NormReducer, "merge")  # on the driver: the level cannot be split
    events = []
    local, remote = tmp_path / "local", tmp_path / "ray"
    plan = tvlang.compile(RECIPES["norm"])
    plan.run(models, str(local), shard_size=SHARD)
    plan.run(models, str(remote), shard_size=SHARD, executor="ray", progress=events.append)
    assert_same_bytes(local, remote)
    assert reduction_events(events) == {}
    assert [e.label for e in events if e.label.startswith("pass 1 of 2")][-1] == "pass 1 of 2: norm"  # streamed here


def test_a_failing_reduction_task_names_its_tensors_and_worker(ray_instance, models, tmp_path, monkeypatch):
    real = distributed.reduce_part

    def elsewhere(job, *args):
        import dataclasses

        return real(dataclasses.replace(job, cwd="/nonexistent"), *args)

    monkeypatch.setattr(distributed, "reduce_part", elsewhere)
    monkeypatch.chdir(os.path.dirname(models["pre"]))
    relative = {k: os.path.basename(v) for k, v in models.items()}
    out = tmp_path / "o" / "merged"
    with pytest.raises(TvlangError) as info:
        # two workers: every range fails, and the first range's failure is the one reported, whichever
        # task failed first (run_tasks waits for the earlier ranges and reports the earliest)
        tvlang.compile(RECIPES["ties-model"]).run(relative, str(out), shard_size=SHARD, executor="ray", workers=2)
    message = str(info.value)
    assert "pass 1 of 3 (reduction) over tensors embed.weight .. " in message
    assert f"failed on worker {socket.gethostname()} (pid " in message
    assert not out.exists() and os.listdir(tmp_path / "o") == []


def test_ctrl_c_in_a_reduction_pass_cancels_and_cleans_up(ray_instance, models, tmp_path):
    def interrupt(event):
        if "(reduction)" in event.tensor:
            raise KeyboardInterrupt  # as Ctrl-C would, once the first reduction task is in

    out = tmp_path / "out" / "merged"
    with pytest.raises(KeyboardInterrupt):
        tvlang.compile(RECIPES["norm"]).run(models, str(out), shard_size=SHARD, executor="ray", workers=1,
                                            progress=interrupt)
    assert not out.exists() and os.listdir(tmp_path / "out") == []


def test_a_task_past_the_timeout_is_cancelled_and_names_its_shard(ray_instance, models, tmp_path, monkeypatch):
    real = distributed.compute_shards

    def hangs(job, task):
        import time as _time

        if "layers.1.w" in task.names:
            _time.sleep(600)  # a hung read: the driver cancels it (an interrupt ends the sleep)
        return real(job, task)

    monkeypatch.setattr(distributed, "compute_shards", hangs)
    out = tmp_path / "out" / "merged"
    started = time.monotonic()
    with pytest.raises(TvlangError) as info:
        tvlang.compile(RECIPES["plain"]).run(models, str(out), shard_size=SHARD, executor="ray", task_timeout=4)
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert "shard model-0000" in message and "of output 'out' ran past the task timeout of 4 s" in message
    assert "--task-timeout" in message  # the note says how to raise it
    assert not out.exists() and os.listdir(tmp_path / "out") == []  # nothing written, no temporary left


def test_task_timeout_is_checked(models, tmp_path, capsys):
    from tvlang.faces.cli import main

    plan = tvlang.compile("pre + 0.5*(a - pre)")
    with pytest.raises(TvlangError, match="options of executor='ray'"):
        plan.run(without_b(models), str(tmp_path / "m"), task_timeout=5)
    binds = [arg for name, path in models.items() for arg in ("--bind", f"{name}={path}")]
    recipe = ["-e", RECIPES["plain"], *binds, "-o", str(tmp_path / "x"), "-q"]
    assert main(["run", *recipe, "--task-timeout", "5"]) == 2
    assert "--task-timeout goes with --executor ray" in capsys.readouterr().err
    assert main(["run", *recipe, "--executor", "ray", "--task-timeout", "0"]) == 2
    assert "--task-timeout expects a positive number of seconds, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()


# Last: these kill worker processes, and Ray starts new ones (seconds each).


def test_task_killed_mid_shard_is_retried(ray_instance, models, tmp_path, monkeypatch):
    """The first attempt at the first shard dies after writing part of it; Ray's retry completes it."""
    marker = str(tmp_path / "killed-once")
    died = str(tmp_path / "died-mid-shard")
    real = distributed.compute_shards

    def dies_once(job, task):  # nested: Ray ships it by value to the workers
        import os as _os

        from tvlang.io import writer as writer_module

        if task.names and task.names[0] == "embed.weight" and not _os.path.exists(marker):
            open(marker, "w").close()
            original = writer_module._write_all

            def write_then_die(f, data):
                original(f, data)
                open(died, "w").close()
                _os._exit(1)  # the worker process dies with the shard half written

            writer_module._write_all = write_then_die
        return real(job, task)

    monkeypatch.setattr(distributed, "compute_shards", dies_once)
    local, remote = both(RECIPES["plain"], models, tmp_path, {"out": "merged"}, shard_size=SHARD)
    assert os.path.exists(died)  # the first attempt did die with its shard half written
    assert_same_bytes(local["out"], remote["out"])
    assert no_temporaries(tmp_path / "ray")


def test_task_failing_every_retry_leaves_nothing(ray_instance, models, tmp_path, monkeypatch):
    real = distributed.compute_shards

    def always_dies(job, task):
        import os as _os

        if "layers.1.w" in task.names:
            _os._exit(1)
        return real(job, task)

    monkeypatch.setattr(distributed, "compute_shards", always_dies)
    monkeypatch.setattr(distributed, "MAX_RETRIES", 1)  # each attempt starts a worker: keep the test short
    out = tmp_path / "out" / "merged"
    with pytest.raises(TvlangError) as info:
        tvlang.compile(RECIPES["plain"]).run(models, str(out), shard_size=SHARD, executor="ray")
    message = str(info.value)
    assert "shard model-0000" in message and "of output 'out'" in message
    assert f"tried {distributed.MAX_RETRIES + 1} times" in message
    assert "Traceback" not in message
    assert not out.exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary directory left either
