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


@torch.inference_mode()
def generate_answers(model, tokenizer, conversations, out_path, max_new_tokens: int = 256,
                     batch_size: int = 8, max_prompt_tokens: int = 512,
                     progress: bool = True) -> int:
    """Append the target's greedy answers to ``out_path`` (JSONL); return how many lines the
    file holds afterwards. Prompts longer than ``max_prompt_tokens`` are skipped (recorded
    as skipped lines, so that resuming stays aligned with ``conversations``).

    Args:
        model, tokenizer: the target and its tokenizer (chat template).
        conversations: chat message lists; only the first user turn of each is used.
        out_path: JSONL output; existing lines are kept and not regenerated.
        max_new_tokens: answer length cap.
        batch_size: prompts generated together (left-padded).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                         f"{max_new_tokens}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = len(out_path.read_text().splitlines()) if out_path.exists() else 0
    todo = list(conversations)[done:]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="answer", desc="selfdistill", dynamic_ncols=True)
    device = next(model.parameters()).device
    for a in range(0, len(todo), batch_size):
        group = [_prompt(c) for c in todo[a:a + batch_size]]
        encoded = []
        for prompt in group:
            if not prompt:
                encoded.append(None)
                continue
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            encoded.append(list(ids) if len(ids) <= max_prompt_tokens else None)
        live = [i for i, e in enumerate(encoded) if e is not None]
        answers: dict[int, str] = {}
        if live:
            width = max(len(encoded[i]) for i in live)
            input_ids = torch.full((len(live), width), pad_id, dtype=torch.int64)
            attn = torch.zeros(len(live), width, dtype=torch.int64)
            for r, i in enumerate(live):
                e = encoded[i]
                input_ids[r, width - len(e):] = torch.tensor(e)
                attn[r, width - len(e):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                                 do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id)
            for r, i in enumerate(live):
                answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
        with open(out_path, "a") as handle:
            for i, prompt in enumerate(group):
                answer = answers.get(i, "")
                line = ({"messages": prompt + [{"role": "assistant", "content": answer}]}
                        if answer else {"messages": [], "skipped": True})
                handle.write(json.dumps(line) + "\n")
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return len(out_path.read_text().splitlines())
