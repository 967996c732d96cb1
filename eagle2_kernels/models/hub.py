"""Local paths or Hugging Face hub repository ids for draft heads.

``resolve_head(name)`` returns a local directory for a draft head: the path itself when it
exists, else the snapshot of hub repository ``name`` ("org/name", optionally "org/name@revision")
through ``huggingface_hub``, which honours ``HF_HUB_OFFLINE`` (then only the local cache is read)
and the cache location (``HF_HUB_CACHE`` / ``HF_HOME``). Only a head's own files are fetched.
Targets named by repository id go through transformers' ``from_pretrained``, which resolves
them the same way.
"""

from __future__ import annotations

import os

# What a draft head directory may hold (the loader prefers safetensors).
HEAD_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def looks_like_repo_id(name: str) -> bool:
    """True when ``name`` is a syntactically valid hub repository id (optionally @revision)."""
    repo = name.split("@", 1)[0]
    if not repo or repo.startswith((".", "/", "~")) or repo.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def resolve_head(name_or_path: str | os.PathLike, what: str = "draft head") -> str:
    """A local directory (or file) for ``name_or_path``: a local path, or a hub repo id.

    Raises:
        FileNotFoundError: neither a local path nor a repository id that can be fetched (or,
            offline, that is in the local cache); the message says which.
    """
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    if not looks_like_repo_id(path):
        raise FileNotFoundError(
            f"{what} {path!r}: no such local directory (one holding config.json and the weights) "
            f"or file, and not a hub repository id"
        )
    import huggingface_hub
    from huggingface_hub import snapshot_download

    repo, _, revision = path.partition("@")
    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=list(HEAD_FILES),
                                 local_files_only=offline)
    except Exception as exc:  # huggingface_hub raises several (not found, offline, network) kinds
        how = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face hub"
        raise FileNotFoundError(
            f"{what} {path!r}: not a local path, and repository {repo!r}"
            f"{'@' + revision if revision else ''} could not be found {how}: {type(exc).__name__}: {exc}"
        ) from exc
