"""Where and with what a stage ran, as its manifest records it (:meth:`ssb.rundir.Stage.finish`): library versions,
the CPU and its bf16 matrix flags, the GPUs in use (the multiplier of wall time in a stage's cost), the git commit."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("ssb", "torch", "transformers", "peft", "datasets", "math_verify", "vllm", "trl"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """The CPU a stage ran on, for its manifest: model name, cores, and the bf16 matrix flags that decide its speed
    (and what ``model.dtype=auto`` resolves to on a CPU)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "cpu_bf16_flags": sorted(flags & {"amx_bf16", "avx512_bf16"})}


def gpus_in_use() -> int:
    """GPUs this process has initialised (0 on CPU): the multiplier of wall time in a stage's cost."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun every rank is one GPU
    return max(world, 1)


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
