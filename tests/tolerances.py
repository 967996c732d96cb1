"""The suite's one tolerance table: splat an entry into assert_close, as in
``torch.testing.assert_close(got, want, **FP32)`` (shared: no test module imports another).

assert_close passes where |got - want| <= atol + rtol * |want|, element by element. Machine
epsilons for the sizes below: fp32 2**-23 ~ 1.2e-7, fp16 2**-10 ~ 9.8e-4, bf16 2**-7 ~ 7.8e-3.
A test that needs another bound adds an entry here, with the case it is for and why it has that
size, rather than a literal in the test; an entry is never loosened to make a test pass.
"""

from __future__ import annotations

# Same arithmetic in the same order (copies, gathers, graph replays, one op by two routes): bit-equal.
EXACT = dict(rtol=0, atol=0)
# float64 against a float64 reference: room for another summation order, far below any fp32 error.
FP64 = dict(rtol=1e-10, atol=1e-10)
# Order-one fp32 values from sums of a few terms, or one computation read through another layout
# (paged vs dense, a cache vs the model's own): about 8 ulp at 1.0.
FP32_TIGHT = dict(rtol=0, atol=1e-6)
# Bounded fp32 results (attention outputs, probabilities, top-k log-probs) against float64 truth or
# another fp32 implementation, sums of up to ~1000 terms in another order: about 80 ulp at 1.0.
FP32_ABS = dict(rtol=0, atol=1e-5)
# Bounded fp32 results of longer or split reductions (attention in merged chunks over hundreds of
# keys, a native log-softmax over thousands of logits): twice FP32_ABS.
FP32_ACCUM = dict(rtol=0, atol=2e-5)
# fp32 results of any magnitude (logits, hidden states, KV, log-prob scores) against a reference
# that computes them in another order: about 100 ulp relative, with an order-one floor.
FP32 = dict(rtol=1e-5, atol=1e-5)
# Log-prob scores from a log-softmax over a whole vocabulary (up to ~1e5 terms, bf16 inputs
# included) plus a parent score: FP32's relative part with FP32_ACCUM's floor.
FP32_VOCAB = dict(rtol=1e-5, atol=2e-5)
# fp32 results through a chain of separately rounded steps (a draft head against a re-derived
# reference, a rollout feeding its own outputs back): errors compound, ~1000 ulp relative.
FP32_CHAINED = dict(rtol=1e-4, atol=1e-5)
# Probabilities against transformers' logits processors: relative for the large ones, and an atol
# small enough that a probability of 1e-6 is still held to 10%.
PROBS = dict(rtol=1e-5, atol=1e-7)
# A compiled (inductor) forward against the eager one through every layer of a model: fused
# kernels reorder the matmul and norm reductions, and the differences grow layer by layer.
FP32_COMPILED = dict(rtol=1e-4, atol=1e-4)
# Order-one fp16 results against float64 truth: two fp16 ulps.
FP16 = dict(rtol=0, atol=2e-3)
# Order-one fp16/bf16 kernel outputs against the reference in the same dtype, each rounding its
# own fp32 accumulations: about two and a half bf16 ulps.
HALF = dict(rtol=0, atol=2e-2)
# A bf16 copy of weights against an fp32 copy of the same weights: bf16 rounding is at most 2**-9
# relative (~2e-3), so this catches a wrong tensor or a wrong dequantisation, not the rounding.
BF16_CAST = dict(rtol=1e-2, atol=1e-2)
