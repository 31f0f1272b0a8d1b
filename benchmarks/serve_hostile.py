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
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
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


def start_server(port: int, extra: list[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "ferkit", "serve", "--port", str(port), "--device", "cpu",
                                "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(process.communicate()[0])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/serve/hostile"))
    parser.add_argument("--slow-clients", type=int, default=70)
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--serve-args", default="", help="more `ferkit serve` flags, space-separated")
    parser.add_argument("--cases", nargs="+", choices=["memory", "slow_body"], default=["memory", "slow_body"])
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
