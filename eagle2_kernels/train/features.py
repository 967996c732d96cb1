"""Feature generation: the target's hidden states, cached on disk in chunks.

A feature directory holds ``meta.json`` (what was generated, from what, with which settings)
and ``chunk_00000.safetensors``, ``chunk_00001.safetensors``, ... Each chunk covers a fixed run
of ``chunk_size`` conversations and stores, concatenated over them:

    input_ids  [N] int32      token ids
    loss_mask  [N] uint8      1 on assistant tokens
    features   [N, F] bf16    EAGLE-1/2: the target's last hidden state after the final norm
                              (the lm_head input), F = H. EAGLE-3 (``feature_layers`` set): the
                              hidden states of those layers, then that post-norm last hidden
                              state, concatenated: F = (len(feature_layers) + 1) * H, so the same
                              directory trains either kind (an EAGLE-1/2 fit reads the last H)
    offsets    [S+1] int64    sequence boundaries: sequence s is rows offsets[s]:offsets[s+1]

Chunks are written to a temporary name and renamed, so a chunk file either is complete or does
not exist. A run that is interrupted (Ctrl-C, a killed job) continues where it stopped when the
same command is run again: finished chunks are skipped, and ``meta.json`` guards against
resuming with different settings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eagle2_kernels.train.data import Example, tokenize_conversation

FORMAT_VERSION = 1


def chunk_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"chunk_{index:05d}.safetensors"


@dataclass
class FeatureChunk:
    """One chunk loaded in memory (see the module docstring for shapes and dtypes)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    features: torch.Tensor
    offsets: torch.Tensor

    def sequences(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids [n] int64, loss_mask [n] bool, features [n, H])`` per sequence."""
        for s in range(len(self.offsets) - 1):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            yield (self.input_ids[a:b].long(), self.loss_mask[a:b].bool(), self.features[a:b])


def load_chunk(path: str | Path) -> FeatureChunk:
    tensors = load_file(str(path))
    return FeatureChunk(tensors["input_ids"], tensors["loss_mask"], tensors["features"],
                        tensors["offsets"])


def _settings(model, tokenizer, source: str, max_len: int, chunk_size: int,
              num_conversations: int, feature_layers=None) -> dict:
    settings = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "max_len": max_len,
        "chunk_size": chunk_size,
        "num_conversations": num_conversations,
        "hidden_size": int(model.config.hidden_size),
        "vocab_size": int(model.config.vocab_size),
        "model": str(getattr(model.config, "_name_or_path", "") or model.config.model_type),
        "dtype": "bfloat16",
        "tokenizer_len": len(tokenizer),
    }
    if feature_layers is not None:  # absent for EAGLE-1/2 features, as before
        settings["feature_layers"] = [int(i) for i in feature_layers]
    return settings


def feature_layout(meta: dict) -> tuple[tuple[int, ...] | None, int]:
    """(feature_layers or None, hidden size H) of a feature directory's ``meta.json``."""
    layers = meta.get("feature_layers")
    return (None if layers is None else tuple(int(i) for i in layers)), int(meta["hidden_size"])


def read_meta(directory: str | Path) -> dict:
    """The ``meta.json`` of a feature directory."""
    path = Path(directory) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a feature directory (no meta.json); "
                                "create one with `eagle2 train features`")
    return json.loads(path.read_text())


@torch.inference_mode()
def target_features(model, input_ids: torch.Tensor, feature_layers=None) -> torch.Tensor:
    """Target features of ``model`` (an HF causal LM) for ``input_ids`` [B, N].

    Returns [B, N, H] in the model's dtype, the post-norm last hidden state (exactly what the
    target's ``lm_head`` consumes); with ``feature_layers`` (``output_hidden_states`` indices)
    [B, N, (len(feature_layers) + 1) * H]: those hidden states, then the post-norm one.
    """
    device = next(model.parameters()).device
    # The decoder stack under the lm_head: ``model.model`` for Llama-like families, another
    # attribute for some (GPT-NeoX: ``gpt_neox``, GPT-2: ``transformer``).
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model.model
    out = decoder(input_ids=input_ids.to(device), use_cache=False,
                  output_hidden_states=feature_layers is not None)
    if feature_layers is None:
        return out.last_hidden_state
    return torch.cat([out.hidden_states[i] for i in feature_layers] + [out.last_hidden_state], dim=-1)


def generate_features(model, tokenizer, conversations: Sequence[list[dict]], out_dir: str | Path,
                      *, source: str = "custom", max_len: int = 1024, chunk_size: int = 32,
                      progress: bool = True, stop_after_chunks: int | None = None,
                      feature_layers=None) -> dict:
    """Run the target over ``conversations`` and store features in resumable chunks.

    Args:
        model: HF causal LM (the target), eval mode; its dtype is the feature precision
            (features are stored as bf16).
        tokenizer: the target's tokenizer with its chat template.
        conversations: chat message lists (see :mod:`eagle2_kernels.train.data`). Their order
            defines the chunks: resuming needs the same sequence.
        out_dir: feature directory (created; keep it outside the repository, it is large:
            ``2 * H`` bytes per token).
        source: a label stored in ``meta.json`` (which data, which subset).
        max_len: conversations are cut to this many tokens.
        chunk_size: conversations per chunk (the unit of resumption).
        progress: show a tqdm bar with tokens/s and ETA.
        stop_after_chunks: write at most this many new chunks, then return (for tests and for
            splitting a long job).
        feature_layers: None for EAGLE-1/2 features; for EAGLE-3 the ``output_hidden_states``
            indices to store (see the module docstring; ``(len + 1) * 2 * H`` bytes per token).

    Returns:
        The meta dict, with ``complete`` telling whether every chunk exists.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if feature_layers is not None:
        n_layers = int(model.config.num_hidden_layers)
        bad = [i for i in feature_layers if not 0 <= int(i) <= n_layers]
        if bad or not feature_layers:
            raise ValueError(f"feature_layers {list(feature_layers)} must be hidden-state indices in "
                             f"[0, {n_layers}] of this {n_layers}-layer target")
    settings = _settings(model, tokenizer, source, max_len, chunk_size, len(conversations),
                         feature_layers)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        differ = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if differ:
            raise ValueError(f"{out} holds features made with other settings {differ} "
                             "(old, new); use another directory or delete it")
        meta = old
    else:
        meta = dict(settings, complete=False, tokens=0, loss_tokens=0, seconds=0.0)
        _write_json(meta_path, meta)

    num_chunks = (len(conversations) + chunk_size - 1) // chunk_size
    todo = [c for c in range(num_chunks) if not chunk_path(out, c).exists()]
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(len(conversations[c * chunk_size:(c + 1) * chunk_size]) for c in todo)
        bar = tqdm(total=total, unit="conv", desc=f"features -> {out.name}",
                   dynamic_ncols=True, smoothing=0.05)
    written = 0
    for c in todo:
        if stop_after_chunks is not None and written >= stop_after_chunks:
            break
        t0 = time.perf_counter()
        ids_l, mask_l, feat_l, offsets = [], [], [], [0]
        for messages in conversations[c * chunk_size:(c + 1) * chunk_size]:
            ex: Example = tokenize_conversation(tokenizer, messages, max_len=max_len)
            if len(ex.input_ids) < 2:
                continue
            feats = target_features(model, ex.input_ids[None], feature_layers)[0]
            ids_l.append(ex.input_ids.to(torch.int32))
            mask_l.append(ex.loss_mask.to(torch.uint8))
            feat_l.append(feats.to("cpu", torch.bfloat16))
            offsets.append(offsets[-1] + len(ex.input_ids))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok=meta["tokens"] + offsets[-1])
        hidden = settings["hidden_size"] * (1 + len(feature_layers or ()))
        tensors = {
            "input_ids": torch.cat(ids_l) if ids_l else torch.zeros(0, dtype=torch.int32),
            "loss_mask": torch.cat(mask_l) if mask_l else torch.zeros(0, dtype=torch.uint8),
            "features": (torch.cat(feat_l) if feat_l
                         else torch.zeros(0, hidden, dtype=torch.bfloat16)).contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        tmp = chunk_path(out, c).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, chunk_path(out, c))
        meta["tokens"] += int(offsets[-1])
        meta["loss_tokens"] += int(tensors["loss_mask"].sum())
        meta["seconds"] = round(meta["seconds"] + time.perf_counter() - t0, 1)
        _write_json(meta_path, meta)
        written += 1
    if bar is not None:
        bar.close()
    meta["complete"] = all(chunk_path(out, c).exists() for c in range(num_chunks))
    _write_json(meta_path, meta)
    return meta


def feature_chunks(directory: str | Path) -> list[Path]:
    """The finished chunk files of a feature directory, in order."""
    directory = Path(directory)
    read_meta(directory)
    return sorted(directory.glob("chunk_*.safetensors"))


def load_sequences(directories: Sequence[str | Path], max_tokens: int | None = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """All sequences of the given feature directories, as ``(ids, mask, features)`` triples."""
    seqs = []
    total = 0
    for directory in directories:
        for path in feature_chunks(directory):
            for seq in load_chunk(path).sequences():
                seqs.append(seq)
                total += len(seq[0])
                if max_tokens is not None and total >= max_tokens:
                    return seqs
    return seqs


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
