//! The in-flight records of `irm_route`: request id → the reservation it made (ticket and cost) and
//! when, so that `irm_complete` releases exactly what was reserved and measures the latency.
//!
//! One map per table handle, in this process's memory beside the handle, never in the table: a
//! shared table's in-flight records belong to the process that routed the requests (another
//! process cannot complete them, and a process that exits takes its records with it).
//!
//! Open addressing with linear probing and backward-shift deletion (no tombstones), grown (by
//! quadrupling while small, then doubling) under one lock. Its size is bounded by the reservations
//! it names: each record holds a reservation, and the table bounds those (a slot takes at most
//! `count_max` requests).

const std = @import("std");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const memory = @import("memory.zig");
const table_mod = @import("table.zig");

pub const Error = error{
    /// The id already names a request in flight.
    DuplicateRequest,
    /// No request with that id is in flight.
    UnknownRequest,
    OutOfMemory,
    /// The lock stayed taken beyond its bound.
    Busy,
};

/// What `irm_route` recorded for one request.
pub const Record = struct {
    ticket: table_mod.Ticket,
    cost: u32,
    started_ns: u64,
};

/// What a decision reserved: the slot's ticket and the cost, recorded for the request.
pub const Reservation = struct {
    ticket: table_mod.Ticket,
    cost: u32,
};

/// An empty entry: real tickets have an incarnation of at least 1.
const ticket_empty: table_mod.Ticket = 0;

const Entry = extern struct {
    id: u64,
    ticket: table_mod.Ticket,
    started_ns: u64,
    cost: u32,
    reserved: u32,

    comptime {
        assert(@sizeOf(Entry) == 32);
    }
};

const entries_min: usize = 64;
/// Up to this length (8 MiB) the map quadruples when it grows, beyond it it doubles: a growth
/// rehashes every record (a cold write each, at scattered homes) and the kernel zeroes the new
/// pages, so fewer, larger steps do a third to two thirds of doubling's work on the way to a few
/// MiB (100,000 records: 43,680 moves instead of 131,040), and the memory they may leave unused
/// (up to 8 entries per record instead of 4) is small there; a larger map keeps doubling's bound.
const entries_quadruple_max: usize = 1 << 18;

fn growthOf(length: usize) usize {
    return if (length < entries_quadruple_max) 4 else 2;
}

const run_ids: u64 = 8;

comptime {
    assert(entries_min % run_ids == 0);
}
const lock_attempts_max: u32 = 1 << 24;

pub const Requests = struct {
    lock_word: Atomic(u32) = .init(0),
    /// A power of two long (or empty before the first record), in a private anonymous mapping
    /// of its own (zero-filled by the kernel: nothing to clear); at most half full, which keeps
    /// the clusters that runs of consecutive ids form short.
    entries: []Entry = &.{},
    count: u64 = 0,

    /// Unmaps the map. Only when no call can use it any more (the handle is closed and drained).
    pub fn deinit(r: *Requests) void {
        unmapEntries(r.entries);
        r.entries = &.{};
        r.count = 0;
    }

    /// Records request `id` with the reservation `decision.decide()` makes, in one critical
    /// section: the id is checked first, so a duplicate (`DuplicateRequest`) changes nothing
    /// (the decision is not made: not even a cursor moves), and the map is grown first, so a
    /// failed growth (`OutOfMemory`) has nothing to undo either. Returns the reservation, or
    /// null when the decision found nothing (nothing recorded). Holding the lock through the
    /// decision takes it once per route instead of twice, and the entry is written once; it
    /// serialises only this handle's `route`s and `complete`s in this process, whose callers
    /// (the seed API's builtins) hold the GIL anyway. `decision` must not call back into `r`.
    pub fn record(r: *Requests, id: u64, started_ns: u64, decision: anytype) Error!?Reservation {
        try r.lock();
        defer r.unlock();
        if ((r.count + 1) * 2 > r.entries.len) {
            if (r.indexOf(id) != null) return error.DuplicateRequest;
            try r.grow();
        }
        // One probe finds a duplicate or the entry to fill, before the decision, which leaves
        // the map alone (the lock is held).
        const place = r.probe(id);
        if (place.found) return error.DuplicateRequest;
        const reservation = decision.decide() orelse return null;
        assert(reservation.ticket != ticket_empty);
        assert(reservation.cost > 0);
        r.entries[place.index] = .{
            .id = id,
            .ticket = reservation.ticket,
            .started_ns = started_ns,
            .cost = reservation.cost,
            .reserved = 0,
        };
        r.count += 1;
        // Ids from a counter (the common case) put the next one at the next entry, or in the
        // next run: a random, cold line, which now loads while the caller does its own work
        // instead of within the next call. For other ids it is a wasted hint, nothing more.
        @prefetch(&r.entries[r.home(id +% 1)], .{ .rw = .write, .locality = 3, .cache = .data });
        return reservation;
    }

    /// Removes and returns the record of a routed request.
    pub fn remove(r: *Requests, id: u64) Error!Record {
        try r.lock();
        defer r.unlock();
        const index = r.indexOf(id) orelse return error.UnknownRequest;
        const entry = r.entries[index];
        r.removeAt(index);
        return .{ .ticket = entry.ticket, .cost = entry.cost, .started_ns = entry.started_ns };
    }

    /// The record of a routed request, if it is in flight.
    pub fn find(r: *Requests, id: u64) Error!?Record {
        try r.lock();
        defer r.unlock();
        const index = r.indexOf(id) orelse return null;
        const entry = r.entries[index];
        return .{ .ticket = entry.ticket, .cost = entry.cost, .started_ns = entry.started_ns };
    }

    pub fn recordsCount(r: *Requests) Error!u64 {
        try r.lock();
        defer r.unlock();
        return r.count;
    }

    /// Where `id`'s probe starts: runs of `run_ids` consecutive ids land on consecutive entries,
    /// so ids from a counter share cache lines and pages (a hash of the whole id sends every
    /// record to a new page: a TLB miss per call once the map outgrows the TLB, which dominated
    /// `irm_route`'s cost in a VM), and the runs are scattered by a hash of the rest, so however
    /// ids are chosen at most `run_ids` of them share a start.
    fn home(r: *const Requests, id: u64) usize {
        const run = table_mod.splitmix64(id / run_ids);
        return @intCast((run *% run_ids +% id % run_ids) & (r.entries.len - 1));
    }

    /// The entry holding `id`.
    fn indexOf(r: *const Requests, id: u64) ?usize {
        if (r.entries.len == 0) return null;
        const place = r.probe(id);
        return if (place.found) place.index else null;
    }

    /// From `id`'s home, the entry holding `id` (`found`), else the first empty entry, where it
    /// would go: with backward-shift deletion no record lies beyond an empty entry on its probe.
    /// At most one pass; the map is at most half full, so an empty entry ends it before that.
    fn probe(r: *const Requests, id: u64) struct { index: usize, found: bool } {
        assert(r.count < r.entries.len);
        const mask = r.entries.len - 1;
        var index = r.home(id);
        for (0..r.entries.len) |_| {
            const entry = &r.entries[index];
            if (entry.ticket == ticket_empty) return .{ .index = index, .found = false };
            if (entry.id == id) return .{ .index = index, .found = true };
            index = (index + 1) & mask;
        }
        unreachable;
    }

    fn grow(r: *Requests) Error!void {
        const old = r.entries;
        r.entries = try mapEntries(@max(entries_min, old.len * growthOf(old.len)));
        for (old) |entry| {
            if (entry.ticket == ticket_empty) continue;
            const place = r.probe(entry.id);
            assert(!place.found);
            r.entries[place.index] = entry;
        }
        unmapEntries(old);
    }

    /// Backward-shift deletion: entries after the hole that may move closer to home do.
    fn removeAt(r: *Requests, index: usize) void {
        assert(r.entries[index].ticket != ticket_empty);
        assert(r.count > 0);
        const mask = r.entries.len - 1;
        var hole = index;
        var next = (hole + 1) & mask;
        while (r.entries[next].ticket != ticket_empty) : (next = (next + 1) & mask) {
            const distance_home = (next -% r.home(r.entries[next].id)) & mask;
            const distance_hole = (next -% hole) & mask;
            if (distance_home >= distance_hole) {
                r.entries[hole] = r.entries[next];
                hole = next;
            }
        }
        r.entries[hole] = std.mem.zeroes(Entry);
        r.count -= 1;
    }

    fn lock(r: *Requests) Error!void {
        var attempts: u32 = 0;
        while (attempts < lock_attempts_max) : (attempts += 1) {
            // .acquire: the critical section sees everything the previous holder wrote.
            if (r.lock_word.cmpxchgWeak(0, 1, .acquire, .monotonic) == null) return;
            if (attempts % 64 == 63) {
                _ = std.os.linux.sched_yield();
            } else {
                std.atomic.spinLoopHint();
            }
        }
        return error.Busy;
    }

    fn unlock(r: *Requests) void {
        // .release: publishes the critical section's writes to the next holder.
        r.lock_word.store(0, .release);
    }
};

/// A fresh zeroed array of `length` entries, in a mapping of its own rather than from an
/// allocator: the kernel hands out zeroed pages, so nothing clears them again, and unmapping
/// frees without writing (Zig's `Allocator` fills fresh and freed memory with 0xaa in checked
/// builds: two extra passes over the whole map per growth, most of a growing map's cost).
fn mapEntries(length: usize) Error![]Entry {
    const bytes = length * @sizeOf(Entry);
    const region = memory.mapPrivate(bytes) catch return error.OutOfMemory;
    populate(region);
    const entries: [*]Entry = @ptrCast(region.ptr);
    return entries[0..length];
}

fn unmapEntries(entries: []Entry) void {
    if (entries.len == 0) return;
    memory.unmap(@alignCast(std.mem.sliceAsBytes(entries)));
}

/// Entries of a fresh array are all written soon (the rehash, then records at scattered homes):
/// faulting its pages in with one call costs under half of faulting them one by one, which
/// dominated a growing map's cost in a VM (a fault per 4 KiB page on first touch). A map of a
/// few MiB asks for huge pages too: the runs' scattered homes then share a few TLB entries.
const populate_bytes_min: usize = 64 << 10;
const huge_page_bytes: usize = 2 << 20;
const madv_populate_write: u32 = 23; // Linux 5.14; older kernels refuse it (EINVAL): a hint.

fn populate(bytes: []u8) void {
    if (bytes.len < populate_bytes_min) return;
    const linux = std.os.linux;
    if (bytes.len >= huge_page_bytes) _ = linux.madvise(bytes.ptr, bytes.len, linux.MADV.HUGEPAGE);
    _ = linux.madvise(bytes.ptr, bytes.len, madv_populate_write);
}

/// Nanoseconds of CLOCK_MONOTONIC (Python's `time.perf_counter_ns()` on Linux).
pub fn monotonicNs() u64 {
    var now: std.os.linux.timespec = undefined;
    if (std.os.linux.errno(std.os.linux.clock_gettime(.MONOTONIC, &now)) != .SUCCESS) return 0;
    return @as(u64, @intCast(now.sec)) * std.time.ns_per_s + @as(u64, @intCast(now.nsec));
}

const testing = std.testing;

/// A decision for the tests: reserves `ticket` (null: nothing fits) and counts its calls.
const TestDecision = struct {
    ticket: ?table_mod.Ticket,
    cost: u32 = 1,
    calls: *u32,
    /// When set: the map and the id being recorded, which the decision checks is no record yet
    /// (a request being routed is neither found nor removable), under the lock `record` holds.
    pending: ?struct { map: *const Requests, id: u64, count: u64 } = null,

    pub fn decide(d: TestDecision) ?Reservation {
        d.calls.* += 1;
        if (d.pending) |pending| {
            assert(pending.map.lock_word.load(.monotonic) == 1);
            assert(pending.map.indexOf(pending.id) == null);
            assert(pending.map.count == pending.count);
        }
        return .{ .ticket = d.ticket orelse return null, .cost = d.cost };
    }
};

fn recordTest(r: *Requests, id: u64, started_ns: u64, ticket: table_mod.Ticket, cost: u32) !void {
    var calls: u32 = 0;
    _ = try r.record(id, started_ns, TestDecision{ .ticket = ticket, .cost = cost, .calls = &calls });
}

test "records are kept, found, removed once, and refused twice" {
    var r: Requests = .{};
    defer r.deinit();
    var calls: u32 = 0;
    const first: TestDecision = .{
        .ticket = 1 << 32 | 3,
        .cost = 5,
        .calls = &calls,
        .pending = .{ .map = &r, .id = 7, .count = 0 },
    };
    const reserved = try r.record(7, 100, first);
    try testing.expectEqual(Reservation{ .ticket = 1 << 32 | 3, .cost = 5 }, reserved.?);
    // A duplicate is refused before its decision is made: nothing reserved, nothing recorded.
    const duplicate: TestDecision = .{ .ticket = 1 << 32, .calls = &calls };
    try testing.expectError(error.DuplicateRequest, r.record(7, 101, duplicate));
    try testing.expectEqual(@as(u32, 1), calls);
    const record = (try r.find(7)).?;
    try testing.expectEqual(@as(u64, 1 << 32 | 3), record.ticket);
    try testing.expectEqual(@as(u32, 5), record.cost);
    try testing.expectEqual(@as(u64, 100), record.started_ns);
    try testing.expectEqual(record, try r.remove(7));
    try testing.expectError(error.UnknownRequest, r.remove(7));
    try testing.expectEqual(@as(?Record, null), try r.find(7));
    try testing.expectEqual(@as(u64, 0), try r.recordsCount());
    // Nothing fit: the decision was made, nothing is recorded and the id stays free.
    const nothing_fits: TestDecision = .{ .ticket = null, .calls = &calls };
    try testing.expectEqual(@as(?Reservation, null), try r.record(8, 0, nothing_fits));
    try testing.expectEqual(@as(u32, 2), calls);
    try testing.expectEqual(@as(u64, 0), try r.recordsCount());
    try testing.expectError(error.UnknownRequest, r.remove(8));
    try recordTest(&r, 8, 0, 1 << 32, 1);
    try testing.expectEqual(@as(u64, 1), try r.recordsCount());
}

test "the map grows, keeps every record, and deletes without losing neighbours" {
    var r: Requests = .{};
    defer r.deinit();
    // Past `entries_quadruple_max / 2` records: the map quadruples, then doubles.
    const total: u64 = entries_quadruple_max / 2 + 5000;
    for (0..total) |i| try recordTest(&r, i * 7919, i, (1 << 32) | i, @intCast(i % 13 + 1));
    try testing.expectEqual(total, try r.recordsCount());
    try testing.expectEqual(entries_quadruple_max * 2, r.entries.len);
    // Remove every other record, then check the rest are all still reachable.
    var i: u64 = 0;
    while (i < total) : (i += 2) _ = try r.remove(i * 7919);
    for (0..total) |j| {
        const found = try r.find(j * 7919);
        if (j % 2 == 0) {
            try testing.expectEqual(@as(?Record, null), found);
        } else {
            try testing.expectEqual(@as(u32, @intCast(j % 13 + 1)), found.?.cost);
        }
    }
    try testing.expectEqual(total / 2, try r.recordsCount());
}

test "threads routing distinct ids leave the map empty" {
    var r: Requests = .{};
    defer r.deinit();
    var threads: [4]std.Thread = undefined;
    for (&threads, 0..) |*thread, index| {
        thread.* = try std.Thread.spawn(.{}, recordRemove, .{ &r, @as(u64, index) });
    }
    for (threads) |thread| thread.join();
    try testing.expectEqual(@as(u64, 0), try r.recordsCount());
}

fn recordRemove(r: *Requests, thread_index: u64) void {
    for (0..2000) |i| {
        const id = thread_index << 32 | i;
        recordTest(r, id, 0, 1 << 32, 1) catch unreachable;
        if (i % 3 == 0) _ = r.remove(id) catch unreachable;
    }
    for (0..2000) |i| {
        if (i % 3 != 0) _ = r.remove(thread_index << 32 | i) catch unreachable;
    }
}

test "the clock moves forward" {
    const before = monotonicNs();
    const after = monotonicNs();
    try testing.expect(before > 0);
    try testing.expect(after >= before);
}
