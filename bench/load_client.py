"""WebSocket fan-out load: N clients speaking chatlib's protocol, in a process of their own.

``python bench/load_client.py --port P -n N -m M --server-pid PID [--mode burst|closed]
[--compression none|deflate]`` prints one JSON line of results.

Every client opens ``ws://127.0.0.1:P/ws`` and sends ``{"type": "hello", "user": ..., "after":
<last id seen, 0 on a fresh server>}``. Client #0 is also the sender: it sends M frames
``{"type": "message", "text": "m <seq> <monotonic ns> <pad>"}`` (~100 bytes on the wire). Every
client, the sender included, must receive all M; it parses each frame as JSON, keeps the
``message`` ones and takes the latency from the timestamp in ``text`` (the sender is in this
process, so one clock). chatlib answers with ``{"type": "message", "id", "ts", "user", "text"}``
(plus presence frames, which are skipped); the baseline forwards the sender's frame verbatim.
So that the load client's work per delivery is the same for both (one ``json.loads`` of the same
size and shape, one ``split``), the sender's frames also carry ``id``, ``ts`` and ``user`` fields
in chatlib's order: chatlib ignores them (it reads ``type`` and ``text``), the baseline copies
them. Without them the baseline's frames would be ~45 bytes shorter and ~0.5 µs cheaper to parse.

Receivers share one nickname (``load``; the sender is ``sender``). chatlib broadcasts the whole
presence list whenever it changes, so N distinct nicknames would make the connect phase send
O(N^2) presence frames; that is measured separately (``--users distinct``), not mixed into the
fan-out numbers.

Before timing, a barrier: the sender sends ``sync <k>`` messages until every client has seen one,
so the server has registered everyone. Then (reading /proc/PID/stat around the timed phase):

* ``burst``: the sender sends all M back-to-back (awaiting each send): throughput, and latency
  that is mostly queueing;
* ``closed``: message i+1 is sent only when all N clients got message i: unloaded latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

PAD = "x" * 40  # frame text ~ "m 123 1234567890123456789 xxxx..." -> ~100-byte frames


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # as chatlib does


def proc_cpu(pid: int) -> tuple[float, float, float]:
    """(user, sys, total) CPU seconds of a process.

    user and sys come from /proc/PID/stat in clock ticks (10 ms); total, which is user+sys,
    comes from /proc/PID/task/*/schedstat in nanoseconds, precise enough for runs under 1 s.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return int(fields[11]) / tick, int(fields[12]) / tick, total_ns / 1e9


def system_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle/iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def percentile(sorted_values: list, p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def summary(n, m, delivered, lat_ns, t0, t_end, cpu0, cpu1, my0, my1, sys0, sys1) -> dict:
    """Results of the timed phase; ``other_cpu_s`` is CPU used by neither server nor load
    (other processes on the machine) while it ran: a check that the measurement was clean."""
    lat_ns.sort()
    total_s = (t_end - t0) / 1e9
    user_s, sys_s, cpu_s = (after - before for after, before in zip(cpu1, cpu0, strict=True))
    return dict(
        N=n, M=m, delivered=delivered, expected=n * m, total_s=total_s,
        deliveries_per_s=delivered / total_s if total_s > 0 else 0,
        lat_p50_ms=percentile(lat_ns, 50) / 1e6, lat_p99_ms=percentile(lat_ns, 99) / 1e6,
        lat_max_ms=lat_ns[-1] / 1e6 if lat_ns else float("nan"),
        server_cpu_s=cpu_s, server_utime_s=user_s, server_stime_s=sys_s,
        server_cpu_us_per_delivery=cpu_s / max(delivered, 1) * 1e6,
        server_user_us_per_delivery=user_s / max(delivered, 1) * 1e6,
        server_sys_us_per_delivery=sys_s / max(delivered, 1) * 1e6,
        client_cpu_s=my1 - my0, client_busy=(my1 - my0) / total_s if total_s > 0 else 0.0,
        other_cpu_s=max(0.0, (sys1 - sys0) - (user_s + sys_s) - (my1 - my0)),
    )


async def timed_phase(send_all, all_done: asyncio.Event, timeout: float, server_pid: int):
    """Run ``send_all()`` until every delivery is in (``all_done``) or ``timeout`` passes.

    Returns ``(timed_out, t_stop_ns, (server_cpu, own_cpu, system_busy))`` read at the end.
    """
    sending = asyncio.create_task(send_all())
    timed_out = False
    try:
        await asyncio.wait_for(all_done.wait(), max(1.0, timeout))
        await sending
    except TimeoutError:
        timed_out = True
        sending.cancel()
    t_stop = time.monotonic_ns()
    return timed_out, t_stop, (proc_cpu(server_pid), time.process_time(), system_busy_s())


async def run(a: argparse.Namespace) -> dict:
    url = f"ws://127.0.0.1:{a.port}/ws"
    compression = "deflate" if a.compression == "deflate" else None
    n, m, loop = a.n, a.m, asyncio.get_running_loop()
    deadline = loop.time() + a.timeout
    conns: list = [None] * n
    gate = asyncio.Semaphore(50)  # bounded connect concurrency (listen backlog)

    def nickname(i: int) -> str:
        if i == 0:
            return "sender"
        return f"load{i}" if a.users == "distinct" else "load"

    async def open_one(i: int) -> None:
        async with gate:
            ws = await connect(url, compression=compression, ping_interval=None,
                               open_timeout=30, close_timeout=5, max_queue=64,
                               max_size=2**22)
            await ws.send(json.dumps({"type": "hello", "user": nickname(i), "after": 0}))
            conns[i] = ws

    synced = [False] * n
    got = [0] * n
    last_recv = [0] * n
    lat: list[int] = []
    per_seq: dict[int, int] = {}
    seq_done = asyncio.Event()
    all_done = asyncio.Event()
    remaining = [n]
    closes: list = []  # (client, close code) of connections the server closed early
    other_frames = [0]

    async def reader(i: int, ws) -> None:
        loads, mono, record = json.loads, time.monotonic_ns, lat.append
        closed_mode = a.mode == "closed"
        try:
            async for raw in ws:
                now = mono()
                frame = loads(raw)
                if frame.get("type") != "message":
                    other_frames[0] += 1  # presence, typing, error
                    continue
                text = frame["text"]
                if text[0] == "s":  # "sync <k>"
                    synced[i] = True
                    continue
                _, seq, ts, _ = text.split(" ", 3)
                record(now - int(ts))
                got[i] += 1
                last_recv[i] = now
                if closed_mode:
                    count = per_seq.get(seq, 0) + 1
                    per_seq[seq] = count
                    if count == n:
                        seq_done.set()
                if got[i] == m:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        all_done.set()
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                closes.append((i, exc.rcvd.code))
            if got[i] < m:  # closed early (1013: chatlib's queue for it overflowed): give up
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

    t_c0 = time.monotonic()
    readers = []
    try:
        await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(n))), a.timeout)
        connect_s = time.monotonic() - t_c0
        ext = conns[0].response.headers.get("Sec-WebSocket-Extensions")
        readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(conns)]
        sender = conns[0]

        # Barrier: the server has registered every client once each has seen a sync message.
        for k in range(400):  # bounded: <= 400 x 50 ms
            await sender.send(json.dumps({"type": "message", "text": f"sync {k}"}))
            await asyncio.sleep(0.05)
            if all(synced):
                break
        else:
            raise RuntimeError(f"sync barrier failed: {sum(synced)}/{n} clients registered")
        ready_s = time.monotonic() - t_c0  # connected, and registered by the server
        await asyncio.sleep(0.3)  # let in-flight sync copies drain
        rss_connected = status_kb(a.server_pid)

        cpu0, my0, sys0 = proc_cpu(a.server_pid), time.process_time(), system_busy_s()
        t0 = time.monotonic_ns()

        async def send_all() -> None:
            for seq in range(m):
                if a.mode == "closed":
                    seq_done.clear()
                text = f"m {seq} {time.monotonic_ns()} {PAD}"
                await sender.send(dumps({"type": "message", "id": seq, "ts": time.time(),
                                         "user": "sender", "text": text}))
                if a.mode == "closed":
                    await seq_done.wait()

        timed_out, t_stop, (cpu1, my1, sys1) = await timed_phase(
            send_all, all_done, deadline - loop.time(), a.server_pid)
        t_end = max(last_recv) if any(last_recv) else t_stop
        rss_after = status_kb(a.server_pid)
        res = summary(n, m, sum(got), lat, t0, t_end, cpu0, cpu1, my0, my1, sys0, sys1)
        res.update(mode=a.mode, compression=a.compression, negotiated_ext=ext,
                   users=a.users, connect_s=round(connect_s, 3), ready_s=round(ready_s, 3),
                   timed_out=timed_out,
                   server_VmRSS_connected_kB=rss_connected, server_VmRSS_after_kB=rss_after,
                   early_closes=len(closes), early_close_codes=sorted({c for _, c in closes}),
                   other_frames=other_frames[0])
        return res
    finally:
        for task in readers:
            task.cancel()

        async def close(ws) -> None:
            try:
                await asyncio.wait_for(ws.close(), 5)
            except Exception:
                pass

        await asyncio.wait_for(asyncio.gather(*(close(ws) for ws in conns if ws is not None),
                                              return_exceptions=True), 60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, required=True, help="clients (the sender is one of them)")
    p.add_argument("-m", type=int, required=True, help="messages the sender sends")
    p.add_argument("--server-pid", type=int, required=True, help="for CPU and RSS from /proc")
    p.add_argument("--mode", choices=["burst", "closed"], default="burst")
    p.add_argument("--compression", choices=["none", "deflate"], default="none")
    p.add_argument("--users", choices=["shared", "distinct"], default="shared")
    p.add_argument("--timeout", type=float, default=120)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
