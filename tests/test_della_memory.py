"""della's memory does not grow with the tensor (issue 18 case 8: tvlang 0.2 took about 14
times a tensor's size, 5.6 GB private for a 400 MB tensor): a run of della over a 64 MB tensor
peaks within 160 MB of plain task arithmetic over the same inputs (0.2: about 800 MB above)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

CHILD = """
import resource, sys
from tvlang.faces.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
sys.exit(code)
"""


def peak_mb(recipe: str, paths: dict[str, str], out: str) -> int:
    binds = [arg for name, path in paths.items() for arg in ("--bind", f"{name}={path}")]
    done = subprocess.run([sys.executable, "-c", CHILD, "run", "-e", recipe, *binds, "-o", out, "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_della_peaks_near_plain_task_arithmetic(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4096, 4096, generator=g)  # 64 MB
    paths = {}
    for name, scale in (("pre", 0.0), ("a", 0.01), ("b", 0.02)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({"w": pre + scale * torch.randn(pre.shape, generator=g)}, paths[name])
    del pre
    ta = peak_mb("pre + 0.5*(a - pre) + 0.5*(b - pre)", paths, str(tmp_path / "ta.safetensors"))
    della = peak_mb("pre + della(a - pre, b - pre, density=0.5, epsilon=0.1)", paths,
                    str(tmp_path / "della.safetensors"))
    assert della - ta < 160, (della, ta)
    assert os.path.getsize(tmp_path / "della.safetensors") > 64 * 2**20
