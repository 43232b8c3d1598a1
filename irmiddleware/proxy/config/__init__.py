"""The router's configuration: TOML (the shape doc/proxy.md documents) read with `tomllib` into
frozen dataclasses.

Layers, bottom up: `_toml` (the error type and the validating readers; a bounded field declares its
limits with `bounded`, and `section` reads any table of such fields), one module per area
(`_sections`: the `[router.*]` tables; `_admission`: `[admission]`; `_discovery`: `[[discovery]]`),
and `_document` (the whole file). A new `[router.x]` section is a dataclass in `_sections` and one
`section(...)` line in `_document.parse_config`. Every value is checked once, at startup, and an
error names its key.
"""

from irmiddleware.proxy.config._admission import AdmissionConfig, ClassConfig, TenantConfig, parse_admission
from irmiddleware.proxy.config._discovery import DiscoveryConfig
from irmiddleware.proxy.config._document import (
    COSTS,
    LOG_FORMATS,
    READY_RULES,
    BackendConfig,
    RouterConfig,
    check_listen,
    load_config,
    parse_backend,
    parse_config,
)
from irmiddleware.proxy.config._sections import (
    WORKERS_MAX,
    AdminConfig,
    AffinityConfig,
    HealthConfig,
    LimitsConfig,
    OutliersConfig,
    ProbesConfig,
    RetriesConfig,
    SignalsConfig,
    SpeedConfig,
    TimeoutsConfig,
    TokensConfig,
)
from irmiddleware.proxy.config._toml import ConfigError

__all__ = [
    "COSTS",
    "LOG_FORMATS",
    "READY_RULES",
    "WORKERS_MAX",
    "AdminConfig",
    "AdmissionConfig",
    "AffinityConfig",
    "BackendConfig",
    "ClassConfig",
    "ConfigError",
    "DiscoveryConfig",
    "HealthConfig",
    "LimitsConfig",
    "OutliersConfig",
    "ProbesConfig",
    "RetriesConfig",
    "RouterConfig",
    "SignalsConfig",
    "SpeedConfig",
    "TenantConfig",
    "TimeoutsConfig",
    "TokensConfig",
    "check_listen",
    "load_config",
    "parse_admission",
    "parse_backend",
    "parse_config",
]
