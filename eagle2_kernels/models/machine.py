"""The machine a compiled graph or a kernel measurement is bound to: CPU model, the ISA flags
that decide the generated kernels and oneDNN's packed layouts, and the library versions."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

__all__ = ["cpu_info", "environment_key"]

_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """CPU model and the ISA flags that decide the kernels and oneDNN's packed weight layout."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):  # x86 / Arm
                flags = set(line.split(":", 1)[1].split())
                break
    # (Inductor's own ISA pick compiles test programs, ~1 s: the flags decide it anyway.)
    return {"cpu": name, "arch": platform.machine(), "flags": sorted(flags & set(_ISA_FLAGS))
            if flags & set(_ISA_FLAGS) else sorted(flags)}


def environment_key() -> dict:
    """The versions and machine a compiled artifact is bound to."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), **cpu_info()}
