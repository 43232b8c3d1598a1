"""Fixtures for the emulator tests: real emulator servers on 127.0.0.1, stopped after each test."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from irmiddleware.testing import RunningServer, VLLMEmulator, create_vllm_app, serve_in_thread

# Fast timings so a whole test file runs in seconds; individual tests slow down what they need.
FAST = {"time_per_request_s": 0.0, "time_per_prompt_token_s": 0.0, "time_per_output_token_s": 0.001}

VLLMFactory = Callable[..., tuple[RunningServer, VLLMEmulator]]


@pytest.fixture
def vllm_server() -> Iterator[VLLMFactory]:
    """Start emulators with `vllm_server(**config_overrides)`; returns (server, emulator)."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> tuple[RunningServer, VLLMEmulator]:
            app = create_vllm_app(**{"served_model_names": ("m",), **FAST, **overrides})
            return stack.enter_context(serve_in_thread(app)), app.state.emulator

        yield start
