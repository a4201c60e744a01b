"""A classroom in one kernel: ``python bench/classroom.py [--quick]`` (issue 11, target 4).

**kernel**: a real ipykernel, started with ``jupyter_client``'s ``KernelManager`` as JupyterLab
does (the venv's ``python3`` kernelspec), pinned to CPU 0 (``taskset -a -p -c 0``). The server
is started in it exactly as a learner does in notebook 01::

    import chatlib
    server = await chatlib.start_server(limits=chatlib.Limits(admit_rate=0))

with chatlib's default limits, but for admission control (off: N clients connecting as fast
as they can are a storm the server would spread at 100 new sessions/s; bench/storm.py
measures that). The load's senders each send far below the
per-connection limit (5/s, bursts of 20), and the whole room's 10 messages/s from 127.0.0.1
stays below the per-address limit (50/s, bursts of 200). Then ``classroom_load.py`` (pinned
to CPU 1) opens N WebSocket clients, waits until all are registered, and chats at ``--rate``
messages/s in total for ``--duration`` seconds, checking that every client gets every
message in order, once. Meanwhile this process (on CPU 1 too) runs the cell ``1+1``
through the kernel client, one every ``--cell-interval`` s, and times each from
``execute`` to having both the ``execute_result`` (IOPub) and the ``execute_reply``
(shell). The same cell is timed with no load (server started, nobody connected) as the
baseline, and with the room connected but silent. Kernel memory: VmRSS from
/proc/PID/status before the server starts, after, with N connected, after the chat; VmHWM.
Any IOPub ``stream`` output that no timed cell asked for (the server printing into a cell)
is counted.

**cli**: ``python -m chatlib serve`` (CPU 0) with ``--cli-clients`` clients (10,000), chatting
for ``--cli-duration`` s at ``--cli-rate`` (2/s: at 10/s the load process, not the server, is
the bottleneck): RSS idle / connected / after and KiB per connection.

Results: one JSON line per run in ``bench/results/classroom-<date>.jsonl``, a table on stdout.
Run it under the shared lock: ``flock /tmp/bench.lock .venv/bin/python bench/classroom.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

from fanout import stop_server
from jupyter_client.manager import KernelManager
from load_client import status_kb

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PY = sys.executable
START_CELL = ("import chatlib\nserver = await chatlib.start_server("
              "limits=chatlib.Limits(admit_rate=0))\nserver.port")
PIN = True


def taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if PIN else []


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (/proc/PID/stat, 10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle/iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


class Load:
    """classroom_load.py in a process of its own; its JSON lines arrive on a queue."""

    def __init__(self, port: int, pid: int, n: int, rate: float, duration: float) -> None:
        cmd = [PY, os.path.join(BENCH, "classroom_load.py"), "--port", str(port), "-n", str(n),
               "--rate", str(rate), "--duration", str(duration), "--server-pid", str(pid)]
        self.proc = subprocess.Popen(taskset(1) + cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float) -> dict:
        try:
            record = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"load process silent for {timeout} s") from None
        if record is None or record.get("phase") == "error":
            raise RuntimeError(f"load process failed: {record or self.proc.stderr.read()[-2000:]}")
        return record

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Kernel:
    """A real ipykernel and a blocking client; ``cell()`` times one ``1+1``."""

    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=ROOT)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.pid = self.km.provisioner.pid
        if PIN:  # every thread of the kernel (and those it starts later) on CPU 0
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(self.pid)],
                           check=True, capture_output=True)
        self.stray: list[str] = []  # stream output no timed cell asked for

    def run(self, code: str, timeout: float = 60) -> dict:
        """Execute ``code``; the execute_result's text/plain (or raise with the error)."""
        msg_id = self.kc.execute(code, store_history=False)
        reply = self._reply(msg_id, timeout)
        result = None
        while True:  # bounded by the timeout of get_iopub_msg
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                self._note(msg)
                continue
            if msg["msg_type"] == "execute_result":
                result = msg["content"]["data"]["text/plain"]
            elif msg["msg_type"] == "stream":
                self.stray.append(msg["content"]["text"][:300])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"cell failed: {reply['content']}")
        return {"result": result}

    def cell(self, timeout: float = 30) -> float:
        """Seconds from sending ``1+1`` to having its execute_result and its execute_reply."""
        t0 = time.perf_counter()
        msg_id = self.kc.execute("1+1", store_history=False)
        result = reply = False
        while not (result and reply):  # bounded by the timeouts
            if not result:
                msg = self.kc.get_iopub_msg(timeout=timeout)
                if msg["parent_header"].get("msg_id") == msg_id:
                    result = msg["msg_type"] == "execute_result"
                else:
                    self._note(msg)
            else:
                self._reply(msg_id, timeout)
                reply = True
        rtt = time.perf_counter() - t0
        self._drain()
        return rtt

    def _reply(self, msg_id: str, timeout: float) -> dict:
        while True:  # bounded by get_shell_msg's timeout
            msg = self.kc.get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def _note(self, msg: dict) -> None:
        if msg["msg_type"] == "stream":
            self.stray.append(msg["content"]["text"][:300])

    def _drain(self) -> None:
        while self.kc.iopub_channel.msg_ready():
            self._note(self.kc.get_iopub_msg(timeout=1))

    def cells(self, seconds: float, interval: float, until=None) -> list[float]:
        """Time ``1+1`` every ``interval`` s for ``seconds`` (or until ``until()`` is true)."""
        rtts = []
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            rtts.append(self.cell())
            time.sleep(interval)
        return rtts

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def rtt_stats(prefix: str, rtts: list[float]) -> dict:
    ms = [r * 1000 for r in rtts]
    return {f"{prefix}_cells": len(ms), f"{prefix}_p50_ms": pct(ms, 50),
            f"{prefix}_p99_ms": pct(ms, 99), f"{prefix}_max_ms": max(ms, default=float("nan"))}


def kernel_run(a: argparse.Namespace, n: int) -> dict:
    kernel = Kernel()
    load = None
    try:
        res = {"section": "kernel", "N": n, "rate": a.rate, "duration": a.duration,
               "kernel_argv0": kernel.km.kernel_spec.argv[0]}
        kernel.cells(1.0, a.cell_interval)  # warm-up (first cells import things)
        res["VmRSS_kernel_kB"] = status_kb(kernel.pid)
        if a.fanout_slice is not None:  # A/B of hub.FANOUT_SLICE (not what a learner does)
            kernel.run(f"import chatlib.hub\nchatlib.hub.FANOUT_SLICE = {a.fanout_slice}")
            res["fanout_slice"] = a.fanout_slice
        port = int(kernel.run(START_CELL)["result"])
        time.sleep(0.5)
        res["VmRSS_idle_kB"] = status_kb(kernel.pid)
        res.update(rtt_stats("rtt_idle", kernel.cells(a.baseline_s, a.cell_interval)))
        load = Load(port, kernel.pid, n, a.rate, a.duration)
        res.update(load.next(timeout=180))  # connected
        res["VmRSS_connected_kB"] = status_kb(kernel.pid)
        res.update(rtt_stats("rtt_connected", kernel.cells(a.baseline_s, a.cell_interval)))
        cpu0, t0, sys0, me0 = cpu_s(kernel.pid), time.monotonic(), system_busy_s(), \
            time.process_time()
        load.go()
        spy = None
        if a.profile:  # py-spy (pip install py-spy) samples the kernel while the room chats
            spy = subprocess.Popen(["py-spy", "record", "-p", str(kernel.pid), "-d",
                                    str(int(a.duration)), "-o", a.profile, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rtts = kernel.cells(a.duration, a.cell_interval)
        if spy is not None:
            spy.wait(60)
        res.update(rtt_stats("rtt_load", rtts))
        res.update(load.next(timeout=a.duration + 120))  # done
        # The kernel's CPU while the room chats (deliveries, cells, the kernel's own threads).
        res["kernel_busy"] = (cpu_s(kernel.pid) - cpu0) / (time.monotonic() - t0)
        # CPU used by other processes on the machine meanwhile: a disturbed run shows here.
        res["other_cpu_s"] = max(0.0, system_busy_s() - sys0 - (cpu_s(kernel.pid) - cpu0)
                                 - res["load_cpu_s"] - (time.process_time() - me0))
        res["kernel_cpu_us_per_delivery"] = ((cpu_s(kernel.pid) - cpu0)
                                             / max(res["delivered"], 1) * 1e6)
        res["VmRSS_after_kB"] = status_kb(kernel.pid)
        res["VmHWM_kB"] = status_kb(kernel.pid, "VmHWM")
        kernel._drain()
        res["stray_output"] = len(kernel.stray)
        res["stray_sample"] = kernel.stray[:3]
        return res
    finally:
        if load is not None:
            load.stop()
        kernel.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_run(a: argparse.Namespace, n: int) -> dict:
    port = free_port()
    proc = subprocess.Popen(taskset(0) + [PY, "-m", "chatlib", "serve", "--port", str(port),
                                          "--admit-rate", "0"],  # a classroom joins at once
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    load = None
    try:
        with selectors.DefaultSelector() as sel:  # ready when it prints "serving on" (20 s)
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=20) or "serving on" not in proc.stdout.readline():
                raise RuntimeError("chatlib serve did not start")
        time.sleep(0.3)
        res = {"section": "cli", "N": n, "rate": a.cli_rate, "duration": a.cli_duration,
               "VmRSS_idle_kB": status_kb(proc.pid)}
        load = Load(port, proc.pid, n, a.cli_rate, a.cli_duration)
        res.update(load.next(timeout=240))
        res["VmRSS_connected_kB"] = status_kb(proc.pid)
        load.go()
        res.update(load.next(timeout=a.cli_duration + 120))
        res["VmRSS_after_kB"] = status_kb(proc.pid)
        res["VmHWM_kB"] = status_kb(proc.pid, "VmHWM")
        res["KiB_per_connection"] = (res["VmRSS_connected_kB"] - res["VmRSS_idle_kB"]) / n
        return res
    finally:
        if load is not None:
            load.stop()
        err = stop_server(proc)
        if "Traceback" in err:
            sys.stderr.write(f"[chatlib serve stderr] {err}\n")


def mib(kb) -> str:
    return f"{kb / 1024:.0f}" if kb else "-"


def med(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def table(results: list[dict]) -> str:
    out = []
    kernel = [r for r in results if r["section"] == "kernel" and "error" not in r]
    if kernel:
        r0 = kernel[0]
        out += [f"\n**classroom: chatlib in an ipykernel, N={r0['N']:,} WebSocket clients, "
                f"{r0['rate']:g} messages/s for {r0['duration']:g} s** — median of "
                f"{len(kernel)} run(s)\n",
                "| kernel VmRSS MiB: before server / server idle / connected / after / VmHWM "
                "| delivered / expected | in order, once | delivery p50 / p99 ms "
                "| cell `1+1` RTT p50 / p99 ms: no load / connected, silent / chatting "
                "| stray output |",
                "|---:|---:|---|---:|---:|---:|"]
        out.append(
            f"| {mib(med(kernel, 'VmRSS_kernel_kB'))} / {mib(med(kernel, 'VmRSS_idle_kB'))} / "
            f"{mib(med(kernel, 'VmRSS_connected_kB'))} / {mib(med(kernel, 'VmRSS_after_kB'))} / "
            f"{mib(med(kernel, 'VmHWM_kB'))} "
            f"| {sum(r['delivered'] for r in kernel):,} / {sum(r['expected'] for r in kernel):,} "
            f"| {all(r['order_errors'] == 0 and not r['lost_early'] for r in kernel)} "
            f"| {med(kernel, 'lat_p50_ms'):.1f} / {med(kernel, 'lat_p99_ms'):.1f} "
            f"| {med(kernel, 'rtt_idle_p50_ms'):.1f} / {med(kernel, 'rtt_idle_p99_ms'):.1f}; "
            f"{med(kernel, 'rtt_connected_p50_ms'):.1f} / "
            f"{med(kernel, 'rtt_connected_p99_ms'):.1f}; "
            f"{med(kernel, 'rtt_load_p50_ms'):.1f} / {med(kernel, 'rtt_load_p99_ms'):.1f} "
            f"| {sum(r['stray_output'] for r in kernel)} |")
        out.append(f"\nConnect: {med(kernel, 'connect_s'):.1f} s for all. While the room "
                   f"chats the kernel is busy {med(kernel, 'kernel_busy'):.0%} of CPU 0 "
                   f"({med(kernel, 'kernel_cpu_us_per_delivery'):.1f} µs of CPU per "
                   f"delivery, cells included), the load process "
                   f"{med(kernel, 'load_busy'):.0%} of CPU 1; other processes used "
                   f"{med(kernel, 'other_cpu_s'):.1f} s of CPU meanwhile (median).")
    cli = [r for r in results if r["section"] == "cli" and "error" not in r]
    if cli:
        r0 = cli[0]
        out += [f"\n**classroom (CLI): `python -m chatlib serve`, N={r0['N']:,} WebSocket "
                f"clients, {r0['rate']:g} messages/s for {r0['duration']:g} s** — median of "
                f"{len(cli)} run(s)\n",
                "| VmRSS MiB idle / connected / after / VmHWM | KiB per connection "
                "| delivered / expected | in order, once | delivery p50 / p99 ms |",
                "|---:|---:|---:|---|---:|"]
        out.append(
            f"| {mib(med(cli, 'VmRSS_idle_kB'))} / {mib(med(cli, 'VmRSS_connected_kB'))} / "
            f"{mib(med(cli, 'VmRSS_after_kB'))} / {mib(med(cli, 'VmHWM_kB'))} "
            f"| {med(cli, 'KiB_per_connection'):.1f} "
            f"| {sum(r['delivered'] for r in cli):,} / {sum(r['expected'] for r in cli):,} "
            f"| {all(r['order_errors'] == 0 and not r['lost_early'] for r in cli)} "
            f"| {med(cli, 'lat_p50_ms'):.1f} / {med(cli, 'lat_p99_ms'):.1f} |")
    failed = [r for r in results if "error" in r]
    if failed:
        out.append(f"\n{len(failed)} run(s) failed: " + "; ".join(r["error"][-300:]
                                                              for r in failed))
    return "\n".join(out) + "\n"


def run_all(a: argparse.Namespace) -> list[dict]:
    """Every run of the section, in order; each result is also printed as it comes."""
    results = []
    plan = [("kernel", a.clients)] * a.reps + ([("cli", a.cli_clients)] if a.cli_clients else [])
    for section, n in plan:
        started = time.monotonic()
        for attempt in range(1, a.retries + 2):  # bounded: a disturbed run is repeated
            try:
                res = kernel_run(a, n) if section == "kernel" else cli_run(a, n)
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, the rest go on
                res = {"section": section, "N": n, "error": f"{type(exc).__name__}: {exc}"}
            res["attempt"] = attempt
            other = res.get("other_cpu_s", 0.0)
            if other <= a.max_other * a.duration:
                break
            print(f"    (disturbed: other processes used {other:.1f} s of CPU; again)",
                  flush=True)
        res["wall_s"] = round(time.monotonic() - started, 1)
        results.append(res)
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()
                 if k not in ("errors", "stray_sample")}
        print(f"[{section} N={n}] {json.dumps(brief)}", flush=True)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=5000, help="WebSocket clients (kernel)")
    p.add_argument("--rate", type=float, default=10.0, help="messages per second, in total")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of chat")
    p.add_argument("--cell-interval", type=float, default=0.05,
                   help="seconds between two timed cells")
    p.add_argument("--baseline-s", type=float, default=10.0,
                   help="seconds of timed cells with no load, and with the room silent")
    p.add_argument("--cli-clients", type=int, default=10000,
                   help="clients of `python -m chatlib serve` (0: skip)")
    p.add_argument("--cli-duration", type=float, default=10.0)
    p.add_argument("--cli-rate", type=float, default=2.0,
                   help="messages/s with the CLI's clients (10 with 10,000 clients is 100,000 "
                        "deliveries/s: more than the load process can read on one core)")
    p.add_argument("--max-other", type=float, default=0.2,
                   help="a kernel run during which other processes used more than this "
                        "fraction of a core is repeated (default 0.2) ...")
    p.add_argument("--retries", type=int, default=2, help="... at most this many times")
    p.add_argument("--fanout-slice", type=int, default=None,
                   help="set chatlib.hub.FANOUT_SLICE in the kernel first (an A/B knob)")
    p.add_argument("--profile", metavar="SVG", help="py-spy flame graph of the kernel while "
                   "the room chats (e.g. bench/profiles/classroom-kernel.svg)")


def configure(a: argparse.Namespace) -> None:
    """--quick: 1,000 clients in the kernel, 10 s, 2,000 from the CLI; one repetition."""
    global PIN
    if a.quick:
        a.clients, a.duration, a.baseline_s = min(a.clients, 1000), 10.0, 5.0
        a.cli_clients, a.cli_duration = min(a.cli_clients, 2000), 5.0
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 3)
    PIN = not getattr(a, "no_pin", False) and os.cpu_count() >= 2 and bool(
        subprocess.run(["which", "taskset"], capture_output=True).stdout)
    if PIN:  # this process (the cell timer) shares CPU 1 with the load, not the kernel's
        os.sched_setaffinity(0, {1})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="kernel runs (default 3; quick 1)")
    p.add_argument("--no-pin", action="store_true", help="don't use taskset")
    a = p.parse_args()
    configure(a)
    os.makedirs(os.path.join(BENCH, "results"), exist_ok=True)
    path = os.path.join(BENCH, "results", f"classroom-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    results = run_all(a)
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(table(results))
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
