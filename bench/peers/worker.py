"""One system of the peer benchmark, loaded once and then serving generation requests.

Started by ``bench/peers/run_peers.py`` with the Python of the system's own virtual environment
(the project's for ours and transformers, ``bench/peers/.envs/<peer>`` for llama.cpp and vLLM),
so this file imports nothing but the standard library at module level.

Protocol (JSON lines): after loading, the worker writes ``{"ready": true, "load_s": ...,
"versions": {...}}`` to stdout. Then each stdin line ``{"ids": [...], "max_new_tokens": N,
"eos": [...]}`` is answered with ``{"tokens": [...], "seconds": s, "rounds": r}`` (``rounds``:
target forwards of a speculative system, else null); ``seconds`` times the generation call only
(prefill included, tokenisation excluded: every system gets the same prompt ids). Greedy, batch 1.
Anything the engines print goes to stderr so that stdout carries only the protocol.

    python bench/peers/worker.py SYSTEM [--threads 2] [--model PATH]

SYSTEM: ours (a request with ``"plain": true`` runs its plain loop; ``--no-head``: no draft head,
lookup trees alone), hf-eager, hf-compiled (``--cache-len`` its static cache's slots), hf-lookup
(transformers' prompt-lookup decoding, ``--lookup-tokens`` candidates), llama (``--model`` a GGUF),
vllm (``--model`` a transformers directory), vllm-ngram.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SYSTEMS = ("ours", "hf-eager", "hf-compiled", "hf-lookup", "llama", "vllm", "vllm-ngram")


class Ours:
    """TreeSpecDecoder.from_pretrained() with the default settings (compile="auto"), or its plain loop;
    with ``--no-head`` the same decoder without a draft head (trees from context lookup alone)."""

    def __init__(self, args):
        import torch

        from eagle2_kernels import TreeSpecDecoder

        torch.set_num_threads(args.threads)
        self.torch = torch
        # draft=False: no head, the decoder drafts from the context alone (the CLI's --draft none).
        if args.no_head:
            self.dec = TreeSpecDecoder.from_pretrained(None, False)
        else:  # --no-lookup: the head's trees alone (the comparison "never below head-only")
            self.dec = TreeSpecDecoder.from_pretrained(**({"lookup": False} if args.no_lookup else {}))
        self.versions = {"torch": torch.__version__, "compile": self.dec.compile_status,
                         "draft_head": self.dec.draft is not None}
        # Warm-up, excluded from timing: the compiled graphs loaded (or built once per machine),
        # the cost model, then one short generation of each kind.
        self.dec.precompile(1)
        self.dec.cost_model(1)
        warm = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        self.dec.generate(warm, max_new_tokens=16)
        self.dec.generate_plain(warm, max_new_tokens=16)
        self.versions["compile"] = self.dec.compile_status
        self.versions["head_compile"] = self.dec.head_compile_status

    def generate(self, ids, n, eos, plain=False):
        x = self.torch.tensor([ids])
        fn = self.dec.generate_plain if plain else self.dec.generate
        t0 = time.perf_counter()
        out = fn(x, max_new_tokens=n, eos_token_id=eos)
        dt = time.perf_counter() - t0
        return out.sequences[0, len(ids):].tolist(), dt, (None if plain else out.stats.rounds)


class HF:
    """transformers' generate on the same bf16 weights: eager (sdpa); or with a static cache whose
    decode step transformers compiles (torch.compile, Inductor with freezing: weights prepacked);
    or eager with prompt-lookup decoding (``prompt_lookup_num_tokens``)."""

    def __init__(self, args, compiled: bool, lookup: int | None = None):
        import torch
        import transformers

        from eagle2_kernels.models.default import load_default

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.model, _ = load_default(torch.bfloat16)
        self.model.eval()
        self.compiled, self.lookup = compiled, lookup
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        self.cache = None
        # Target forwards per call (prefill included, as ours counts them), for prompt lookup's tau.
        self.forwards = 0
        if lookup:
            self.model.register_forward_hook(self._count)
        if compiled:
            import torch._inductor.config as inductor_config

            from transformers import CompileConfig

            inductor_config.freezing = True
            # transformers compiles the decode step by itself only on GPUs; this opts the CPU in.
            cc = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode="default")
            cc._compile_all_devices = True
            self.model.generation_config.compile_config = cc
            # One cache for every call, emptied in place before each (StaticCache.reset): its
            # tensors are marked as static addresses, which Inductor's freezing treats like
            # weights, so the compiled step keeps pointing at the first cache it saw. A fresh
            # StaticCache per call (transformers' cache_implementation="static" does that) then
            # runs the step on freed memory: garbage positions, "index out of bounds" in the
            # rotary / index_copy kernel. One size for every prompt: the step compiles once.
            from transformers import StaticCache

            self.cache = StaticCache(config=self.model.config, max_cache_len=args.cache_len)
            self.versions["static_cache_len"] = args.cache_len
        if lookup:
            self.versions["prompt_lookup_num_tokens"] = lookup
        self._warm()

    def _count(self, *_):
        self.forwards += 1

    def _kwargs(self):
        if self.compiled:
            self.cache.reset()
            return {"cache": self.cache}
        if self.lookup:
            return {"prompt_lookup_num_tokens": self.lookup}
        return {}

    def _warm(self):
        warm = self.torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        for _ in range(2):
            with self.torch.no_grad():
                self.model.generate(warm, max_new_tokens=16, do_sample=False, pad_token_id=0, **self._kwargs())

    def generate(self, ids, n, eos):
        x = self.torch.tensor([ids])
        kw = self._kwargs()
        self.forwards = 0
        t0 = time.perf_counter()
        with self.torch.no_grad():
            seq = self.model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **kw)
        dt = time.perf_counter() - t0
        return seq[0, len(ids):].tolist(), dt, (self.forwards if self.lookup else None)


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF: greedy token loop over the given prompt ids."""

    def __init__(self, args):
        import llama_cpp

        kw = dict(model_path=args.model, n_ctx=args.cache_len, n_threads=args.threads, n_threads_batch=args.threads,
                  n_batch=512, verbose=False, seed=0)
        # ggml's AMX matmul path crashes on quantised (Q4_1) weights on AMX CPUs; the extra buffer
        # types (where AMX lives) are switched off for every file so BF16 and Q4_1 run alike.
        import inspect

        if "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters:
            kw["use_extra_bufts"] = False
        self.llm = llama_cpp.Llama(**kw)
        self.versions = {"llama_cpp_python": llama_cpp.__version__,
                         "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}
        self.generate([1, 2, 3, 4, 5, 6, 7, 8], 16, [])

    def generate(self, ids, n, eos):
        out = []
        stop = set(eos)
        t0 = time.perf_counter()
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok in stop:
                out.append(tok)
                break
            out.append(tok)
            if len(out) >= n:
                break
        dt = time.perf_counter() - t0
        return out, dt, None


class VLLM:
    """vLLM's CPU engine on the transformers copy of the same weights (bf16), plain or n-gram."""

    def __init__(self, args, ngram: bool):
        import vllm
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        kw = dict(model=args.model, dtype="bfloat16", max_model_len=args.cache_len, seed=0)
        self.ngram = ngram
        if ngram:
            kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 4, "prompt_lookup_min": 2}
            kw["disable_log_stats"] = False
        self.llm = LLM(**kw)
        import torch

        self.versions = {"vllm": vllm.__version__, "torch": torch.__version__}
        self.generate([1, 2, 3, 4, 5, 6, 7, 8], 16, [])

    def _spec_counts(self):
        """(drafts, accepted tokens) so far, from the engine's metrics; (None, None) if absent."""
        try:
            drafts = accepted = 0
            for m in self.llm.get_metrics():
                if m.name == "vllm:spec_decode_num_drafts":
                    drafts += m.value
                elif m.name == "vllm:spec_decode_num_accepted_tokens":
                    accepted += m.value
            return drafts, accepted
        except Exception:  # metrics API differs: no tau
            return None, None

    def generate(self, ids, n, eos):
        sp = self.SamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=list(eos) or None)
        before = self._spec_counts() if self.ngram else (None, None)
        t0 = time.perf_counter()
        res = self.llm.generate([{"prompt_token_ids": list(ids)}], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        toks = list(res[0].outputs[0].token_ids)
        rounds = None
        if self.ngram and before[0] is not None:
            after = self._spec_counts()
            accepted = after[1] - before[1]
            # Each target forward (the prefill, then one per decode step, with or without an
            # n-gram draft) commits one token plus the drafted tokens it accepts, so the forwards
            # are the tokens less the accepted drafts (tau = tokens per forward, as ours counts).
            rounds = max(1, round(len(toks) - accepted))
        return toks, dt, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=SYSTEMS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="GGUF file (llama) or transformers directory (vllm)")
    ap.add_argument("--cache-len", type=int, default=1024, help="context size of static caches / engines")
    ap.add_argument("--no-head", action="store_true", help="ours: no draft head (lookup trees alone)")
    ap.add_argument("--no-lookup", action="store_true", help="ours: no lookup candidates (head trees alone)")
    ap.add_argument("--lookup-tokens", type=int, default=10, help="hf-lookup: prompt_lookup_num_tokens")
    args = ap.parse_args()
    # Engines print to stdout; keep the protocol on a private copy of it.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    if args.system == "ours":
        sysobj = Ours(args)
    elif args.system in ("hf-eager", "hf-compiled", "hf-lookup"):
        sysobj = HF(args, compiled=args.system == "hf-compiled",
                    lookup=args.lookup_tokens if args.system == "hf-lookup" else None)
    elif args.system == "llama":
        sysobj = LlamaCpp(args)
    else:
        sysobj = VLLM(args, ngram=args.system == "vllm-ngram")
    load_s = time.perf_counter() - t0
    proto.write(json.dumps({"ready": True, "load_s": load_s, "versions": sysobj.versions}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        kw = {"plain": True} if req.get("plain") else {}  # ours only: its plain loop in the same process
        toks, dt, rounds = sysobj.generate(req["ids"], req["max_new_tokens"], req.get("eos", []), **kw)
        proto.write(json.dumps({"tokens": toks, "seconds": dt, "rounds": rounds}) + "\n")


if __name__ == "__main__":
    main()
