"""The plugin manager: loads the `irmiddleware` entry points and collects what they register.

Each plugin's registration hooks are called one at a time so that a plugin that fails (at import
or in a hook) is reported by name and skipped, instead of taking the others down with it.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from irmiddleware import _router
from irmiddleware.hooks import (
    PROJECT_NAME,
    BackendAdapter,
    IrmHookspecs,
    NativeStrategy,
    PythonStrategy,
    RequestEvent,
    Strategy,
)

__all__ = ["Observer", "PluginError", "Registry", "collect", "load_plugins", "notify", "observers"]

log = logging.getLogger("irmiddleware.plugins")


class PluginError(ValueError):
    """A plugin registered something invalid, or configuration names something no plugin has."""


@dataclass
class Registry:
    """What the loaded plugins offer: name -> (object, name of the plugin that registered it)."""

    strategies: dict[str, tuple[Strategy, str]] = field(default_factory=dict)
    adapters: dict[str, tuple[Callable[[], BackendAdapter], str]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    """Plugin name -> why it could not be loaded or queried."""

    def strategy(self, name: str) -> tuple[Strategy, str]:
        """The strategy registered as `name`; PluginError lists the valid names."""
        found = self.strategies.get(name)
        if found is None:
            raise PluginError(self._unknown("strategy", name, self.strategies))
        return found

    def adapter(self, name: str) -> BackendAdapter:
        """A new adapter of type `name`; PluginError lists the valid types."""
        found = self.adapters.get(name)
        if found is None:
            raise PluginError(self._unknown("backend type", name, self.adapters))
        factory, plugin = found
        try:
            return factory()
        except Exception as error:
            raise PluginError(f"plugin {plugin!r} failed to create adapter {name!r}: {error!r}") from error

    def _unknown(self, what: str, name: str, known: Iterable[str]) -> str:
        message = f"unknown {what} {name!r}; available: {', '.join(sorted(known)) or '(none)'}"
        if self.broken:
            failed = "; ".join(f"{plugin}: {why}" for plugin, why in sorted(self.broken.items()))
            message += f" (plugins that failed: {failed})"
        return message


def load_plugins(*plugins: object, entry_points: bool = True) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A plugin manager with the hookspecs, `plugins` registered directly (tests, embedding) and,
    if `entry_points`, every plugin of the `irmiddleware` entry-point group. Returns the manager
    and the entry points that failed to load (name -> error)."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(IrmHookspecs)
    for plugin in plugins:
        manager.register(plugin)
    broken = _load_entry_points(manager) if entry_points else {}
    return manager, broken


def _load_entry_points(manager: pluggy.PluginManager) -> dict[str, str]:
    # Not `manager.load_setuptools_entrypoints`: it stops at the first plugin that fails to import,
    # with an error that does not say which plugin it was.
    broken: dict[str, str] = {}
    for entry_point in importlib.metadata.entry_points(group=PROJECT_NAME):
        if manager.get_plugin(entry_point.name) is not None or manager.is_blocked(entry_point.name):
            continue
        try:
            manager.register(entry_point.load(), name=entry_point.name)
        except Exception as error:
            log.error(
                "irmiddleware plugin %r (%s) failed to load: %r", entry_point.name, entry_point.value, error
            )
            broken[entry_point.name] = repr(error)
    return broken


def collect(manager: pluggy.PluginManager, broken: dict[str, str] | None = None) -> Registry:
    """Calls every plugin's registration hooks and indexes the results by name."""
    registry = Registry(broken=dict(broken or {}))
    for plugin_name, result in _call_each(manager, "irm_strategies", registry.broken):
        for strategy in result:
            _check_strategy(plugin_name, strategy)
            _add(registry.strategies, "strategy", strategy.name, strategy, plugin_name)
    for plugin_name, result in _call_each(manager, "irm_adapters", registry.broken):
        for type_name, factory in dict(result).items():
            _add(registry.adapters, "backend type", type_name, factory, plugin_name)
    return registry


def _call_each(
    manager: pluggy.PluginManager, hook_name: str, broken: dict[str, str]
) -> list[tuple[str, Any]]:
    results = []
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        try:
            results.append((impl.plugin_name, impl.function()))
        except Exception as error:
            log.error("irmiddleware plugin %r raised in %s: %r", impl.plugin_name, hook_name, error)
            broken[impl.plugin_name] = f"{hook_name} raised {error!r}"
    return results


def _check_strategy(plugin_name: str, strategy: object) -> None:
    if isinstance(strategy, NativeStrategy):
        if strategy.native not in _router.STRATEGIES:
            raise PluginError(
                f"plugin {plugin_name!r}: {strategy.name!r} names unknown native {strategy.native!r}"
            )
    elif isinstance(strategy, PythonStrategy):
        if not callable(strategy.pick) or strategy.fallback not in _router.STRATEGIES:
            raise PluginError(
                f"plugin {plugin_name!r}: {strategy.name!r} needs a callable pick and native fallback"
            )
    else:
        raise PluginError(
            f"plugin {plugin_name!r} registered {strategy!r}, not a NativeStrategy/PythonStrategy"
        )


def _add(table: dict[str, tuple[Any, str]], what: str, name: str, value: object, plugin_name: str) -> None:
    if name in table:
        raise PluginError(f"{what} {name!r} is registered by both {table[name][1]!r} and {plugin_name!r}")
    table[name] = (value, plugin_name)


Observer = tuple[str, Callable[..., object]]


def observers(manager: pluggy.PluginManager, hook_name: str) -> tuple[Observer, ...]:
    """The (plugin name, function) pairs implementing an observer hook, resolved once so that a
    request with no observers pays nothing, and so each can be called (and blamed) on its own."""
    return tuple(
        (impl.plugin_name, impl.function) for impl in getattr(manager.hook, hook_name).get_hookimpls()
    )


def notify(hook_observers: tuple[Observer, ...], event: RequestEvent) -> None:
    """Calls each observer; one that raises is logged by plugin name and never fails the request
    nor hides the event from the others."""
    for plugin_name, function in hook_observers:
        try:
            function(event=event)
        except Exception as error:
            log.warning("irmiddleware plugin %r raised in an observer hook: %r", plugin_name, error)
