"""benchmarks/run.py kept from rotting: its cheap parts, no timing assertions (~10 s).

The dry run describes every section; the step-time arithmetic and the report are checked on
made-up numbers; `tpplan plan` is measured on the tiny spec; handwritten_tp.py trains on the same
token rows, in the same order, as the generated train.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from benchmarks import run as bench
from tests.conftest import REPO, SPECS


def _bench(*args: str, timeout: float = 120):
    return subprocess.run([sys.executable, "benchmarks/run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_describes_every_section(tmp_path):
    proc = _bench("--dry-run", "--quick", "--json", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "r.md").read_text()
    for title in bench.TITLES.values():
        assert title in report
    assert "Command: `python benchmarks/run.py --dry-run --quick --json" in report
    assert "tpplan run benchmarks/specs/step-time.yaml --max-steps 8" in report
    assert "benchmarks/handwritten_tp.py --steps 8" in report and "--data" in report
    assert "tpplan plan specs/llama3-405b.yaml" in report
    # what ran is read from the spec; the compile ratio runs the tiny spec with and without train.compile
    assert "hidden 512, intermediate 2048, 4 layers" in report and "no gradient clipping" in report
    assert "tpplan run specs/tiny-llama.yaml --max-steps 25" in report and "--set train.compile=true`" in report
    # on a GPU: tpplan alone with compile, float8 (8.9+) and async TP (9.0+, 2 GPUs)
    assert "--set train.float8=true" in report and "--set mesh.async_tp=true --set mesh.tp=2" in report
    assert "compute capability 8.9+" in report and "compute capability 9.0+, 2 GPU(s)" in report
    data = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(proc.stdout) == data  # --json: the raw numbers on stdout
    assert data["dry_run"] is True and data["errors"] == {}
    assert data["machine"]["torch"] and data["machine"]["cores"] >= 1
    import torch

    if not torch.cuda.is_available():
        assert "skipped: no CUDA device" in report


def test_unknown_section_is_bad_input(tmp_path):
    proc = _bench("--only", "step,nope", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "nope" in proc.stderr


def _times(base: float, n: int = 6) -> list[dict]:
    return [{"data": 0.0, "forward": base, "backward": 2 * base, "update": base / 2 + i, "step": 0.0} for i in range(n)]


def test_step_summaries_and_report_from_made_up_runs():
    run = bench.summarize_run(_times(100.0) + [{"forward": 1e9, "backward": 0, "update": 0}], warmup=0)
    assert run["steps_measured"] == 7
    first_skipped = bench.summarize_run([{"forward": 1e9, "backward": 0.0, "update": 0.0}] + _times(100.0), 1)
    assert first_skipped["fbu_ms"] == pytest.approx(352.5)  # median of 350..355
    with pytest.raises(bench.Failed):
        bench.summarize_run(_times(1.0, 2), warmup=2)

    pairs = []
    for t, h in ((100.0, 100.0), (90.0, 100.0), (120.0, 100.0)):
        pairs.append({
            "tpplan": {**bench.summarize_run(_times(t), 1), "process_s": 20.0},
            "handwritten": {**bench.summarize_run(_times(h), 1), "process_s": 15.0},
            "max_loss_difference": 0.0,
        })
    summary = bench.summarize_pairs(pairs)
    assert summary["ratio_median"] == pytest.approx(1.0)
    assert summary["ratio_min"] < summary["ratio_median"] < summary["ratio_max"]
    step = {**bench.step_time(bench.SETTINGS["quick"], REPO, dry_run=True), "runs": pairs, "config_differences": [],
            "max_loss_difference": 0.0, **summary}
    results = {"command": "python benchmarks/run.py", "machine": bench.machine(), "step": step,
               "bytes": {"failed": "it broke"}}
    report = bench.markdown(results)
    assert report.count("\n| 1 |") == 1 and "\n| 3 |" in report
    assert "median 1.000" in report and "**failed to run:** it broke" in report
    assert report.index(bench.TITLES["step"]) < report.index(bench.TITLES["bytes"])


def test_tpplan_steps_wants_one_record_per_step(tmp_path):
    records = [{"event": "start", "step": 0}] + [{"step": s, "loss": 1.0, "time_ms": {"forward": 1}} for s in (1, 2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(bench.Failed, match="log_freq"):
        bench.tpplan_steps(tmp_path, 4)


def test_measure_plan_in_a_fresh_process(tmp_path):
    row = bench.measure_plan([str(SPECS / "tiny-llama.yaml")], tmp_path)
    assert row["tp"] == 2 and row["dp"] == 1 and row["ranks"] == 2
    assert row["wall_s"] > 0 and row["peak_rss_mib"] > 0 and row["simulate_s"] is not None


def test_handwritten_trains_on_the_rows_train_py_trains_on():
    """Same corpus, tokenizer, packing and sampler order as the generated script (tpplan.runtime)."""
    import datasets
    from torch.utils.data import BatchSampler, DistributedSampler

    from benchmarks import handwritten_tp
    from tpplan.runtime.helpers import build_byte_bpe_tokenizer, pack_token_ids

    corpus = SPECS / "data" / "tiny-alpaca.jsonl"
    seq, batch, vocab, steps = 64, 4, 512, 5
    texts = [t for t in datasets.load_dataset("json", data_files=[str(corpus)], split="train")["text"] if t]
    tokenizer = build_byte_bpe_tokenizer(texts, vocab_size=vocab)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    rows = pack_token_ids(ids, tokenizer.eos_token_id, seq + 1)
    sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    expected = [rows[indices] for indices in itertools.islice(BatchSampler(sampler, batch, drop_last=True), steps)]

    args = SimpleNamespace(data=str(corpus), bpe_vocab=vocab, seq=seq, batch=batch, steps=steps, seed=0)
    got = handwritten_tp.make_batches(args)
    assert len(got) == steps
    for a, b in zip(got, expected, strict=True):
        assert a.equal(b)


def test_readme_section_is_replaced_between_its_markers():
    readme = f"# tpplan\n\n## Benchmarks\n\nintro\n\n{bench.README_BEGIN}\nold table\n{bench.README_END}\n\n## Next\n"
    report = "# tpplan benchmarks\n\nCommand: `x`\n\n## 1. Step time\n\n| a |\n"
    updated = bench.readme_with(readme, report)
    assert updated == (f"# tpplan\n\n## Benchmarks\n\nintro\n\n{bench.README_BEGIN}\nCommand: `x`\n\n"
                       f"#### 1. Step time\n\n| a |\n{bench.README_END}\n\n## Next\n")
    assert bench.readme_with(updated, report) == updated
    with pytest.raises(ValueError, match="no"):
        bench.readme_with("# no markers\n", report)
    assert bench.README_BEGIN in (REPO / "README.md").read_text()
