"""The Ray executor's tasks: progress in bytes while they run, GPU placement, which failure is reported.

One local Ray instance (2 CPUs, loopback only, no GPU) serves the module.
"""

from __future__ import annotations

import os

import pytest

import tvlang
from tvlang.errors import TvlangError
from tvlang.run import distributed
from tvlang.testing.synth import write_synthetic

SPEC = {"embed.weight": (64, 32), "layers.0.w": (32, 32), "layers.1.w": (32, 32), "head.weight": (64, 32)}
SHARD = 10_000  # bytes: three shards (embed.weight; layers.0.w and layers.1.w; head.weight)
PLAIN = "pre + 0.5*(a - pre)"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"pre": write_synthetic(root / "pre", SPEC, seed=0),
            "a": write_synthetic(root / "a", SPEC, seed=1, finetune_of=0)}


def test_the_bar_counts_bytes_while_a_task_runs(ray_instance, models, tmp_path, monkeypatch):
    """One task (one output file) that, after its first tensor, waits until the driver's callback has
    seen its bytes: the callback gets them while no task has finished, or the test fails."""
    seen = str(tmp_path / "driver-saw-bytes")
    waited = str(tmp_path / "task-waited")

    def waits_for_the_driver(job, task):  # nested: Ray ships it by value to the workers
        import os as _os
        import time as _time

        from tvlang.run import distributed as module

        # The worker's own compute_shards, whose globals are the module's: the driver's, shipped by value
        # (the driver's module attribute is this function while the test runs), would keep its own
        # write_results and never wait.
        real = module.compute_shards
        original = module.write_results

        class Waiting:
            def __init__(self, inner):
                self.inner = inner

            def start(self, *args):
                pass

            def advance(self, name, nbytes):
                self.inner.advance(name, nbytes)
                open(waited, "w").close()
                deadline = _time.monotonic() + 60  # without the driver's answer, the task goes on after this
                while not _os.path.exists(seen) and _time.monotonic() < deadline:
                    _time.sleep(0.05)

        def write_and_wait(session, writers, progress=None):
            return original(session, writers, Waiting(progress) if progress is not None else None)

        module.write_results = write_and_wait
        try:
            return real(job, task)
        finally:
            module.write_results = original

    monkeypatch.setattr(distributed, "compute_shards", waits_for_the_driver)
    events = []

    def callback(event):
        events.append(event)
        if 0 < event.bytes_done and event.tensors_done == 0:
            open(seen, "w").close()

    plan = tvlang.compile(PLAIN)
    plan.run(models, str(tmp_path / "local.safetensors"))
    plan.run(models, str(tmp_path / "ray.safetensors"), executor="ray", progress=callback)
    assert os.path.exists(waited)  # the task did wait for the driver (the test is not a race)
    assert os.path.exists(seen), [(e.label, e.tensor, e.tensors_done, e.bytes_done) for e in events]
    running = [e for e in events if e.tensors_done == 0 and e.bytes_done > 0]
    total = (2 * 64 * 32 + 2 * 32 * 32) * 4  # float32 bytes of the four tensors
    assert running and running[0].bytes_done < total == running[0].bytes_total
    assert running[0].label == "main pass: 1 shard task on Ray"
    assert running[0].tensor == "shard ray.safetensors of output 'out'"
    last = events[-1]
    assert (last.tensors_done, last.tensors_total, last.bytes_done) == (1, 1, total)
    assert (tmp_path / "ray.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()


def test_cuda_on_a_cluster_without_gpus_is_refused(ray_instance, models, tmp_path):
    out = tmp_path / "out" / "merged"
    for recipe in (PLAIN, "pre + norm(a - pre)*(a - pre)"):  # the main pass's tasks, and a reduction's
        with pytest.raises(TvlangError) as info:
            tvlang.compile(recipe).run(models, str(out), executor="ray", device="cuda")
        message = str(info.value)
        assert "--device cuda on Ray runs each task on a GPU (num_gpus=1), but the Ray cluster has no GPU" in message
        assert "run with --device cpu" in message and "ray start --num-gpus" in message
        assert os.listdir(tmp_path / "out") == []


def test_cuda_tasks_ask_for_one_gpu_each(ray_instance, models, tmp_path, monkeypatch):
    """On a cluster with a GPU (faked: nothing is submitted), each task asks for one and computes on cuda."""
    submitted = {}

    class Submitted(Exception):
        pass

    class Remote:
        def __init__(self, function):
            submitted["function"] = function

        def options(self, **options):
            submitted["options"] = options
            return self

        def remote(self, *args):
            submitted["args"] = args
            raise Submitted

    monkeypatch.setattr(ray_instance, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(ray_instance, "remote", Remote)
    out = tmp_path / "out" / "merged"
    with pytest.raises(Submitted):
        tvlang.compile(PLAIN).run(models, str(out), executor="ray", device="cuda:1")
    assert submitted["function"] is distributed.compute_shards
    assert submitted["options"] == {"max_retries": distributed.MAX_RETRIES, "num_cpus": 1, "num_gpus": 1}
    job = ray_instance.get(submitted["args"][0])
    assert job.options["device"] == "cuda"  # the GPU Ray gives the task is its cuda:0
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(Submitted):
        tvlang.compile(PLAIN).run(models, str(out), executor="ray", device="cpu")
    assert submitted["options"]["num_gpus"] == 0


def test_the_earliest_failing_shard_is_reported(ray_instance, models, tmp_path, monkeypatch):
    """Shards 1 and 3 of 3 fail; shard 1 slowly, after shard 3 has failed: shard 1 is the one reported."""
    real = distributed.compute_shards

    def two_fail(job, task):
        import time as _time

        from tvlang.errors import TvlangError as Error
        from tvlang.run.ray_tasks import TaskFailed

        if task.index == 0:
            _time.sleep(4)
            raise TaskFailed(Error("the slow failure"), "worker-0")
        if task.index == 2:
            raise TaskFailed(Error("the quick failure"), "worker-2")
        return real(job, task)

    monkeypatch.setattr(distributed, "compute_shards", two_fail)
    out = tmp_path / "out" / "merged"
    with pytest.raises(TvlangError) as info:
        tvlang.compile(PLAIN).run(models, str(out), shard_size=SHARD, executor="ray", workers=2)
    message = str(info.value)
    assert "shard model-00001-of-00003.safetensors of output 'out' failed on worker worker-0: the slow failure" \
        in message
    assert os.listdir(tmp_path / "out") == []
