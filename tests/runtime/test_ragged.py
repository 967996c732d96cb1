"""Prompts of different lengths decoded together: a list of 1-D prompts, or a padded batch with
its attention mask (left or right padding). Each row must equal its own prompt's plain greedy
decoding in fp32 (dynamic round fixed and adaptive, static round), sampling must keep each row's
law, and ``sequences`` is laid out as transformers' batched generate lays it out (prompts
left-padded, answers from column Lmax on)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import TreeSpecDecoder  # noqa: E402
from eagle2_kernels.ops.sampling import process_logits  # noqa: E402
from chi_square import chi_square_pvalue  # noqa: E402
from tiny_models import (  # noqa: E402
    SAMPLING,
    SAMPLING_VOCAB,
    exact_law,
    fixed,
    hf_greedy,
    marginal,
    one_thread,  # noqa: F401  (autouse fixture)
    prompt,
    sampling_setup,
    token_counts,
    trained_setup,
)

MODES = [pytest.param(fixed(), id="dynamic-fixed"), pytest.param({}, id="adaptive"),
         pytest.param(fixed(static_round=True), id="static")]


def _rows(arch):
    model, head, prompts = trained_setup(arch)
    vocab = model.config.vocab_size
    # Known prompts (long accepted paths) cut to different lengths, and a longer fresh one.
    return model, head, [prompts[0, :6], prompts[1, :2], torch.cat([prompts[2], prompt(vocab, 5, 3)[0]]),
                         prompts[3, :1]]


def _answers(model, rows, n, eos=None):
    return [hf_greedy(model, r[None], n, eos=eos)[0, r.numel():].tolist() for r in rows]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", MODES)
def test_list_of_prompts_equals_each_prompt_alone(arch, mode):
    model, head, rows = _rows(arch)
    dec = TreeSpecDecoder(model, head, total_tokens=10, depth=4, top_k=3, **mode)
    out = dec.generate(rows, 30, eos_token_id=[])
    lmax = max(r.numel() for r in rows)
    assert out.sequences.shape == (len(rows), lmax + 30)
    for b, (r, want) in enumerate(zip(rows, _answers(model, rows, 30))):
        assert out.sequences[b, lmax:].tolist() == want
        # transformers' layout: the prompt right-aligned before column Lmax, pad id before it
        assert out.sequences[b, lmax - r.numel() : lmax].tolist() == r.tolist()
        assert (out.sequences[b, : lmax - r.numel()] == 0).all()  # no pad/eos id: 0
    assert max(out.stats.accept_lengths[1:]) >= 2 * len(rows) - 1  # drafted tokens were accepted
    plain = dec.generate_plain(rows, 30, eos_token_id=[])
    assert torch.equal(plain.sequences, out.sequences)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_attention_mask(side):
    model, head, rows = _rows("llama")
    lmax = max(r.numel() for r in rows)
    ids = torch.full((len(rows), lmax), 5, dtype=torch.int64)  # padding: any id, masked out
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(lmax - r.numel(), lmax) if side == "left" else slice(0, r.numel())
        ids[b, sl], mask[b, sl] = r, 1
    dec = TreeSpecDecoder(model, head, total_tokens=8, depth=3, top_k=3)
    want = _answers(model, rows, 20)
    for out in (dec.generate({"input_ids": ids, "attention_mask": mask}, 20, eos_token_id=[]),
                dec.generate(ids, 20, eos_token_id=[], attention_mask=mask)):
        assert [out.sequences[b, lmax:].tolist() for b in range(len(rows))] == want
    # stream: per round one list per row, concatenating to the same answers
    got = [[] for _ in rows]
    for chunks in dec.stream(ids, 20, eos_token_id=[], attention_mask=mask):
        for g, c in zip(got, chunks):
            g.extend(c)
    assert got == want


def test_each_row_stops_on_its_own_eos():
    model, head, rows = _rows("mistral")
    full = _answers(model, rows, 30)
    eos = full[0][7]  # row 0 stops at the first occurrence of this token; others when they meet it
    dec = TreeSpecDecoder(model, head, total_tokens=10, depth=4, top_k=3)
    out = dec.generate(rows, 30, eos_token_id=[eos])
    lmax = max(r.numel() for r in rows)
    want = _answers(model, rows, 30, eos=[eos])
    for b in range(len(rows)):
        got = out.sequences[b, lmax:].tolist()
        n = len(want[b])
        assert got[:n] == want[b]
        assert all(t == eos for t in got[n:])  # padded with the first EOS id (no pad id)
    assert out.sequences[0, lmax:].tolist().index(eos) == full[0].index(eos) <= 7
    assert len({len(w) for w in want}) > 1  # rows stopped at different lengths


def test_ragged_sampling_keeps_each_rows_law():
    """B = 2 prompts of lengths 5 and 2, 400 samples of 3 tokens per row: each row's joints
    (x1, x2) and (x2, x3) follow its own exact law and the rows are independent."""
    model, head = sampling_setup()
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3)
    rows = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([2, 7])]
    n = 3
    process = lambda lg: process_logits(lg, **SAMPLING)  # noqa: E731
    laws = [exact_law(model, r[None], n, process) for r in rows]
    g = torch.Generator().manual_seed(17)
    samples = torch.stack([dec.generate(rows, n, generator=g, **SAMPLING).sequences[:, 5:].reshape(-1)
                           for _ in range(400)])
    pvalues = {}
    for b in range(2):
        for dims in [(0, 1), (1, 2)]:
            counts = token_counts(samples[:, b * n : (b + 1) * n], dims, SAMPLING_VOCAB)
            pvalues[f"row{b}{dims}"] = chi_square_pvalue(counts, marginal(laws[b], dims))
    both = token_counts(samples, (0, n), SAMPLING_VOCAB)
    pvalues["x1 of both rows"] = chi_square_pvalue(both, torch.outer(marginal(laws[0], (0,)), marginal(laws[1], (0,))))
    assert min(pvalues.values()) > 1e-3, pvalues


@pytest.mark.parametrize("call, message", [
    (lambda d, ids: d.generate(ids, 4, attention_mask=torch.tensor([[1, 0, 1, 1]])), "zeros between ones"),
    (lambda d, ids: d.generate(ids, 4, attention_mask=torch.ones(1, 3, dtype=torch.int64)), "attention_mask shape"),
    (lambda d, ids: d.generate([ids[0], torch.tensor([], dtype=torch.int64)], 4), "at least one token"),
    (lambda d, ids: d.generate([ids[0]], 4, attention_mask=torch.ones(1, 4)), "not with a list"),
    (lambda d, ids: d.generate([ids], 4), "must be 1-D"),
    (lambda d, ids: d.generate([], 4), "empty list"),
    (lambda d, ids: d.generate([ids[0], torch.tensor([10**6])], 4), r"prompt 1 must lie in"),
])
def test_bad_ragged_inputs(call, message):
    model, head, prompts = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3)
    with pytest.raises(ValueError, match=message):
        call(dec, prompts[:1, :4])
