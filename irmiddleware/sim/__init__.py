"""Simulation of a fleet of accelerators behind the router, for choosing a strategy from evidence.

Every routing decision and every release goes through the real native core; the simulator only
models time, arrivals and how accelerators serve requests (see `_model` for the service model and
`_engine` for the policies on rejection and failure).

    from irmiddleware.sim import LlmWorkload, PoissonArrivals, Scenario, compare, make_fleet, offered_rate

    fleet = make_fleet(50, heterogeneity=1.0, seed=7)
    workload = LlmWorkload()
    arrivals = PoissonArrivals(offered_rate(fleet, workload, load=0.8))
    scenario = Scenario(fleet, workload, arrivals, requests=20_000, seed=7)
    for result in compare(scenario):
        print(result.strategy, result.latency, result.rejection_rate)

Router replicas with their own books (`ReplicaScenario`, `replica_study`, `format_replica_table`)
take a chat scenario; see doc/replicas.md.
"""

from irmiddleware.sim._chat import ChatWorkload, session_rate
from irmiddleware.sim._engine import (
    AFFINITY_STRATEGIES,
    DEFAULT_STRATEGIES,
    Progress,
    Scenario,
    compare,
    simulate,
)
from irmiddleware.sim._model import (
    Arrival,
    ArrivalProcess,
    BurstyArrivals,
    Failure,
    Fleet,
    Job,
    LlmWorkload,
    PoissonArrivals,
    ReplayArrivals,
    SpeedChange,
    TraceArrivals,
    UniformWorkload,
    Workload,
    make_fleet,
    mean_work_s,
    offered_rate,
)
from irmiddleware.sim._replicas import (
    REPLICA_STRATEGIES,
    ReplicaResult,
    ReplicaScenario,
    format_replica_table,
    replica_study,
    simulate_replicas,
)
from irmiddleware.sim._stats import (
    Affinity,
    Outage,
    Percentiles,
    StrategyResult,
    format_histograms,
    format_table,
)
from irmiddleware.sim._theory import (
    BallsIntoBins,
    balls_into_bins,
    format_balls_into_bins,
    max_load_one_choice,
    max_load_two_choices,
)

__all__ = [
    "AFFINITY_STRATEGIES",
    "DEFAULT_STRATEGIES",
    "REPLICA_STRATEGIES",
    "Affinity",
    "Arrival",
    "ArrivalProcess",
    "BallsIntoBins",
    "BurstyArrivals",
    "ChatWorkload",
    "Failure",
    "Fleet",
    "Job",
    "LlmWorkload",
    "Outage",
    "Percentiles",
    "PoissonArrivals",
    "Progress",
    "ReplayArrivals",
    "ReplicaResult",
    "ReplicaScenario",
    "Scenario",
    "SpeedChange",
    "StrategyResult",
    "TraceArrivals",
    "UniformWorkload",
    "Workload",
    "balls_into_bins",
    "compare",
    "format_balls_into_bins",
    "format_histograms",
    "format_replica_table",
    "format_table",
    "make_fleet",
    "max_load_one_choice",
    "max_load_two_choices",
    "mean_work_s",
    "offered_rate",
    "replica_study",
    "session_rate",
    "simulate",
    "simulate_replicas",
]
