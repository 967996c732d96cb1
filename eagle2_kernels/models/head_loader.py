"""A draft head's files: reading and checking them, telling their format, and the one loader
that builds the head of that format (:func:`load_draft_head`).

The head classes sit above this module: each format's class (``DraftHeadBase`` subclasses
that set ``file_format``: EAGLE-1/2 in :mod:`.draft_head`, EAGLE-3 in :mod:`.eagle3_head`)
registers itself here when it is defined, and parses its own config and weight names
(``_from_files``). Importing :mod:`eagle2_kernels.models` defines both, so the loader knows
every format whichever head module a caller imported. Imports go one way: this module <-
:mod:`.head_base` <- each head module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = [
    "BIN_NAME", "CONFIG_NAME", "SAFETENSORS_NAME", "check_head_config", "head_format", "is_eagle3",
    "load_draft_head", "read_head_config", "read_head_files", "read_head_weights", "register_format",
]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"

_WEIGHTS_FORMAT = (
    "the head's tensors by name (EAGLE-1/2: fc.weight, layers.0.self_attn.*, layers.0.mlp.*, ...; "
    "EAGLE-3: fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t, ...)"
)


# ---------------------------------------------------------------------------------- files
def _pointer_hint(path: str) -> str:
    """' (...)' when ``path`` is a Git LFS / git-annex pointer instead of the file itself."""
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return ""
    if head.startswith(b"version https://git-lfs"):
        return " (it is a Git LFS pointer, not the weights: fetch them with `git lfs pull`)"
    if b".git/annex/objects" in head:
        return " (it is a git-annex pointer, not the weights: fetch them with `git annex get`)"
    return ""


def read_head_config(cfg_path: str) -> dict[str, Any]:
    """The JSON object in a head's ``config.json``; ValueError naming the file otherwise."""
    try:
        with open(cfg_path, "rb") as f:
            text = f.read().decode("utf-8")
        raw = json.loads(text)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        detail = exc.msg + f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) \
            else f"{type(exc).__name__}: {exc}"
        raise ValueError(
            f"draft head config {cfg_path} is not valid JSON ({detail}){_pointer_hint(cfg_path)}; expected a "
            f"JSON object with the head's Llama fields (hidden_size, intermediate_size, num_attention_heads, "
            f"vocab_size, ...)"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"draft head config {cfg_path} holds a JSON {type(raw).__name__}; expected an object with the "
            f"head's Llama fields (hidden_size, intermediate_size, num_attention_heads, vocab_size, ...)"
        )
    return raw


def read_head_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a head's ``model.safetensors`` or ``pytorch_model.bin`` (the latter
    with ``weights_only=True``: a downloaded pickle never runs code); ValueError naming the file
    and what is wrong with it otherwise."""
    st = path.endswith(".safetensors")
    try:
        if st:
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own kinds
        kind = "a safetensors file" if st else "a torch.save'd state dict (zip or legacy pickle)"
        raise ValueError(
            f"draft head weights {path} cannot be read ({type(exc).__name__}: {exc}){_pointer_hint(path)}: "
            f"is it truncated or damaged? Expected {kind} of {_WEIGHTS_FORMAT}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(
            f"draft head weights {path} hold a {type(state).__name__} that is not a flat dict of named "
            f"tensors; expected {_WEIGHTS_FORMAT}"
        )
    return state


def read_head_files(folder: str, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of the head in ``folder``; safetensors preferred over .bin.
    ``where`` (the caller's name) starts the FileNotFoundError messages."""
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in {folder!r}")
    raw = read_head_config(cfg_path)
    st_path, bin_path = os.path.join(folder, SAFETENSORS_NAME), os.path.join(folder, BIN_NAME)
    if os.path.isfile(st_path):
        state = read_head_weights(st_path)
    elif os.path.isfile(bin_path):
        state = read_head_weights(bin_path)
    else:
        raise FileNotFoundError(f"{where}: neither {SAFETENSORS_NAME} nor {BIN_NAME} in {folder!r}")
    return raw, state


_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "num_hidden_layers", "max_position_embeddings")


def check_head_config(raw: dict[str, Any], cfg_path: str) -> None:
    """ValueError naming ``cfg_path`` and the field when a head config lacks a size the head's
    layer is built from, or holds one that is not a positive int (or heads that do not group)."""
    def bad(key, why):
        return ValueError(f"draft head config {cfg_path}: {key} {why}; expected a Llama-style head config "
                          f"with positive int {', '.join(_REQUIRED_INTS)}")

    for key in _REQUIRED_INTS + _OPTIONAL_INTS:
        if key not in raw or (key in _OPTIONAL_INTS and raw[key] is None):
            if key in _REQUIRED_INTS:
                raise bad(key, "is missing")
            continue
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, f"is {v!r}, not a positive int")
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv:
        raise bad("num_key_value_heads", f"({kv}) does not divide num_attention_heads ({heads})")
    if not raw.get("head_dim") and raw["hidden_size"] % heads:
        raise bad("hidden_size", f"({raw['hidden_size']}) is not a multiple of num_attention_heads ({heads}) "
                                 f"and no head_dim is given")


# ------------------------------------------------------------------------- format detection
def _strip_model_prefix(state: dict) -> dict:
    # No key of a head legitimately starts with "model.": SGLang-style files prefix some or all.
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}


def is_eagle3(raw: dict[str, Any], keys) -> bool:
    """Whether a head's config and weight names are EAGLE-3's (else EAGLE-1/2's).

    Raises ValueError when the config says EAGLE-3 but the weights are EAGLE-1/2's (or the
    other way round)."""
    names = set(_strip_model_prefix(dict.fromkeys(keys)))
    by_keys = bool(names & {"d2t", "t2d", "norm.weight", "lm_head.weight"}) or any(
        k.startswith("midlayer.") or k.endswith("hidden_norm.weight") for k in names)
    archs = " ".join(raw.get("architectures") or [])
    # Only explicit names count: a draft_vocab_size alone also appears in other heads' configs.
    by_config = "EAGLE3" in archs.upper() or raw.get("speculators_model_type") == "eagle3"
    eagle2_keys = "layers.0.post_attention_layernorm.weight" in names and not by_keys
    if by_config and eagle2_keys:
        raise ValueError(
            f"the head config says EAGLE-3 (architectures={raw.get('architectures')}, speculators_model_type="
            f"{raw.get('speculators_model_type')}) but the weights are an EAGLE-1/2 head's (layers.0.*, no "
            f"midlayer / lm_head / norm / d2t)"
        )
    return by_keys or by_config


# ---------------------------------------------------------------------------------- formats
_FORMATS: dict[str, type] = {}  # file format name -> the head class that reads it
_DESCRIBED = {
    "eagle2": "an EAGLE-1/2 head (layers.0.*, no midlayer / lm_head / d2t)",
    "eagle3": "an EAGLE-3 head (midlayer.* / norm / lm_head / d2t)",
}
# Asked for by name, these load files of any format (what EagleDraftHead.from_pretrained always
# did): None is load_draft_head itself or DraftHeadBase.from_pretrained.
_ANY_FORMAT = (None, "eagle2")


def register_format(name: str, cls: type) -> None:
    """Make ``cls`` the head class that loads files of format ``name`` (called by
    ``DraftHeadBase.__init_subclass__`` for a class that sets ``file_format``)."""
    if name not in _DESCRIBED:
        raise ValueError(f"unknown draft head file format {name!r}; known: {sorted(_DESCRIBED)}")
    _FORMATS[name] = cls


def head_format(raw: dict[str, Any], keys) -> str:
    """The format of a head from its config and weight names: "eagle3" or "eagle2" (the
    released EAGLE-1/2 layout, also the default: its loader names what does not fit)."""
    return "eagle3" if is_eagle3(raw, keys) else "eagle2"


def load_draft_head(
    path: str | os.PathLike,
    target=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    head_class: type | None = None,
):
    """Load a draft head, EAGLE-1/2 or EAGLE-3, recognised from its files.

    Args:
        path: a directory holding ``config.json`` and ``model.safetensors`` (preferred) or
            ``pytorch_model.bin``; or the path of one of those files; or a Hugging Face hub
            repository id ("org/name", "org/name@revision"), resolved through
            ``huggingface_hub`` (``HF_HUB_OFFLINE`` = the local cache only).
        target: optional transformers causal LM to attach (its dtype and device are used
            unless ``dtype`` / ``device`` say otherwise).
        dtype: dtype of the head (default: the target's, else the file's).
        device: device of the head (default: the target's, else CPU).
        head_class: the class ``from_pretrained`` was called on (None when called directly):
            names the caller in messages. ``DraftHeadBase`` and ``EagleDraftHead`` (and its
            subclasses) load either format; another format's class only its own. A subclass of
            the files' format's class loads them as itself.

    Returns:
        an :class:`~eagle2_kernels.models.draft_head.EagleDraftHead` for the released
        EAGLE-1/2 layout (``layers.0.*``), an
        :class:`~eagle2_kernels.models.eagle3_head.Eagle3DraftHead` for the EAGLE-3 layouts
        (``midlayer.*`` / ``d2t`` / own ``lm_head``, or a config that names EAGLE-3).

    Raises:
        FileNotFoundError: no such path / repository, no config.json or no weights file.
        ValueError: files that are unreadable, inconsistent (a config naming EAGLE-3 over
            EAGLE-1/2 weights), or that do not match their format or the target; the file
            and the problem are named.

    Example::

        head = load_draft_head("path/to/head", target=model)   # either format
    """
    from eagle2_kernels.models.hub import resolve_head

    where = "load_draft_head" if head_class is None else f"{head_class.__name__}.from_pretrained"
    path = resolve_head(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    raw, state = read_head_files(folder, where)
    try:
        fmt = head_format(raw, state.keys())
    except ValueError as exc:
        raise ValueError(f"{where}({folder!r}): {exc}") from None
    asked = getattr(head_class, "file_format", None)
    if asked == fmt:
        cls = head_class
    elif asked in _ANY_FORMAT:
        cls = _FORMATS.get(fmt)
        if cls is None:  # only when a head module was loaded without its package
            raise RuntimeError(f"{where}: {folder!r} holds {_DESCRIBED[fmt]}, but no head class for that format "
                               f"is defined: import eagle2_kernels.models")
    else:
        other = _FORMATS["eagle2"].__name__ if "eagle2" in _FORMATS else "EagleDraftHead"
        raise ValueError(f"{where}: {folder!r} holds {_DESCRIBED[fmt]}; load it with {other}.from_pretrained")
    return cls._from_files(folder, raw, state, target=target, dtype=dtype, device=device)
