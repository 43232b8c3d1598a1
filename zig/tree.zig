//! The least-loaded index: a tournament tree over the slots whose root names the active backend
//! with the lowest load relative to capacity × weight. Leaves are computed from the slots on the
//! fly; inner nodes hold `key << 32 | slot` so a plain integer minimum picks the winner (ties go to
//! the lower slot).
//!
//! Concurrency: after a slot's word changes, its path to the root is refreshed with the "double
//! refresh" of Jayanti's f-arrays: each node is recomputed from its children and swapped in with a
//! CAS, twice. If both CASes fail, another thread's refresh succeeded after our leaf changed, so it
//! already read our leaf. The tree is only an index: reservations are still decided by the slot's
//! own CAS, so a stale node can cost a retry, never an over-commitment.
//!
//! The index costs O(log n) per load change, so it is enabled lazily the first time a
//! least-connections decision is asked for; tables that never use it pay nothing.

const std = @import("std");
const assert = std.debug.assert;
const table_mod = @import("table.zig");
const Table = table_mod.Table;

pub const node_none: u64 = std.math.maxInt(u64);
const key_max: u64 = std.math.maxInt(u32) - 1;
/// Relative load 1.0 (cost in flight equal to capacity × weight) maps to this key.
const key_unit: u64 = 1 << 24;

/// The value of the leaf for `slot`: its relative load and index, or `node_none` if it is not
/// active (an inactive backend never wins).
pub fn leafValue(t: *const Table, slot: u32) u64 {
    if (slot >= t.backendsMax()) return node_none;
    const word = t.wordOf(slot);
    if (word.state != .active) return node_none;
    return (relativeLoadKey(t, slot, word.cost) << 32) | slot;
}

pub fn relativeLoadKey(t: *const Table, slot: u32, cost: u32) u64 {
    const s = &t.slots[slot];
    const capacity = s.capacity.load(.monotonic);
    const weight_milli = s.weight_milli.load(.monotonic);
    assert(capacity > 0);
    assert(weight_milli > 0);
    // f64 rather than u128: a 128-bit division costs more than the rest of a p2c decision, and
    // 53 bits of mantissa order relative loads exactly enough for a minimum.
    const scale: f64 = @floatFromInt(key_unit * 1000);
    const key = @as(f64, @floatFromInt(cost)) * scale /
        (@as(f64, @floatFromInt(capacity)) * @as(f64, @floatFromInt(weight_milli)));
    return @intFromFloat(@min(key, @as(f64, @floatFromInt(key_max))));
}

pub fn onLeafChanged(t: *const Table, slot: u32) void {
    // .acquire pairs with the enabling CAS: once we see the index on, the rebuild has started and
    // any change we make after this point is refreshed by us.
    if (t.header.index_enabled.load(.acquire) == 0) return;
    const leaves = leavesCount(t);
    var node = (leaves + slot) >> 1;
    while (node >= 1) : (node >>= 1) {
        const changed_first = refresh(t, node);
        const changed_second = refresh(t, node);
        // Nothing to change here means the value above already reflects this subtree, or the
        // thread that last wrote this node is on its way up and will refresh the parents.
        if (!changed_first and !changed_second) break;
    }
}

/// Turns the index on (once per table, shared across processes) and builds it bottom-up.
pub fn ensureEnabled(t: *const Table) void {
    if (t.header.index_enabled.load(.acquire) != 0) return;
    if (t.header.index_enabled.cmpxchgStrong(0, 1, .acq_rel, .acquire) != null) return;
    var node = leavesCount(t) - 1;
    while (node >= 1) : (node -= 1) _ = refresh(t, node);
}

/// The tree's size from this process's view of the table, never re-read from the shared header.
fn leavesCount(t: *const Table) u32 {
    return @intCast(t.tree_nodes.len);
}

pub fn root(t: *const Table) u64 {
    return t.tree_nodes[1].load(.acquire);
}

fn childValue(t: *const Table, node: u32) u64 {
    const leaves = leavesCount(t);
    if (node >= leaves) return leafValue(t, node - leaves);
    return t.tree_nodes[node].load(.acquire);
}

fn refresh(t: *const Table, node: u32) bool {
    assert(node >= 1);
    assert(node < leavesCount(t));
    const old = t.tree_nodes[node].load(.acquire);
    const new = @min(childValue(t, node * 2), childValue(t, node * 2 + 1));
    if (old == new) return false;
    // .acq_rel: readers of this node see the children values it summarises.
    _ = t.tree_nodes[node].cmpxchgStrong(old, new, .acq_rel, .monotonic);
    return true;
}

const testing = std.testing;

test "the root follows the least relative load" {
    const t = try table_mod.testTable(8);
    defer table_mod.testTableFree(t);
    const a = try t.add(1, 10, 1000);
    const b = try t.add(2, 20, 1000);
    ensureEnabled(&t);
    try testing.expectEqual(@as(u64, a), root(&t) & 0xFFFF_FFFF);
    try testing.expect(t.reserve(a, 5, 0)); // a at 50 %, b at 0 %.
    try testing.expectEqual(@as(u64, b), root(&t) & 0xFFFF_FFFF);
    try testing.expect(t.reserve(b, 15, 0)); // b at 75 %.
    try testing.expectEqual(@as(u64, a), root(&t) & 0xFFFF_FFFF);
    try t.update(a, 10, 1000, .down);
    try testing.expectEqual(@as(u64, b), root(&t) & 0xFFFF_FFFF);
    try t.remove(b);
    try testing.expectEqual(node_none, root(&t));
}

test "weight scales relative load" {
    const t = try table_mod.testTable(2);
    defer table_mod.testTableFree(t);
    const a = try t.add(1, 10, 2000);
    const b = try t.add(2, 10, 1000);
    ensureEnabled(&t);
    try testing.expect(t.reserve(a, 4, 0)); // a: 4 / (10 × 2) = 0.2
    try testing.expect(t.reserve(b, 3, 0)); // b: 3 / 10 = 0.3
    try testing.expectEqual(@as(u64, a), root(&t) & 0xFFFF_FFFF);
}
