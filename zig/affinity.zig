//! What cache-aware strategies remember: a consistent-hashing ring of backend points, and a bounded
//! prefix index from block hash to the backends that recently received that prefix. Both live in
//! the table region (fixed size, chosen at creation) and are changed only under the table lock
//! (ring) or a per-set lock (prefix index); readers use atomic loads and validate every slot they
//! find, so a concurrent change costs at worst a less affine choice, never a wrong reservation.

const std = @import("std");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const table_mod = @import("table.zig");
const Table = table_mod.Table;
const RingPoint = table_mod.RingPoint;
const PrefixEntry = table_mod.PrefixEntry;
const slot_none = table_mod.slot_none;

const set_lock_attempts_max: u32 = 1 << 12;

// ---- the ring --------------------------------------------------------------------------------

/// A backend's points depend on its ring key (else its id), never on its slot, so every process
/// (and every restart) puts the same backend at the same places. With a key derived from the
/// backend's address, routers that number their backends differently (listed in another order,
/// added at run time) agree as well.
fn pointHash(t: *const Table, slot: u32, point: u32) u64 {
    const s = &t.slots[slot];
    const key = s.ring_key.load(.monotonic);
    const name = if (key != 0) key else s.id.load(.monotonic);
    return table_mod.splitmix64(name ^ (@as(u64, point) *% 0xD6E8_FEB8_6659_FD93));
}

/// Builds the ring the first time a consistent-hash decision needs it; tables that never use it
/// pay nothing on add and remove. Returns false if the lock could not be had (bounded wait).
pub fn ensureRing(t: *const Table) bool {
    // .acquire pairs with the .release below: a reader that sees the ring enabled sees it built.
    if (t.header.ring_enabled.load(.acquire) != 0) return true;
    t.lock() catch return false;
    defer t.unlock();
    if (t.header.ring_enabled.load(.monotonic) != 0) return true;
    var count: u32 = 0;
    for (t.present[0..t.presentCount()]) |*entry| {
        const slot = entry.load(.monotonic);
        for (0..pointsPerBackend(t)) |point| {
            t.ring[count] = .{ .hash = pointHash(t, slot, @intCast(point)), .slot = slot, .reserved = 0 };
            count += 1;
        }
    }
    std.sort.pdq(RingPoint, t.ring[0..count], {}, pointLessThan);
    t.header.ring_count.store(count, .release);
    t.header.ring_enabled.store(1, .release);
    return true;
}

/// Every backend's number of points, from this process's view of the table (the ring holds that
/// many per slot), never re-read from the shared header.
fn pointsPerBackend(t: *const Table) u32 {
    return @intCast(t.ring.len / t.slots.len);
}

fn pointLessThan(_: void, a: RingPoint, b: RingPoint) bool {
    return a.hash < b.hash;
}

/// Called under the table lock after a backend was added.
pub fn onAdded(t: *const Table, slot: u32) void {
    if (t.header.ring_enabled.load(.acquire) == 0) return;
    var count = ringCount(t);
    for (0..pointsPerBackend(t)) |point| {
        assert(count < t.ring.len);
        const hash = pointHash(t, slot, @intCast(point));
        const position = upperBound(t, count, hash);
        var index = count;
        while (index > position) : (index -= 1) storePoint(t, index, loadPoint(t, index - 1));
        storePoint(t, position, .{ .hash = hash, .slot = slot, .reserved = 0 });
        count += 1;
        t.header.ring_count.store(count, .release);
    }
}

/// Called under the table lock after a backend was removed: its points go, the others keep their
/// places (so only its keys move).
pub fn onRemoved(t: *const Table, slot: u32) void {
    if (t.header.ring_enabled.load(.acquire) == 0) return;
    const count = ringCount(t);
    var kept: u32 = 0;
    for (0..count) |index| {
        const point = loadPoint(t, @intCast(index));
        if (point.slot == slot) continue;
        storePoint(t, kept, point);
        kept += 1;
    }
    t.header.ring_count.store(kept, .release);
}

pub fn ringCount(t: *const Table) u32 {
    return @min(t.header.ring_count.load(.acquire), @as(u32, @intCast(t.ring.len)));
}

/// The first point whose hash is greater than `hash` (wrapping to 0 past the end is the caller's).
pub fn upperBound(t: *const Table, count: u32, hash: u64) u32 {
    var low: u32 = 0;
    var high: u32 = count;
    while (low < high) {
        const middle = low + (high - low) / 2;
        if (@atomicLoad(u64, &t.ring[middle].hash, .monotonic) <= hash) low = middle + 1 else high = middle;
    }
    return low;
}

pub fn pointAt(t: *const Table, index: u32) RingPoint {
    return loadPoint(t, index);
}

/// Whether the ring point (`point_hash`, of `slot`) takes the key at `position`. Every backend
/// has the same number of points, so to give each a share of keys in proportion to its capacity
/// × weight, a point of a backend below the largest (`weighted_max`) takes a key only with
/// probability weight / weighted_max, decided by a hash of (key, point); a key a point declines
/// walks on clockwise. The first point that takes a key then belongs to each backend with
/// probability ∝ its points × its acceptance ∝ its weight. Changing one backend's weight moves
/// only keys to or from it, unless it is (or becomes) the largest: that rescales every backend.
pub fn accepts(t: *const Table, slot: u32, position: u64, point_hash: u64, weighted_max: u64) bool {
    const weight = t.slots[slot].configuredWeightOf();
    if (weight >= weighted_max) return true;
    const draw = table_mod.splitmix64(position ^ point_hash ^ 0x6A09_E667_F3BC_C908);
    // draw / 2^64 < weight / weighted_max, in integers.
    return @as(u128, draw) * weighted_max < @as(u128, weight) << 64;
}

fn loadPoint(t: *const Table, index: u32) RingPoint {
    return .{
        .hash = @atomicLoad(u64, &t.ring[index].hash, .monotonic),
        .slot = @atomicLoad(u32, &t.ring[index].slot, .monotonic),
        .reserved = 0,
    };
}

fn storePoint(t: *const Table, index: u32, point: RingPoint) void {
    // Element by element with atomic stores: readers binary-search the ring while it moves.
    @atomicStore(u64, &t.ring[index].hash, point.hash, .monotonic);
    @atomicStore(u32, &t.ring[index].slot, point.slot, .monotonic);
}

// ---- bounded load ----------------------------------------------------------------------------

pub const Totals = struct {
    cost: u64,
    weighted_capacity: u64,
    /// The largest configured capacity × weight among the candidates (the ring's scale).
    weighted_max: u64,
};

/// Whether `slot` may take `cost` without exceeding ⌈(1+ε) × its share of the fleet's cost in
/// flight (this request included)⌉, its share being capacity × weight over the fleet's. An idle
/// backend is never overloaded, so a quiet fleet always keeps affinity.
pub fn withinBound(t: *const Table, slot: u32, cost: u32, totals: Totals) bool {
    const word = t.wordOf(slot);
    if (word.state != .active) return false;
    if (word.cost == 0) return true;
    if (totals.weighted_capacity == 0) return false;
    const s = &t.slots[slot];
    const weighted: f64 = @floatFromInt(s.configuredWeightOf());
    const epsilon: f64 = @as(f64, @floatFromInt(t.header.balance_epsilon_permille.load(.monotonic))) / 1000;
    const share = weighted / @as(f64, @floatFromInt(totals.weighted_capacity));
    // Saturating: the fleet total is a shared hint that may hold any value.
    const limit = @ceil((1 + epsilon) * @as(f64, @floatFromInt(totals.cost +| cost)) * share);
    return @as(f64, @floatFromInt(@as(u64, word.cost) + cost)) <= limit;
}

// ---- the prefix index ------------------------------------------------------------------------

pub const Locations = struct {
    slots: [table_mod.prefix_locations_max]u32 = @splat(slot_none),
    incarnations: [table_mod.prefix_locations_max]u32 = @splat(0),
    found: bool = false,
};

pub fn prefixEnabled(t: *const Table) bool {
    return t.prefix_entries.len > 0;
}

/// The backends recorded for `hash` (most recent first); touches the entry (LRU).
pub fn prefixLookup(t: *const Table, hash: u64) Locations {
    var result: Locations = .{};
    const set = setOf(t, hash);
    if (!lockSet(t, set)) return result;
    defer unlockSet(t, set);
    for (waysOf(t, set)) |*entry| {
        if (entry.stamp == 0 or entry.hash != hash) continue;
        result = .{ .slots = entry.slots, .incarnations = entry.incarnations, .found = true };
        entry.stamp = nextStamp(t);
        break;
    }
    return result;
}

/// Records that `slot` received a prompt with the prefix `hash`: it becomes the most recent
/// location; a new hash evicts the least recently used way of its set.
pub fn prefixRecord(t: *const Table, hash: u64, slot: u32) void {
    const set = setOf(t, hash);
    if (!lockSet(t, set)) return;
    defer unlockSet(t, set);
    const ways = waysOf(t, set);
    const incarnation = t.slots[slot].incarnation.load(.monotonic);
    const stamp = nextStamp(t);
    const entry = for (ways) |*way| {
        if (way.stamp != 0 and way.hash == hash) break way;
    } else blk: {
        var oldest = &ways[0];
        for (ways[1..]) |*way| {
            if (way.stamp < oldest.stamp) oldest = way;
        }
        oldest.* = .{ .hash = hash, .stamp = 0, .slots = @splat(slot_none), .incarnations = @splat(0) };
        break :blk oldest;
    };
    entry.stamp = stamp;
    // Move `slot` to the front, keeping the others in recency order.
    var previous_slot = slot;
    var previous_incarnation = incarnation;
    for (&entry.slots, &entry.incarnations) |*location, *location_incarnation| {
        const displaced_slot = location.*;
        const displaced_incarnation = location_incarnation.*;
        location.* = previous_slot;
        location_incarnation.* = previous_incarnation;
        if (displaced_slot == slot or displaced_slot == slot_none) break;
        previous_slot = displaced_slot;
        previous_incarnation = displaced_incarnation;
    }
}

/// A recorded location is usable only while that slot still holds the same backend and it is
/// active: entries for removed or down backends are never used.
pub fn locationValid(t: *const Table, slot: u32, incarnation: u32) bool {
    if (slot >= t.backendsMax()) return false;
    if (t.slots[slot].incarnation.load(.monotonic) != incarnation) return false;
    return t.wordOf(slot).state == .active;
}

/// The next LRU stamp. The clock wraps (it is shared memory, and any value must be safe); a
/// stamp of 0, which marks an empty way, then makes one entry look free: a lost hint, no more.
fn nextStamp(t: *const Table) u64 {
    return t.header.prefix_clock.fetchAdd(1, .monotonic) +% 1;
}

fn setOf(t: *const Table, hash: u64) u32 {
    assert(t.prefix_locks.len > 0);
    // Mixed first: callers may pass low-entropy hashes (small or sequential ints), which must
    // still spread over every set.
    return @intCast(table_mod.splitmix64(hash) % t.prefix_locks.len);
}

fn waysOf(t: *const Table, set: u32) []PrefixEntry {
    const first = @as(usize, set) * table_mod.prefix_ways;
    return t.prefix_entries[first..][0..table_mod.prefix_ways];
}

fn lockSet(t: *const Table, set: u32) bool {
    var attempts: u32 = 0;
    while (attempts < set_lock_attempts_max) : (attempts += 1) {
        // .acquire: the set's entries are as the previous holder left them.
        if (t.prefix_locks[set].cmpxchgWeak(0, 1, .acquire, .monotonic) == null) return true;
        std.atomic.spinLoopHint();
    }
    return false; // Give up: a skipped lookup or record only costs affinity.
}

fn unlockSet(t: *const Table, set: u32) void {
    t.prefix_locks[set].store(0, .release);
}

/// Chained block hashes of `text`, as vLLM's prefix cache does: block i's hash covers every byte
/// before its end, so equal hashes mean equal prefixes. Only full blocks are hashed (a partial
/// last block is not cacheable). Returns how many hashes were written.
pub fn prefixHashes(text: []const u8, block_bytes: u32, out: []u64) u32 {
    assert(block_bytes > 0);
    const blocks = @min(text.len / block_bytes, out.len);
    var previous: u64 = 0x9E37_79B9_7F4A_7C15;
    for (0..blocks) |index| {
        const block = text[index * block_bytes ..][0..block_bytes];
        previous = std.hash.Wyhash.hash(previous, block);
        out[index] = previous;
    }
    return @intCast(blocks);
}

const testing = std.testing;

test "ring points follow ids and removal keeps the others in place" {
    const t = try table_mod.testTable(8);
    defer table_mod.testTableFree(t);
    for (0..4) |i| _ = try t.add(100 + i, 10, 1000);
    try testing.expect(ensureRing(&t));
    const per = pointsPerBackend(&t);
    try testing.expectEqual(4 * per, ringCount(&t));
    for (1..ringCount(&t)) |i| try testing.expect(t.ring[i - 1].hash <= t.ring[i].hash);
    const removed = try t.find(101);
    try t.remove(removed);
    try testing.expectEqual(3 * per, ringCount(&t));
    for (t.ring[0..ringCount(&t)]) |point| try testing.expect(point.slot != removed);
    _ = try t.add(104, 10, 1000);
    try testing.expectEqual(4 * per, ringCount(&t));
    for (1..ringCount(&t)) |i| try testing.expect(t.ring[i - 1].hash <= t.ring[i].hash);
}

test "ring keys place backends whatever their ids and order of adding" {
    const first = try table_mod.testTable(8);
    defer table_mod.testTableFree(first);
    const second = try table_mod.testTable(8);
    defer table_mod.testTableFree(second);
    const names = [_]u64{ 0xA1, 0xB2, 0xC3, 0xD4 };
    for (names, 0..) |name, i| try first.setRingKey(try first.add(i, 10, 1000), name);
    for (0..4) |i| try second.setRingKey(try second.add(40 + i, 10, 1000), names[3 - i]);
    try testing.expect(ensureRing(&first));
    try testing.expect(ensureRing(&second));
    try testing.expectEqual(ringCount(&first), ringCount(&second));
    for (first.ring[0..ringCount(&first)], second.ring[0..ringCount(&second)]) |a, b| {
        try testing.expectEqual(a.hash, b.hash);
        try testing.expectEqual(first.slots[a.slot].ring_key.load(.monotonic), second.slots[b.slot].ring_key.load(.monotonic));
    }
    // A key set after the ring was built moves that backend's points only.
    const before = ringCount(&first);
    try first.setRingKey(try first.find(0), 0xE5);
    try testing.expectEqual(before, ringCount(&first));
    for (1..ringCount(&first)) |i| try testing.expect(first.ring[i - 1].hash <= first.ring[i].hash);
    try testing.expectError(error.UnknownBackend, first.setRingKey(7, 1));
}

test "prefix index keeps the most recent locations and evicts the least recently used" {
    const t = try table_mod.testTableWithPrefix(8, 8); // one set of eight ways
    defer table_mod.testTableFree(t);
    const a = try t.add(1, 10, 1000);
    const b = try t.add(2, 10, 1000);
    prefixRecord(&t, 42, a);
    prefixRecord(&t, 42, b);
    const found = prefixLookup(&t, 42);
    try testing.expect(found.found);
    try testing.expectEqual(b, found.slots[0]);
    try testing.expectEqual(a, found.slots[1]);
    try testing.expectEqual(slot_none, found.slots[2]);
    for (0..8) |i| prefixRecord(&t, 1000 + i, a); // eight new hashes: 42 was touched last by lookup
    try testing.expect(!prefixLookup(&t, 42).found);
    try t.remove(b);
    try testing.expect(!locationValid(&t, b, found.incarnations[0]));
    try testing.expect(locationValid(&t, a, found.incarnations[1]));
}

test "chained hashes: equal prefixes, equal hashes" {
    var first: [4]u64 = undefined;
    var second: [4]u64 = undefined;
    const count_first = prefixHashes("aaaabbbbccccdd", 4, &first);
    const count_second = prefixHashes("aaaabbbbxxxx", 4, &second);
    try testing.expectEqual(@as(u32, 3), count_first);
    try testing.expectEqual(@as(u32, 3), count_second);
    try testing.expectEqual(first[1], second[1]);
    try testing.expect(first[2] != second[2]);
}
