"""The decode worker: a process of its own that decodes one untrusted upload at a time and finds its faces,
under a memory limit set for each image (its share of the decode budget) and killed by the service at its
time limit (`ferkit.serve.decoding`).

Run as a script (`python decode_worker.py`), not imported from the package: it imports only `ferkit.images`
and `ferkit.faces` (about 50 MB), not the service, the model or torch. It speaks over its stdin and a copy of
its stdout in length-framed bytes (`multiprocessing.connection`), never pickle, so a worker that a hostile
file took over cannot make the service run code: the service sends a JSON job and the file's bytes, the
worker answers a JSON reply and, for a read image, its faces' 48x48 crops as raw bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # run as a script: this folder's modules are not top-level modules

SLACK_BYTES = 192 * 2**20
"""Address space granted beyond an image's share: the decoders' and detector's buffers, stacks, and their growth."""


def vm_size() -> int:
    """This process's address space now, in bytes (what RLIMIT_AS counts)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_since_reset() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS


def main() -> None:
    import cv2
    from PIL import Image

    from ferkit.faces import find_faces, make_detector, whole_image_face
    from ferkit.images import ImageError, PixelLimitError, decode_image_bytes

    # Answers go out on a copy of stdout; stdout itself becomes stderr, so that no library's print can
    # corrupt the framing.
    answers = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    jobs = Connection(0, writable=False)
    settings = json.loads(jobs.recv_bytes())
    cv2.setNumThreads(1)  # one image at a time a process; the service runs `--workers` of them
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    detector = make_detector(settings["detector"], settings["min_face"], settings["detect_max_side"])
    find_faces(_blank(), detector)  # warm: the detector's buffers and threads exist before any limit is set
    formats = tuple(settings["formats"])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    answers.send_bytes(b"ready")
    while True:
        try:
            job = json.loads(jobs.recv_bytes())
            data = jobs.recv_bytes()
        except EOFError:
            return
        name = job["name"]
        reset_peak_rss()
        rss_before = peak_rss_since_reset()
        limit = vm_size() + int(job["memory"]) + SLACK_BYTES
        reply: dict[str, Any]
        crops = b""
        exit_after = False
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard),
                                                    hard))
            image, _ = decode_image_bytes(data, name, settings["max_pixels"], formats)
            faces = find_faces(image, detector) if job["detect"] else [whole_image_face(image)]
            size = (int(image.shape[1]), int(image.shape[0]))
            del image
            reply = {"status": 200, "size": size,
                     "faces": [{f.name: getattr(face, f.name) for f in dataclasses.fields(face) if f.name != "crop"}
                               for face in faces]}
            crops = b"".join(face.crop.tobytes() for face in faces)
        except MemoryError:
            budget = int(job["memory"]) / 2**20
            reply = {"status": 413, "error": f"{name}: took more memory to decode than its share of the budget, "
                                             f"{budget:,.0f} MB (--max-decode-mb)"}
            exit_after = True
        except cv2.error as err:
            reply = {"status": 422, "error": f"{name}: face search failed ({str(err).strip()[:200]})"}
            exit_after = True
        except ImageError as err:
            reply = {"status": 413 if isinstance(err, PixelLimitError) else 422, "error": str(err)}
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        reply["peak_rss_bytes"] = max(0, peak_rss_since_reset() - rss_before)
        reply["exit"] = exit_after
        answers.send_bytes(json.dumps(reply, default=_plain).encode())
        answers.send_bytes(crops)
        if exit_after:  # a decoder that ran out of memory may have left its state half made
            return


def _blank() -> Any:
    import numpy as np

    return np.full((96, 96), 128, np.uint8)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in a face's fields as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


if __name__ == "__main__":
    main()
