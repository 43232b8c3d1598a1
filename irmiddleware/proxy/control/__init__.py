"""The control plane: what decides which backends may take traffic, beside the requests themselves.

`_health` (active checks and the native state they set), `_outlier` (passive ejection from live
traffic, a pure book-keeper on a clock it is given) and `_signals` (the load backends report in
their metrics) run as tasks of `FleetMonitor` for the router's lifetime; `_discovery` (backends
from DNS names, `[[discovery]]`) runs beside them and changes the fleet as the admin API does.
The data plane only calls `FleetMonitor.observe` once per attempt and reads `status_of` for the
status document. `_speed` (learned backend speed) is fed by the attempts themselves and sets the
core's weights.
"""

from irmiddleware.proxy.control._discovery import Discovery, FleetChanges, Removals, check_resolvers, resolve
from irmiddleware.proxy.control._health import FleetHealth, FleetMonitor
from irmiddleware.proxy.control._outlier import OutlierDetector
from irmiddleware.proxy.control._signals import SignalScraper
from irmiddleware.proxy.control._speed import SpeedCollector, SpeedFeed

__all__ = [
    "Discovery",
    "FleetChanges",
    "FleetHealth",
    "FleetMonitor",
    "OutlierDetector",
    "Removals",
    "SignalScraper",
    "SpeedCollector",
    "SpeedFeed",
    "check_resolvers",
    "resolve",
]
