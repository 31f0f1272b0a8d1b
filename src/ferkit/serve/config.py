"""The service's settings: `ServeConfig` (one field a `ferkit serve` flag), its constants, the API key's
source and the recognizer a config describes.

Importable without the serve extra: `ferkit serve`'s argument parser takes its defaults from here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..faces import DEFAULT_DETECT_MAX_SIDE, DEFAULT_DETECTOR, DEFAULT_MIN_FACE
from ..predict import EmotionRecognizer

API_KEY_ENV = "FERKIT_API_KEY"
"""Environment variable read for the API key when `--api-key` is not given."""
DEFAULT_MAX_PIXELS = 50_000_000
"""Pixels an uploaded image may have (a 50 MP photo); larger ones are refused from their header."""
MAX_DIGITS = 15
"""The most decimals `?digits=` may ask for: float64 holds no more."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names every server answers; others only with an API key or in `allowed_hosts`."""


@dataclass
class ServeConfig:
    """The service's settings; `ferkit serve`'s flags map onto these one to one."""

    weights: str | None = None
    device: str = "auto"
    detector: str = DEFAULT_DETECTOR
    min_face: int = DEFAULT_MIN_FACE
    detect_max_side: int | None = DEFAULT_DETECT_MAX_SIDE
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    api_key: str | None = None
    max_file_bytes: int = 10 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 16
    batch_window_ms: float = 5.0
    max_batch: int = 64
    max_pending: int = 64
    timeout_s: float = 30.0
    max_request_pixels: int = 100_000_000
    max_decode_mb: float = 768.0
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
    decode_timeout_s: float = 10.0
    max_inflight_mb: float = 768.0
    limit_concurrency: int = 1000
    forwarded_allow_ips: tuple[str, ...] = ()
    max_streams_per_client: int = 4

    def problem(self) -> str | None:
        """What is wrong with these settings, or None."""
        for name in ("workers", "max_file_bytes", "max_pixels", "max_files", "max_batch", "max_pending",
                     "max_request_pixels", "limit_concurrency", "max_streams_per_client"):
            if getattr(self, name) < 1:
                return f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}"
        for name in ("max_decode_mb", "body_timeout_s", "header_timeout_s", "decode_timeout_s", "max_inflight_mb"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                return f"{name.removesuffix('_s').replace('_', '-')} must be positive, not {value}"
        if not (self.batch_window_ms >= 0 and math.isfinite(self.batch_window_ms)):
            return f"batch-window-ms must be 0 (no batching) or more, not {self.batch_window_ms}"
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            return f"timeout must be positive, not {self.timeout_s}"
        if not 0 <= self.port <= 65535:
            return f"port {self.port} is not a TCP port"
        return None

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: every file at its limit, base64-encoded, plus room for framing."""
        return self.max_files * (self.max_file_bytes * 4 // 3 + 4) + 64 * 1024

    @property
    def max_inflight_bytes(self) -> int:
        """`max_inflight_mb` in bytes: the memory request bodies being read and parsed at once may take in all."""
        return round(self.max_inflight_mb * 2**20)

    @property
    def max_decode_bytes(self) -> int:
        """`max_decode_mb` in bytes: the memory images being decoded at once may take in all."""
        return round(self.max_decode_mb * 2**20)


def make_recognizer(config: ServeConfig) -> EmotionRecognizer:
    """The recognizer `config` describes: its weights, device and face detection."""
    return EmotionRecognizer(config.weights, device=config.device, detector=config.detector, min_face=config.min_face,
                             detect_max_side=config.detect_max_side, max_pixels=config.max_pixels)


def resolve_api_key(given: str | None) -> str | None:
    """The API key from the flag, else from $FERKIT_API_KEY; None (no key) when neither is set or empty."""
    key = given if given is not None else os.environ.get(API_KEY_ENV)
    return key or None
