"""schemathesis against the OpenAPI schema of a live `ferkit serve`: no 5xx, no response that breaks the schema.

Bounded: a few dozen generated requests an operation, well under a minute in all. Generated image
bytes are not images, so /v1/predict answers them 4xx; the schema cannot say "a decodable image",
which is why the one check that wants schema-valid requests accepted is left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from ferkit.predict import EmotionRecognizer  # noqa: E402
from ferkit.serve import ServeConfig, create_app  # noqa: E402
from serve_live import live_server  # noqa: E402

KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def live_url(recognizer: EmotionRecognizer) -> Iterator[str]:
    with live_server(create_app(ServeConfig(api_key=KEY, max_files=4, timeout_s=20), recognizer)) as url:
        yield url


@pytest.mark.slow
def test_api_conforms_to_its_schema(live_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/predict", "GET /v1/models", "GET /healthz", "GET /readyz", "GET /metrics"}
    started = time.monotonic()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate], derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            case.call_and_validate(base_url=live_url, headers={"Authorization": f"Bearer {KEY}"},
                                   excluded_checks=[positive_data_acceptance], timeout=30)

        check()
    assert time.monotonic() - started < 120, "the schema run is meant to stay well under a minute"
    metrics = httpx.get(f"{live_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    sent = {(s.labels["path"], s.labels["status"]): s.value for family in text_string_to_metric_families(metrics)
            for s in family.samples if s.name == "ferkit_http_requests_total"}
    assert sum(n for (path, _), n in sent.items() if path == "/v1/predict") >= 20, sent
    assert not [key for key in sent if key[1].startswith("5") and key[0] != "/readyz"], sent  # readyz: warming up
