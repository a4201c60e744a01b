"""bench/capacity.py: one tiny step and the search's logic, checked for what must hold.

No timing is asserted: 20 clients and 5 broadcasts must all be delivered, by one process and
by three behind nginx on Redis (skipped without redis-server and nginx) (the share of
broadcasts within the bound is a fraction, the percentiles are ordered), and the search
doubles, then bisects, on a fake measurement.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from chatlib.cluster import missing_programs

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import capacity  # noqa: E402


@pytest.mark.parametrize("setup", [
    capacity.ONE,
    pytest.param(capacity.THREE, marks=pytest.mark.skipif(
        bool(missing_programs()), reason=f"needs {', '.join(missing_programs())}")),
])
def test_one_step_delivers_every_broadcast_to_every_client(setup) -> None:
    step = asyncio.run(capacity.measure(20, broadcasts=5, interval=0.05, timeout=60,
                                        setup=setup))
    assert step["n"] == 20 and step["broadcasts"] == 5
    assert step["incomplete"] == 0, step          # every client got every broadcast
    assert 0.0 <= step["within_share"] <= 1.0
    assert 0 <= step["p50_all_ms"] <= step["p95_all_ms"] < float("inf")
    assert step["server_cpu_s"] > 0 and step["clients_cpu_share"] >= 0


def test_search_doubles_then_bisects(monkeypatch) -> None:
    limit = 700  # a fake server that meets the criterion up to 700 clients

    async def fake(n, broadcasts=20, **_):
        return dict(n=n, within_share=1.0 if n <= limit else 0.5)

    monkeypatch.setattr(capacity, "measure", fake)
    result = asyncio.run(capacity.search(100, 10_000, 5, 0.1))
    tried = [s["n"] for s in result["steps"]]
    assert tried[:4] == [100, 200, 400, 800]      # doubling until the first failure
    assert result["capacity"] <= limit < result["first_failing"]
    assert result["first_failing"] - result["capacity"] <= 0.1 * result["capacity"]


def test_readme_shows_the_saved_search() -> None:
    """bench/README.md's capacity table and figure are the saved JSON's (review of chapter
    12: a README and a JSON from different runs)."""
    import json

    with open(os.path.join(BENCH, "capacity-results.json")) as f:
        saved = json.load(f)
    with open(os.path.join(BENCH, "README.md")) as f:
        readme = f.read()
    assert capacity.readme_table(saved) in readme
    assert f"**Capacity: {saved['setups']['one process']['capacity']} clients**" in readme
