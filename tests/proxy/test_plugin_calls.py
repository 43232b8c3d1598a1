"""Hooks are called by pluggy's own callers, with pluggy's semantics, and one plugin cannot silence
another: `tryfirst`/`trylast` order holds for the registration hooks and for observers; every
notification hook reaches an implementation that takes a subset of the spec's arguments (here, of
a real router's request lifecycle and health transitions); hook wrappers, new-style and old-style,
see each plugin's call with its result or exception; and an observer that raises is logged by name
while the other observers still hear the event and the request is answered. doc/plugins.md's example
of these rules runs as written."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_support import FAST_FLEET, Emulators, Routers, config_for, wait_idle

from irmiddleware import _plugins
from irmiddleware.hooks import (
    BackendLoad,
    NativeStrategy,
    PythonStrategy,
    RequestEvent,
    RouteInfo,
    Strategy,
    hookimpl,
)
from irmiddleware.testing import assert_idle, wait_until

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


# ---- registration hooks ----------------------------------------------------------------------


class Offering:
    """Offers native strategies named `<name>-p2c` (and `hidden`), recording when it is asked."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.__name__ = name
        self._calls = calls

    def _offer(self) -> Sequence[Strategy]:
        self._calls.append(self.__name__)
        return [
            NativeStrategy(f"{self.__name__}-p2c", "p2c"),
            NativeStrategy(f"{self.__name__}-hidden", "p2c"),
        ]


class OfferingFirst(Offering):
    @hookimpl(tryfirst=True)
    def irm_strategies(self) -> Sequence[Strategy]:
        return self._offer()


class OfferingPlain(Offering):
    @hookimpl
    def irm_strategies(self) -> Sequence[Strategy]:
        return self._offer()


class OfferingLast(Offering):
    @hookimpl(trylast=True)
    def irm_strategies(self) -> Sequence[Strategy]:
        return self._offer()


class HidingWrapper:
    """Wraps `irm_strategies`: drops every strategy whose name ends in "-hidden"."""

    __name__ = "hiding-wrapper"

    def __init__(self) -> None:
        self.wrapped = 0

    @hookimpl(wrapper=True)
    def irm_strategies(self) -> Generator[None, list[Sequence[Strategy]], list[Sequence[Strategy]]]:
        results = yield
        self.wrapped += 1
        return [[s for s in offered if not s.name.endswith("-hidden")] for offered in results]


def test_registration_hooks_follow_pluggy_order_and_wrappers() -> None:
    calls: list[str] = []
    wrapper = HidingWrapper()
    # Registered tryfirst first and trylast last: registration order alone (pluggy calls the last
    # registered first) would give the reverse of what the markers ask for.
    plugins = (
        OfferingFirst("first", calls),
        OfferingPlain("plain", calls),
        OfferingLast("last", calls),
        wrapper,
    )
    manager, broken = _plugins.load_plugins(*plugins, entry_points=False)
    registry = _plugins.collect(manager, broken)
    assert calls == ["first", "plain", "last"]
    assert set(registry.strategies) == {"first-p2c", "plain-p2c", "last-p2c"}
    assert registry.strategies["last-p2c"][1] == "last"  # still credited to the plugin that offered it
    assert wrapper.wrapped == 3  # around each plugin's call
    assert broken == {}


# ---- observers: order, wrappers, isolation -----------------------------------------------------


class Heard:
    """An observer of `irm_request_routed` and `irm_request_completed` that writes its name and
    the step into a shared list."""

    def __init__(self, name: str, heard: list[str]) -> None:
        self.__name__ = name
        self._heard = heard

    def _hear(self, step: str) -> None:
        self._heard.append(f"{self.__name__}:{step}")


class HeardFirst(Heard):
    @hookimpl(tryfirst=True)
    def irm_request_routed(self, event: RequestEvent) -> None:
        self._hear("routed")


class HeardPlain(Heard):
    @hookimpl
    def irm_request_routed(self, event: RequestEvent) -> None:
        self._hear("routed")

    @hookimpl
    def irm_request_completed(self, event: RequestEvent) -> None:
        self._hear("completed")


def test_a_tryfirst_observer_is_called_first(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    heard: list[str] = []
    # Registered first: without the marker it would be called last.
    server = router(
        config_for([backend.url]), plugins=(HeardFirst("first", heard), HeardPlain("plain", heard))
    )
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    wait_until(lambda: "plain:completed" in heard, "the completed notification")
    assert heard == ["first:routed", "plain:routed", "plain:completed"]
    wait_idle(server.app)
    assert_idle(server.app.router)


class Boom:
    __name__ = "boom"

    @hookimpl(tryfirst=True)
    def irm_request_completed(self, event: RequestEvent) -> None:
        raise RuntimeError("observer bug")


class NewStyleWrapper:
    __name__ = "new-style-wrapper"

    def __init__(self) -> None:
        self.saw: list[str] = []

    @hookimpl(wrapper=True)
    def irm_request_completed(self, event: RequestEvent) -> Generator[None, list[None], list[None]]:
        try:
            result = yield
        except RuntimeError as error:
            self.saw.append(f"raised {error}")
            raise
        self.saw.append(f"returned {result} for status {event.status}")
        return result


class OldStyleWrapper:
    __name__ = "old-style-wrapper"

    def __init__(self) -> None:
        self.saw: list[str] = []

    @hookimpl(hookwrapper=True)
    def irm_request_completed(self) -> Generator[None, Any, None]:
        outcome = yield
        self.saw.append("raised" if outcome.exception is not None else "returned")


def test_wrappers_see_each_call_and_a_raising_observer_silences_nobody(
    emulators: Emulators, router: Routers, caplog: pytest.LogCaptureFixture
) -> None:
    (backend,) = emulators(1)
    heard: list[str] = []
    new_style, old_style = NewStyleWrapper(), OldStyleWrapper()
    plugins = (HeardPlain("plain", heard), Boom(), new_style, old_style)
    server = router(config_for([backend.url]), plugins=plugins)
    with caplog.at_level(logging.WARNING, logger="irmiddleware.plugins"):
        assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
        wait_until(lambda: len(new_style.saw) == 2, "both observers' calls wrapped")
    # boom is tryfirst: it raised before plain was called, and plain still heard the event.
    assert heard == ["plain:routed", "plain:completed"]
    assert new_style.saw == ["raised observer bug", "returned [] for status 200"]
    assert old_style.saw == ["raised", "returned"]
    assert "'boom' raised in irm_request_completed" in caplog.text
    wait_idle(server.app)
    assert_idle(server.app.router)


# ---- every notification hook reaches an implementation taking a subset of its arguments -------


class SubsetObserver:
    """Implements every notification hook with fewer arguments than its spec (pluggy allows it)."""

    __name__ = "subset-observer"

    def __init__(self) -> None:
        self.heard: list[str] = []

    @hookimpl
    def irm_request_routed(self) -> None:
        self.heard.append("routed")

    @hookimpl
    def irm_request_first_byte(self) -> None:
        self.heard.append("first_byte")

    @hookimpl
    def irm_request_completed(self) -> None:
        self.heard.append("completed")

    @hookimpl
    def irm_request_failed(self) -> None:
        self.heard.append("failed")

    @hookimpl
    def irm_backend_state_changed(self, new: str) -> None:
        self.heard.append(f"state:{new}")


class FirstBackend:
    """A strategy that always picks backend 0 (the retry goes to another)."""

    __name__ = "first-backend"

    @hookimpl
    def irm_strategies(self) -> Sequence[Strategy]:
        return [PythonStrategy("first", _pick_first)]


def _pick_first(backends: Sequence[BackendLoad], request: RouteInfo) -> int | None:
    return 0


def test_every_notification_hook_reaches_a_subset_implementation(
    emulators: Emulators, router: Routers
) -> None:
    overloaded, well = emulators(2)
    overloaded.emulator.reconfigure(fail_status=503)  # an overload answer: retried on `well`
    observer = SubsetObserver()
    config = config_for([overloaded.url, well.url], strategy="first", **FAST_FLEET)
    server = router(config, plugins=(observer, FirstBackend()))
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    wait_until(lambda: "completed" in observer.heard, "the completed notification")
    overloaded.emulator.reconfigure(unhealthy=True)  # down, by its ejection or by health checks
    wait_until(lambda: "state:down" in observer.heard, "the state change")
    assert {"routed", "first_byte", "completed", "failed", "state:down"} <= set(observer.heard)
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_the_plugins_doc_example_runs() -> None:
    doc = (Path(__file__).resolve().parents[2] / "doc" / "plugins.md").read_text(encoding="utf-8")
    section = doc[doc.index("## How hooks are called") :]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, "doc/plugins.md", "exec"), {"__name__": "plugins_doc_example"})
    assert output.getvalue() == "['p2c']\n"
