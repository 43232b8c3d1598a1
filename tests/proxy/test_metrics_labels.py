"""The router's `/metrics` page as an operator reads it, parsed with prometheus-client's parser,
after real requests through a router to vLLM emulators.

`irm_requests_total` counts each request by backend, model, outcome and the class of the status the
client got (2xx, 4xx, 5xx, or none when it got none); a model no backend serves (a client's typo)
counts as `model="none"` and its name appears nowhere on the page, however many are sent.
`irm_request_ttfb_seconds` holds one observation per answer relayed from a backend, by backend.
The page has process and Python metrics and no `_created` series."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from proxy_support import Emulators, Routers, config_for, wait_idle

from irmiddleware.proxy import parse_config

BODY = {"prompt": "Hi", "max_tokens": 2}


def _samples(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = httpx.get(f"{url}/metrics").text
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_requests_count_by_model_and_status_class(emulators: Emulators, router: Routers) -> None:
    (good,) = emulators(1)
    (failing,) = emulators(1, served_model_names=("bad",), fail_status=500)
    backends = [{"url": good.url, "models": ["m"]}, {"url": failing.url, "models": ["bad"]}]
    quiet = {"health": {"enabled": False}, "outliers": {"enabled": False}, "signals": {"enabled": False}}
    server = router(parse_config({"router": quiet, "backends": backends}))
    with httpx.Client(base_url=server.url) as http:
        for _ in range(3):
            assert http.post("/v1/completions", json={**BODY, "model": "m"}).status_code == 200
        assert http.post("/v1/completions", json={**BODY, "model": "bad"}).status_code == 500
        for typo in ("typo-1", "typo-2", "typo-3"):
            assert http.post("/v1/completions", json={**BODY, "model": typo}).status_code == 404
    wait_idle(server.app)
    requests = _samples(server.url)["irm_requests_total"]
    assert requests == {
        (("backend", good.url), ("model", "m"), ("outcome", "ok"), ("status_class", "2xx")): 3.0,
        (
            ("backend", failing.url),
            ("model", "bad"),
            ("outcome", "backend_error"),
            ("status_class", "5xx"),
        ): 1.0,
        (("backend", "none"), ("model", "none"), ("outcome", "rejected"), ("status_class", "4xx")): 3.0,
    }
    assert "typo" not in httpx.get(f"{server.url}/metrics").text  # no label from a client's input


def test_router_side_ttfb_process_metrics_and_no_created_series(
    emulators: Emulators, router: Routers
) -> None:
    first, second = emulators(2)
    server = router(config_for([first.url, second.url], strategy="round_robin"))
    for _ in range(4):
        assert httpx.post(f"{server.url}/v1/completions", json={**BODY, "model": "m"}).status_code == 200
    wait_idle(server.app)
    samples = _samples(server.url)
    ttfb = samples["irm_request_ttfb_seconds_count"]
    assert ttfb == {(("backend", first.url),): 2.0, (("backend", second.url),): 2.0}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert name in samples, name
    assert not [name for name in samples if name.endswith("_created")]
    # The router's export leaves the library's global switch alone: an app's own metrics keep theirs.
    registry = CollectorRegistry()
    Counter("app_things", "An app's own counter.", registry=registry).inc()
    assert b"app_things_created" in generate_latest(registry)
