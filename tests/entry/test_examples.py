"""The integration examples under examples/ run and check themselves (losslessness vs plain greedy)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--batch", "3", "--tree", "10,3,3", "--new-tokens", "20"], id="B3-T10-D3-K3"),
        # T=40 > 32: two mask words; a tree deeper than most acceptances
        pytest.param(["--batch", "2", "--tree", "40,5,4", "--new-tokens", "16", "--seed", "3"], id="B2-T40-D5-K4"),
        pytest.param(["--batch", "1", "--tree", "2,1,1", "--new-tokens", "8"], id="B1-T2-chain"),
    ],
)
def test_batched_engine_matches_plain_greedy(args, capsys):
    engine = _load("batched_engine")
    assert engine.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("equals plain greedy: True") == int(args[1])


def test_batched_engine_accepts_multi_token_paths():
    """The example must exercise compaction: some step commits more than one token."""
    import torch

    engine = _load("batched_engine")
    torch.set_num_threads(1)
    target = engine.ToyTarget(seed=0).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14]]
    eng = engine.SpecEngine(target, total_tokens=12, depth=3, top_k=3, max_len=64)
    with torch.no_grad():
        outputs, per_step = eng.generate(prompts, 20)
        for prompt, out in zip(prompts, outputs):
            assert out == engine.plain_greedy(target, prompt, 20)
    lengths = [n for step in per_step for n in step if n is not None]
    assert max(lengths) > 1
    # every sequence advanced by its own acceptances: its cache holds the prompt and every
    # committed token except the newest root (whose KV the next step writes)
    for b, prompt in enumerate(prompts):
        committed = sum(step[b] for step in per_step if step[b] is not None)
        assert eng.prefix_len[b].item() == len(prompt) + committed


def test_batched_engine_runs_as_a_script():
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(EXAMPLES.parent))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "batched_engine.py"), "--batch", "2", "--new-tokens", "6"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "equals plain greedy: True" in proc.stdout


def test_batched_engine_rejects_a_bad_tree(capsys):
    with pytest.raises(SystemExit) as exc:
        _load("batched_engine").main(["--tree", "10,3"])
    assert exc.value.code == 2
    assert "--tree must be three integers T,D,K, got '10,3'" in capsys.readouterr().err
