"""Issue 18's two hostile loads on a live `ferkit serve`, measured: memory and slow bodies.

Starts `ferkit serve` (its defaults, the default model, CPU) on 127.0.0.1 and a free port, and runs:

- memory: one request with 16 one-colour 7000x7000 PNGs (about 150 kB each, 49 megapixels each),
  then two such requests at once; then, within the budgets, 4 clients at once each sending 2 of
  those images (98 megapixels a request: under --max-request-pixels, so they are decoded, one at a
  time in --max-decode-mb). A normal predict (the astronaut photo) is sent every 0.5 s throughout.
  Reports each request's status and time, the server's peak RSS (VmHWM) and RSS after, and the
  normal predicts' latencies.
- slow-body: 70 clients each send a JSON predict body at 1 byte a second for `--slow-seconds`,
  reconnecting when the server drops them (408), while normal predicts go on every 0.5 s; reports
  the normal requests' statuses and latencies and what the slow clients got.

Bounded: about 2 minutes in all. Peak RSS is a property of the server alone; the latencies depend on
what else runs on the machine, so the JSON records the load average at the start and the end.

    python benchmarks/serve_hostile.py --out docs/results/serve/hostile
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

SIDE = 7000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def memory_kb(pid: int) -> dict[str, int]:
    """The process's RSS now and at its peak (VmHWM), in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "peak_rss_kb": int(fields["VmHWM"].split()[0])}


def start_server(port: int, extra: list[str], file_limit: int | None = None,
                 log: Path | None = None) -> subprocess.Popen[str]:
    """`ferkit serve` on `port`; with `file_limit`, under that limit on open files (soft and hard: it cannot raise
    it); its output to `log` when given (else a pipe)."""

    def limit_files() -> None:
        if file_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    output: Any = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen([sys.executable, "-m", "ferkit", "serve", "--port", str(port), "--device", "cpu",
                                "--log-level", "warning", *extra], stdout=output, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=limit_files)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(process.communicate()[0] or (log.read_text() if log else ""))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("ferkit serve did not get ready in 120 s")
        time.sleep(0.2)


class NormalPredicts:
    """A normal predict every `every` seconds on a thread of its own, until stopped: (status, seconds) each."""

    def __init__(self, url: str, image: bytes, every: float = 0.5) -> None:
        self.url, self.image, self.every = url, image, every
        self.results: list[tuple[int, float]] = []
        self.log: list[dict[str, Any]] = []
        self.origin = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                error = None
                try:
                    status = client.post(f"{self.url}/v1/predict", files=[("files", ("a.png", self.image))]).status_code
                except httpx.HTTPError as err:
                    status, error = 0, f"{type(err).__name__}: {err}"
                self.results.append((status, time.perf_counter() - started))
                self.log.append({"sent_at_s": round(started - self.origin, 2), "status": status,
                                 "seconds": round(self.results[-1][1], 3), **({"error": error} if error else {})})
                self.stop.wait(self.every)

    def __enter__(self) -> NormalPredicts:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(70)

    def mark(self) -> float:
        """Seconds since the start: a phase boundary."""
        return time.monotonic() - self.origin

    def summary(self, phases: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
        """Counts, statuses, median and max latency over all, and over the predicts sent in each phase."""

        def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
            seconds = [r["seconds"] for r in rows]
            return {"count": len(rows), "statuses": dict(Counter(str(r["status"]) for r in rows)),
                    "max_s": max(seconds) if seconds else None,
                    "median_s": round(float(np.median(seconds)), 3) if seconds else None}

        by_phase = {name: stats([r for r in self.log if start <= r["sent_at_s"] < end])
                    for name, (start, end) in (phases or {}).items()}
        return {**stats(self.log), "by_phase": by_phase, "each": self.log}


def timed(send: Callable[[], httpx.Response]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = send()
        outcome: dict[str, Any] = {"status": response.status_code}
        if response.status_code != 200:
            outcome["error"] = response.json().get("error")
    except httpx.HTTPError as err:
        outcome = {"status": 0, "error": f"{type(err).__name__}: {err}"}
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


def memory_case(url: str, pid: int, normal: bytes) -> dict[str, Any]:
    big = png(np.full((SIDE, SIDE, 3), (200, 120, 40), np.uint8))
    files = [("files", (f"{i}.png", big)) for i in range(16)]
    report: dict[str, Any] = {"image": f"{SIDE}x{SIDE} RGB PNG of one colour, {len(big):,} bytes",
                              "before": memory_kb(pid)}

    def post(parts: list[Any]) -> dict[str, Any]:
        return timed(lambda: httpx.post(f"{url}/v1/predict", files=parts, timeout=120))

    with NormalPredicts(url, normal) as meanwhile:
        time.sleep(5)  # normal predicts alone first: what they take on this machine now
        quiet_end = meanwhile.mark()
        report["one_request_of_16"] = post(files)
        threads: list[dict[str, Any]] = []
        workers = [threading.Thread(target=lambda: threads.append(post(files))) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(130)
        report["two_requests_of_16_at_once"] = threads
        report["after_16"] = memory_kb(pid)
        time.sleep(2)  # the normal predicts sent meanwhile come back
        refused_end = meanwhile.mark()
        within: list[dict[str, Any]] = []
        workers = [threading.Thread(target=lambda: within.append(post(files[:2]))) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(130)
        report["four_requests_of_2_at_once"] = within
        time.sleep(1)
    report["after"] = memory_kb(pid)
    report["normal_predicts_meanwhile"] = meanwhile.summary({
        "alone": (0, quiet_end), "during_the_requests_of_16": (quiet_end, refused_end),
        "during_the_four_requests_of_2": (refused_end, float("inf"))})
    return report


async def slow_client(host: str, port: int, until: float, outcomes: Counter[str]) -> None:
    body = b'{"images": ["' + base64.b64encode(b"x" * 600) + b'"]}'
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            status = None
            for byte in body:
                if time.monotonic() >= until or reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    line = await asyncio.wait_for(reader.readline(), 1.0)
                except asyncio.TimeoutError:
                    continue
                status = line.split()[1].decode() if line.startswith(b"HTTP/") else "closed by the server"
                break
            outcomes[status or "cut off by the client at the end"] += 1
            writer.close()
        except OSError as err:
            outcomes[f"{type(err).__name__}"] += 1
            await asyncio.sleep(0.5)


def slow_body_case(url: str, port: int, normal: bytes, clients: int, seconds: float) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()

    async def all_slow() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(slow_client("127.0.0.1", port, until, outcomes) for _ in range(clients)))

    with NormalPredicts(url, normal) as meanwhile:
        time.sleep(5)
        quiet_end = meanwhile.mark()
        asyncio.run(all_slow())
    return {"normal_predicts_meanwhile": meanwhile.summary({"alone": (0, quiet_end),
                                                            "during_the_slow_clients": (quiet_end, float("inf"))}),
            "slow_clients": clients, "seconds": seconds, "slow_clients_got": dict(outcomes)}


# ---------------------------------------------------------------------------------------------
# Issue 32, the second round: rows 1-7 of its table, each on its own, and the mix of all of them


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the decode workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with_children = task / "children"
            if with_children.exists():
                todo += [int(c) for c in with_children.read_text().split()]
    return pids


def reset_peaks(pid: int) -> None:
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{member}/clear_refs").write_text("5")  # VmHWM back to the current RSS


class TreeMemory:
    """Samples the RSS of the server and its decode workers every 50 ms: the peak of their sum, and each one's
    VmHWM (reset at the start) summed, an upper bound."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for member in process_tree(self.pid):
                with contextlib.suppress(OSError, KeyError):
                    total += memory_kb(member)["rss_kb"]
            self.peak_kb = max(self.peak_kb, total)
            self.stop.wait(0.05)

    def __enter__(self) -> TreeMemory:
        reset_peaks(self.pid)
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(5)

    def report(self) -> dict[str, Any]:
        hwm = 0
        for member in process_tree(self.pid):
            with contextlib.suppress(OSError, KeyError):
                hwm += memory_kb(member)["peak_rss_kb"]
        return {"peak_sampled_tree_rss_mb": round(self.peak_kb / 1024, 1),
                "peak_tree_vmhwm_sum_mb": round(hwm / 1024, 1), "processes": len(process_tree(self.pid))}


def scan_bomb(side: int = 7000, copies: int = 15_000) -> bytes:
    """Row 1: a progressive JPEG declaring side x side, its smallest scan repeated `copies` times."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=20)
    blob = buffer.getvalue()
    scans, pos = [], blob.find(b"\xff\xda")
    while pos >= 0:
        end = blob.find(b"\xff\xda", pos + 2)
        scans.append(blob[pos : end if end >= 0 else len(blob) - 2])
        pos = end
    return blob[:-2] + min(scans, key=len) * copies + b"\xff\xd9"


def tiff_bomb() -> bytes:
    """Row 2: a TIFF declaring 64x64 followed by 2 MB of deflated zeros (a 46336x46336 tile's worth)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, "TIFF", compression="tiff_adobe_deflate")
    squeeze = zlib.compressobj(9)
    chunk = bytes(64 * 2**20)
    tail = b"".join(squeeze.compress(chunk) for _ in range(32)) + squeeze.flush()
    return buffer.getvalue() + tail


def multipart(files: list[tuple[str, bytes]], boundary: str = "ferkitbench") -> tuple[bytes, str]:
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%s\"\r\n"
             b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary.encode(), name.encode(), data)
             for name, data in files]
    return b"".join(parts) + b"--%s--\r\n" % boundary.encode(), f"multipart/form-data; boundary={boundary}"


async def raw_post(port: int, body: bytes, content_type: str, timeout: float = 60) -> str:
    """One POST /v1/predict on a connection of its own: the status, or what happened instead."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as err:
        return type(err).__name__
    try:
        writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                     % (content_type.encode(), len(body)))
        writer.write(body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.split()[1].decode() if line.startswith(b"HTTP/") else "closed"
    except (OSError, asyncio.TimeoutError) as err:
        return type(err).__name__
    finally:
        writer.close()


async def repeat_post(port: int, until: float, body: bytes, content_type: str, outcomes: Counter[str]) -> None:
    while time.monotonic() < until:
        outcomes[await raw_post(port, body, content_type)] += 1


async def tiny_chunks(port: int, until: float, outcomes: Counter[str]) -> None:
    """Row 3: a chunked body of 1-byte chunks, sent as fast as the server takes them, again when cut off."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as err:
            outcomes[type(err).__name__] += 1
            await asyncio.sleep(0.2)
            continue
        try:
            writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            while time.monotonic() < until and not reader.at_eof() and not writer.is_closing():
                writer.write(b"1\r\n \r\n" * 64)
                await writer.drain()
                if reader._buffer:  # type: ignore[attr-defined]  # the server answered: it is cut off
                    break
            line = await asyncio.wait_for(reader.readline(), 2)
            outcomes[line.split()[1].decode() if line.startswith(b"HTTP/") else "closed"] += 1
        except (OSError, asyncio.TimeoutError) as err:
            outcomes[type(err).__name__] += 1
        finally:
            writer.close()


async def idle_connections(port: int, count: int, until: float, outcomes: Counter[str]) -> None:
    """Row 6: `count` connections that send nothing, each opened again when the server closes it."""

    async def one() -> None:
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as err:
                outcomes[type(err).__name__] += 1
                await asyncio.sleep(0.5)
                continue
            outcomes["opened"] += 1
            try:
                await asyncio.wait_for(reader.read(), max(0.1, until - time.monotonic()))
                outcomes["closed by the server"] += 1
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


class Probes:
    """Requests sent back to back by `clients` threads (or one every `every` s), each (sent at, status, seconds)."""

    def __init__(self, send: Callable[[httpx.Client], httpx.Response], clients: int = 1, every: float = 0.0) -> None:
        self.send, self.every = send, every
        self.rows: list[tuple[float, int, float]] = []
        self.origin = time.monotonic()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    status = self.send(client).status_code
                except httpx.HTTPError:
                    status = 0
                self.rows.append((round(time.monotonic() - self.origin, 2), status,
                                  round(time.perf_counter() - started, 3)))
                if self.every:
                    self.stop.wait(self.every)

    def __enter__(self) -> Probes:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(70)

    def summary(self, since: float = 0.0) -> dict[str, Any]:
        rows = [r for r in self.rows if r[0] >= since]
        seconds = np.array([r[2] for r in rows]) if rows else np.zeros(0)
        ok = sum(1 for r in rows if r[1] == 200)
        return {"count": len(rows), "statuses": dict(Counter(str(r[1]) for r in rows)),
                "ok_share": round(ok / len(rows), 4) if rows else None,
                "p50_s": round(float(np.percentile(seconds, 50)), 3) if rows else None,
                "p95_s": round(float(np.percentile(seconds, 95)), 3) if rows else None,
                "max_s": round(float(seconds.max()), 3) if rows else None}


def normal_predicts(url: str, image: bytes, clients: int = 1, every: float = 0.0) -> Probes:
    return Probes(lambda c: c.post(f"{url}/v1/predict", files=[("files", ("a.png", image))]), clients, every)


def healthz(url: str, every: float = 0.2) -> Probes:
    return Probes(lambda c: c.get(f"{url}/healthz"), 1, every)


def run_for(seconds: float, *jobs: Callable[[float], Any]) -> None:
    """Run the async hostile `jobs` (each given the deadline) together for `seconds`."""
    async def together() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(job(until) for job in jobs))

    asyncio.run(together())


def round2_case(url: str, port: int, pid: int, normal: bytes, seconds: float) -> dict[str, Any]:
    """Rows 1-5 and 7, each for `seconds` with normal predicts (one every 0.2 s) and /healthz probes beside."""
    report: dict[str, Any] = {}
    bomb = scan_bomb()
    tiff = tiff_bomb()
    b64 = json.dumps({"images": [base64.b64encode(np.random.default_rng(0).bytes(10 * 2**20 - 4096)).decode()]}
                     ).encode()
    big, big_type = multipart([("big.bin", bytes(160 * 2**20))])
    rows: dict[str, tuple[str, Callable[[float, Counter[str]], Any]]] = {
        "row1_four_scan_bombs_in_flight": (f"{len(bomb):,}-byte progressive JPEG declaring 7000x7000 with 15,000 "
                                           "scans, 4 clients sending it again and again",
                                           lambda until, out: asyncio.gather(*(repeat_post(
                                               port, until, *multipart([("bomb.jpg", bomb)]), out)
                                               for _ in range(4)))),
        "row2_four_tiff_bombs_a_request": (f"a request of 4 TIFFs of {len(tiff):,} bytes declaring 64x64 with 2 MB "
                                           "of deflated zeros, sent again and again",
                                           lambda until, out: repeat_post(
                                               port, until, *multipart([(f"{i}.tif", tiff) for i in range(4)]), out)),
        "row3_two_one_byte_chunk_clients": ("2 clients sending chunked bodies of 1-byte chunks, reconnecting",
                                            lambda until, out: asyncio.gather(*(tiny_chunks(port, until, out)
                                                                                for _ in range(2)))),
        "row4_two_14_mb_base64_requests": (f"2 clients each sending a JSON body of one {len(b64) / 2**20:.1f} MB "
                                           "base64 string, again and again",
                                           lambda until, out: asyncio.gather(*(repeat_post(
                                               port, until, b64, "application/json", out) for _ in range(2)))),
        "row5_eight_160_mb_bodies": ("8 clients each sending a 160 MB multipart body at once, again and again",
                                     lambda until, out: asyncio.gather(*(repeat_post(port, until, big, big_type, out)
                                                                         for _ in range(8)))),
    }
    for name, (what, attack) in rows.items():
        outcomes: Counter[str] = Counter()
        with TreeMemory(pid) as memory, normal_predicts(url, normal, every=0.2) as normal_probe, \
                healthz(url) as health_probe:
            time.sleep(2)  # the probes alone first
            start = time.monotonic() - normal_probe.origin
            run_for(seconds, lambda until, a=attack, o=outcomes: a(until, o))
        report[name] = {"attack": what, "seconds": seconds, "attack_outcomes": dict(outcomes),
                        "normal_predicts_during": normal_probe.summary(start),
                        "healthz_during": health_probe.summary(start), **memory.report()}
        print(name, json.dumps(report[name]), flush=True)
    digits = b'{"images": [], "n": ' + b"9" * 5000 + b"}"
    report["row7_a_5000_digit_integer"] = {"status": asyncio.run(raw_post(port, digits, "application/json"))}
    return report


def idle_case(normal: bytes, connections: int = 1100, file_limit: int = 1024, seconds: float = 20.0,
              out: Path | None = None) -> dict[str, Any]:
    """Row 6: `connections` idle connections to a server under a `file_limit`, /healthz probed meanwhile;
    the size of the server's log afterwards."""
    port = free_port()
    log = (out or Path(".")) / "server-idle.log"
    server = start_server(port, [], file_limit=file_limit, log=log)
    url = f"http://127.0.0.1:{port}"
    outcomes: Counter[str] = Counter()
    try:
        with healthz(url) as health_probe, normal_predicts(url, normal, every=0.5) as normal_probe:
            time.sleep(1)
            start = time.monotonic() - health_probe.origin
            run_for(seconds, lambda until: idle_connections(port, connections, until, outcomes))
    finally:
        server.terminate()
        server.wait(30)
    return {"connections": connections, "file_limit": file_limit, "seconds": seconds,
            "idle_outcomes": dict(outcomes), "healthz_during": health_probe.summary(start),
            "normal_predicts_during": normal_probe.summary(start), "server_log_bytes": log.stat().st_size}


def mix_case(url: str, port: int, pid: int, normal: bytes, seconds: float = 30.0) -> dict[str, Any]:
    """8 normal clients (back to back) and 20 hostile ones (4 each: JPEG scan bombs, TIFF bombs, 14 MB base64
    JSON, slow bodies at a byte a second, 1-byte chunks) and 300 idle connections, for `seconds`."""
    bomb = multipart([("bomb.jpg", scan_bomb())])
    tiff = multipart([(f"{i}.tif", tiff_bomb()) for i in range(4)])
    b64 = json.dumps({"images": [base64.b64encode(np.random.default_rng(0).bytes(10 * 2**20 - 4096)).decode()]}
                     ).encode()
    outcomes: dict[str, Counter[str]] = {k: Counter() for k in ("jpeg", "tiff", "base64", "slow", "chunks", "idle")}

    async def hostile(until: float) -> None:
        await asyncio.gather(
            *(repeat_post(port, until, *bomb, outcomes["jpeg"]) for _ in range(4)),
            *(repeat_post(port, until, *tiff, outcomes["tiff"]) for _ in range(4)),
            *(repeat_post(port, until, b64, "application/json", outcomes["base64"]) for _ in range(4)),
            *(slow_client("127.0.0.1", port, until, outcomes["slow"]) for _ in range(4)),
            *(tiny_chunks(port, until, outcomes["chunks"]) for _ in range(4)),
            idle_connections(port, 300, until, outcomes["idle"]))

    with TreeMemory(pid) as memory, normal_predicts(url, normal, clients=8) as normal_probe, \
            healthz(url, every=0.5) as health_probe:
        run_for(seconds, hostile)
    return {"seconds": seconds, "normal_clients": 8, "hostile_clients": 20, "idle_connections": 300,
            "normal_predicts": normal_probe.summary(), "healthz": health_probe.summary(),
            "hostile_outcomes": {k: dict(v) for k, v in outcomes.items()}, **memory.report()}


def alone_case(url: str, normal: bytes, seconds: float = 30.0) -> dict[str, Any]:
    """The 8 normal clients alone, for the same time: the baseline of the mix."""
    with normal_predicts(url, normal, clients=8) as normal_probe, healthz(url, every=0.5) as health_probe:
        time.sleep(seconds)
    return {"seconds": seconds, "normal_predicts": normal_probe.summary(), "healthz": health_probe.summary()}


def decode_memory_case() -> dict[str, Any]:
    """Row 9: the memory decoding and a face search take in a decode worker, a pixel, for each format and mode
    the service reads, against the service's estimate (`ferkit.serve.limits.decode_bytes`), on 4000x3000 images."""
    import cv2
    from skimage import data as skimage_data

    from ferkit.images import read_image_format
    from ferkit.serve.decoding import DecodeWorker, WorkerSettings
    from ferkit.serve.limits import IMAGE_FORMATS, decode_bytes

    rgb = cv2.resize(skimage_data.astronaut(), (4000, 3000))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)

    def save(image: Image.Image, kind: str, **options: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, kind, **options)
        return buffer.getvalue()

    cases = {"JPEG RGB": save(Image.fromarray(rgb), "JPEG", quality=90),
             "JPEG RGB progressive": save(Image.fromarray(rgb), "JPEG", quality=90, progressive=True),
             "JPEG gray": save(Image.fromarray(gray), "JPEG"),
             "PNG RGB": save(Image.fromarray(rgb), "PNG", compress_level=1),
             "PNG RGBA": save(Image.fromarray(np.dstack([rgb, gray])), "PNG", compress_level=1),
             "PNG 16-bit gray": save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG", compress_level=1),
             "PNG 16-bit RGB": cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(),
             "PNG palette": save(Image.fromarray(rgb).quantize(64), "PNG", compress_level=1),
             "PNG gray+alpha": save(Image.fromarray(np.dstack([gray, gray])), "PNG", compress_level=1),
             "WebP lossless": save(Image.fromarray(rgb), "WEBP", lossless=True, method=0),
             "WebP lossy": save(Image.fromarray(rgb), "WEBP", quality=80),
             "GIF": save(Image.fromarray(rgb).quantize(64), "GIF"),
             "BMP": save(Image.fromarray(rgb), "BMP")}
    worker = DecodeWorker(WorkerSettings("yunet", 64, 640, 50_000_000, IMAGE_FORMATS))
    report: dict[str, Any] = {}
    try:
        worker.decode(cases["JPEG RGB"], "warm", True, 2**31, 120, threading.Event())
        for name, blob in cases.items():
            width, height, mode, kind = read_image_format(blob, name)
            decoded = worker.decode(blob, name, True, 2**31, 120, threading.Event())
            pixels = width * height
            report[name] = {"mode": mode, "peak_bytes_a_pixel": round(decoded.peak_rss_bytes / pixels, 2),
                            "estimate_bytes_a_pixel": round(decode_bytes(width, height, mode, kind) / pixels, 2)}
            print(name, report[name], flush=True)
    finally:
        worker.close()
    return {"image": "4000x3000, the astronaut resized", "per_format": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/serve/hostile"))
    parser.add_argument("--slow-clients", type=int, default=70)
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--serve-args", default="", help="more `ferkit serve` flags, space-separated")
    parser.add_argument("--cases", nargs="+", choices=["memory", "slow_body", "round2", "idle", "mix", "alone",
                                                        "decode_memory"],
                        default=["memory", "slow_body"])
    parser.add_argument("--seconds", type=float, default=30.0, help="the mix's length (and each round2 row's / 3)")
    args = parser.parse_args()
    from skimage import data as skimage_data

    normal = png(skimage_data.astronaut())
    port = free_port()
    server = start_server(port, args.serve_args.split())
    url = f"http://127.0.0.1:{port}"
    context = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
               "serve_args": args.serve_args}
    reports: dict[str, dict[str, Any]] = {}
    try:
        if "memory" in args.cases:
            reports["memory"] = memory_case(url, server.pid, normal)
        if "slow_body" in args.cases:
            reports["slow_body"] = slow_body_case(url, port, normal, args.slow_clients, args.slow_seconds)
        if "round2" in args.cases:
            reports["round2"] = round2_case(url, port, server.pid, normal, args.seconds / 3)
        if "alone" in args.cases:
            reports["alone"] = alone_case(url, normal, args.seconds)
        if "mix" in args.cases:
            reports["mix"] = mix_case(url, port, server.pid, normal, args.seconds)
        if "decode_memory" in args.cases:
            reports["decode_memory"] = decode_memory_case()
        if "idle" in args.cases:
            args.out.mkdir(parents=True, exist_ok=True)
            reports["idle"] = idle_case(normal, out=args.out)
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    context["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, report in reports.items():
        (args.out / f"{name}.json").write_text(json.dumps({**context, **report}, indent=2) + "\n")
        print(f"{name}: {json.dumps(report, indent=2)}")
    (args.out / f"server-{'-'.join(args.cases)}.log").write_text(log)
    print(f"server log: {len(log.splitlines())} lines, in {args.out}")


if __name__ == "__main__":
    main()
