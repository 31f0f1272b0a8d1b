"""Load on a live `ferkit serve` over loopback, with request batching on and then off.

Starts `ferkit serve` as a subprocess on 127.0.0.1 (a free port), sends a bounded load of real photos
(`--requests` in all from `--clients` concurrent clients, stopped at `--time-cap` seconds), and reports
requests/s, faces/s, p50/p95/p99 latency and failed requests; then the same with `--no-batching`.
Photos: scikit-image's astronaut (640x480, one face) and, where FER-2013 is found ($FERKIT_DATA),
photos with FER-2013 faces pasted in, built in memory and never written anywhere.
The client runs on the same machine, so on a small CPU it takes some of the server's time.

    .venv/bin/python benchmarks/bench_serve.py                       # 8 clients, 2,000 requests a mode
    .venv/bin/python benchmarks/bench_serve.py --requests 200 --out /tmp/serve   # a quick look
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
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from PIL import Image

from ferkit.weights import DEFAULT_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fer_photos import fer_faces, photo, read_gray


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def real_photos() -> list[tuple[str, bytes]]:
    """Named JPEGs of real faces: the astronaut, and FER-2013 faces pasted into photos if the data is here."""
    from skimage.data import astronaut

    portrait = np.ascontiguousarray(cv2.resize(astronaut(), (640, 640), interpolation=cv2.INTER_AREA)[:480])
    photos = [("astronaut.jpg", jpeg(portrait))]
    root = Path(os.environ.get("FERKIT_DATA") or Path(__file__).resolve().parents[2] / "shared/data/fer2013")
    if (root / "test").is_dir():
        for i, cls in enumerate(("happy", "surprise", "neutral")):
            faces = [read_gray(p) for p in fer_faces(root, cls)[:3]]
            photos.append((f"fer-{cls}.jpg", jpeg(photo(faces[:1], [(220, 110, 170, 170)], seed=i))))
    return photos


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


async def load(url: str, photos: list[tuple[str, bytes]], clients: int, requests: int, time_cap: float
               ) -> dict[str, Any]:
    """`requests` predict calls from `clients` concurrent clients, cycling through the photos."""
    latencies: list[float] = []
    failures: list[str] = []
    faces = 0
    sent = 0
    stop_at = time.monotonic() + time_cap

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal faces, sent
        while sent < requests and time.monotonic() < stop_at:
            name, data = photos[sent % len(photos)]
            sent += 1
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", files={"files": (name, data, "image/jpeg")})
            except httpx.HTTPError as err:
                failures.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text[:200]}")
            else:
                faces += sum(len(record["faces"]) for record in response.json())

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "requests": sent,
        "failed": len(failures), "failures": failures[:5], "faces": faces, "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 2), "faces_per_s": round(faces / seconds, 2),
        "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
        "stopped_by_time_cap": sent < requests,
    }


def batch_sizes(url: str) -> dict[str, float]:
    """Model calls and mean faces a call, from the server's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for s in family.samples if s.name.startswith("ferkit_batch_faces")}
    calls = samples.get("ferkit_batch_faces_count", 0)
    mean = samples.get("ferkit_batch_faces_sum", 0) / max(calls, 1)
    return {"model_calls": calls, "mean_faces_a_call": round(mean, 2)}


def cpu_flags() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=DEFAULT_MODEL, help=f"(default: {DEFAULT_MODEL}, the shipped default)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="requests a mode (default: 2000)")
    parser.add_argument("--time-cap", type=float, default=300, help="seconds a mode at most (default: 300)")
    parser.add_argument("--warmup", type=int, default=32, help="requests before measuring (default: 32)")
    parser.add_argument("--out", default="docs/results/serve", help="folder for bench_serve.json")
    parser.add_argument("--serve-args", default="", help="more flags for ferkit serve, e.g. '--workers 1'")
    args = parser.parse_args()

    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print(f"cpu flags: {cpu_flags()}")
    photos = real_photos()
    print(f"photos: {', '.join(name for name, _ in photos)}; {args.clients} clients, {args.requests} requests a "
          f"mode, time cap {args.time_cap:g} s")
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/bench_serve.py", *sys.argv[1:]]), "weights": args.weights,
        "clients": args.clients, "requests": args.requests, "time_cap_s": args.time_cap,
        "photos": [name for name, _ in photos], "cpu": cpu_model(), "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(), "load_average_before": os.getloadavg(), "python": platform.python_version(),
        "modes": {},
    }
    for mode, batching in (("batching", True), ("no_batching", False)):
        port = free_port()
        server = start_server(args.weights, port, batching, args.serve_args.split())
        url = f"http://127.0.0.1:{port}"
        try:
            loaded = next(m for m in httpx.get(f"{url}/v1/models").json() if m["loaded"])
            report["model"] = {k: loaded[k] for k in ("name", "arch", "views_per_face", "accuracy")}
            asyncio.run(load(url, photos, args.clients, args.warmup, 60))
            before = batch_sizes(url)
            result = asyncio.run(load(url, photos, args.clients, args.requests, args.time_cap))
            after = batch_sizes(url)
            calls = after["model_calls"] - before["model_calls"]
            result["model_calls"] = calls
            result["mean_faces_a_call"] = round(result["faces"] / max(calls, 1), 2)
        finally:
            server.terminate()
            server.wait(30)
        report["modes"][mode] = result
        print(f"{mode:>12}: {result['requests']} requests in {result['seconds']} s, {result['requests_per_s']} req/s, "
              f"{result['faces_per_s']} faces/s, latency p50/p95/p99 {result['latency_ms']['p50']}/"
              f"{result['latency_ms']['p95']}/{result['latency_ms']['p99']} ms, {result['failed']} failed, "
              f"{result['mean_faces_a_call']} faces a model call")
    on, off = report["modes"]["batching"], report["modes"]["no_batching"]
    report["speedup_faces_per_s"] = round(on["faces_per_s"] / max(off["faces_per_s"], 1e-9), 2)
    report["load_average_after"] = os.getloadavg()
    print(f"batching: {report['speedup_faces_per_s']}x the faces/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'bench_serve.json'}")
    if on["failed"] or off["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
