"""Tiny random targets and draft heads shared by the model-level tests.

Real sizes: Llama-3-8B hidden 4096, 32 layers, vocab 128256; Qwen2-7B hidden 3584, vocab 152064;
Mistral-7B hidden 4096, vocab 32000. Here: 2 layers, hidden 64, GQA with 4 query / 2 KV heads,
unless a test asks otherwise. Builders do not seed unless they say so: the caller's seed (or the
per-test seed of conftest.py) fixes the random weights.

Test modules import from here (pyproject's pytest ``pythonpath`` puts tests/ on sys.path); ``one_thread`` is an autouse
fixture that a module activates by importing it.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from chi_square import chi_square_pvalue
from eagle2_kernels import EagleDraftHead, TreeSpecDecoder

# Tree shapes whose accepted paths get long with the trained head: a chain, a mid tree, the
# paper default.
LONG_PATH_TREES = [pytest.param(7, 5, 1, id="T7-D5-K1-chain"), pytest.param(16, 3, 4, id="T16-D3-K4"),
                   pytest.param(60, 5, 10, id="T60-D5-K10")]

ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    "mistral": (MistralForCausalLM, MistralConfig),
}

# The shape every builder starts from; keyword arguments of tiny_model override it.
BASE_CONFIG = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, max_position_embeddings=256,
)
# No BOS / EOS / PAD: generation runs to max_new_tokens unless a test passes an EOS.
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

# Vocab sizes of the decoder-level targets (different per arch so mix-ups show).
DECODER_VOCABS = {"llama": 320, "qwen2": 500, "mistral": 1000}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread start-up and contention cost more than the matmuls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(arch: str, **config):
    """A random-weight causal LM of ``arch`` ("llama" | "qwen2" | "mistral") in eval mode:
    BASE_CONFIG updated with ``config`` (vocab_size is required)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    if "vocab_size" not in config:
        raise ValueError("tiny_model needs vocab_size")
    cls, cfg_cls = ARCHS[arch]
    return cls(cfg_cls(**{**BASE_CONFIG, **config})).eval()


@functools.lru_cache(maxsize=None)
def tiny_target(arch: str, peaked: bool = False):
    """The decoder-level target of ``arch`` (seed 1234, intermediate 128, 512 positions, no
    special tokens); ``peaked`` scales lm_head by 40 so next-token distributions are confident."""
    torch.manual_seed(1234)
    model = tiny_model(arch, vocab_size=DECODER_VOCABS[arch], intermediate_size=128,
                       max_position_embeddings=512, **NO_SPECIAL_TOKENS)
    if peaked:
        # A random lm_head gives near-uniform next-token distributions; scaled up, the
        # target becomes confident, and a head that matches its features becomes confident too.
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    return model


@functools.lru_cache(maxsize=None)
def random_head(arch: str):
    """An untrained draft head (seed 99) for tiny_target(arch): short acceptances."""
    torch.manual_seed(99)
    return EagleDraftHead.from_target(tiny_target(arch))


def fixed(**kw):
    """Decoder keyword arguments for an exact, fixed tree shape: ``kw`` plus ``adaptive=False``
    when the decoder has an adaptive tree-size policy (one that can shrink a round's tree)."""
    if "adaptive" in inspect.signature(TreeSpecDecoder.__init__).parameters:
        kw = {**kw, "adaptive": False}
    return kw


def fixed_decoder(model, head, T, D, K, **kw):
    """A TreeSpecDecoder with exactly the tree (T, D, K) every round."""
    return TreeSpecDecoder(model, head, **fixed(total_tokens=T, depth=D, top_k=K, **kw))


@functools.lru_cache(maxsize=None)
def _trained(arch: str):
    model = tiny_target(arch, peaked=True)
    vocab = model.config.vocab_size
    torch.manual_seed(7)
    prompts = torch.randint(0, vocab, (8, 6))
    with torch.no_grad():
        seqs = model.generate(prompts, max_new_tokens=48, do_sample=False)
        out = model(seqs, output_hidden_states=True)
    feats, target_tok = out.hidden_states[-1], out.logits.argmax(-1)
    torch.manual_seed(0)
    head = EagleDraftHead.from_target(model)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(200):
        pred = head(feats[:, :-1], seqs[:, 1:])
        loss = torch.nn.functional.cross_entropy(
            head.logits(pred).reshape(-1, vocab), target_tok[:, 1:].reshape(-1)
        ) + 10.0 * torch.nn.functional.smooth_l1_loss(pred, feats[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return model, head, prompts


def trained_setup(arch: str = "llama"):
    """A peaked tiny ``arch`` target and a head trained for about a second of CPU on its own
    greedy continuations of 8 random prompts (trained once per test run, then cached).
    Returns (model, head, prompts [8, 6] int64); on these prompts the head's accepted paths
    are long (tau ~4-5 for trees of depth >= 3), on fresh prompts short."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    return _trained(arch)


def assert_accepts(stats, tau: float, longest: int = 3):
    """Drafted tokens were really accepted: some round committed >= ``longest`` tokens and the
    mean tokens per round exceeds ``tau`` (a head or decoder that stops accepting fails here)."""
    lengths = stats.accept_lengths
    assert max(lengths) >= longest, lengths
    assert stats.mean_accept_length > tau, (stats.mean_accept_length, lengths)


def hf_greedy(model, ids, n, eos=None):
    """transformers' greedy generate of ``n`` new tokens (the losslessness reference)."""
    pad = eos[0] if isinstance(eos, list) else eos
    kwargs = {} if eos is None else {"eos_token_id": eos, "pad_token_id": pad}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)


def prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    """A random prompt [1, length] int64 from its own generator (seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)


def check_stats(out, prompt_len):
    """The decode stats of ``out`` agree with its sequences."""
    s = out.stats
    n = out.sequences.shape[1] - prompt_len
    assert s.new_tokens == n == sum(s.accept_lengths)
    assert s.rounds == len(s.accept_lengths)
    assert all(a >= 1 for a in s.accept_lengths)
    assert s.mean_accept_length == pytest.approx(sum(s.accept_lengths) / len(s.accept_lengths))
    assert min(s.draft_s, s.verify_s, s.other_s) >= 0.0


# ---------------------------------------------------------------------- sampling-law tests
# The decoder-level distribution tests compare sampled tokens with the exact law of plain
# sampling, computed by enumerating every continuation of a vocabulary-8 target.
SAMPLING_VOCAB = 8
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=6)
SAMPLING_PROMPTS = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 6, 2]])


@functools.lru_cache(maxsize=None)
def sampling_setup():
    """The sampling target and its head: a Llama shrunk to 1 layer, hidden 32, vocab 8 (real
    Llama-3-8B: 32 layers, 4096, 128256), lm_head scaled by 5 so next-token laws are spread
    over several tokens, not uniform; and a head trained (about a second) against the
    target's softmax on its own sampled continuations, so the tree's children are likely
    tokens and every branch of the acceptance walk is exercised: first children accepted,
    rejected siblings, later siblings accepted, bonus draws from residuals. Returns
    (model, head)."""
    torch.manual_seed(2024)
    model = tiny_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       vocab_size=SAMPLING_VOCAB, max_position_embeddings=128, **NO_SPECIAL_TOKENS)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    torch.manual_seed(7)
    prompts = torch.randint(0, SAMPLING_VOCAB, (16, 5))
    with torch.no_grad():
        seqs = model.generate(prompts, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=0, top_p=1.0)
        out = model(seqs, output_hidden_states=True)
    feats, target_p = out.hidden_states[-1], torch.softmax(out.logits, -1)
    torch.manual_seed(0)
    head = EagleDraftHead.from_target(model)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(200):
        pred = head(feats[:, :-1], seqs[:, 1:])
        logp = torch.log_softmax(head.logits(pred), -1)
        loss = (-(target_p[:, 1:] * logp).sum(-1).mean()
                + 10.0 * torch.nn.functional.smooth_l1_loss(pred, feats[:, 1:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return model, head


def exact_law(model, prompt_ids, n, process):
    """The exact law P(x1..xn) [V]*n float64 of n tokens sampled after ``prompt_ids`` [1, L],
    where ``process`` maps logits [N, V] to a next-token distribution."""
    V = model.config.vocab_size
    law = torch.ones(1, dtype=torch.float64)
    seqs = prompt_ids
    with torch.no_grad():
        for _ in range(n):
            p = process(model(seqs).logits[:, -1]).double()  # [V^j, V]
            law = (law[:, None] * p).reshape(-1)
            nxt = torch.arange(V).repeat(seqs.shape[0])[:, None]
            seqs = torch.cat([seqs.repeat_interleave(V, 0), nxt], 1)
    return law.reshape([V] * n)


def marginal(law: torch.Tensor, dims) -> torch.Tensor:
    """The marginal of ``law`` [V]*n over the token positions ``dims`` (0-based, ascending)."""
    assert list(dims) == sorted(dims), dims
    rest = [d for d in range(law.dim()) if d not in dims]
    return law.sum(dim=rest) if rest else law


def token_counts(samples: torch.Tensor, dims, vocab: int) -> torch.Tensor:
    """Counts [V]*len(dims) float64 of the tokens at columns ``dims`` of ``samples`` [N, n]."""
    counts = torch.zeros([vocab] * len(dims), dtype=torch.float64)
    counts.index_put_(tuple(samples[:, d] for d in dims), torch.ones(len(samples), dtype=torch.float64),
                      accumulate=True)
    return counts


def law_pvalues(samples: torch.Tensor, law: torch.Tensor, groups) -> dict:
    """Chi-square p-values of ``samples`` [N, n] int64 against ``law`` [V]*n, one per group of
    token positions (0-based, ascending; e.g. (0, 1) tests the joint of the first two tokens
    against that marginal of ``law``). Keys name the tokens 1-based: "x1x2"."""
    return {"".join(f"x{d + 1}" for d in dims): chi_square_pvalue(token_counts(samples, dims, law.shape[0]),
                                                                  marginal(law, dims))
            for dims in groups}


def first_prompt_pvalues(dec, samples: int, seed: int) -> dict:
    """Chi-square p-values of ``samples`` draws of 3 tokens from ``dec`` (a decoder over
    ``sampling_setup()``'s target) after SAMPLING_PROMPTS[0], against the exact law of plain
    sampling: the joints (x1, x2) and (x2, x3)."""
    from eagle2_kernels.ops.sampling import process_logits

    ids = SAMPLING_PROMPTS[:1]
    law = exact_law(dec.target, ids, 3, lambda lg: process_logits(lg, **SAMPLING))
    g = torch.Generator().manual_seed(seed)
    drawn = torch.stack([dec.generate(ids, 3, generator=g, **SAMPLING).sequences[0, ids.shape[1]:]
                         for _ in range(samples)])
    return law_pvalues(drawn, law, [(0, 1), (1, 2)])
