"""`hooks.metric_samples` reads only the lines of the samples it is asked for, and finds exactly what
a parse of the whole page finds: on the pages the emulated vLLM, TGI and Triton servers serve over
HTTP, on a vLLM-shaped page of several hundred lines, and on a page written to trip a line filter
(names that prefix other names, braces and spaces inside label values, no final newline).
`irmiddleware bench-signals` runs and prints its comparison."""

from __future__ import annotations

import contextlib
import io

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from irmiddleware.bench._signals import bench_signals_main, vllm_page
from irmiddleware.hooks import metric_samples
from irmiddleware.testing import (
    create_tgi_app,
    create_triton_app,
    create_triton_metrics_app,
    create_vllm_app,
    serve_in_thread,
)


def whole_parse(text: str) -> dict[str, list[float]]:
    """Every sample of the page, parsed whole, under the name the page writes it with (the parser
    reports a counter written without `_total`, as TGI writes them, as `<name>_total`)."""
    written = {line.partition("{")[0].split()[0] for line in text.splitlines() if line and line[0] != "#"}
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name not in written and name.endswith("_total") and name[: -len("_total")] in written:
                name = name[: -len("_total")]
            found.setdefault(name, []).append(sample.value)
    return found


def assert_same_as_whole_parse(text: str) -> None:
    everything = whole_parse(text)
    assert everything, "the page has samples"
    assert metric_samples(text, set(everything)) == everything  # all names at once
    for name, values in everything.items():  # and each alone
        assert metric_samples(text, (name,)) == {name: values}, name
    assert metric_samples(text, ("no_such_metric",)) == {}


def served_pages() -> dict[str, str]:
    pages = {}
    with serve_in_thread(create_vllm_app(served_model_names=("m",))) as vllm:
        httpx.post(f"{vllm.url}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3})
        pages["vllm"] = httpx.get(f"{vllm.url}/metrics").text
    with serve_in_thread(create_tgi_app()) as tgi:
        httpx.post(f"{tgi.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
        pages["tgi"] = httpx.get(f"{tgi.url}/metrics").text
    triton = create_triton_app()
    with serve_in_thread(triton), serve_in_thread(create_triton_metrics_app(triton)) as metrics:
        pages["triton"] = httpx.get(f"{metrics.url}/metrics").text
    return pages


def test_the_emulators_pages_read_the_same_as_whole_parses() -> None:
    for kind, text in served_pages().items():
        assert len(text.splitlines()) > 10, kind
        assert_same_as_whole_parse(text)


def test_a_vllm_shaped_page_reads_the_same_as_a_whole_parse() -> None:
    text = vllm_page(engines=2)
    assert len(text.splitlines()) > 500
    assert_same_as_whole_parse(text)


TRICKY = """# HELP queue Requests waiting.
# TYPE queue gauge
queue{model="a b",note="x{y} queue 9"} 3
queue_size 100
queue\t7
# TYPE queue_total counter
queue_total 5
# HELP other mentions queue{model="z"} 8 in its help
other{label="\\nqueue 11"} 1
queue{model="last"} 4"""


def test_a_line_filter_is_not_fooled() -> None:
    assert metric_samples(TRICKY, ("queue",)) == {"queue": [3.0, 7.0, 4.0]}
    assert metric_samples(TRICKY, ("queue_size", "queue_total")) == {
        "queue_size": [100.0],
        "queue_total": [5.0],
    }
    assert_same_as_whole_parse(TRICKY)


@pytest.mark.parametrize("text", ["not a metric page {", 'queue{model="a} 3\n'])
def test_text_the_parser_refuses_still_raises(text: str) -> None:
    with pytest.raises(ValueError):
        metric_samples(text, ("queue", "not"))


def test_bench_signals_prints_both_ways_and_the_ratio() -> None:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert bench_signals_main(["--rounds", "3", "--engines", "1"]) == 0
    printed = output.getvalue()
    assert "the whole page parsed (baseline)" in printed and "load_signals: needed lines only" in printed
    assert "x less per scrape" in printed
