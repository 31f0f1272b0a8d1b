"""Load on a live `ferkit serve` over loopback, with request batching on and then off.

Starts two `ferkit serve` subprocesses on 127.0.0.1 (free ports), one with `--no-batching`, sends each
a bounded load (`--requests` a mode from `--clients` concurrent clients, stopped at `--time-cap`
seconds a mode), and reports requests/s, faces/s, p50/p95/p99 latency and failed requests per mode.
The modes take turns in `--rounds`, so a job that starts or stops elsewhere on the machine during the
run weighs on both. Two workloads:

- photos (the default): 640x480 JPEGs with one face each, faces found by the service. scikit-image's
  astronaut and, where FER-2013 is found ($FERKIT_DATA), photos with FER-2013 faces pasted in, built
  in memory and never written anywhere.
- `--crops`: FER-2013 face crops as they are in the data set (48x48 JPEGs), sent with `detect=false`,
  as an app with a face detector of its own would; here the model is most of the work.

The clients share the machine with the server, so each keeps one keep-alive connection and speaks
HTTP/1.1 on asyncio streams: a general client (httpx) took about 4 ms of CPU a request, a quarter of
what the server spends on a face crop. Every mode also reports where the CPU time went (server, client,
other processes, idle), so a run on a busy machine says so.

    .venv/bin/python benchmarks/bench_serve.py                       # photos: 8 clients, 2,000 requests a mode
    .venv/bin/python benchmarks/bench_serve.py --crops               # face crops, no detection
    .venv/bin/python benchmarks/bench_serve.py --requests 200 --out /tmp/serve   # a quick look
    .venv/bin/python benchmarks/bench_serve.py --views 1             # the default model, one view a face

`--views N` serves a temporary copy of the weights whose stored preprocessing says N views (the same
network and tensors), since the service takes its views from the weights file.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from PIL import Image

from ferkit.faces import DEFAULT_DETECTOR
from ferkit.inference import VIEW_COUNTS
from ferkit.weights import DEFAULT_MODEL, load_model, save_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fer_photos import fer_faces, photo, read_gray

DATA = Path(os.environ.get("FERKIT_DATA") or Path(__file__).resolve().parents[2] / "shared/data/fer2013")


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def real_photos() -> list[tuple[str, bytes]]:
    """Named JPEGs of real faces: the astronaut, and FER-2013 faces pasted into photos if the data is here."""
    from skimage.data import astronaut

    portrait = np.ascontiguousarray(cv2.resize(astronaut(), (640, 640), interpolation=cv2.INTER_AREA)[:480])
    photos = [("astronaut.jpg", jpeg(portrait))]
    if (DATA / "test").is_dir():
        for i, cls in enumerate(("happy", "surprise", "neutral")):
            faces = [read_gray(p) for p in fer_faces(DATA, cls)[:3]]
            photos.append((f"fer-{cls}.jpg", jpeg(photo(faces[:1], [(220, 110, 170, 170)], seed=i))))
    return photos


def face_crops() -> list[tuple[str, bytes]]:
    """FER-2013 PrivateTest face crops, the files as they are, four of each of four classes."""
    crops = [(path.name, path.read_bytes()) for cls in ("happy", "surprise", "neutral", "sad")
             for path in fer_faces(DATA, cls)[:4]]
    if not crops:
        sys.exit(f"--crops needs FER-2013 in {DATA} (or $FERKIT_DATA)")
    return crops


def with_views(weights: str, views: int, folder: Path) -> str:
    """A copy of `weights` in `folder` whose preprocessing asks for `views` views a face.

    The copy carries no metrics: the original's accuracy was measured with its own views.
    """
    model, meta = load_model(weights)
    path = folder / f"{Path(weights).stem}-{views}view.safetensors"
    save_weights(path, model, replace(meta, preprocessing=replace(meta.preprocessing, views=views), metrics={}))
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(weights: str, port: int, batching: bool, extra: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "ferkit", "serve", "--host", "127.0.0.1", "--port", str(port), "--weights",
               weights, "--log-level", "warning", "--max-pending", "256", *extra]
    if not batching:
        command.append("--no-batching")
    env = {k: v for k, v in os.environ.items() if k != "FERKIT_API_KEY"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            sys.exit(f"ferkit serve exited: {process.communicate()[0]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            sys.exit("ferkit serve did not get ready in 120 s")
        time.sleep(0.2)


def predict_request(port: int, detect: bool, name: str, data: bytes) -> bytes:
    """The bytes of a POST /v1/predict with one file in the multipart field `files`."""
    boundary = "ferkit-bench-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict?detect={str(detect).lower()} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; its status and body (the service always sends a length)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    lengths = [int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:")]
    if not lengths:
        raise ValueError(f"a response without Content-Length: {head[0]}")
    return int(head[0].split()[1]), await reader.readexactly(lengths[0])


@dataclass
class Tally:
    """What one mode's load has measured so far, over its rounds."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    sent: int = 0
    faces: int = 0
    seconds: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)  # model calls, faces in them, seconds in them
    cpu: Counter[str] = field(default_factory=Counter)  # CPU seconds: server, client, busy, idle

    def summary(self, requests: int) -> dict[str, Any]:
        ms = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        calls = max(self.calls["calls"], 1)
        cpu = {"server": self.cpu["server"], "client": self.cpu["client"],
               "other_processes": max(self.cpu["busy"] - self.cpu["server"] - self.cpu["client"], 0),
               "idle": self.cpu["idle"]}
        return {
            "requests": self.sent, "failed": len(self.failures), "failures": self.failures[:5], "faces": self.faces,
            "seconds": round(self.seconds, 2), "requests_per_s": round(len(self.latencies) / self.seconds, 2),
            "faces_per_s": round(self.faces / self.seconds, 2),
            "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
            "stopped_by_time_cap": self.sent < requests,
            "model_calls": int(self.calls["calls"]), "mean_faces_a_call": round(self.calls["faces"] / calls, 2),
            "model_ms_a_call": round(1000 * self.calls["seconds"] / calls, 1),
            "cpu_s": {k: round(v, 1) for k, v in cpu.items()} if self.cpu else None,
        }


async def load(port: int, uploads: list[tuple[str, bytes]], detect: bool, clients: int, requests: int,
               time_cap: float, tally: Tally) -> None:
    """`requests` predict calls from `clients` concurrent clients, cycling through the uploads, into `tally`."""
    prepared = [predict_request(port, detect, name, data) for name, data in uploads]
    sent = 0
    stop_at = time.monotonic() + time_cap

    async def client() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < requests and time.monotonic() < stop_at:
                request = prepared[(tally.sent + sent) % len(prepared)]
                sent += 1
                start = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(exchange(reader, writer, request), 60)
                except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
                    tally.failures.append(f"{type(err).__name__}: {err}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                tally.latencies.append(time.perf_counter() - start)
                if status != 200:
                    tally.failures.append(f"{status}: {body[:200]!r}")
                else:
                    tally.faces += sum(len(record["faces"]) for record in json.loads(body))
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    tally.seconds += time.perf_counter() - started
    tally.sent += sent


def model_calls(port: int) -> Counter[str]:
    """Model calls so far, faces in them, and seconds spent in them, from the server's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return Counter({"calls": samples.get("ferkit_batch_faces_count", 0.0),
                    "faces": samples.get("ferkit_batch_faces_sum", 0.0),
                    "seconds": samples.get("ferkit_model_call_seconds_sum", 0.0)})


def cpu_times(server: int) -> Counter[str]:
    """CPU seconds so far of the server process, this process (the clients) and the whole machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
        machine = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:  # not Linux: no breakdown
        return Counter()
    own = os.times()
    idle = (machine[3] + machine[4]) / ticks
    return Counter({"server": (int(fields[11]) + int(fields[12])) / ticks, "client": own.user + own.system,
                    "busy": sum(machine) / ticks - idle, "idle": idle})


def measure(port: int, pid: int, uploads: list[tuple[str, bytes]], detect: bool, clients: int, requests: int,
            time_cap: float, tally: Tally) -> None:
    """One round of load on one server, with its model calls and CPU seconds."""
    calls, cpu = model_calls(port), cpu_times(pid)
    asyncio.run(load(port, uploads, detect, clients, requests, time_cap, tally))
    tally.calls.update(model_calls(port) - calls)
    tally.cpu.update(cpu_times(pid) - cpu)


def cpu_info(key: str) -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith(key))
    except (OSError, StopIteration):
        return platform.processor() if key == "model name" else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=DEFAULT_MODEL, help=f"(default: {DEFAULT_MODEL}, the shipped default)")
    parser.add_argument("--views", type=int, choices=VIEW_COUNTS,
                        help="serve the weights with this many views a face (default: the weights' own)")
    parser.add_argument("--crops", action="store_true", help="send FER-2013 face crops with detect=false")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="requests a mode (default: 2000)")
    parser.add_argument("--time-cap", type=float, default=300, help="seconds a mode at most (default: 300)")
    parser.add_argument("--warmup", type=int, default=32, help="requests before measuring (default: 32)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the modes take turns this many times, each sending its share (default: 4)")
    parser.add_argument("--out", default="docs/results/serve",
                        help="folder for bench_serve.json (photos) or bench_serve_crops.json")
    parser.add_argument("--serve-args", default="", help="more flags for ferkit serve, e.g. '--workers 1'")
    args = parser.parse_args()

    workload = "crops" if args.crops else "photos"
    uploads = face_crops() if args.crops else real_photos()
    print(f"cpu: {cpu_info('model name')}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print(f"{workload}: {', '.join(name for name, _ in uploads)}; {args.clients} clients, {args.requests} requests "
          f"a mode, time cap {args.time_cap:g} s")
    serve_args = args.serve_args.split()
    detector = serve_args[serve_args.index("--detector") + 1] if "--detector" in serve_args[:-1] else DEFAULT_DETECTOR
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/bench_serve.py", *sys.argv[1:]]), "weights": args.weights,
        "detector": None if args.crops else detector,
        "views": args.views, "workload": workload, "detect": not args.crops, "clients": args.clients,
        "requests": args.requests, "rounds": args.rounds, "time_cap_s": args.time_cap,
        "uploads": [name for name, _ in uploads],
        "cpu": cpu_info("model name"), "cores": os.cpu_count(), "cpu_flags": cpu_info("flags"),
        "load_average_before": os.getloadavg(), "python": platform.python_version(), "modes": {},
    }
    modes = {"batching": True, "no_batching": False}
    tallies = {mode: Tally() for mode in modes}
    servers: dict[str, tuple[int, subprocess.Popen[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        weights = with_views(args.weights, args.views, Path(folder)) if args.views else args.weights
        try:
            for mode, batching in modes.items():
                port = free_port()
                servers[mode] = port, start_server(weights, port, batching, serve_args)
                asyncio.run(load(port, uploads, not args.crops, args.clients, args.warmup, 60, Tally()))
            loaded = next(m for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json() if m["loaded"])
            report["model"] = {k: loaded[k] for k in ("name", "arch", "views_per_face", "accuracy")}
            # Rounds alternate the modes, so that another job on the machine weighs on both alike.
            for i in range(args.rounds):
                for mode, (port, server) in servers.items():
                    share = args.requests // args.rounds + (i < args.requests % args.rounds)
                    measure(port, server.pid, uploads, not args.crops, args.clients, share,
                            args.time_cap / args.rounds, tallies[mode])
        finally:
            for _, server in servers.values():
                server.terminate()
                server.wait(30)
    for mode, tally in tallies.items():
        result = report["modes"][mode] = tally.summary(args.requests)
        print(f"{mode:>12}: {result['requests']} requests in {result['seconds']} s, {result['requests_per_s']} "
              f"req/s, {result['faces_per_s']} faces/s, latency p50/p95/p99 {result['latency_ms']['p50']}/"
              f"{result['latency_ms']['p95']}/{result['latency_ms']['p99']} ms, {result['failed']} failed, "
              f"{result['mean_faces_a_call']} faces a model call of {result['model_ms_a_call']} ms; "
              f"CPU s {result['cpu_s']}")
    on, off = report["modes"]["batching"], report["modes"]["no_batching"]
    report["speedup_faces_per_s"] = round(on["faces_per_s"] / max(off["faces_per_s"], 1e-9), 2)
    report["load_average_after"] = os.getloadavg()
    print(f"batching: {report['speedup_faces_per_s']}x the faces/s")
    out = Path(args.out) / ("bench_serve_crops.json" if args.crops else "bench_serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if on["failed"] or off["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
