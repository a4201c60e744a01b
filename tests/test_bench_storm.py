"""bench/storm.py: a tiny reconnect storm, checked for what must hold on any machine.

20 clients in their own process, 30 messages to catch up each, every mode: every client is
back, nothing lost or duplicated, every live message of the bystander came back, and the
figures are in order (first history before the last client is back). No timing is asserted.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import storm  # noqa: E402


@pytest.mark.parametrize("mode", storm.MODES)
def test_storm_brings_every_client_back_with_nothing_lost(mode) -> None:
    n, catch_up = 20, 30
    result = asyncio.run(storm.trial(mode, n, catch_up, live_rate=20, base=0.2,
                                     admit_rate=50, timeout=60))
    assert result["mode"] == mode and result["n"] == n
    assert result["back"] == n and result["final_missing"] == 0, result
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["attempts"] >= n  # every client tried at least once after the restart
    restarts = sum(k for key, k in result["closes"].items() if key.split()[0] == "1012")
    assert restarts == n  # every one was told: service restart
    assert result["clients_cpu_share"] >= 0
    assert len(result["firsts"]) == n
    if mode in storm.HINTED:  # the server never admitted more than its bucket allows
        assert result["server_admitted"] >= n
        assert result["worst_1s"] <= result["worst_1s_bound"], result
    if mode == "spread":  # each with its own delay
        assert result["closes"].get("1012 restart: retry after S s") == n, result["closes"]
    assert 0 < result["first_history_p50_s"] <= result["first_history_p99_s"] \
        <= result["all_back_s"]
    assert result["bystander_received"] == result["bystander_sent"] > 0
    assert 0 <= result["bystander_p50_ms"] <= result["bystander_p99_ms"] \
        <= result["bystander_max_ms"]
    assert result["server_cpu_s"] > 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux and two CPUs this process may use")
def test_a_pinned_storm_replays_pages_in_slices_and_gives_the_cpus_back() -> None:
    """``--catch-up`` above a replay slice (chatlib.limits.REPLAY_SLICE): nothing lost or
    duplicated; the trial says where it ran, and leaves this process where it was."""
    from chatlib.limits import REPLAY_SLICE

    before = os.sched_getaffinity(0)
    n, catch_up = 20, 2 * REPLAY_SLICE + 17
    result = asyncio.run(storm.trial("admission", n, catch_up, live_rate=20, admit_rate=50,
                                     timeout=60, pin=True))
    assert result["back"] == n and result["lost"] == 0 and result["duplicated"] == 0, result
    mine = sorted(before)
    assert result["pinned"] == dict(server=mine[:1], clients=mine[1:], bystander=mine[:1])
    assert os.sched_getaffinity(0) == before


def test_next_delay_policies() -> None:
    assert storm.next_delay("naive", 0) == 0.0
    assert storm.next_delay("naive", 3, naive_delay=0.25) == 0.25
    draws = [storm.next_delay("jitter", k, base=1.0, cap=8.0) for k in range(8) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in draws) and max(draws) > 4  # capped, and spread
    assert storm.next_delay("admission", 5, server_delay=2.5) == 2.5  # told: obeyed
    assert storm.next_delay("spread", 0, server_delay=0.7) == 0.7
    assert storm.next_delay("jitter", 0, server_delay=2.5) <= 1.0  # not told: ignored


def test_message_ids_are_read_from_chatlib_frames() -> None:
    from chatlib import wire
    from chatlib.store import Message

    frame = wire.ws_frame(Message(id=4711, ts=1.5, user="a", text='{"id":1},'))
    assert frame.startswith(storm.MESSAGE_ID)  # the fast path, not the JSON fallback
    assert storm.message_id(frame) == 4711
    assert storm.message_id('{"type":"message","ts":1,"id":12}') == 12


def test_summary_takes_medians_and_sums_losses() -> None:
    trials = [dict(mode="naive", lost=0, duplicated=0, **{k: v for k in storm.SUMMARY_KEYS
                                                          if k not in ("lost", "duplicated")})
              for v in (1.0, 3.0, 2.0)]
    trials[1]["lost"] = 2
    summary = storm.summarize(trials)["naive"]
    assert summary["all_back_s"] == 2.0 and summary["lost"] == 2 and summary["trials"] == 3


def test_readme_shows_the_saved_storms() -> None:
    """bench/README.md's storm table is the saved JSON's (review of chapter 12: a README and
    a JSON from different runs), and the saved run lost and duplicated nothing."""
    import json

    with open(os.path.join(BENCH, "storm-results.json")) as f:
        saved = json.load(f)
    with open(os.path.join(BENCH, "README.md")) as f:
        readme = f.read()
    assert storm.readme_table(saved) in readme
    assert all(r["lost"] == 0 and r["duplicated"] == 0 for r in saved["summary"].values())


def test_handshake_burst_refuses_the_crowd_while_the_bystander_chats() -> None:
    """bench/handshake_burst.py, unpatched (no gate, no step timing): the crowd is refused
    with 1013 past the admission burst, and the bystander's messages all came back."""
    import handshake_burst

    result = asyncio.run(handshake_burst.burst(30, admit_rate=1.0))
    codes = result["crowd"]  # {close code: clients}
    assert sum(codes.values()) == 30 and codes.get("1013", 0) >= 25, codes
    assert result["bystander_received"] > 0 and result["server_cpu_s"] > 0
    assert result["long_steps"] == 0  # not timed here
