"""Self-distillation data: the target's own greedy answers to ShareGPT prompts.

At decode time the draft must predict what the TARGET will say, not what ChatGPT said in
ShareGPT; training on the target's own answers removes that mismatch (at the price of running
the target's generation, which on a small CPU is the expensive part). :func:`generate_answers`
answers the first user turn of each conversation greedily, in left-padded batches, and appends
``{"messages": [...]}`` lines to a JSONL file; rerunning continues after the last written line.
The JSONL is then a ``--source`` for ``eagle2 train features``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _prompt(messages: list[dict]) -> list[dict]:
    """System message (if any) and the first user turn."""
    out = []
    for m in messages:
        out.append(m)
        if m["role"] == "user":
            return out
    return []


def _encode(tokenizer, prompt: list[dict], max_prompt_tokens: int) -> list[int] | None:
    if not prompt:
        return None
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids) if len(ids) <= max_prompt_tokens else None


def _generate_batch(model, encoded: list[list[int]], pad_id: int, max_new_tokens: int
                    ) -> list[torch.Tensor]:
    """Greedy answers of one left-padded batch; each answer's ids, padding removed."""
    device = next(model.parameters()).device
    width = max(len(e) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.int64)
    attn = torch.zeros(len(encoded), width, dtype=torch.int64)
    for r, e in enumerate(encoded):
        input_ids[r, width - len(e):] = torch.tensor(e)
        attn[r, width - len(e):] = 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return [row[width:].cpu() for row in out]


@torch.inference_mode()
def generate_answers(model, tokenizer, conversations, out_path, max_new_tokens: int = 256,
                     batch_size: int = 8, max_prompt_tokens: int = 512,
                     window_batches: int = 8, progress: bool = True) -> int:
    """Append the target's greedy answers to ``out_path`` (JSONL); return how many lines the
    file holds afterwards. Prompts longer than ``max_prompt_tokens`` are skipped (recorded
    as skipped lines, so that resuming stays aligned with ``conversations``).

    Prompts are taken in windows of ``window_batches * batch_size`` conversations; inside a
    window they are sorted by length before batching, so that left padding (which costs as
    much as real tokens) stays small. A window's lines are written together, in the order of
    ``conversations``: an interrupted run loses at most the window in progress.

    Args:
        model, tokenizer: the target and its tokenizer (chat template).
        conversations: chat message lists; only the first user turn of each is used.
        out_path: JSONL output; existing lines are kept and not regenerated.
        max_new_tokens: answer length cap.
        batch_size: prompts generated together (left-padded).
        max_prompt_tokens: longer prompts are skipped.
        window_batches: batches per sorting window.
    """
    if batch_size < 1 or max_new_tokens < 1 or window_batches < 1:
        raise ValueError(f"batch_size, max_new_tokens and window_batches must be >= 1, got "
                         f"{batch_size}, {max_new_tokens}, {window_batches}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = len(out_path.read_text().splitlines()) if out_path.exists() else 0
    todo = list(conversations)[done:]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="answer", desc="selfdistill", dynamic_ncols=True,
                   smoothing=0.1)
    t0 = time.perf_counter()
    new_tokens = 0
    window = batch_size * window_batches
    for a in range(0, len(todo), window):
        group = [_prompt(c) for c in todo[a:a + window]]
        encoded = [_encode(tokenizer, p, max_prompt_tokens) for p in group]
        live = sorted((i for i, e in enumerate(encoded) if e is not None),
                      key=lambda i: len(encoded[i]))
        answers: dict[int, str] = {}
        finished: dict[int, bool] = {}
        for b in range(0, len(live), batch_size):
            rows = live[b:b + batch_size]
            for i, ids in zip(rows, _generate_batch(model, [encoded[i] for i in rows], pad_id,
                                                    max_new_tokens)):
                ended = bool((ids == eos_id).any()) if eos_id is not None else False
                if ended:
                    ids = ids[: int((ids == eos_id).nonzero()[0, 0])]
                ids = ids[ids != pad_id] if pad_id != eos_id else ids
                new_tokens += len(ids)
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                finished[i] = ended
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(tok_s=round(new_tokens / (time.perf_counter() - t0)))
        with open(out_path, "a") as handle:
            for i, prompt in enumerate(group):
                answer = answers.get(i, "")
                line = ({"messages": prompt + [{"role": "assistant", "content": answer}],
                         "finished": finished[i]}
                        if answer else {"messages": [], "skipped": True})
                handle.write(json.dumps(line) + "\n")
        if bar is not None:
            bar.update(len(group) - len(live))
    if bar is not None:
        bar.close()
    return len(out_path.read_text().splitlines())
