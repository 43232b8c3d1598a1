"""The plugin manager: loads the `irmiddleware` entry points, collects what they register, and calls
the hooks.

Every hook is called by pluggy's own callers, so pluggy's semantics hold: `tryfirst`/`trylast`
order, hook wrappers (`wrapper=True` and old-style `hookwrapper=True`) and implementations that
take a subset of the spec's arguments. What pluggy does not give is isolation: in one
`pm.hook.irm_x(...)` call, the first implementation that raises ends the call and the later ones
never run. `HookCalls` therefore resolves, once, one pluggy caller per implementing plugin
(`PluginManager.subset_hook_caller`, keeping every wrapper) and calls them in pluggy's order: a
plugin that raises (at import, in a registration hook or in an observer) is logged by name and
skipped, and the others still hear the call.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    Strategy,
)

__all__ = ["HookCalls", "PluginError", "Registry", "collect", "load_plugins"]

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
    for plugin_name, result in _registered(manager, "irm_strategies", registry.broken):
        for strategy in result:
            _check_strategy(plugin_name, strategy)
            _add(registry.strategies, "strategy", strategy.name, strategy, plugin_name)
    for plugin_name, result in _registered(manager, "irm_adapters", registry.broken):
        for type_name, factory in dict(result).items():
            _add(registry.adapters, "backend type", type_name, factory, plugin_name)
    return registry


def _registered(
    manager: pluggy.PluginManager, hook_name: str, broken: dict[str, str]
) -> Iterator[tuple[str, Any]]:
    calls = HookCalls.of(manager, hook_name)
    if calls is None:
        return
    for plugin_name, results in calls.each({}, failed=broken):
        for result in results:  # pluggy's list of the plugin's non-None results (one per implementation)
            yield plugin_name, result


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
        # Sorted: which of the two pluggy calls first (tryfirst, registration order) is not the point.
        first, second = sorted((table[name][1], plugin_name))
        raise PluginError(f"{what} {name!r} is registered by both {first!r} and {second!r}")
    table[name] = (value, plugin_name)


class HookCalls:
    """One hook's implementations, each plugin's behind a pluggy caller of its own, resolved once.

    `HookCalls.of(manager, name)` is None when no plugin implements the hook, so a caller on a hot
    path tests for None once per call and builds nothing for a hook nobody implements. Calls go in
    pluggy's order (`tryfirst` first, `trylast` last, otherwise the last registered first). Each
    plugin's caller keeps every wrapper of the hook, so a wrapper runs around each plugin's call
    and sees that call's result or exception (pluggy would run it once around all of them, and one
    exception would end the call). A hook implemented only by wrappers is called once, as pluggy
    would. Plugins registered after `of` are not seen: resolve after loading them.
    """

    __slots__ = ("_callers", "name")

    def __init__(self, name: str, callers: tuple[tuple[str, pluggy.HookCaller], ...]) -> None:
        self.name = name
        self._callers = callers

    @classmethod
    def of(cls, manager: pluggy.PluginManager, name: str) -> HookCalls | None:
        """The calls of hook `name`, or None when no plugin implements it."""
        hook: pluggy.HookCaller = getattr(manager.hook, name)
        impls = hook.get_hookimpls()
        if not impls:
            return None
        # pluggy runs its list from the end: tryfirst implementations sit last.
        plain = [impl for impl in reversed(impls) if not (impl.wrapper or impl.hookwrapper)]
        if not plain:
            return cls(name, (("+".join(impl.plugin_name for impl in impls), hook),))
        callers: list[tuple[str, pluggy.HookCaller]] = []
        done: list[object] = []
        for impl in plain:
            if any(impl.plugin is plugin for plugin in done):
                continue  # a plugin with two implementations (`specname`): both are in its caller
            done.append(impl.plugin)
            # Removing the other plugins removes their wrappers of this hook too, if they have
            # both; a plugin usually either observes a hook or wraps it.
            others = [other.plugin for other in plain if other.plugin is not impl.plugin]
            callers.append((impl.plugin_name, manager.subset_hook_caller(name, others)))
        return cls(name, tuple(callers))

    def each(
        self, kwargs: Mapping[str, object], *, failed: dict[str, str] | None = None
    ) -> Iterator[tuple[str, Any]]:
        """(plugin name, what its caller returned), in pluggy's order. A plugin whose call raises
        is logged by name (an error when `failed` is given, where it is also recorded, else a
        warning) and skipped; the next plugin is still called."""
        for plugin_name, caller in self._callers:
            try:
                result = caller(**kwargs)
            except Exception as error:
                level = logging.WARNING if failed is None else logging.ERROR
                log.log(level, "irmiddleware plugin %r raised in %s: %r", plugin_name, self.name, error)
                if failed is not None:
                    failed[plugin_name] = f"{self.name} raised {error!r}"
                continue
            yield plugin_name, result

    def notify(self, **kwargs: object) -> None:
        """Calls every plugin (a notification); what they return is ignored."""
        for _plugin_name, _result in self.each(kwargs):
            pass

    def first(self, **kwargs: object) -> Any:
        """The first plugin's answer that is not None (a `firstresult` hook); None when none
        answers. Later plugins are not called once one has answered."""
        for _plugin_name, result in self.each(kwargs):
            if result is not None:
                return result
        return None
