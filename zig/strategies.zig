//! Routing strategies: each picks a slot and reserves the request's cost on it with the table's
//! CAS, or returns `slot_none` when nothing fits (a normal result). One `acquire` switch selects
//! them; they are leaf functions over the table.

const std = @import("std");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const table_mod = @import("table.zig");
const tree = @import("tree.zig");
const Table = table_mod.Table;
const slot_none = table_mod.slot_none;

pub const Strategy = enum(u32) {
    round_robin = 0,
    least_connections = 1,
    p2c = 2,
    _,
};

/// How many times p2c samples a pair before falling back to a scan, and how many times least
/// connections re-reads a stale root. Small: a miss is rare until the fleet is nearly full.
const p2c_rounds_max: u32 = 3;
const least_root_attempts_max: u32 = 3;

/// The backends a decision may choose from: the whole table (its dense list of present slots and
/// its cursor), or a caller's pool (a subset, e.g. the backends serving one model).
pub const Candidates = struct {
    slots: []const u32,
    cursor: *Atomic(u64),
    whole_table: bool,

    pub fn ofTable(t: *const Table) Candidates {
        // .acquire pairs with the .release store in `add`: entries below the count are written.
        const count = t.header.present_count.load(.acquire);
        const slots: [*]const u32 = @ptrCast(t.present.ptr);
        return .{ .slots = slots[0..count], .cursor = &t.header.rr_cursor, .whole_table = true };
    }

    fn at(candidates: Candidates, index: u64) u32 {
        // Present-list entries move under concurrent removal: read each one atomically.
        return @atomicLoad(u32, &candidates.slots[@intCast(index)], .monotonic);
    }
};

pub fn acquire(t: *const Table, candidates: Candidates, strategy: Strategy, cost: u32, class: u32) u32 {
    assert(cost > 0);
    assert(class < table_mod.classes_count);
    return switch (strategy) {
        .round_robin => roundRobinFromCursor(t, candidates, cost, class),
        .least_connections => leastConnections(t, candidates, cost, class),
        .p2c => powerOfTwoChoices(t, candidates, cost, class),
        _ => unreachable, // The ABI edge validates the strategy.
    };
}

pub fn isKnown(strategy: u32) bool {
    return switch (@as(Strategy, @fromBackingInt(@intCast(strategy)))) {
        .round_robin, .least_connections, .p2c => true,
        _ => false,
    };
}

/// Round robin from the shared cursor. When it had to skip backends, it moves the cursor past
/// them too, so the skipped share is spread instead of all landing on the next backend.
fn roundRobinFromCursor(t: *const Table, candidates: Candidates, cost: u32, class: u32) u32 {
    const start = candidates.cursor.fetchAdd(1, .monotonic);
    const count = candidates.slots.len;
    for (0..count) |offset| {
        const slot = candidates.at((start + offset) % count);
        if (slot >= t.backendsMax() or !t.reserve(slot, cost, class)) continue;
        if (offset > 0) _ = candidates.cursor.fetchAdd(offset, .monotonic);
        return slot;
    }
    return slot_none;
}

/// Visits candidates in order from `start`, skipping those that are down, draining or full;
/// returns none only after every candidate was tried.
fn roundRobin(t: *const Table, candidates: Candidates, cost: u32, class: u32, start: u64) u32 {
    const count = candidates.slots.len;
    for (0..count) |offset| {
        const slot = candidates.at((start + offset) % count);
        if (slot >= t.backendsMax()) continue;
        if (t.reserve(slot, cost, class)) return slot;
    }
    return slot_none;
}

/// Over the whole table: O(log n) while the least-loaded backend can take the request; when it
/// cannot (the fleet is nearly full, or the cost is large), one O(n) scan finds the least-loaded
/// backend that fits. Over a pool: an O(pool size) scan.
fn leastConnections(t: *const Table, candidates: Candidates, cost: u32, class: u32) u32 {
    if (!candidates.whole_table) return scanLeastLoaded(t, candidates, cost, class);
    tree.ensureEnabled(t);
    var attempts: u32 = 0;
    while (attempts < least_root_attempts_max) : (attempts += 1) {
        const best = tree.root(t);
        if (best == tree.node_none) break;
        const slot: u32 = @truncate(best);
        if (t.reserve(slot, cost, class)) return slot;
        if (!t.fits(slot, cost, class) and t.wordOf(slot).state == .active) break;
        tree.onLeafChanged(t, slot); // A stale root: refresh its path and look again.
    }
    return scanLeastLoaded(t, candidates, cost, class);
}

fn scanLeastLoaded(t: *const Table, candidates: Candidates, cost: u32, class: u32) u32 {
    var attempts: u32 = 0;
    while (attempts < least_root_attempts_max) : (attempts += 1) {
        var best_value: u64 = tree.node_none;
        for (0..candidates.slots.len) |index| {
            best_value = @min(best_value, candidate(t, candidates, index, cost, class));
        }
        if (best_value == tree.node_none) return slot_none;
        const slot: u32 = @truncate(best_value);
        if (t.reserve(slot, cost, class)) return slot;
    }
    return slot_none;
}

/// Two distinct random candidates; the one with the lower relative load (that can take the
/// request) wins. If neither can, sample again, then fall back to a round-robin scan from a
/// random start.
fn powerOfTwoChoices(t: *const Table, candidates: Candidates, cost: u32, class: u32) u32 {
    const count = candidates.slots.len;
    if (count == 0) return slot_none;
    if (count == 1) return roundRobin(t, candidates, cost, class, 0);
    var rounds: u32 = 0;
    while (rounds < p2c_rounds_max) : (rounds += 1) {
        const r = t.random();
        const first_index = (r & 0xFFFF_FFFF) % count;
        const second_index = (first_index + 1 + (r >> 32) % (count - 1)) % count;
        assert(first_index != second_index);
        const first = candidate(t, candidates, first_index, cost, class);
        const second = candidate(t, candidates, second_index, cost, class);
        const better = @min(first, second);
        const worse = @max(first, second);
        if (better == tree.node_none) continue;
        if (t.reserve(@truncate(better), cost, class)) return @truncate(better);
        if (worse != tree.node_none and t.reserve(@truncate(worse), cost, class)) return @truncate(worse);
    }
    return roundRobin(t, candidates, cost, class, t.random());
}

/// The tree value (relative load, slot) of a candidate that could take the request, else none.
fn candidate(t: *const Table, candidates: Candidates, index: u64, cost: u32, class: u32) u64 {
    const slot = candidates.at(index);
    if (slot >= t.backendsMax() or !t.fits(slot, cost, class)) return tree.node_none;
    return tree.leafValue(t, slot);
}

const testing = std.testing;

test "round robin rotates and fails over" {
    const t = try table_mod.testTable(4);
    defer table_mod.testTableFree(t);
    const a = try t.add(1, 2, 1000);
    const b = try t.add(2, 2, 1000);
    const c = try t.add(3, 2, 1000);
    try t.update(b, 2, 1000, .down);
    var seen: [4]u32 = @splat(0);
    for (0..4) |_| {
        const slot = acquire(&t, .ofTable(&t), .round_robin, 1, 0);
        try testing.expect(slot != slot_none);
        seen[slot] += 1;
    }
    try testing.expectEqual(@as(u32, 2), seen[a]);
    try testing.expectEqual(@as(u32, 0), seen[b]);
    try testing.expectEqual(@as(u32, 2), seen[c]);
    try testing.expectEqual(slot_none, acquire(&t, .ofTable(&t), .round_robin, 1, 0));
}

test "least connections picks the emptiest and scans when the best cannot fit" {
    const t = try table_mod.testTable(4);
    defer table_mod.testTableFree(t);
    const small = try t.add(1, 4, 1000);
    const big = try t.add(2, 100, 1000);
    try testing.expect(t.reserve(big, 10, 0)); // big at 10 %, small at 0 %.
    try testing.expectEqual(small, acquire(&t, .ofTable(&t), .least_connections, 1, 0));
    // small is now at 25 %, but a cost of 4 only fits on big.
    try testing.expectEqual(big, acquire(&t, .ofTable(&t), .least_connections, 4, 0));
    try testing.expectEqual(slot_none, acquire(&t, .ofTable(&t), .least_connections, 200, 0));
}

test "p2c picks distinct backends and falls back when both are full" {
    const t = try table_mod.testTable(8);
    defer table_mod.testTableFree(t);
    for (0..8) |i| _ = try t.add(i, 1, 1000);
    var acquired: u32 = 0;
    while (acquire(&t, .ofTable(&t), .p2c, 1, 0) != slot_none) acquired += 1;
    try testing.expectEqual(@as(u32, 8), acquired);
}

test "a pool limits the choice to its members" {
    const t = try table_mod.testTable(8);
    defer table_mod.testTableFree(t);
    for (0..8) |i| _ = try t.add(i, 100, 1000);
    const pool = [_]u32{ 2, 5 };
    var cursor: Atomic(u64) = .init(0);
    const candidates: Candidates = .{ .slots = &pool, .cursor = &cursor, .whole_table = false };
    inline for (.{ Strategy.round_robin, Strategy.least_connections, Strategy.p2c }) |strategy| {
        for (0..20) |_| {
            const slot = acquire(&t, candidates, strategy, 1, 0);
            try testing.expect(slot == 2 or slot == 5);
        }
    }
}
