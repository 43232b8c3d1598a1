"""The benchmarks behind `irmiddleware bench`, `bench-proxy`, `bench-admission` and
`bench-affinity`: commands that print figures (recorded in doc/benchmarks.md), never tests.

One module per command (`_core`: the native core at the seed's scale; `_proxy`: the proxy's
overhead against direct calls, with `_peers` and `_load` for `--peers`: the Rust routers beside
ours under a native load generator; `_admission`: priority classes under overload; `_affinity`:
what a cache-aware decision costs), all on one harness (`_harness`: ports, child processes, CPU
time, percentiles, tables). They use the package's public surface: `irmiddleware`'s router, the
`irmiddleware serve` command and `irmiddleware.testing`'s emulators, each in its own process.
"""

__all__: list[str] = []
