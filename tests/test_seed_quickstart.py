"""The seed's README Python Quick Start runs unchanged except for its import line."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the seed's quick start in fresh interpreters

# Verbatim from the seed README's "Python Usage", with only the import line changed.
QUICK_START = """
import irmiddleware as intelligent_routing

# Create accelerators
acc1 = intelligent_routing.Accelerator(1, 100)
acc2 = intelligent_routing.Accelerator(2, 100)

# Initialize router with a strategy ("round_robin", "least_connections", "p2c")
router = intelligent_routing.Router("p2c")
router.add_accelerator(acc1)
router.add_accelerator(acc2)

# Route a request
req = intelligent_routing.Request(1, 10, 1)
acc_id = router.route_request(req)

if acc_id is not None:
    print(f"Routed to accelerator {acc_id}")
"""


def test_seed_quick_start_runs_unchanged() -> None:
    result = subprocess.run([sys.executable, "-c", QUICK_START], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("Routed to accelerator 1", "Routed to accelerator 2")


def test_every_seed_strategy_name_works() -> None:
    for strategy in ("round_robin", "least_connections", "p2c"):
        script = QUICK_START.replace('Router("p2c")', f'Router("{strategy}")')
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Routed to accelerator ")
