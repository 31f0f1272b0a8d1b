"""Load on a live `ferkit serve` over loopback, with request batching on and then off.

Starts `ferkit serve` as a subprocess on 127.0.0.1 (a free port), sends a bounded load (`--requests` in
all from `--clients` concurrent clients, stopped at `--time-cap` seconds), and reports requests/s,
faces/s, p50/p95/p99 latency and failed requests; then the same with `--no-batching`. Two workloads:

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
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from PIL import Image

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
    """A copy of `weights` in `folder` whose preprocessing asks for `views` views a face."""
    model, meta = load_model(weights)
    path = folder / f"{Path(weights).stem}-{views}view.safetensors"
    save_weights(path, model, replace(meta, preprocessing=replace(meta.preprocessing, views=views)))
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


async def load(port: int, uploads: list[tuple[str, bytes]], detect: bool, clients: int, requests: int,
               time_cap: float) -> dict[str, Any]:
    """`requests` predict calls from `clients` concurrent clients, cycling through the uploads."""
    prepared = [predict_request(port, detect, name, data) for name, data in uploads]
    latencies: list[float] = []
    failures: list[str] = []
    faces = sent = 0
    stop_at = time.monotonic() + time_cap

    async def client() -> None:
        nonlocal faces, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < requests and time.monotonic() < stop_at:
                request = prepared[sent % len(prepared)]
                sent += 1
                start = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(exchange(reader, writer, request), 60)
                except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
                    failures.append(f"{type(err).__name__}: {err}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    failures.append(f"{status}: {body[:200]!r}")
                else:
                    faces += sum(len(record["faces"]) for record in json.loads(body))
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "requests": sent,
        "failed": len(failures), "failures": failures[:5], "faces": faces, "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 2), "faces_per_s": round(faces / seconds, 2),
        "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
        "stopped_by_time_cap": sent < requests,
    }


def model_calls(port: int) -> tuple[float, float, float]:
    """Model calls so far, faces in them, and seconds spent in them, from the server's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return (samples.get("ferkit_batch_faces_count", 0.0), samples.get("ferkit_batch_faces_sum", 0.0),
            samples.get("ferkit_model_call_seconds_sum", 0.0))


def cpu_times(server: int) -> dict[str, float]:
    """CPU seconds so far of the server process, this process (the clients) and the whole machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
        machine = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:  # not Linux: no breakdown
        return {}
    own = os.times()
    idle = (machine[3] + machine[4]) / ticks
    return {"server": (int(fields[11]) + int(fields[12])) / ticks, "client": own.user + own.system,
            "busy": sum(machine) / ticks - idle, "idle": idle}


def run_mode(weights: str, batching: bool, uploads: list[tuple[str, bytes]], detect: bool,
             args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """One server, warmed up, then the measured load; (result, the loaded model's listing)."""
    port = free_port()
    server = start_server(weights, port, batching, args.serve_args.split())
    try:
        loaded = next(m for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json() if m["loaded"])
        asyncio.run(load(port, uploads, detect, args.clients, args.warmup, 60))
        calls_before, cpu_before = model_calls(port), cpu_times(server.pid)
        result = asyncio.run(load(port, uploads, detect, args.clients, args.requests, args.time_cap))
        calls_after, cpu_after = model_calls(port), cpu_times(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    calls, faces, seconds = (after - before for after, before in zip(calls_after, calls_before, strict=True))
    result["model_calls"] = int(calls)
    result["mean_faces_a_call"] = round(faces / max(calls, 1), 2)
    result["model_ms_a_call"] = round(1000 * seconds / max(calls, 1), 1)
    if cpu_before and cpu_after:
        used = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
        result["cpu_s"] = {"server": round(used["server"], 1), "client": round(used["client"], 1),
                           "other_processes": round(max(used["busy"] - used["server"] - used["client"], 0), 1),
                           "idle": round(used["idle"], 1)}
    return result, loaded


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
    parser.add_argument("--out", default="docs/results/serve",
                        help="folder for bench_serve.json (photos) or bench_serve_crops.json")
    parser.add_argument("--serve-args", default="", help="more flags for ferkit serve, e.g. '--workers 1'")
    args = parser.parse_args()

    workload = "crops" if args.crops else "photos"
    uploads = face_crops() if args.crops else real_photos()
    print(f"cpu: {cpu_info('model name')}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print(f"{workload}: {', '.join(name for name, _ in uploads)}; {args.clients} clients, {args.requests} requests "
          f"a mode, time cap {args.time_cap:g} s")
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/bench_serve.py", *sys.argv[1:]]), "weights": args.weights,
        "views": args.views, "workload": workload, "detect": not args.crops, "clients": args.clients,
        "requests": args.requests, "time_cap_s": args.time_cap, "uploads": [name for name, _ in uploads],
        "cpu": cpu_info("model name"), "cores": os.cpu_count(), "cpu_flags": cpu_info("flags"),
        "load_average_before": os.getloadavg(), "python": platform.python_version(), "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        weights = with_views(args.weights, args.views, Path(folder)) if args.views else args.weights
        for mode, batching in (("batching", True), ("no_batching", False)):
            result, loaded = run_mode(weights, batching, uploads, not args.crops, args)
            report["model"] = {k: loaded[k] for k in ("name", "arch", "views_per_face", "accuracy")}
            report["modes"][mode] = result
            print(f"{mode:>12}: {result['requests']} requests in {result['seconds']} s, {result['requests_per_s']} "
                  f"req/s, {result['faces_per_s']} faces/s, latency p50/p95/p99 {result['latency_ms']['p50']}/"
                  f"{result['latency_ms']['p95']}/{result['latency_ms']['p99']} ms, {result['failed']} failed, "
                  f"{result['mean_faces_a_call']} faces a model call of {result['model_ms_a_call']} ms; "
                  f"CPU s {result.get('cpu_s')}")
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
