"""Build hook: compile tvlang's optional C helper (tvlang/ops/native.c) when a C compiler is found.

The helper draws ``dare``'s masks, computes ``ties``' sign merge with unit weights, runs the
thresholds' window pass, ``breadcrumbs``' band trim, ``ram``, ``ramplus_tl``, ``nearswap`` and
``dare``'s saved keep flags in a fraction of numpy's and torch's time (tvlang/ops/native.py).
It is plain C99 with no Python headers, loaded through ctypes, so it is built with the
compiler alone: ``$CC`` or ``cc``, ``-O3 -ffp-contract=off -shared -fPIC`` (no fused
multiply-adds: it must round as torch does). Where no compiler works (or
``TVLANG_NATIVE=0`` at build time) the build goes on without it, numpy and torch compute
the same values, and the hook says so on stderr.

An editable install (``pip install -e .``) builds the library next to the source
(``tvlang/ops/libtvnative.so.1``, ignored by git); a wheel carries it and is tagged for this
platform instead of ``py3-none-any``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("tvlang/ops/native.c")
LIBRARY = Path("tvlang/ops/libtvnative.so.1")


def compile_helper(root: Path) -> str | None:
    """Compile the helper into the source tree; ``None`` on success, else why not."""
    if os.environ.get("TVLANG_NATIVE", "1") == "0":
        return "TVLANG_NATIVE=0"
    if sys.platform == "win32":
        return "not built on Windows"
    cc = shlex.split(os.environ.get("CC") or "cc")
    target = root / LIBRARY
    partial = target.with_name(target.name + ".partial")
    flags = ["-O3", "-std=gnu99", "-ffp-contract=off", "-shared", "-fPIC"]
    command = [*cc, *flags, "-o", str(partial), str(root / SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{' '.join(command)}: {error}"
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[:500]}"
    os.replace(partial, target)  # a running tvlang never loads a half-written library
    return None


class NativeHelperHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        why = compile_helper(root)
        if why is not None:
            print(f"tvlang: the C helper (tvlang/ops/native.c) was not built ({why}); numpy and torch "
                  "compute the same values, more slowly", file=sys.stderr)
            return
        if version != "editable":
            build_data["force_include"][str(root / LIBRARY)] = LIBRARY.as_posix()
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
