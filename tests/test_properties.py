"""Property tests: hypothesis drives random sequences of add / remove / update / acquire / release
against the native table and a simple Python model of it, and compares them after every step.

The model decides everything that is deterministic (fits, states, counters, totals, statuses);
for a strategy's choice it checks the rule instead of the pick: the chosen backend was eligible
and had room, and "none" is only answered when no backend had room."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from irmiddleware import _errors, _native
from irmiddleware._native import SLOT_NONE, NativeTable, State, slot_of_ticket

BACKENDS_MAX = 6
SHARES = [1000, 900, 800, 700, 600, 500, 500, 500]


@dataclass
class ModelBackend:
    id: int
    capacity: int
    weight_milli: int
    state: State = State.ACTIVE
    cost: int = 0
    count: int = 0
    routed: int = 0
    completed: int = 0
    failed: int = 0

    def fits(self, cost: int, priority: int) -> bool:
        limit = self.capacity * SHARES[priority] // 1000
        return self.state == State.ACTIVE and self.cost + cost <= limit


class TableMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.table = NativeTable(BACKENDS_MAX)
        self.model: dict[int, ModelBackend] = {}  # by slot, including retired ones
        self.next_id = 0

    def present(self) -> dict[int, ModelBackend]:
        return {slot: b for slot, b in self.model.items() if b.state != State.RETIRED}

    @rule(capacity=st.integers(1, 40), weight_milli=st.integers(1, 4000))
    def add(self, capacity: int, weight_milli: int) -> None:
        self.next_id += 1
        occupied = len(self.model)
        try:
            slot = self.table.add(self.next_id, capacity, weight_milli)
        except _errors.TableFullError:
            assert occupied == BACKENDS_MAX
            return
        assert slot not in self.model
        self.model[slot] = ModelBackend(self.next_id, capacity, weight_milli)

    @precondition(lambda self: bool(self.present()))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.present())))
        self.table.remove(slot)
        backend = self.model[slot]
        if backend.count == 0:
            del self.model[slot]
        else:
            backend.state = State.RETIRED

    @precondition(lambda self: bool(self.present()))
    @rule(
        data=st.data(),
        capacity=st.integers(1, 40),
        state=st.sampled_from([State.ACTIVE, State.DRAINING, State.DOWN]),
    )
    def update(self, data: st.DataObject, capacity: int, state: State) -> None:
        slot = data.draw(st.sampled_from(sorted(self.present())))
        backend = self.model[slot]
        self.table.update(slot, capacity, backend.weight_milli, state)
        backend.capacity, backend.state = capacity, state

    @rule(
        target=leases,
        strategy=st.sampled_from(list(_native.StrategyCode)),
        cost=st.integers(1, 12),
        priority=st.integers(0, 7),
    )
    def acquire(self, strategy: _native.StrategyCode, cost: int, priority: int) -> tuple[int, int] | None:
        ticket = self.table.acquire(int(strategy), cost, priority)
        if ticket == SLOT_NONE:
            assert not any(b.fits(cost, priority) for b in self.model.values()), (
                "none, but a backend had room"
            )
            return None
        backend = self.model[slot_of_ticket(ticket)]
        assert backend.fits(cost, priority), f"{strategy.name} chose a backend without room"
        backend.cost += cost
        backend.count += 1
        backend.routed += 1
        return ticket, cost

    @precondition(lambda self: bool(self.model))
    @rule(target=leases, data=st.data(), cost=st.integers(1, 12), priority=st.integers(0, 7))
    def acquire_on(self, data: st.DataObject, cost: int, priority: int) -> tuple[int, int] | None:
        """A choice made outside the core: the model predicts the answer exactly."""
        slot = data.draw(st.sampled_from(sorted(self.model)))
        backend = self.model[slot]
        ticket = self.table.acquire_on(slot, cost, priority)
        assert (ticket != SLOT_NONE) == backend.fits(cost, priority)
        if ticket == SLOT_NONE:
            return None
        assert slot_of_ticket(ticket) == slot
        backend.cost += cost
        backend.count += 1
        backend.routed += 1
        return ticket, cost

    @rule(lease=consumes(leases), ok=st.booleans())
    def release(self, lease: tuple[int, int] | None, ok: bool) -> None:
        if lease is None:
            return
        ticket, cost = lease
        self.table.release(ticket, cost, 100, ok)
        slot = slot_of_ticket(ticket)
        backend = self.model[slot]
        backend.cost -= cost
        backend.count -= 1
        if backend.state == State.RETIRED and backend.count == 0:
            del self.model[slot]
            return
        backend.completed += ok
        backend.failed += not ok

    @rule(slot=st.integers(0, BACKENDS_MAX - 1), cost=st.integers(1, 5))
    def release_what_was_never_acquired(self, slot: int, cost: int) -> None:
        backend = self.model.get(slot)
        if backend is not None and backend.count > 0:
            return  # That would be a legitimate release of someone else's reservation.
        try:
            self.table.release(slot, cost, 0, True)
        except (_errors.ReleaseMismatchError, _errors.UnknownBackendError):
            return
        raise AssertionError("a release with nothing in flight was accepted")

    @invariant()
    def table_matches_model(self) -> None:
        snapshot = {info.slot: info for info in self.table.snapshot()}
        assert set(snapshot) == set(self.model)
        for slot, backend in self.model.items():
            info = snapshot[slot]
            assert (info.id, info.state, info.capacity) == (backend.id, backend.state, backend.capacity)
            assert (info.cost_in_flight, info.count_in_flight) == (backend.cost, backend.count)
            if backend.state != State.RETIRED:
                assert (info.routed_total, info.completed_total, info.failed_total) == (
                    backend.routed,
                    backend.completed,
                    backend.failed,
                )

    def teardown(self) -> None:
        self.table.close()


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_table_against_model = pytest.mark.slow(TableMachine.TestCase)  # 150 runs of up to 60 steps
