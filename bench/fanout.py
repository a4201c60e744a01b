"""chatlib's fan-out benchmark: ``make bench`` (= ``.venv/bin/python bench/fanout.py``).

Every run starts a fresh server process pinned to CPU 0 (``taskset -c 0``), runs one load process
pinned to CPU 1 (``taskset -c 1``), reads the server's CPU time and memory from /proc, and stops
the server by PID. Sections (see bench/README.md for the method and the results):

* ``ws-burst``   WebSocket fan-out, N=100 (M=1000) and N=1000 (M=100), chatlib vs a raw
                 ``websockets`` broadcast server, alternating runs (A B A B ...), medians;
                 a third row, "reference: Node.js ws" (bench/node/server.js), when Node.js
                 and ``npm ci --prefix bench/node`` are there (``make bench`` runs it);
* ``ws-closed``  the same, closed loop (next message once everyone got the previous one);
* ``ws-open``    open loop: N=100 at 100 messages/s and N=1000 at 20/s for 30 s (5 s with
                 ``--quick``), latency from each message's scheduled send time to when the
                 kernel received the frame and to when the load read it, both servers (2
                 runs each), Node.js once at N=1000;
* ``http``       long-poll and SSE fan-out at N=100 (chatlib only; a WebSocket run in between);
* ``rss``        server memory with 1000 WebSocket clients, with and without permessage-deflate;
* ``join-storm`` 1000 clients with distinct nicknames connecting within one second (paced,
                 bench/join_storm.py): failures, time to the first history frame, presence
                 frames per client, server CPU and RSS; the two baselines beside it.
* ``classroom``  bench/classroom.py: the server in a real ipykernel, 5,000 WebSocket clients
                 chatting at 10 messages/s for 30 s (1,000 for 10 s with ``--quick``): kernel
                 RSS, all delivered, a cell's round trip meanwhile; the CLI with 10,000.

chatlib is started with ``--rate 1000000 --burst 1000000``: its default limit (5 messages/s per
client, bursts of 20) would throttle the one benchmark sender; and ``--admit-rate 0``: admission
control (100 new sessions/s, bursts of 400) would spread the join storm's 1000 joins in one
second over seven (bench/storm.py measures it). Everything else is the default
(``--max-queue 1024``, no compression unless the section says so).

    .venv/bin/python bench/fanout.py              # everything, ~4 min on 2 cores
    .venv/bin/python bench/fanout.py --quick      # 3 reps of ws-burst, 1 of http and rss, <1 min
    .venv/bin/python bench/fanout.py --sections ws-burst --reps 7
    .venv/bin/python bench/fanout.py --summarize bench/results/fanout-*.jsonl

Results: one JSON line per run in ``bench/results/fanout-<date>.jsonl`` (git-ignored), markdown
tables on stdout and in ``bench/results/fanout-<date>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PY = sys.executable
RATE_ARGS = ["--rate", "1000000", "--burst", "1000000", "--admit-rate", "0"]
LABEL = {"chatlib": "chatlib (Starlette + uvicorn websockets-sansio)",
         "baseline": "baseline: raw websockets + broadcast()",
         "node": "reference: Node.js ws"}
SECTIONS = ["ws-burst", "ws-closed", "ws-open", "http", "rss", "join-storm", "classroom"]
# ws-open: (clients, messages per second), for OPEN_SECONDS (issue 11, target 2), OPEN_REPS
# runs each of chatlib and the baseline; the Node.js reference only at OPEN_NODE, once. These
# 30 s runs are most of make bench's 15-minute budget (issue 11): 3 reps of 3 stacks took
# 9 min 45 s of an 18 min 54 s run; this plan takes ~4 min 50 s (see bench/README.md, "The
# open loop, measured where delivery happens"). An explicit --reps runs every stack, N too.
OPEN = [(100, 100), (1000, 20)]
OPEN_SECONDS = 30
OPEN_REPS = 2
OPEN_NODE = (1000,)
NODE_SERVER = os.path.join(BENCH, "node", "server.js")


def node_missing() -> str:
    """Why the Node.js ``ws`` reference can't run here ("" if it can)."""
    if not shutil.which("node"):
        return "node is not installed"
    if not os.path.isfile(os.path.join(BENCH, "node", "node_modules", "ws", "package.json")):
        return "bench/node/node_modules/ws is missing (make bench runs npm ci --prefix bench/node)"
    return ""


# -- processes ----------------------------------------------------------------------------


def status_kb(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    return None


def free_port(start: int) -> int:
    for port in range(start, start + 200):  # bounded
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {start}..{start + 199}")


def taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if PIN else []


def start_server(stack: str, port: int, compression: bool) -> subprocess.Popen:
    if stack == "chatlib":
        cmd = [PY, "-m", "chatlib", "serve", "--port", str(port), *RATE_ARGS]
        cmd += ["--compression"] if compression else []
    elif stack == "node":
        cmd = ["node", NODE_SERVER, str(port)]
    else:
        cmd = [PY, os.path.join(BENCH, "baseline_server.py"), str(port)]
    return start_command(cmd, stack)


def start_command(cmd: list[str], label: str, cwd: str = ROOT) -> subprocess.Popen:
    """Start a server on CPU 0; return once it prints its "serving on" line (<= 20 s)."""
    proc = subprocess.Popen(taskset(0) + cmd, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=20) or "serving on" not in proc.stdout.readline():
                raise RuntimeError(f"{label} did not start: {proc.stderr.read()[-500:]!r}"
                                   if proc.poll() is not None else f"{label} did not start")
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM, then SIGKILL after 10 s; returns the tail of its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    try:
        return proc.stderr.read()[-800:]
    except (OSError, ValueError):
        return ""


def one_run(stack: str, load: list[str], port: int, compression: bool, timeout: float,
            start=None) -> dict:
    """One server (``start(port)``, default :func:`start_server`) under one load process;
    ``wall_s``: [server start, load, server stop] seconds (for the run-time budget: ``make
    bench`` must stay under 15 minutes, issue 11)."""
    t0 = time.monotonic()
    proc = start(port) if start else start_server(stack, port, compression)
    t1 = time.monotonic()
    result = {}
    try:
        time.sleep(0.3)
        rss_idle = status_kb(proc.pid, "VmRSS")
        cmd = [PY, *load, "--port", str(port), "--server-pid", str(proc.pid),
               "--timeout", str(timeout)]
        done = subprocess.run(taskset(1) + cmd, cwd=BENCH, capture_output=True, text=True,
                              timeout=timeout + 90)
        hwm = status_kb(proc.pid, "VmHWM")
        if done.returncode != 0:
            result = {"error": done.stderr[-1500:]}
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(stack=stack, server_VmRSS_idle_kB=rss_idle, server_VmHWM_kB=hwm,
                      loadavg=open("/proc/loadavg").read().split()[0])
    except subprocess.TimeoutExpired:
        result = {"stack": stack, "error": "load process timed out"}
    finally:
        t2 = time.monotonic()
        err = stop_server(proc)
        if err.strip() and "Traceback" in err:
            sys.stderr.write(f"[{stack} server stderr] {err}\n")
    result["wall_s"] = [round(t1 - t0, 2), round(t2 - t1, 2), round(time.monotonic() - t2, 2)]
    return result


# -- sections -----------------------------------------------------------------------------


def plan(section: str, quick: bool, reps: int | None) -> list[dict]:
    """The runs of one section, in the order they run (stacks alternate within a rep)."""
    runs = []
    if section in ("ws-burst", "ws-closed"):
        mode = section.split("-")[1]
        configs = [(100, 1000), (1000, 100)] if mode == "burst" else [(100, 200), (1000, 50)]
        k = reps or (3 if quick else 9 if mode == "burst" else 5)
        stacks = ["chatlib", "baseline"] + ([] if NODE_MISSING else ["node"])
        for n, m in configs:
            for rep in range(k):
                # Each stack goes first in turn (A B C, B C A, C A B; with two: A B, B A).
                order = stacks[rep % len(stacks):] + stacks[:rep % len(stacks)]
                for stack in order:
                    runs.append(dict(section=section, stack=stack, rep=rep, compression=False,
                                     load=["load_client.py", "-n", str(n), "-m", str(m),
                                           "--mode", mode]))
    elif section == "ws-open":
        seconds = 5 if quick else OPEN_SECONDS
        k = reps or (1 if quick else OPEN_REPS)
        for n, rate in OPEN:
            for rep in range(k):
                # Node.js: a reference, not a target: once, at N=1000, unless asked for.
                node = not NODE_MISSING and (reps or quick or (n in OPEN_NODE and rep == 0))
                stacks = ["chatlib", "baseline"] + (["node"] if node else [])
                for stack in stacks[rep % len(stacks):] + stacks[:rep % len(stacks)]:
                    runs.append(dict(section=section, stack=stack, rep=rep, compression=False,
                                     load=["load_client.py", "-n", str(n), "-m",
                                           str(rate * seconds), "--mode", "open",
                                           "--rate", str(rate)]))
    elif section == "http":
        k = reps or (1 if quick else 5)
        for rep in range(k):
            # ws-post: WebSocket receivers under the HTTP rows' own sender (one POST at a time),
            # the like-for-like comparison for SSE; ws: WebSocket receivers and a frame burst.
            for transport in ("longpoll", "sse", "ws-post", "ws"):
                load = (["load_client.py", "-n", "100", "-m", "300"] if transport == "ws" else
                        ["http_fanout.py", "--transport", transport.removesuffix("-post"),
                         "-n", "100", "-m", "300"])
                runs.append(dict(section=section, stack="chatlib", rep=rep, compression=False,
                                 transport=transport, load=load))
    elif section == "rss":
        k = reps or (1 if quick else 3)
        for rep in range(k):
            for compression in (False, True):
                for stack in ("chatlib", "baseline"):
                    runs.append(dict(section=section, stack=stack, rep=rep,
                                     compression=compression,
                                     load=["load_client.py", "-n", "1000", "-m", "20",
                                           "--compression",
                                           "deflate" if compression else "none"]))
    elif section == "join-storm":
        k = reps or (1 if quick else 5)
        stacks = ["chatlib", "baseline"] + ([] if NODE_MISSING else ["node"])
        for rep in range(k):
            for stack in stacks[rep % len(stacks):] + stacks[:rep % len(stacks)]:
                load = ["join_storm.py", "-n", "1000", "--spacing-ms", "1", "--seed", "5"]
                runs.append(dict(section=section, stack=stack, rep=rep, compression=False,
                                 load=load + (["--history"] if stack == "chatlib" else [])))
    return runs


def run_times(results: list[dict]) -> str:
    """Wall-clock seconds each section took (server start to stop, retries included)."""
    took: dict[str, float] = {}
    for r in results:
        took[r["section"]] = took.get(r["section"], 0.0) + r.get("run_wall_s", 0.0)
    return ", ".join(f"{section} {seconds:.0f} s" for section, seconds in took.items())


def disturbed(r: dict, max_other: float) -> bool:
    """Did other processes on the machine use more than ``max_other`` of a core meanwhile?"""
    return "error" not in r and r["other_cpu_s"] > max_other * max(r["total_s"], 0.1)


def describe(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error'][-400:]}"
    if "server_cpu_us_per_join" in r:  # join-storm
        first = r["first_history_p50_ms"]
        return (f"connected {r['connected']}/{r['N']} open p50={r['open_p50_ms']:.1f}ms "
                f"p99={r['open_p99_ms']:.1f}ms"
                + (f" first history p50={first:.1f}ms p99={r['first_history_p99_ms']:.1f}ms"
                   if first is not None else "")
                + f" presence={r['presence_frames']:,} (max {r['presence_max_per_client']}/"
                f"client) cpu={r['server_cpu_us_per_join']:.0f}us/join busy="
                f"{r['server_busy_storm']:.0%} rss={r['server_VmRSS_max_kB'] / 1024:.1f}MiB "
                f"lag p99={r['launch_lag_p99_ms']:.1f}ms other_cpu={r['other_cpu_s']:.2f}s"
                + (f" FAILED {r['failures']}" if r["failed"] else "")
                + (" TIMEOUT" if r.get("timed_out") else ""))
    return (f"{r['deliveries_per_s']:>9,.0f} del/s p50={r['lat_p50_ms']:.1f}ms "
            f"p99={r['lat_p99_ms']:.1f}ms cpu={r['server_cpu_us_per_delivery']:.2f}us/del "
            f"(u{r['server_utime_s']:.2f}/s{r['server_stime_s']:.2f}s) "
            f"conn={r['connect_s']:.2f}s rss={(r['server_VmRSS_connected_kB'] or 0) / 1024:.1f}MiB "
            f"ok={r['delivered'] == r['expected']} other_cpu={r['other_cpu_s']:.2f}s"
            + (" TIMEOUT" if r.get("timed_out") else "")
            + (f" CLOSED{r['early_close_codes']}" if r.get("early_closes") else ""))


def environment() -> dict:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M %Z"), cpus=os.cpu_count(), cpu=cpu,
        kernel=platform.release(), python=platform.python_version(), chatlib_commit=commit,
        **{pkg: version(pkg) for pkg in
           ("websockets", "uvicorn", "starlette", "h11", "httptools", "uvloop")},
        pinned=PIN, **node_environment(),
    )


def node_environment() -> dict:
    """Node.js and ws versions of the reference server, or why it is skipped."""
    if NODE_MISSING:
        return {"node_missing": NODE_MISSING}
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(BENCH, "node", "node_modules", "ws", "package.json")) as f:
        return {"node": node, "node_ws": json.load(f)["version"]}


# -- tables -------------------------------------------------------------------------------


def usable(r: dict) -> bool:
    """Runs that failed, or that other processes disturbed on every attempt, are left out."""
    return "error" not in r and not r.get("disturbed")


def med(values: list) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values: list, fmt: str) -> str:
    return f"{format(med(values), fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def mib(kb) -> float:
    return kb / 1024 if kb else float("nan")


def ws_tables(results: list[dict], section: str) -> list[str]:
    out = []
    rows = [r for r in results if r.get("section") == section and usable(r)]
    for n in sorted({r["N"] for r in rows}):
        at_n = [r for r in rows if r["N"] == n]
        m = at_n[0]["M"]
        by = {s: [r for r in at_n if r["stack"] == s] for s in ("chatlib", "baseline", "node")}
        if not by["baseline"] or not by["chatlib"]:
            continue
        if not by["node"]:
            del by["node"]
        base_dps = med([r["deliveries_per_s"] for r in by["baseline"]])
        base_cpu = med([r["server_cpu_us_per_delivery"] for r in by["baseline"]])
        out += [f"\n**{section}, N={n} clients, M={m} messages** — median of "
                f"{len(by['chatlib'])}/{len(by['baseline'])} runs [min–max]\n",
                "| server | deliveries/s | × baseline | p50 ms | p99 ms "
                "| server CPU µs/delivery (user+sys) | × baseline | server RSS MiB idle / "
                "connected / VmHWM | all delivered |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for stack, rr in by.items():
            dps = [r["deliveries_per_s"] for r in rr]
            cpu = [r["server_cpu_us_per_delivery"] for r in rr]
            user = med([r["server_user_us_per_delivery"] for r in rr])
            sys_ = med([r["server_sys_us_per_delivery"] for r in rr])
            ok = all(r["delivered"] == r["expected"] and not r.get("early_closes") for r in rr)
            out.append(
                f"| {LABEL[stack]} | {spread(dps, ',.0f')} | {med(dps) / base_dps:.2f} "
                f"| {med([r['lat_p50_ms'] for r in rr]):.1f} "
                f"| {med([r['lat_p99_ms'] for r in rr]):.1f} "
                f"| {spread(cpu, '.2f')} ({user:.1f}+{sys_:.1f}) | {med(cpu) / base_cpu:.2f} "
                f"| {mib(med([r['server_VmRSS_idle_kB'] for r in rr])):.1f} / "
                f"{mib(med([r['server_VmRSS_connected_kB'] for r in rr])):.1f} / "
                f"{mib(med([r['server_VmHWM_kB'] for r in rr])):.1f} | {ok} |")
        pairs = paired(by["chatlib"], by["baseline"])
        if pairs:
            out.append(f"\nPaired ratios chatlib/baseline (run i vs run i): deliveries/s "
                       f"{spread([p[0] for p in pairs], '.2f')}, CPU/delivery "
                       f"{spread([p[1] for p in pairs], '.2f')}. Load process busy "
                       f"{med([r['client_busy'] for r in at_n]):.0%} (median); CPU used by "
                       f"other processes during the timed phase: median "
                       f"{med([r['other_cpu_s'] for r in at_n]):.2f} s, max "
                       f"{max(r['other_cpu_s'] for r in at_n):.2f} s.")
        node_pairs = paired(by["chatlib"], by.get("node", []))
        if node_pairs:
            out.append(f"Paired ratios chatlib/Node.js ws: deliveries/s "
                       f"{spread([p[0] for p in node_pairs], '.2f')}, CPU/delivery "
                       f"{spread([p[1] for p in node_pairs], '.2f')}.")
    return out


def paired(a: list[dict], b: list[dict]) -> list[tuple[float, float]]:
    by_rep = {r["rep"]: r for r in b}
    return [(r["deliveries_per_s"] / by_rep[r["rep"]]["deliveries_per_s"],
             r["server_cpu_us_per_delivery"] / by_rep[r["rep"]]["server_cpu_us_per_delivery"])
            for r in a if r["rep"] in by_rep]


def open_tables(results: list[dict]) -> list[str]:
    """ws-open: latency percentiles at a fixed send rate, chatlib beside the baselines.

    Two clocks for each delivery (load_client.StampedReceiver): when the kernel received it
    (the server's delivery latency) and when the load process read it (that plus the load
    process's own queue); then where the time goes.
    """
    out = []
    rows = [r for r in results if r.get("section") == "ws-open" and usable(r)]
    for n in sorted({r["N"] for r in rows}):
        at_n = [r for r in rows if r["N"] == n]
        by = {s: [r for r in at_n if r["stack"] == s] for s in ("chatlib", "baseline", "node")}
        if not by["baseline"] or not by["chatlib"]:
            continue
        if not by["node"]:
            del by["node"]
        r0 = at_n[0]
        base_cpu = med([r["server_cpu_us_per_delivery"] for r in by["baseline"]])
        runs = "/".join(str(len(rr)) for rr in by.values())
        out += [f"\n**ws-open, N={n} clients, {r0['rate']:g} messages/s for "
                f"{r0['M'] / r0['rate']:g} s** (open loop: latency from each message's "
                f"scheduled send time; *delivered*: when the kernel received the frame, *read*: "
                f"when the load process read it) — median of {runs} runs [min–max]\n",
                "| server | delivered p50 ms | delivered p99 ms | delivered p99.9 ms "
                "| read p50 ms | read p99 ms | read p99.9 ms | server CPU µs/delivery "
                "(user+sys) | × baseline | sender late p99 ms | all delivered |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for stack, rr in by.items():
            cpu = [r["server_cpu_us_per_delivery"] for r in rr]
            ok = all(r["delivered"] == r["expected"] and not r.get("early_closes") for r in rr)
            kern = [r for r in rr if "kern_p99_ms" in r]
            delivered = (f"{med([r['kern_p50_ms'] for r in kern]):.2f} "
                         f"| {spread([r['kern_p99_ms'] for r in kern], '.2f')} "
                         f"| {med([r['kern_p999_ms'] for r in kern]):.2f}" if kern else
                         "- | - | -")
            out.append(
                f"| {LABEL[stack]} | {delivered} | {med([r['lat_p50_ms'] for r in rr]):.2f} "
                f"| {spread([r['lat_p99_ms'] for r in rr], '.2f')} "
                f"| {med([r['lat_p999_ms'] for r in rr]):.2f} "
                f"| {spread(cpu, '.2f')} ({med([r['server_user_us_per_delivery'] for r in rr]):.1f}"
                f"+{med([r['server_sys_us_per_delivery'] for r in rr]):.1f}) "
                f"| {med(cpu) / base_cpu:.2f} "
                f"| {med([r['send_lag_p99_ms'] for r in rr]):.2f} | {ok} |")
        pairs = paired(by["chatlib"], by["baseline"])
        if pairs:
            out.append(f"\nPaired CPU/delivery chatlib/baseline: "
                       f"{spread([p[1] for p in pairs], '.2f')}. Load process busy "
                       f"{med([r['client_busy'] for r in at_n]):.0%} (median).")
        node_pairs = paired(by["chatlib"], by.get("node", []))
        if node_pairs:
            out.append(f"Paired CPU/delivery chatlib/Node.js ws: "
                       f"{spread([p[1] for p in node_pairs], '.2f')}.")
        out += open_breakdown({s: [r for r in rr if "kern_p99_ms" in r] for s, rr in by.items()})
    return out


def open_breakdown(by: dict[str, list[dict]]) -> list[str]:
    """Where an open-loop delivery's time goes, from the kernel's receive stamps (medians)."""
    if not all(by.values()):
        return []
    out = ["\n| server | due → first client's copy delivered p50 / p99 ms | first → last "
           "client's copy delivered (per message) p50 / p99 / max ms | read − delivered "
           "(load process queue) p50 / p99 ms | read − delivered by read order: first / "
           "middle / last 10 % of receivers, p50 ms | frames read with a later one |",
           "|---|---:|---:|---:|---:|---:|"]
    for stack, rr in by.items():
        deciles = [med([r["gap_by_decile_p50_ms"][d] for r in rr]) for d in range(10)]
        shared = med([r["shared_reads"] / max(r["kern_n"], 1) for r in rr])
        out.append(
            f"| {LABEL[stack]} | {med([r['first_p50_ms'] for r in rr]):.2f} / "
            f"{med([r['first_p99_ms'] for r in rr]):.2f} "
            f"| {med([r['spread_p50_ms'] for r in rr]):.2f} / "
            f"{med([r['spread_p99_ms'] for r in rr]):.2f} / "
            f"{med([r['spread_max_ms'] for r in rr]):.1f} "
            f"| {med([r['gap_p50_ms'] for r in rr]):.2f} / "
            f"{med([r['gap_p99_ms'] for r in rr]):.2f} "
            f"| {deciles[0]:.2f} / {deciles[4]:.2f} / {deciles[9]:.2f} | {shared:.1%} |")
    return out


def http_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r.get("section") == "http" and usable(r)]
    if not rows:
        return []
    out = [f"\n**http: chatlib fan-out by transport, N=100 receivers, M={rows[0]['M']} messages "
           f"** — median of {len(rows) // 4 or 1} runs [min–max]\n",
           "| transport | sender | deliveries/s | p50 ms | p99 ms | server CPU µs/delivery "
           "(user+sys) | responses per client | all delivered |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    names = {"longpoll": "long poll (`GET /api/messages?after=&wait=25`)",
             "sse": "SSE (`GET /api/events`)", "ws-post": "WebSocket (`/ws`)",
             "ws": "WebSocket (`/ws`)"}
    cpu = {}
    for transport in ("longpoll", "sse", "ws-post", "ws"):
        rr = [r for r in rows if r.get("transport", "ws") == transport]
        if not rr:
            continue
        cpu[transport] = med([r["server_cpu_us_per_delivery"] for r in rr])
        sender = ("WebSocket frames, back to back" if transport == "ws" else
                  "`POST /api/messages`, one at a time")
        polls = med([r.get("responses_per_client") for r in rr])
        dps = spread([r["deliveries_per_s"] for r in rr], ",.0f")
        p50, p99 = med([r["lat_p50_ms"] for r in rr]), med([r["lat_p99_ms"] for r in rr])
        out.append(
            f"| {names[transport]} | {sender} | {dps} | {p50:.1f} | {p99:.1f} "
            f"| {spread([r['server_cpu_us_per_delivery'] for r in rr], '.1f')} "
            f"({med([r['server_user_us_per_delivery'] for r in rr]):.1f}"
            f"+{med([r['server_sys_us_per_delivery'] for r in rr]):.1f}) "
            f"| {'-' if polls != polls else f'{polls:.0f}'} "
            f"| {all(r['delivered'] == r['expected'] for r in rr)} |")
    if "ws-post" in cpu:
        out.append("\nServer CPU per delivery under the same sender (one `POST` at a time), "
                   "× WebSocket: " + ", ".join(
                       f"{name} {cpu[t] / cpu['ws-post']:.2f}×"
                       for t, name in (("sse", "SSE"), ("longpoll", "long poll")) if t in cpu)
                   + ".")
    return out


def rss_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r.get("section") == "rss" and usable(r)]
    if not rows:
        return []
    out = [f"\n**rss: server memory, N=1000 WebSocket clients** — median of "
           f"{max(1, len(rows) // 4)} runs (MiB; VmRSS from /proc/PID/status)\n",
           "| server | permessage-deflate | idle | 1000 connected | after fan-out of 20 "
           "messages | VmHWM | KiB per connection | negotiated |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for stack in ("chatlib", "baseline"):
        for compression in ("none", "deflate"):
            rr = [r for r in rows if r["stack"] == stack and r["compression"] == compression]
            if not rr:
                continue
            idle = med([r["server_VmRSS_idle_kB"] for r in rr])
            conn = med([r["server_VmRSS_connected_kB"] for r in rr])
            after = med([r["server_VmRSS_after_kB"] for r in rr])
            ext = (rr[0].get("negotiated_ext") or "-").split(";")[0]
            out.append(f"| {LABEL[stack]} | {compression} | {mib(idle):.1f} | {mib(conn):.1f} "
                       f"| {mib(after):.1f} | {mib(med([r['server_VmHWM_kB'] for r in rr])):.1f} "
                       f"| {(after - idle) / 1000:.1f} | {ext} |")
    return out


def join_storm_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r.get("section") == "join-storm" and usable(r)]
    if not rows:
        return []
    r0 = rows[0]
    out = [f"\n**join-storm: {r0['N']} WebSocket clients, connection i starts at i × "
           f"{r0['spacing_ms']:g} ms, each says hello as `load<i>`; chatlib's log holds "
           f"{r0['seeded']} messages** — medians of the runs counted in the first column "
           f"[min–max]; open: connect start → 101 read; first history: connect start → "
           f"first message frame (chatlib only: the baselines keep no history)\n",
           "| server | connected | open p50 / p99 ms | first history p50 ms | first history p99 "
           "ms | presence frames (all clients) | presence MB | max per client | server CPU "
           "µs/join | server busy during the storm | VmRSS max MiB | load lag p99 ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stack in ("chatlib", "baseline", "node"):
        rr = [r for r in rows if r["stack"] == stack]
        if not rr:
            continue
        first = [r["first_history_p99_ms"] for r in rr if r["first_history_p99_ms"] is not None]
        fails = sum(r["failed"] for r in rr)
        failed = (f"; {fails} failed in {len(rr)} runs: "
                  + "; ".join(sorted({k for r in rr for k in r["failures"]})) if fails else "")
        out.append(
            f"| {LABEL[stack]} ({len(rr)} runs) | {min(r['connected'] for r in rr)}/{r0['N']} "
            f"(min){failed} "
            f"| {med([r['open_p50_ms'] for r in rr]):.1f} / "
            f"{med([r['open_p99_ms'] for r in rr]):.1f} "
            f"| {format(med([r['first_history_p50_ms'] for r in rr]), '.1f') if first else '-'} "
            f"| {spread(first, '.1f') if first else '- (no history)'} "
            f"| {med([r['presence_frames'] for r in rr]):,.0f} "
            f"| {med([r['presence_bytes'] for r in rr]) / 1e6:.2f} "
            f"| {max(r['presence_max_per_client'] for r in rr)} "
            f"| {spread([r['server_cpu_us_per_join'] for r in rr], '.0f')} "
            f"| {med([r['server_busy_storm'] for r in rr]):.0%} "
            f"| {mib(med([r['server_VmRSS_max_kB'] for r in rr])):.1f} "
            f"| {med([r['launch_lag_p99_ms'] for r in rr]):.1f} |")
    return out


def tables(results: list[dict], env: dict | None) -> str:
    out = []
    if env:
        out.append(
            f"Run {env['date']} on {env['cpus']} CPUs ({env['cpu']}), Linux {env['kernel']}, "
            f"Python {env['python']}, websockets {env['websockets']}, uvicorn {env['uvicorn']}, "
            f"starlette {env['starlette']}, h11 {env['h11']} (httptools {env['httptools']}, "
            f"uvloop {env['uvloop']}); chatlib {env['chatlib_commit']}; server on CPU 0, load "
            f"on CPU 1: {env['pinned']}; Node.js ws reference: "
            + (f"skipped ({env['node_missing']})." if env.get("node_missing") else
               f"Node.js {env.get('node', '?')}, ws {env.get('node_ws', '?')}."))
    out += ws_tables(results, "ws-burst") + ws_tables(results, "ws-closed")
    out += open_tables(results)
    out += http_table(results) + rss_table(results) + join_storm_table(results)
    errors = [r for r in results if "error" in r]
    if errors:
        out.append(f"\n{len(errors)} run(s) failed: "
                   + "; ".join(f"{r.get('section')}/{r.get('stack')}" for r in errors))
    left_out = [r for r in results if r.get("disturbed")]
    retried = [r for r in results if r.get("attempt", 1) > 1 and not r.get("disturbed")]
    out.append(f"\nOther processes on the machine: {len(retried)} run(s) were repeated because "
               f"something else used CPU meanwhile; {len(left_out)} left out (disturbed on "
               f"every attempt: "
               + (", ".join(f"{r.get('section')}/{r.get('stack')}/N={r.get('N')}"
                            for r in left_out) or "none") + ").")
    return "\n".join(out) + "\n"


# -- main -----------------------------------------------------------------------------------

PIN = True
NODE_MISSING = ""  # why the Node.js ws reference is skipped ("" when it runs)


def main() -> None:
    global PIN, NODE_MISSING
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no closed loop")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=None, help="repetitions per configuration")
    p.add_argument("--port", type=int, default=18800, help="first port to try (127.0.0.1)")
    p.add_argument("--timeout", type=float, default=120, help="per load process, seconds")
    p.add_argument("--no-pin", action="store_true", help="don't use taskset")
    p.add_argument("--max-other", type=float, default=0.2,
                   help="a run during which other processes used more than this fraction of a "
                        "core is repeated (default 0.2)")
    p.add_argument("--retries", type=int, default=2, help="... at most this many times")
    p.add_argument("--summarize", nargs="+", metavar="JSONL", help="print tables of old runs")
    a = p.parse_args()
    if a.summarize:
        results, env = [], None
        for path in a.summarize:
            for line in open(path):
                record = json.loads(line)
                if record.get("section") == "environment":
                    env = record
                else:
                    results.append(record)
        print(tables(results, env))
        return
    PIN = not a.no_pin and os.cpu_count() >= 2 and bool(
        subprocess.run(["which", "taskset"], capture_output=True).stdout)
    NODE_MISSING = node_missing()
    if NODE_MISSING:
        print(f"Node.js ws reference skipped: {NODE_MISSING}.", flush=True)
    sections = a.sections.split(",") if a.sections else (
        ["ws-burst", "http", "rss"] if a.quick else SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {sorted(unknown)}")
    runs = [r for s in sections for r in plan(s, a.quick, a.reps)]
    os.makedirs(os.path.join(BENCH, "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(BENCH, "results", f"fanout-{stamp}.jsonl")
    env = environment()
    results = []
    started = time.monotonic()
    print(f"{len(runs)} runs; results in {os.path.relpath(path, ROOT)}", flush=True)
    port = a.port
    with open(path, "w") as f:
        f.write(json.dumps({"section": "environment", **env}) + "\n")
        for i, run in enumerate(runs):
            t_run = time.monotonic()
            for attempt in range(1, a.retries + 2):  # bounded: retries + 1 attempts
                port = free_port(port + 1)
                result = one_run(run["stack"], run["load"], port, run["compression"],
                                 a.timeout)
                result["attempt"] = attempt
                result["disturbed"] = disturbed(result, a.max_other)
                if not result["disturbed"]:
                    break
                print(f"    (disturbed: other processes used {result['other_cpu_s']:.2f} s of "
                      f"CPU in {result['total_s']:.2f} s; again)", flush=True)
            result.update({k: v for k, v in run.items() if k != "load"})
            result["compression"] = "deflate" if run["compression"] else "none"
            result["run_wall_s"] = round(time.monotonic() - t_run, 2)  # with any retries
            results.append(result)
            f.write(json.dumps(result) + "\n")
            f.flush()
            what = (f"{run['section']:9s} {run.get('transport', '')[:8]:8s} {run['stack']:8s} "
                    f"N={result.get('N', '?')} rep={run['rep']}")
            print(f"[{i + 1}/{len(runs)} {time.monotonic() - started:5.0f}s] {what}: "
                  f"{describe(result)}", flush=True)
    report = tables(results, env)
    with open(path.replace(".jsonl", ".md"), "w") as f:
        f.write(report)
    print("\n" + report)
    print(f"wrote {os.path.relpath(path, ROOT)} and .md ({time.monotonic() - started:.0f} s)")
    if "classroom" in sections:  # its own processes (a kernel), results and table
        t_classroom = time.monotonic()
        subprocess.run([PY, os.path.join(BENCH, "classroom.py")]
                       + (["--quick"] if a.quick else []) + (["--no-pin"] if not PIN else [])
                       + (["--reps", str(a.reps)] if a.reps else []), cwd=ROOT, check=False)
        print(f"classroom: {time.monotonic() - t_classroom:.0f} s")
    print(f"Run time by section: {run_times(results)}; in all {time.monotonic() - started:.0f} s "
          f"(the full make bench must stay within 15 minutes, issue 11)")


if __name__ == "__main__":
    main()
