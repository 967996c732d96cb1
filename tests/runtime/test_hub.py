"""Hugging Face names: draft heads (and, through transformers, targets) named by hub repository
id resolve from the local hub cache when HF_HUB_OFFLINE is set; tested against a hub-cache
directory built here (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from eagle2_kernels import EagleDraftHead, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.models.eagle3_head import Eagle3DraftHead  # noqa: E402
from eagle2_kernels.models.hub import looks_like_repo_id, resolve_head  # noqa: E402
from eagle3_models import deep_target, random_eagle3_head  # noqa: E402
from tiny_models import hf_greedy, one_thread, prompt  # noqa: E402,F401

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TARGET_ID, HEAD_ID = "tiny-org/tiny-llama-8l", "tiny-org/tiny-llama-8l-eagle3"


def add_to_hub_cache(cache: Path, repo_id: str, save) -> Path:
    """Lay out ``repo_id`` as huggingface_hub's cache does (refs/main -> snapshots/<commit>);
    ``save(folder)`` writes the repository's files. Returns the snapshot folder."""
    base = cache / ("models--" + repo_id.replace("/", "--"))
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    save(snap)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline hub cache holding the 8-layer tiny Llama and an EAGLE-3 head for it."""
    cache = tmp_path / "hub"
    model = deep_target("llama")
    add_to_hub_cache(cache, TARGET_ID, model.save_pretrained)
    head_dir = add_to_hub_cache(cache, HEAD_ID, random_eagle3_head(model, "reduced").save_pretrained)
    # huggingface_hub reads its environment at import: set both the variables and its constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache, model, head_dir


def test_repo_ids_resolve_from_the_offline_cache(hub):
    cache, model, head_dir = hub
    assert Path(resolve_head(HEAD_ID)) == head_dir
    assert Path(resolve_head(HEAD_ID + "@main")) == head_dir
    head = EagleDraftHead.from_pretrained(HEAD_ID, target=model)
    assert isinstance(head, Eagle3DraftHead) and head.draft_vocab_size == 80
    # A target and a head by name: the decoder decodes exactly as the model itself.
    dec = TreeSpecDecoder.from_pretrained(TARGET_ID, HEAD_ID, total_tokens=12, depth=4, top_k=3)
    ids = prompt(320, 6, seed=8)
    assert torch.equal(dec.generate(ids, 16).sequences, hf_greedy(model, ids, 16))
    # Local paths still win, and a missing repository says where it was looked for.
    assert resolve_head(str(head_dir)) == str(head_dir)
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache .HF_HUB_OFFLINE is set"):
        EagleDraftHead.from_pretrained("tiny-org/not-there")
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        EagleDraftHead.from_pretrained(str(cache / "nope"))


def test_repo_id_syntax():
    assert looks_like_repo_id("org/name") and looks_like_repo_id("name") and looks_like_repo_id("org/name@v1")
    for bad in ("./dir", "/abs/dir", "a/b/c", "~/x", "org/na me", ""):
        assert not looks_like_repo_id(bad), bad


def test_hf_hub_offline_from_the_environment(hub, tmp_path):
    """A fresh interpreter with only the environment variables set resolves the head from the
    cache (huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE when imported)."""
    cache, _, head_dir = hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    code = ("from eagle2_kernels.models.hub import resolve_head; import json, sys; "
            f"print(json.dumps(resolve_head({HEAD_ID!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
    assert Path(json.loads(out.stdout.strip().splitlines()[-1])) == head_dir
