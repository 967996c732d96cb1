"""bench/bench_round.py on CPU (--quick, tiny shapes): its correctness gate decodes with real
multi-token acceptance and rejects a wrong decoder or a head that stops accepting; the
projected speedup uses only a tau that was given (--tau) or read from a committed result
(--tau-from), never a placeholder."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bench.bench_round as br  # noqa: E402
from eagle2_kernels import TreeSpecDecoder  # noqa: E402

COMMITTED_TAUS = os.path.join(ROOT, "bench", "results", "cpu", "head_curve", "final.json")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny shapes: thread wake-ups cost more than the matmuls (the benchmark's CPU mode does the
    # same); restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quick_run_with_an_explicit_tau(tmp_path):
    out = tmp_path / "round.json"
    assert br.main(["--quick", "--reps", "2", "--json", str(out), "--tau", "2.5"]) == 0
    data = json.loads(out.read_text())
    assert data["gate"].startswith("passed") and data["finished"] and data["tau"] == 2.5
    assert len(data["rows"]) == 4 and (tmp_path / "round.md").exists()
    for row in data["rows"]:
        assert row["round_eager_ms"] > 0 and row["plain_eager_ms"] > 0 and row["tau"] == 2.5
        assert row["projected_speedup"] == pytest.approx(2.5 * row["plain_eager_ms"] / row["round_eager_ms"])


def test_tau_per_tree_from_a_committed_result(tmp_path):
    table = br.read_tau_table(COMMITTED_TAUS)
    assert table[(60, 5, 10)] > 1.0 and (16, 5, 10) not in table
    out = tmp_path / "round.json"
    assert br.main(["--quick", "--reps", "2", "--json", str(out), "--tau-from", COMMITTED_TAUS]) == 0
    data = json.loads(out.read_text())
    assert data["tau"] is None and "final.json" in data["tau_source"]
    for row in data["rows"]:
        if row["T"] == 60:
            assert row["tau"] == table[(60, 5, 10)] and row["projected_speedup"] > 0
        else:  # no tau for this tree in the file: no projection (not a placeholder)
            assert "tau" not in row and "projected_speedup" not in row


def test_tau_table_schema_errors(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"configs": [{"T": 4, "D": 2, "K": 2, "tau": 1.6, "rounds": 9}]}))
    assert br.read_tau_table(str(good)) == {(4, 2, 2): 1.6}
    for i, bad in enumerate([{"rows": [{"tau": 2.0}]}, {"configs": []}, {"mtbench": {"configs": [{"T": 4}]}},
                             [1, 2]]):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"bad{i}.json"):
            br.read_tau_table(str(path))
    with pytest.raises(SystemExit):  # one source of tau at most
        br.main(["--quick", "--tau", "2", "--tau-from", str(good)])


def test_gate_accepts_multiple_tokens_and_without_a_tau_projects_nothing(tmp_path, capsys):
    seen = []
    real = TreeSpecDecoder.generate

    def spy(self, ids, *a, **k):
        res = real(self, ids, *a, **k)
        seen.append((self.config.total_tokens, self.config.top_k, res.stats.accept_lengths))
        return res

    mp = pytest.MonkeyPatch()
    mp.setattr(TreeSpecDecoder, "generate", spy)
    try:
        assert br.gate("tiny", torch.device("cpu"), None, br.TREES) == []
    finally:
        mp.undo()
    assert [(T, K) for T, K, _ in seen] == [(60, 10), (16, 10), (15, 2)]
    for T, K, acc in seen:
        assert max(acc) >= 3, (T, acc)
    assert min(seen[-1][2][1:-1]) >= 3  # the covering tree: every round but the last
    out = tmp_path / "round.json"
    assert br.main(["--quick", "--reps", "1", "--json", str(out), "--time-budget", "0"]) == 0
    data = json.loads(out.read_text())
    assert data["tau"] is None and "no tau given" in data["tau_source"]
    assert "no tau given" in capsys.readouterr().out


def test_gate_rejects_a_head_that_stops_accepting(monkeypatch):
    # Without the shaped lm_head the target emits tokens outside the draft vocabulary S:
    # nothing drafted is accepted, which the gate must report.
    def unshaped(model, n, seed=11):
        V = model.get_output_embeddings().weight.shape[0]
        return torch.linspace(0, V - 1, n).round().to(torch.int64)

    monkeypatch.setattr(br, "accepting_lm_head", unshaped)
    bad = br.gate("tiny", torch.device("cpu"), None, br.TREES[:1])
    assert len(bad) == 2 and "tau" in bad[0] and "covering tree" in bad[1], bad


def test_gate_rejects_a_wrong_decoder(tmp_path, monkeypatch, capsys):
    real = TreeSpecDecoder.generate

    def wrong(self, ids, *a, **k):
        res = real(self, ids, *a, **k)
        res.sequences[:, -1] = (res.sequences[:, -1] + 1) % self.target.config.vocab_size
        return res

    monkeypatch.setattr(TreeSpecDecoder, "generate", wrong)
    bad = tmp_path / "bad.json"
    capsys.readouterr()
    assert br.main(["--quick", "--reps", "2", "--json", str(bad), "--tau", "2"]) == 1
    assert not bad.exists() and "GATE FAILED" in capsys.readouterr().err
