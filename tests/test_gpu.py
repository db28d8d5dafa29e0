"""The evaluator on a CUDA device equals the CPU result (skipped without a GPU).

No GPU was lent to the sessions that wrote these tests: they have run only as skips.
"""

import pytest
import torch

import tvlang
from tvlang.testing.synth import module_with

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _models():
    gen = torch.Generator().manual_seed(0)
    shapes = {"embed": (512, 64), "layers.0.w": (64, 64), "layers.1.w": (64, 64), "norm": (64,)}
    models = {}
    for name in ("pre", "a", "b", "c"):
        models[name] = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        models[name]["steps"] = torch.tensor([3])
    return models


@pytest.mark.parametrize("text", [
    "pre + 0.4*(a - b) + 0.7*(c - pre)",
    "pre + ties(a - pre, b - pre, c - pre, density=0.2)",
    "pre + (1/norm(a - pre))*(a - pre)",
    "slerp(a, b, 0.3)",
    # dare's masks come from the CPU bit generator on every device: the same entries drop
    "pre + dare(a - pre, 0.5, seed=1) + dare(b - pre, 0.5, seed=2)",
    "pre + dare_ties(a - pre, b - pre, c - pre, p=0.3)",
    # rescale_by="l1": a pass for the norms (block sums on the device), the same masks again
    'pre + dare_ties(a - pre, b - pre, p=0.3, rescale_by="l1") + della(c - pre, density=0.5, rescale_by="l1")',
    "topk(a - pre, 0.1) + breadcrumbs(b - pre, 0.3, 0.05)",
])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_cuda_equals_cpu(text, chunked, monkeypatch):
    from tvlang.run import chunked as chunk_module

    if chunked:  # chunks of 1000 entries, and the radix select of the thresholds on the device
        monkeypatch.setattr(chunk_module, "CHUNK_MIN", 4000)
        monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 1000)
    models = _models()
    plan = tvlang.compile(text)
    on_cpu = plan.evaluate(models, device="cpu", allow_unused=True)  # one dict of four models for every recipe
    on_gpu = plan.evaluate(models, device="cuda", allow_unused=True)
    assert set(on_gpu) == set(on_cpu)
    for name, tensor in on_gpu.items():
        assert tensor.device.type == "cpu"  # results come back to the host for writing
        torch.testing.assert_close(tensor, on_cpu[name], rtol=1e-5, atol=1e-5)


def test_cuda_run_writes_the_same_file(tmp_path):
    from safetensors.torch import load_file

    models = _models()
    plan = tvlang.compile("pre + 0.5*(a - pre)")
    plan.run(models, str(tmp_path / "cpu.safetensors"), device="cpu", allow_unused=True)
    plan.run(models, str(tmp_path / "gpu.safetensors"), device="cuda:0", allow_unused=True)
    cpu, gpu = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "gpu.safetensors")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_inputs_on_the_device_are_read_there_and_apply_to_writes_there(chunked, monkeypatch):
    """Models already on the GPU: read in place (never changed), and apply_to into a module on
    the GPU equals the CPU's evaluate; in chunks, each result computed in the module's memory."""
    from tvlang.run import chunked as chunk_module

    if chunked:
        monkeypatch.setattr(chunk_module, "CHUNK_MIN", 4000)
        monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 1000)
    models = _models()
    on_device = {name: {k: t.cuda() for k, t in model.items()} for name, model in models.items()}
    kept = {name: {k: t.clone() for k, t in model.items()} for name, model in on_device.items()}
    module = module_with({name: torch.zeros_like(tensor, device="cuda") for name, tensor in models["pre"].items()})
    recipe = "pre + ties(a - pre, b - pre, c - pre, density=0.2) + 0.1*(c - pre)"
    expected = tvlang.compile(recipe).evaluate(models)
    memory = {name: tensor.data_ptr() for name, tensor in module.state_dict().items()}
    assert tvlang.apply_to(module, recipe, on_device, device="cuda") == len(expected)
    for name, tensor in module.state_dict().items():
        assert tensor.device.type == "cuda" and tensor.data_ptr() == memory[name]
        torch.testing.assert_close(tensor.cpu(), expected[name], rtol=1e-5, atol=1e-5)
    for name, model in on_device.items():
        for k, t in model.items():
            assert torch.equal(t, kept[name][k]), (name, k)
