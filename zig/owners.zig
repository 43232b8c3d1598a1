//! Owners: what each worker process holds in a shared table, recorded so that when the process
//! dies (even by SIGKILL at any instruction) `reclaim` gives back exactly what it still held,
//! never more, never less. doc/reclaim.md explains the protocol; this is its code.
//!
//! A shared table has `owners_max` owner records. A handle attached with an owner index k
//! (1 … owners_max-1) does every reservation and release as an *owned operation*:
//!
//!   1. take the owner's lock (only this process's threads contend for it: it keeps one
//!      operation of the owner in flight at a time, so one record describes it);
//!   2. describe the operation in the record (slot, kind, cost, count, and `held_before`, what
//!      the owner held on that slot) and publish it as `pending` with a new sequence number;
//!   3. change the slot's word with a 16-byte compare-and-swap that also writes the slot's tag
//!      (owner, sequence): the tag proves that this operation's change happened;
//!   4. store what the owner now holds on the slot (`held`), then its share of the cost total;
//!   5. mark the record `idle`, unlock.
//!
//! Helping: an owned operation that replaces a tag naming another owner's operation first marks
//! that operation `word_done` (if it is still `pending` with that sequence). So a pending
//! operation's change happened exactly when the tag still names it or the record says
//! `word_done`; and whether step 4 happened is read from `held` itself (it is either
//! `held_before` or `held_before` ± the operation, and only the owner writes it). Unowned
//! changes of the word (private handles, add, remove, update) leave the tag as it is.

const std = @import("std");
const builtin = @import("builtin");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const linux = std.os.linux;
const table_mod = @import("table.zig");
const tree = @import("tree.zig");
const Table = table_mod.Table;
const Word = table_mod.Word;
const Error = table_mod.Error;

/// Owner records in a shared table: owner 0 is "unowned", so 63 workers can be owners.
pub const owners_max: u32 = 64;

/// Bounds: an owned reservation gives up like an unowned one; a release or reclaim retries
/// longer (giving up leaves the reservation held, which a later release or reclaim finishes).
const reserve_attempts_max: u32 = 64;
const release_attempts_max: u32 = 1 << 20;
const lock_attempts_max: u32 = 1 << 24;

/// The slot's tag: which owned operation last changed its word. 0 is none (owner 0 is never
/// an owner of operations, and sequences start at 1).
pub const Tag = packed struct(u64) { seq: u56, owner: u8 };

pub const Phase = enum(u8) { idle = 0, pending = 1, word_done = 2, _ };

/// An owner's operation in flight, in one word so that helpers advance it with one CAS.
pub const Op = packed struct(u64) { seq: u56, phase: Phase };

/// What an owner holds on one slot.
pub const Held = packed struct(u64) { cost: u32 = 0, count: u32 = 0 };

pub const StatusKind = enum(u8) { free = 0, live = 1, detached = 2, reclaiming = 3, _ };

/// Who uses an owner index: `live` (attached by process `pid`), `detached` (its handle closed
/// while holding something), `reclaiming` (process `pid` is giving its holdings back).
pub const OwnerStatus = packed struct(u64) { kind: StatusKind, reserved: u24 = 0, pid: u32 = 0 };

pub const OpKind = enum(u32) { none = 0, reserve = 1, release = 2, _ };

pub const OwnerRecord = extern struct {
    status: Atomic(u64),
    op: Atomic(u64),
    op_slot: Atomic(u32),
    op_kind: Atomic(u32),
    op_cost: Atomic(u32),
    op_count: Atomic(u32),
    op_held_before: Atomic(u64),
    /// This owner's share of the cost in flight (`Table.costInFlightTotal` sums the shares):
    /// a reclaim zeroes it, whatever instruction its owner died at.
    cost_in_flight: Atomic(u64),
    lock: Atomic(u32),
    reserved_u32: u32,
    reserved: [9]u64,

    comptime {
        assert(@sizeOf(OwnerRecord) == 128);
    }
};

pub const Reclaimed = struct { leases: u64 = 0, cost: u64 = 0 };

// ---- test points ------------------------------------------------------------------------------

/// Test builds only: called at every numbered point of an owned operation; returning true stops
/// the operation there as a SIGKILL would (nothing after it runs, not even the unlock), so the
/// Zig tests can kill an owner at each point and reclaim. Compiled out of the library.
pub var test_point_hook: ?*const fn (point: u32) bool = null;

inline fn killedAt(point: u32) bool {
    if (!builtin.is_test) return false;
    const hook = test_point_hook orelse return false;
    return hook(point);
}

/// The points an operation passes, in order (for the tests' "every point" loops).
pub const reserve_points = [_]u32{ 1, 2, 3, 4, 5, 6, 7 };
pub const release_points = [_]u32{ 1, 2, 3, 4, 5, 6, 7 };
pub const reclaim_points = [_]u32{ 11, 12, 13 };

// ---- the slot word and its tag ------------------------------------------------------------------

const Pair = extern struct { word: u64, tag: u64 };

fn pairOf(t: *const Table, slot: u32) *align(16) Pair {
    return @ptrCast(@alignCast(&t.slots[slot].word));
}

/// Word and tag, read one after the other: a torn pair only makes the CAS fail and return the
/// real one. Every tag read was written by the successful CAS of the operation it names.
fn loadPair(t: *const Table, slot: u32) Pair {
    const s = &t.slots[slot];
    return .{ .word = s.word.load(.acquire), .tag = s.tag.load(.acquire) };
}

/// Null if `*pair` was `expected` and is now `new`; else what it is.
/// Whether the target's feature set has the 16-byte CAS (then the compiler emits it).
const target_has_cas16 = builtin.cpu.arch != .x86_64 or std.Target.x86.featureSetHas(builtin.cpu.features, .cx16);

fn cas(pair: *align(16) Pair, expected: Pair, new: Pair) ?Pair {
    if (comptime target_has_cas16) {
        const p: *u128 = @ptrCast(pair);
        const found = @cmpxchgStrong(u128, p, wide(expected), wide(new), .seq_cst, .seq_cst) orelse return null;
        return .{ .word = @truncate(found), .tag = @truncate(found >> 64) };
    }
    return casBaselineX86(pair, expected, new);
}

fn casBaselineX86(pair: *align(16) Pair, expected: Pair, new: Pair) ?Pair {
    // Baseline x86-64 (the shipped library) has no 16-byte CAS in its feature set, but every
    // x86-64 CPU that runs a current Linux has the instruction; `attach` checks it (cpuid).
    var word = expected.word;
    var tag = expected.tag;
    asm volatile ("lock cmpxchg16b (%%rsi)"
        : [word] "+{rax}" (word),
          [tag] "+{rdx}" (tag),
        : [pair] "{rsi}" (pair),
          [new_word] "{rbx}" (new.word),
          [new_tag] "{rcx}" (new.tag),
        : .{ .memory = true, .cc = true });
    // On failure the instruction loads the current pair, which differs from `expected`.
    if (word == expected.word and tag == expected.tag) return null;
    return .{ .word = word, .tag = tag };
}

fn wide(pair: Pair) u128 {
    return @as(u128, pair.tag) << 64 | pair.word;
}

/// Whether this CPU has the 16-byte compare-and-swap owned operations use.
pub fn supported() bool {
    if (comptime target_has_cas16) return true;
    var eax: u32 = 1;
    var ecx: u32 = 0;
    asm volatile ("cpuid"
        : [eax] "+{eax}" (eax),
          [ecx] "+{ecx}" (ecx),
        :
        : .{ .ebx = true, .edx = true });
    return ecx & (1 << 13) != 0;
}

/// Before replacing a tag that names another operation: mark that operation's word change done
/// in its record (if the record still describes it), so the record keeps what the tag proved.
fn help(t: *const Table, found: u64, mine: u64) void {
    if (found == mine or found == 0) return;
    const tag: Tag = @bitCast(found);
    if (tag.owner == 0 or tag.owner >= t.owner_records.len) return;
    const record = &t.owner_records[tag.owner];
    const pending: Op = .{ .seq = tag.seq, .phase = .pending };
    const done: Op = .{ .seq = tag.seq, .phase = .word_done };
    // A failure means the record moved on: its owner (or a reclaim) already finished that
    // operation, so nothing is lost by replacing its tag.
    _ = record.op.cmpxchgStrong(@bitCast(pending), @bitCast(done), .acq_rel, .monotonic);
}

fn heldCell(t: *const Table, owner: u32, slot: u32) *Atomic(u64) {
    return &t.held[@as(usize, owner) * t.backendsMax() + slot];
}

fn tagOf(owner: u32, seq: u56) u64 {
    return @bitCast(Tag{ .owner = @intCast(owner), .seq = seq });
}

/// Step 2: describes an operation in the owner's record and publishes it pending. Only the
/// owner (under its lock) or a reclaim (the owner is gone) calls this.
fn beginOp(record: *OwnerRecord, slot: u32, kind: OpKind, cost: u32, count: u32, before: Held) u56 {
    const current: Op = @bitCast(record.op.load(.monotonic));
    assert(current.phase == .idle);
    const seq = current.seq +% 1;
    record.op_slot.store(slot, .monotonic);
    record.op_kind.store(@backingInt(kind), .monotonic);
    record.op_cost.store(cost, .monotonic);
    record.op_count.store(count, .monotonic);
    record.op_held_before.store(@bitCast(before), .monotonic);
    // .release: whoever sees the operation pending (a helper, a reclaim) sees what it is.
    record.op.store(@bitCast(Op{ .seq = seq, .phase = .pending }), .release);
    return seq;
}

fn endOp(record: *OwnerRecord, seq: u56) void {
    record.op.store(@bitCast(Op{ .seq = seq, .phase = .idle }), .release);
}

fn lockOwner(record: *OwnerRecord) bool {
    var attempts: u32 = 0;
    while (attempts < lock_attempts_max) : (attempts += 1) {
        if (record.lock.cmpxchgWeak(0, 1, .acquire, .monotonic) == null) return true;
        if (attempts % 64 == 63) {
            _ = linux.sched_yield();
        } else {
            std.atomic.spinLoopHint();
        }
    }
    return false;
}

fn unlockOwner(record: *OwnerRecord) void {
    record.lock.store(0, .release);
}

// ---- owned operations ----------------------------------------------------------------------------

/// `Table.reserve` for an owned handle.
pub fn reserve(t: *const Table, slot: u32, cost: u32, class: u32) bool {
    const owner = t.owner;
    const record = &t.owner_records[owner];
    if (!lockOwner(record)) return false;
    if (killedAt(1)) return false;
    const cell = heldCell(t, owner, slot);
    const before: Held = @bitCast(cell.load(.monotonic));
    const seq = beginOp(record, slot, .reserve, cost, 1, before);
    if (killedAt(2)) return false;
    const mine = tagOf(owner, seq);
    var old = loadPair(t, slot);
    var attempts: u32 = 0;
    const done = while (attempts < reserve_attempts_max) : (attempts += 1) {
        help(t, old.tag, mine);
        if (killedAt(3)) return false;
        const new = t.reservedWord(slot, @bitCast(old.word), cost, class) orelse break false;
        old = cas(pairOf(t, slot), old, .{ .word = @bitCast(new), .tag = mine }) orelse break true;
    } else false;
    if (killedAt(4)) return false;
    if (done) {
        cell.store(@bitCast(Held{ .cost = before.cost + cost, .count = before.count + 1 }), .monotonic);
        if (killedAt(5)) return false;
        _ = record.cost_in_flight.fetchAdd(cost, .monotonic);
    }
    if (killedAt(6)) return false;
    endOp(record, seq);
    if (killedAt(7)) return false;
    unlockOwner(record);
    if (done) t.afterReserve(slot);
    return done;
}

/// `Table.release` for an owned handle (the incarnation is checked already). A release of
/// something this owner does not hold on the slot is `ReleaseMismatch`, nothing changed.
pub fn release(t: *const Table, slot: u32, cost: u32, latency_us: u32, ok: bool) Error!void {
    const owner = t.owner;
    const record = &t.owner_records[owner];
    if (!lockOwner(record)) return error.Busy;
    if (killedAt(1)) return error.Busy;
    const cell = heldCell(t, owner, slot);
    const before: Held = @bitCast(cell.load(.monotonic));
    if (before.count == 0 or before.cost < cost) {
        unlockOwner(record);
        return error.ReleaseMismatch;
    }
    const seq = beginOp(record, slot, .release, cost, 1, before);
    if (killedAt(2)) return error.Busy;
    const freed = changeWord(t, slot, record, seq, cost, 1) catch |err| {
        unlockOwner(record);
        return err;
    };
    if (killedAt(4)) return error.Busy;
    cell.store(@bitCast(Held{ .cost = before.cost - cost, .count = before.count - 1 }), .monotonic);
    if (killedAt(5)) return error.Busy;
    _ = record.cost_in_flight.fetchSub(cost, .monotonic);
    if (killedAt(6)) return error.Busy;
    endOp(record, seq);
    if (killedAt(7)) return error.Busy;
    unlockOwner(record);
    t.afterRelease(slot, freed, 1, latency_us, ok);
}

/// Step 3 of a release (the owner's, or a reclaim's for the owner): takes `cost` and `count`
/// off the slot's word with this operation's tag. Whether the slot became free; on an error
/// the operation is over (idle) and nothing changed.
fn changeWord(t: *const Table, slot: u32, record: *OwnerRecord, seq: u56, cost: u32, count: u32) Error!bool {
    const mine = tagOf(@intCast(record - t.owner_records.ptr), seq);
    var old = loadPair(t, slot);
    var attempts: u32 = 0;
    while (attempts < release_attempts_max) : (attempts += 1) {
        help(t, old.tag, mine);
        if (killedAt(3)) return error.Busy;
        const new = Table.releasedWord(@bitCast(old.word), cost, count) catch |err| {
            endOp(record, seq);
            return err;
        };
        old = cas(pairOf(t, slot), old, .{ .word = @bitCast(new), .tag = mine }) orelse return new.state == .free;
    }
    endOp(record, seq);
    return error.Busy;
}

// ---- attach, detach, reclaim -----------------------------------------------------------------------

fn ownPid() u32 {
    return @intCast(linux.getpid());
}

/// Whether process `pid` exists (a zombie not yet reaped counts as alive: a supervisor reaps
/// its child before reclaiming).
fn processAlive(pid: u32) bool {
    if (pid == 0) return false;
    const rc = linux.syscall2(.kill, pid, 0);
    return linux.errno(rc) != .SRCH;
}

/// Makes `t` (this process's view, before any call uses it) act as owner `owner`. Refused if
/// the table has no owner records, or the index is out of range, or in use: attached by a live
/// process, or holding what a dead or detached owner left (reclaim it first).
pub fn attach(t: *Table, owner: u32) Error!void {
    if (t.owner_records.len == 0 or owner == 0 or owner >= t.owner_records.len) return error.OwnerInUse;
    if (t.owner != 0) return error.OwnerInUse;
    if (!supported()) return error.Incompatible;
    const record = &t.owner_records[owner];
    const live: OwnerStatus = .{ .kind = .live, .pid = ownPid() };
    const free: OwnerStatus = .{ .kind = .free };
    if (record.status.cmpxchgStrong(@bitCast(free), @bitCast(live), .acq_rel, .monotonic) != null) {
        return error.OwnerInUse;
    }
    _ = t.header.owners_high_water.fetchMax(owner + 1, .monotonic);
    t.owner = owner;
}

/// When an owned handle closes (no call in progress): the index is free again if the owner
/// holds nothing, else `detached` until a reclaim gives its holdings back.
pub fn detach(t: *const Table) void {
    if (t.owner == 0) return;
    const record = &t.owner_records[t.owner];
    const holding = heldTotal(t, t.owner).leases != 0;
    const status: OwnerStatus = if (holding) .{ .kind = .detached, .pid = ownPid() } else .{ .kind = .free };
    record.status.store(@bitCast(status), .release);
}

/// What `owner` holds now, summed over the slots (a snapshot while it runs).
pub fn heldTotal(t: *const Table, owner: u32) Reclaimed {
    var result: Reclaimed = .{};
    if (owner >= t.owner_records.len) return result;
    const high_water = @min(t.header.slots_high_water.load(.acquire), t.backendsMax());
    for (0..high_water) |slot| {
        const held: Held = @bitCast(heldCell(t, owner, @intCast(slot)).load(.monotonic));
        result.leases += held.count;
        result.cost += held.cost;
    }
    return result;
}

/// Gives back everything owner `owner` held: its operation in doubt is decided, then each slot
/// it holds something on is released by one operation done in the owner's name (so a reclaim
/// killed midway is finished exactly by the next one). Refused (`OwnerAlive`) while the owner's
/// process is alive and attached, or another live process is reclaiming it; nothing to do if
/// the index is free.
pub fn reclaim(t: *const Table, owner: u32) Error!Reclaimed {
    if (t.owner_records.len == 0 or owner == 0 or owner >= t.owner_records.len) return error.OwnerInUse;
    if (owner == t.owner) return error.OwnerAlive;
    const record = &t.owner_records[owner];
    if (!try claimForReclaim(record)) return .{};
    return reclaimClaimed(t, owner, record);
}

fn reclaimClaimed(t: *const Table, owner: u32, record: *OwnerRecord) Error!Reclaimed {
    resolveInDoubt(t, owner, record);
    var result: Reclaimed = .{};
    const high_water = @min(t.header.slots_high_water.load(.acquire), t.backendsMax());
    for (0..high_water) |index| {
        const slot: u32 = @intCast(index);
        const held: Held = @bitCast(heldCell(t, owner, slot).load(.monotonic));
        if (held.count == 0) continue;
        try giveBack(t, owner, record, slot, held);
        result.leases += held.count;
        result.cost += held.cost;
    }
    // Everything is given back: the owner's share of the total is zero, whatever it read.
    record.cost_in_flight.store(0, .monotonic);
    record.lock.store(0, .release);
    bumpGeneration(t);
    record.status.store(@bitCast(OwnerStatus{ .kind = .free }), .release);
    return result;
}

fn claimForReclaim(record: *OwnerRecord) Error!bool {
    const me = ownPid();
    var attempts: u32 = 0;
    while (attempts < reserve_attempts_max) : (attempts += 1) {
        const raw = record.status.load(.acquire);
        const status: OwnerStatus = @bitCast(raw);
        switch (status.kind) {
            .free => return false,
            .live => if (processAlive(status.pid)) return error.OwnerAlive,
            .detached => {},
            .reclaiming => if (status.pid != me and processAlive(status.pid)) return error.OwnerAlive,
            _ => return error.Corrupt,
        }
        const claimed: OwnerStatus = .{ .kind = .reclaiming, .pid = me };
        if (record.status.cmpxchgStrong(raw, @bitCast(claimed), .acq_rel, .monotonic) == null) return true;
    }
    return error.Busy;
}

/// Decides the operation the owner died in (if any) and stores in `held` what it really holds
/// on that slot. Idempotent: a reclaim killed after it decides the same way again.
fn resolveInDoubt(t: *const Table, owner: u32, record: *OwnerRecord) void {
    const op: Op = @bitCast(record.op.load(.acquire));
    if (op.phase == .idle) return;
    const slot = record.op_slot.load(.monotonic);
    if (slot >= t.backendsMax()) return endOp(record, op.seq); // damaged: nothing to decide
    const kind: OpKind = @fromBackingInt(record.op_kind.load(.monotonic));
    const cost = record.op_cost.load(.monotonic);
    const count = record.op_count.load(.monotonic);
    const before: Held = @bitCast(record.op_held_before.load(.monotonic));
    // The change happened iff its tag is still on the word, or whoever replaced the tag marked
    // it done first; read in this order, a replacement between the two reads is seen.
    const done = op.phase == .word_done or
        t.slots[slot].tag.load(.acquire) == tagOf(owner, op.seq) or
        @as(Op, @bitCast(record.op.load(.acquire))).phase == .word_done;
    const after: Held = switch (kind) {
        .reserve => .{ .cost = before.cost +% cost, .count = before.count +% count },
        .release => .{ .cost = before.cost -% cost, .count = before.count -% count },
        else => before,
    };
    heldCell(t, owner, slot).store(@bitCast(if (done) after else before), .monotonic);
    endOp(record, op.seq);
    tree.onLeafChanged(t, slot);
}

fn giveBack(t: *const Table, owner: u32, record: *OwnerRecord, slot: u32, held: Held) Error!void {
    const seq = beginOp(record, slot, .release, held.cost, held.count, held);
    if (killedAt(11)) return error.Busy;
    const freed = try changeWord(t, slot, record, seq, held.cost, held.count);
    if (killedAt(12)) return error.Busy;
    heldCell(t, owner, slot).store(0, .monotonic);
    if (killedAt(13)) return error.Busy;
    endOp(record, seq);
    if (freed) return;
    // Statistics: the dead owner's requests did not complete.
    _ = t.slots[slot].failed_total.fetchAdd(held.count, .monotonic);
    tree.onLeafChanged(t, slot);
}

// ---- the release generation ------------------------------------------------------------------------

/// Tells workers that capacity may have been freed: every release, every change of capacity or
/// state, every reclaim moves the generation; waiters (if any) are woken.
pub fn bumpGeneration(t: *const Table) void {
    // .seq_cst with `waitGeneration`'s: either the waiter sees the new generation or this sees
    // the waiter counted, so no wake is lost.
    _ = t.header.release_generation.fetchAdd(1, .seq_cst);
    if (t.header.generation_waiters.load(.seq_cst) == 0) return;
    const futex: *const anyopaque = @ptrCast(&t.header.release_generation);
    _ = linux.futex_3arg(futex, .{ .cmd = .WAKE, .private = false }, std.math.maxInt(i32));
}

pub fn generation(t: *const Table) u64 {
    return t.header.release_generation.load(.acquire);
}

/// Waits (at most `timeout_ms`) until the generation differs from `seen`; returns the current
/// one (equal to `seen` on a timeout or a spurious wake: callers loop). Across processes: the
/// futex is on the shared mapping.
pub fn waitGeneration(t: *const Table, seen: u64, timeout_ms: u32) u64 {
    const word = &t.header.release_generation;
    if (word.load(.seq_cst) != seen or timeout_ms == 0) return word.load(.seq_cst);
    _ = t.header.generation_waiters.fetchAdd(1, .seq_cst);
    defer _ = t.header.generation_waiters.fetchSub(1, .seq_cst);
    if (word.load(.seq_cst) != seen) return word.load(.seq_cst);
    const timeout: linux.timespec = .{ .sec = timeout_ms / 1000, .nsec = @as(isize, timeout_ms % 1000) * std.time.ns_per_ms };
    // The low half of the generation (little-endian: the word's first four bytes).
    _ = linux.futex_4arg(@ptrCast(word), .{ .cmd = .WAIT, .private = false }, @truncate(seen), &timeout);
    return word.load(.seq_cst);
}
