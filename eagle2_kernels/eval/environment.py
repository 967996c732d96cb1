"""The environment header of every result file: device, versions, commit and CPU.

:func:`environment`, used by ``eagle2 bench`` and ``eagle2 tune`` (their JSON files) and by the
benchmarks in ``bench/`` (``bench/common.py`` re-exports it), so that every result names the
machine and the code it was measured with in the same keys; :func:`machine_line`, the one-line
form the commands print; :func:`peak_rss_mib`, this process's peak memory.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    """Short commit hash of the checkout holding this package; None outside a git checkout
    (an installed package)."""
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(**extra) -> dict:
    """Device, versions, commit and CPU as a JSON-able dict.

    Keys: ``torch``, ``python``, ``commit`` (None outside a checkout), ``threads`` (torch's),
    ``triton`` and ``transformers`` (None when not installed), ``device`` (the GPU's name, or
    ``cpu (<model>)``), ``cuda`` (with a GPU), ``machine``, ``cpu_count``, ``processor`` (the CPU
    model), ``omp_wait_policy``, ``load_avg_1m_at_start`` (where the OS has it: other processes
    on a shared machine make timings noisy); then ``extra``, which may add keys but not replace
    these.

    Example::

        env = environment(target="SmolLM2-135M-Instruct")
        print(", ".join(f"{k}={v}" for k, v in env.items()))
    """
    from eagle2_kernels.runtime.costmodel import machine_info

    cpu = machine_info("cpu")["cpu"]
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({cpu})"
    env.update({"machine": platform.machine(), "cpu_count": os.cpu_count(), "processor": cpu,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    if hasattr(os, "getloadavg"):
        env["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    env.update({k: v for k, v in extra.items() if k not in env})
    return env


def machine_line(device: torch.device | str = "cpu") -> str:
    """CPU model, the bf16 matmul flags, threads and device in one line: what a cost model and
    every timing depend on (``machine: <cpu>, AVX-512-BF16, AMX, 2 threads, cpu``)."""
    from eagle2_kernels.runtime.costmodel import machine_info

    m = machine_info(device)
    native = "AVX-512-BF16" if m["avx512_bf16"] else "no AVX-512-BF16 (bf16 matmul emulated)"
    text = f"machine: {m['cpu']}, {native}{', AMX' if m['amx'] else ''}, {m['threads']} threads, {m['device']}"
    return text + (f" ({m['device_name']})" if "device_name" in m else "")


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS, in KiB elsewhere
    return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024
