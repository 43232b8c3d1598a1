"""The routing proxy: a pure-ASGI middleware (and a standalone server) in front of inference servers.

Drop it into any ASGI app; requests on the adapters' paths (for vLLM: `/v1/completions`,
`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`) are routed to the fleet, the rest go to
your app::

    from irmiddleware.proxy import RoutingMiddleware, load_config

    app = RoutingMiddleware(your_asgi_app, load_config("router.toml"))

or run it alone: `irmiddleware serve --config router.toml`. See doc/proxy.md.
"""

from irmiddleware.proxy._middleware import RoutingMiddleware, create_app
from irmiddleware.proxy._outcomes import OUTCOMES
from irmiddleware.proxy.config import (
    BackendConfig,
    ConfigError,
    LimitsConfig,
    RetriesConfig,
    RouterConfig,
    TimeoutsConfig,
    load_config,
    parse_config,
)

__all__ = [
    "OUTCOMES",
    "BackendConfig",
    "ConfigError",
    "LimitsConfig",
    "RetriesConfig",
    "RouterConfig",
    "RoutingMiddleware",
    "TimeoutsConfig",
    "create_app",
    "load_config",
    "parse_config",
]
