//! The reclaim protocol (owners.zig) at every point an owned operation passes: for each
//! operation (reserve, release, and a reclaim itself), each point, and each interleaving (none;
//! another owner's operations on the same slot, which replace the dying operation's tag; unowned
//! operations, which leave it; the same with the operation surviving instead of dying; and with
//! it dying after the race those operations made it lose), the
//! owner stops there as a SIGKILL would stop it, others go on, a reclaim gives its holdings
//! back, and the table must be exactly what the other owners hold — never above capacity.

const std = @import("std");
const testing = std.testing;
const table_mod = @import("table.zig");
const owners = @import("owners.zig");
const Table = table_mod.Table;

const backends_max: u32 = 4;
const capacity: u32 = 40;

/// A surviving process's handle and what it holds on the world's slot, as it holds it.
const Holder = struct {
    view: Table,
    cost: u32 = 0,
    count: u32 = 0,

    fn reserve(h: *Holder, slot: u32, cost: u32) !void {
        try testing.expect(h.view.reserve(slot, cost, 0));
        h.cost += cost;
        h.count += 1;
    }

    fn release(h: *Holder, slot: u32, cost: u32) !void {
        try h.view.release(slot, h.view.incarnationOf(slot), cost, 10, true);
        h.cost -= cost;
        h.count -= 1;
    }
};

/// A table with owner records in ordinary memory, and the views of it that play the processes.
const World = struct {
    base: Table,
    dying: Table, // owner 1
    other: Holder, // owner 2
    unowned: Holder, // owner 0
    slot: u32,

    fn init() !World {
        const layout = table_mod.Layout.init(backends_max, 0, 8);
        const region = try testing.allocator.alignedAlloc(u8, .fromByteUnits(table_mod.header_bytes), layout.region_bytes);
        @memset(region, 0);
        const base = Table.format(region, backends_max, 0, 0, 8);
        const slot = try base.add(1, capacity, 1000);
        _ = try base.add(2, capacity, 1000);
        var world: World = .{ .base = base, .dying = base, .other = .{ .view = base }, .unowned = .{ .view = base }, .slot = slot };
        try owners.attach(&world.dying, 1);
        try owners.attach(&world.other.view, 2);
        return world;
    }

    fn deinit(w: *World) void {
        testing.allocator.free(w.base.region);
    }

    /// The process of owner 1 is gone: what `reclaim` checks for (a dead pid) is simulated by
    /// marking the index detached.
    fn buryDying(w: *World) void {
        const status: owners.OwnerStatus = .{ .kind = .detached, .pid = 1 };
        w.base.owner_records[1].status.store(@bitCast(status), .release);
    }

    /// The table holds exactly what the survivors hold, on every slot and in the totals.
    fn expectExact(w: *World) !void {
        const word = w.base.wordOf(w.slot);
        try testing.expectEqual(w.other.cost + w.unowned.cost, word.cost);
        try testing.expectEqual(w.other.count + w.unowned.count, @as(u32, word.count));
        try testing.expect(word.cost <= capacity);
        try testing.expectEqual(@as(u64, word.cost), w.base.costInFlightTotal());
        const dying = owners.heldTotal(&w.base, 1);
        try testing.expectEqual(@as(u64, 0), dying.leases);
        const other = owners.heldTotal(&w.base, 2);
        try testing.expectEqual(@as(u64, w.other.count), other.leases);
        try testing.expectEqual(@as(u64, w.other.cost), other.cost);
        const op: owners.Op = @bitCast(w.base.owner_records[1].op.load(.monotonic));
        try testing.expectEqual(owners.Phase.idle, op.phase);
    }

    fn expectDyingFree(w: *World) !void {
        const status: owners.OwnerStatus = @bitCast(w.base.owner_records[1].status.load(.monotonic));
        try testing.expectEqual(owners.StatusKind.free, status.kind);
    }
};

const Interleaving = enum {
    none,
    other_owner,
    unowned,
    other_owner_survives,
    /// Another owner's operations at the point, the operation goes on (its CAS then fails and
    /// it retries), and it dies the second time it reaches the point.
    other_owner_then_dies_on_retry,
};

/// The hook's instructions for the operation under test.
var hook_world: ?*World = null;
var hook_point: u32 = 0;
var hook_interleaving: Interleaving = .none;
var hook_fired = false;
var hook_failure: ?anyerror = null;

var hook_second_seen = false;

fn hook(point: u32) bool {
    const w = hook_world orelse return false;
    if (point != hook_point) return false;
    if (hook_fired) {
        if (hook_interleaving != .other_owner_then_dies_on_retry or hook_second_seen) return false;
        hook_second_seen = true;
        return true;
    }
    hook_fired = true;
    // The survivors' operations run while the dying one is stopped at `point`; the hook is off
    // for them (they are other processes, not killed).
    hook_world = null;
    defer hook_world = w;
    interleave(w) catch |err| {
        hook_failure = err;
    };
    return switch (hook_interleaving) {
        .other_owner_survives, .other_owner_then_dies_on_retry => false,
        else => true,
    };
}

fn interleave(w: *World) !void {
    switch (hook_interleaving) {
        .none => {},
        .other_owner, .other_owner_survives, .other_owner_then_dies_on_retry => {
            // Each of these replaces the slot's tag, so the dying operation must be helped.
            try w.other.reserve(w.slot, 3);
            try w.other.release(w.slot, 3);
            try w.other.reserve(w.slot, 1);
        },
        .unowned => {
            try w.unowned.reserve(w.slot, 2);
            try w.unowned.release(w.slot, 2);
            try w.unowned.reserve(w.slot, 1);
        },
    }
    try testing.expect(w.base.wordOf(w.slot).cost <= capacity);
}

fn armHook(w: *World, point: u32, interleaving: Interleaving) void {
    hook_world = w;
    hook_point = point;
    hook_interleaving = interleaving;
    hook_fired = false;
    hook_second_seen = false;
    hook_failure = null;
    owners.test_point_hook = hook;
}

fn disarmHook() !void {
    owners.test_point_hook = null;
    hook_world = null;
    try testing.expect(hook_fired);
    if (hook_failure) |err| return err;
}

const Operation = enum { reserve, release };

/// One case: owner 1 holds two leases (cost 5 and 4), owner 2 one (cost 6); owner 1 starts
/// `operation` and stops at `point`; survivors go on; a reclaim gives back what owner 1 held.
fn runCase(operation: Operation, point: u32, interleaving: Interleaving) !void {
    var w = try World.init();
    defer w.deinit();
    try testing.expect(w.dying.reserve(w.slot, 5, 0));
    try testing.expect(w.dying.reserve(w.slot, 4, 0));
    try w.other.reserve(w.slot, 6);
    armHook(&w, point, interleaving);
    // The operation's word change happens between points 3 and 4 (its compare-and-swap). Only
    // point 3 is reached twice (the survivors' operations make the first CAS fail): "dies on
    // retry" at another point survives.
    const dies_on_retry = interleaving == .other_owner_then_dies_on_retry;
    const survives = interleaving == .other_owner_survives or (dies_on_retry and point != 3);
    const changed = survives or (point >= 4 and !dies_on_retry);
    var dying_count: u64 = 2;
    var dying_cost: u64 = 9;
    switch (operation) {
        .reserve => {
            const reserved = w.dying.reserve(w.slot, 7, 0);
            if (survives) try testing.expect(reserved);
            if (changed) {
                dying_count += 1;
                dying_cost += 7;
            }
        },
        .release => {
            const result = w.dying.release(w.slot, w.dying.incarnationOf(w.slot), 4, 10, true);
            if (survives) try result else result catch {};
            if (changed) {
                dying_count -= 1;
                dying_cost -= 4;
            }
        },
    }
    try disarmHook();
    try testing.expect(hook_second_seen == (dies_on_retry and point == 3));
    // The survivors keep working after the death, before the reclaim (except in `.none`, where
    // the dying operation's tag, if it made one, is still on the word at the reclaim).
    if (interleaving != .none) {
        try w.other.reserve(w.slot, 2);
        try w.unowned.reserve(w.slot, 1);
        try w.unowned.release(w.slot, 1);
    }
    if (survives) {
        // Not killed: the operation finished, and owner 1 closes with what it holds.
        const held = owners.heldTotal(&w.base, 1);
        try testing.expectEqual(dying_count, held.leases);
        try testing.expectEqual(dying_cost, held.cost);
    }
    w.buryDying();
    const reclaimed = try owners.reclaim(&w.unowned.view, 1);
    try testing.expectEqual(dying_count, reclaimed.leases);
    try testing.expectEqual(dying_cost, reclaimed.cost);
    try w.expectExact();
    try w.expectDyingFree();
    // The index is free again: a replacement attaches as owner 1 and works.
    var replacement = w.base;
    try owners.attach(&replacement, 1);
    try testing.expect(replacement.reserve(w.slot, 1, 0));
    try replacement.release(w.slot, replacement.incarnationOf(w.slot), 1, 0, true);
    try w.expectExact();
}

test "a reserve or release killed at any point is reclaimed exactly, whoever runs meanwhile" {
    defer owners.test_point_hook = null;
    const interleavings = [_]Interleaving{ .none, .other_owner, .unowned, .other_owner_survives, .other_owner_then_dies_on_retry };
    for (interleavings) |interleaving| {
        for (owners.reserve_points) |point| try runCase(.reserve, point, interleaving);
        for (owners.release_points) |point| try runCase(.release, point, interleaving);
    }
}

test "a reclaim killed at any point is finished exactly by the next one" {
    defer owners.test_point_hook = null;
    for (owners.reclaim_points) |reclaim_point| {
        for (owners.reserve_points) |point| {
            var w = try World.init();
            defer w.deinit();
            const second = w.slot + 1;
            try testing.expect(w.dying.reserve(w.slot, 5, 0));
            try testing.expect(w.dying.reserve(second, 8, 0));
            try w.other.reserve(w.slot, 6);
            armHook(&w, point, .other_owner);
            _ = w.dying.reserve(w.slot, 7, 0);
            try disarmHook();
            w.buryDying();
            // The first reclaim dies at `reclaim_point` of its first give-back.
            armHook(&w, reclaim_point, .other_owner);
            try testing.expectError(error.Busy, owners.reclaim(&w.unowned.view, 1));
            try disarmHook();
            // The next reclaim (here the same process, as after a supervisor's restart of its
            // loop) finishes: everything owner 1 held is back, counted once.
            const reclaimed = try owners.reclaim(&w.unowned.view, 1);
            try testing.expect(reclaimed.leases <= 3);
            try w.expectExact();
            try w.expectDyingFree();
            try testing.expectEqual(@as(u32, 0), w.base.wordOf(second).cost);
            try testing.expectEqual(@as(u20, 0), w.base.wordOf(second).count);
        }
    }
}

test "reclaim refuses a live owner and its own, and attach refuses an index in use" {
    var w = try World.init();
    defer w.deinit();
    try testing.expect(w.other.view.reserve(w.slot, 1, 0));
    // Owner 2 is live (this process): refused, nothing changed.
    try testing.expectError(error.OwnerAlive, owners.reclaim(&w.unowned.view, 2));
    try testing.expectError(error.OwnerAlive, owners.reclaim(&w.other.view, 2));
    var again = w.base;
    try testing.expectError(error.OwnerInUse, owners.attach(&again, 2));
    try testing.expectError(error.OwnerInUse, owners.attach(&again, 0));
    try testing.expectError(error.OwnerInUse, owners.attach(&again, 8));
    try testing.expectEqual(@as(u32, 1), w.base.wordOf(w.slot).count);
    // A free index: nothing to give back.
    const nothing = try owners.reclaim(&w.unowned.view, 3);
    try testing.expectEqual(@as(u64, 0), nothing.leases);
    // A closed owner holding something is detached; its reclaim is allowed in this process.
    owners.detach(&w.other.view);
    const back = try owners.reclaim(&w.unowned.view, 2);
    try testing.expectEqual(@as(u64, 1), back.leases);
    try testing.expectEqual(@as(u32, 0), w.base.wordOf(w.slot).count);
}

test "an owned release of what the owner does not hold changes nothing, a stale one is refused" {
    var w = try World.init();
    defer w.deinit();
    try w.unowned.reserve(w.slot, 3);
    try testing.expectError(error.ReleaseMismatch, w.dying.release(w.slot, w.dying.incarnationOf(w.slot), 3, 0, true));
    try testing.expect(w.dying.reserve(w.slot, 2, 0));
    try testing.expectError(error.StaleRelease, w.dying.release(w.slot, w.dying.incarnationOf(w.slot) + 1, 2, 0, true));
    try testing.expectEqual(@as(u32, 5), w.base.wordOf(w.slot).cost);
    // Removed while held: retired, and the owned release frees it.
    try w.base.remove(w.slot);
    try w.dying.release(w.slot, w.dying.incarnationOf(w.slot), 2, 0, true);
    try w.unowned.release(w.slot, 3);
    try testing.expectEqual(table_mod.State.free, w.base.wordOf(w.slot).state);
}

test "the release generation moves on releases and wakes a waiter" {
    var w = try World.init();
    defer w.deinit();
    const before = owners.generation(&w.base);
    try testing.expectEqual(before, owners.waitGeneration(&w.base, before, 1)); // times out
    try w.other.reserve(w.slot, 1);
    try testing.expectEqual(before, owners.generation(&w.base)); // a reserve frees nothing
    const waiter = try std.Thread.spawn(.{}, waitInto, .{ &w.base, before });
    try w.other.release(w.slot, 1);
    waiter.join();
    try testing.expect(waited_generation != before);
}

var waited_generation: u64 = 0;

fn waitInto(t: *const Table, seen: u64) void {
    var now = seen;
    for (0..100) |_| {
        now = owners.waitGeneration(t, seen, 100);
        if (now != seen) break;
    }
    waited_generation = now;
}

test "owned threads on one slot never exceed capacity and leave it empty" {
    var w = try World.init();
    defer w.deinit();
    var threads: [3]std.Thread = undefined;
    var views: [3]Table = .{ w.dying, w.other.view, w.unowned.view };
    for (&threads, &views) |*thread, *view| thread.* = try std.Thread.spawn(.{}, churn, .{ view, w.slot });
    for (threads) |thread| thread.join();
    try testing.expectEqual(@as(u32, 0), w.base.wordOf(w.slot).cost);
    try testing.expectEqual(@as(u64, 0), w.base.costInFlightTotal());
    try testing.expectEqual(@as(u64, 0), owners.heldTotal(&w.base, 1).leases);
}

fn churn(t: *const Table, slot: u32) void {
    var held: [16]u32 = undefined;
    var count: usize = 0;
    for (0..20_000) |i| {
        const cost: u32 = @intCast(i % 5 + 1);
        if (count < held.len and t.reserve(slot, cost, 0)) {
            held[count] = cost;
            count += 1;
        }
        std.debug.assert(t.wordOf(slot).cost <= capacity);
        if (count > 0 and i % 2 == 1) {
            count -= 1;
            t.release(slot, t.incarnationOf(slot), held[count], 1, true) catch unreachable;
        }
    }
    while (count > 0) {
        count -= 1;
        t.release(slot, t.incarnationOf(slot), held[count], 1, true) catch unreachable;
    }
}
