"""benchmarks/comm_bytes.py: bytes per step of four Llama-3.1-8B plans at tp=8 (simulated; ~10 s).

The numbers are the ones measured here and recorded in the design notes (ring bytes sent per rank,
seq 1024, batch 1, bf16): plain 3.30 GiB, SP 1.99 GiB, SP + loss parallel 1.78 GiB."""

from __future__ import annotations

import pytest

from benchmarks.comm_bytes import PLANS, comm_bytes, markdown

GIB = 2**30


@pytest.mark.slow
def test_comm_bytes_of_the_8b_plans():
    rows = {r["plan"]: r for r in comm_bytes()}
    assert list(rows) == [name for name, _, _ in PLANS]
    assert rows["chapter-plain"]["ring_bytes"] / GIB == pytest.approx(3.30, abs=0.01)
    assert rows["chapter-sp"]["ring_bytes"] / GIB == pytest.approx(1.99, abs=0.01)
    assert rows["llama3"]["ring_bytes"] / GIB == pytest.approx(1.78, abs=0.01)
    assert rows["chapter-plain"]["ratio_to_floor"] == pytest.approx(1.88, abs=0.01)
    assert rows["llama3"]["ratio_to_floor"] == pytest.approx(1.02, abs=0.01)
    # the colwise embedding swaps the embedding's reduce-scatter for a smaller all-to-all
    assert rows["colwise-embedding"]["ring_bytes"] < rows["llama3"]["ring_bytes"]
    assert rows["chapter-plain"]["ratio_to_first"] == 1.0
    table = markdown(list(rows.values()))
    assert table.count("\n| `") == 4 and "vs chapter-plain" in table
