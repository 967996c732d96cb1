"""Draft-head training: data readers, feature generation, training and evaluation.

The pipeline (``eagle2 train ...`` or ``python -m eagle2_kernels.train ...``):

1. ``features``: run the target over chat-templated ShareGPT conversations (or the target's
   own greedy answers, ``selfdistill``) and cache its post-norm last hidden states on disk in
   resumable bf16 chunks.
2. ``fit``: train an EAGLE head on the cached features (the reference recipe: SmoothL1 feature
   loss + 0.1 * soft cross-entropy against the target's distribution, AdamW (0.9, 0.95), clip
   0.5, warm-up, input noise; optional training-time test that rolls the draft on its own
   predicted features), with a reduced draft vocabulary chosen from token frequencies.
3. ``eval``: held-out 1..5-step draft accuracy, written as JSON.

``run`` does all three with defaults sized for a small CPU. Only :func:`main` is imported
here, lazily, so that ``import eagle2_kernels.train`` stays light.
"""

from __future__ import annotations


def main(argv=None) -> int:
    """Entry point of ``eagle2 train``; see ``eagle2 train --help``."""
    from eagle2_kernels.train.cli import main as _main

    return _main(argv)


__all__ = ["main"]
