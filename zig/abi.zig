//! The C ABI of libirm: every exported symbol is here, prefixed `irm_`, returns an `i32` status and
//! passes results through out-pointers. Every argument is validated at this edge; bad input returns
//! a status and never crashes the host process.
//!
//! Handles are small integers (`generation << 8 | index` into a fixed registry), never pointers, so
//! a stale or made-up handle is detected instead of dereferenced. The hot-path functions
//! (`irm_acquire`, `irm_release`) take only 32-bit integers and one pointer, so the Python binding
//! can call them without per-argument ctypes converters.

const std = @import("std");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const table_mod = @import("table.zig");
const memory = @import("memory.zig");
const strategies = @import("strategies.zig");
const requests_mod = @import("requests.zig");
const owners = @import("owners.zig");
const python = @import("python.zig");
const Table = table_mod.Table;
const Requests = requests_mod.Requests;

/// A failed safety check (the shipped ReleaseSafe build, or Debug) writes its message, e.g.
/// "index out of bounds: index 9, len 8", to stderr and stops the host at once: the core's state
/// can no longer be trusted. No stack trace: unwinding would link the DWARF reader into every
/// build for a path that must never run (and, with it, instructions beyond the baseline CPU).
pub const panic = std.debug.FullPanic(std.debug.simple_panic.call);

/// Bumped on every incompatible change of a signature, a struct or a status value.
pub const abi_version: u32 = 7; // 7: irm_backend_set_batch_timing. 6: irm_backend_set_batch_slots. 5: owners (irm_owner_*), the release generation, statuses 26-27, irm_acquire_priced, irm_backend_set_ring_key, irm_python_bind. 4: irm_route/irm_complete.

pub const Status = enum(i32) {
    ok = 0,
    invalid_handle = 1,
    invalid_argument = 2,
    invalid_strategy = 3,
    invalid_cost = 4,
    invalid_capacity = 5,
    invalid_weight = 6,
    invalid_priority = 7,
    invalid_state = 8,
    unknown_backend = 9,
    duplicate_id = 10,
    table_full = 11,
    too_many_tables = 12,
    release_mismatch = 13,
    busy = 14,
    buffer_too_small = 15,
    out_of_memory = 16,
    shared_exists = 17,
    shared_not_found = 18,
    shared_incompatible = 19,
    invalid_name = 20,
    system_error = 21,
    /// A shared table's header contradicts itself or its segment (stale or damaged): not attached.
    shared_corrupt = 22,
    /// A release for a reservation whose slot was freed and reused since: refused, nothing changed.
    stale_release = 23,
    /// `irm_route` with a request id that is already in flight in this handle.
    duplicate_request = 24,
    /// `irm_complete` (or `irm_request_read`) with a request id that is not in flight.
    unknown_request = 25,
    /// `irm_owner_attach`: the owner index is attached by a live process, or still holds what a
    /// dead or closed owner left (reclaim it first), or is out of range, or the table is private.
    owner_in_use = 26,
    /// `irm_owner_reclaim` of an owner whose process is alive and attached (or of this handle's
    /// own owner): refused, nothing changed.
    owner_alive = 27,
};

const Error = table_mod.Error || memory.Error || requests_mod.Error;

/// Exhaustive: a new error anywhere in the core breaks the build until it is mapped here.
fn statusFrom(err: Error) Status {
    return switch (err) {
        error.UnknownBackend => .unknown_backend,
        error.DuplicateId => .duplicate_id,
        error.TableFull => .table_full,
        error.ReleaseMismatch => .release_mismatch,
        error.Busy => .busy,
        error.InvalidState => .invalid_state,
        error.Incompatible => .shared_incompatible,
        error.Corrupt => .shared_corrupt,
        error.StaleRelease => .stale_release,
        error.SharedCorrupt => .shared_corrupt,
        error.OutOfMemory => .out_of_memory,
        error.SharedExists => .shared_exists,
        error.SharedNotFound => .shared_not_found,
        error.SharedIncompatible => .shared_incompatible,
        error.InvalidName => .invalid_name,
        error.SystemError => .system_error,
        error.DuplicateRequest => .duplicate_request,
        error.UnknownRequest => .unknown_request,
        error.OwnerInUse => .owner_in_use,
        error.OwnerAlive => .owner_alive,
    };
}

/// One row of `irm_table_snapshot`. Explicitly sized fields only; mirrored in `_native.py`.
pub const BackendInfo = extern struct {
    id: u64,
    slot: u32,
    state: u32,
    capacity: u32,
    weight_milli: u32,
    cost_in_flight: u32,
    count_in_flight: u32,
    routed_total: u64,
    completed_total: u64,
    failed_total: u64,
    latency_us_ewma: u64,
    signal_queue_depth: u32,
    signal_kv_permille: u32,
    signal_time_ms: u64,
};

// ---- handle registry ------------------------------------------------------------------------

const tables_max = 256;

/// One registry entry's state in one word, so that a call's entry and a destroy's closing are
/// decided by single atomic operations: the handle (0 when the entry is free, with
/// `closing_bit` set once a destroy began) in the high half, calls in progress in the low half.
const Usage = packed struct(u64) {
    calls: u32,
    handle: u32,
};

/// Handles stay below 2^31 (they pass as a C int), so the top bit is free to mark a closing one.
const closing_bit: u32 = 1 << 31;

/// How long `irm_table_destroy` waits for calls in progress (each is bounded) before it reports
/// `busy`; the table stays closed to new calls and a later destroy finishes the job.
const destroy_wait_attempts_max: u32 = 1 << 22;

const Entry = struct {
    usage: Atomic(u64) = .init(0),
    table: Table = undefined,
    /// This process's records of the requests `irm_route` made on the handle (requests.zig).
    requests: Requests = .{},
};

var registry: [tables_max]Entry = @splat(.{});
var registry_lock: Atomic(u32) = .init(0);
var registry_generation: u32 = 0;

/// Starts a call on `handle`: its table, or null for a handle that is not open (never was,
/// destroyed, or being destroyed). Every successful `enter` is paired with one `leave`, which
/// keeps the table mapped until then: `irm_table_destroy` waits for the calls in progress.
fn enter(handle: u32) ?*const Table {
    const entry = enterEntry(handle) orelse return null;
    return &entry.table;
}

/// `enter`, for the calls that also use the handle's request records.
fn enterEntry(handle: u32) ?*Entry {
    if (handle == 0) return null;
    if (handle & closing_bit != 0) return null; // Never a handle: would match a closing entry.
    const entry = &registry[handle % tables_max];
    // One fetchAdd, not a CAS loop: the hot path pays one atomic either way, and a miss undoes
    // its count at once. .acquire pairs with `register`'s .release (the table view is complete).
    const usage: Usage = @bitCast(entry.usage.fetchAdd(1, .acquire));
    if (usage.handle != handle) {
        leaveEntry(entry);
        return null;
    }
    return entry;
}

fn leave(handle: u32) void {
    leaveEntry(&registry[handle % tables_max]);
}

fn leaveEntry(entry: *Entry) void {
    // .release: everything this call did with the table happens before a destroy that sees the
    // count drop (its .acquire load) unmaps it.
    const before: Usage = @bitCast(entry.usage.fetchSub(1, .release));
    assert(before.calls > 0);
}

fn register(table: Table) ?u32 {
    registryLock();
    defer registryLock_release();
    for (&registry, 0..) |*entry, index| {
        if (entry.usage.load(.monotonic) != 0) continue;
        // Generations keep handles below 2^31 so they pass as a C int.
        registry_generation = (registry_generation % ((1 << 23) - 1)) + 1;
        const handle: u32 = (registry_generation << 8) | @as(u32, @intCast(index));
        assert(handle & closing_bit == 0);
        entry.table = table;
        entry.requests = .{};
        // A CAS, not a store: a stale `enter` may hold a momentary count on a free entry.
        // .release publishes the table view to the calls that enter with this handle.
        const published: Usage = .{ .calls = 0, .handle = handle };
        if (entry.usage.cmpxchgStrong(0, @bitCast(published), .release, .monotonic) != null) continue;
        return handle;
    }
    return null;
}

/// Closes `handle` to new calls, waits (bounded) for the calls in progress, and frees the entry.
/// Returns the table to unmap and the request records to free, or an error status:
/// `invalid_handle` if the handle is not open (or another destroy finished it), `busy` if calls
/// did not drain in time (then it stays closed and a later destroy of the same handle finishes the
/// job).
fn unregister(handle: u32) union(enum) { closed: struct { table: Table, requests: Requests }, failed: Status } {
    if (handle == 0) return .{ .failed = .invalid_handle };
    if (handle & closing_bit != 0) return .{ .failed = .invalid_handle };
    const entry = &registry[handle % tables_max];
    const closing = handle | closing_bit;
    var usage: Usage = @bitCast(entry.usage.load(.monotonic));
    while (usage.handle == handle) {
        var marked = usage;
        marked.handle = closing;
        // .monotonic is enough: new calls only need to see the mark to turn away, and the wait
        // below synchronises with the calls already in progress.
        const seen = entry.usage.cmpxchgWeak(@bitCast(usage), @bitCast(marked), .monotonic, .monotonic) orelse break;
        usage = @bitCast(seen);
    }
    // Marked now (by us or by an earlier destroy that gave up waiting), or not ours to close.
    if (usage.handle != handle and usage.handle != closing) return .{ .failed = .invalid_handle };
    // Copied while the entry is still ours: once it is free, `register` may reuse it.
    const table = entry.table;
    var attempts: u32 = 0;
    while (attempts < destroy_wait_attempts_max) : (attempts += 1) {
        // .acquire pairs with `leave`'s .release: once no call is counted, every call's use of
        // the table and of the records is done, and none can start (the handle is marked).
        const now: Usage = @bitCast(entry.usage.load(.acquire));
        if (now.handle != closing) return .{ .failed = .invalid_handle }; // another destroy won
        if (now.calls == 0) {
            // Copied before the entry is freed: once it is, `register` may reuse it. A count
            // that appears meanwhile is a stale `enter` turning away; it never touches them.
            const requests = entry.requests;
            const idle: Usage = .{ .calls = 0, .handle = closing };
            if (entry.usage.cmpxchgWeak(@bitCast(idle), 0, .acquire, .monotonic) == null) {
                return .{ .closed = .{ .table = table, .requests = requests } };
            }
            continue;
        }
        if (attempts % 64 == 63) {
            _ = std.os.linux.sched_yield();
        } else {
            std.atomic.spinLoopHint();
        }
    }
    return .{ .failed = .busy };
}

fn registryLock() void {
    // Held only for a scan of 256 entries; contention is create/destroy only.
    while (registry_lock.cmpxchgWeak(0, 1, .acquire, .monotonic) != null) std.atomic.spinLoopHint();
}

fn registryLock_release() void {
    registry_lock.store(0, .release);
}

// ---- argument checks ------------------------------------------------------------------------

fn checkCost(cost: i32) ?u32 {
    if (cost <= 0) return null;
    return @intCast(cost);
}

fn checkCapacity(capacity: i64) ?u32 {
    if (capacity <= 0 or capacity > table_mod.capacity_max) return null;
    return @intCast(capacity);
}

fn checkWeight(weight_milli: i64) ?u32 {
    if (weight_milli <= 0 or weight_milli > table_mod.weight_milli_max) return null;
    return @intCast(weight_milli);
}

fn checkSlot(t: *const Table, slot: u32) bool {
    return slot < t.backendsMax();
}

/// A pool's cursor: the caller's u64, used as an atomic. The cast relies on `Atomic(u64)` having
/// u64's size and 8-byte alignment; a `*u64` from C promises that alignment, and a pointer that
/// breaks the promise is refused here rather than faulting in an atomic instruction.
fn cursorFrom(cursor: ?*u64) ?*Atomic(u64) {
    const pointer = cursor orelse return null;
    if (@intFromPtr(pointer) % @alignOf(Atomic(u64)) != 0) return null;
    return @ptrCast(pointer);
}

comptime {
    assert(@sizeOf(Atomic(u64)) == @sizeOf(u64));
    assert(@alignOf(Atomic(u64)) == 8);
}

fn nameFrom(name: ?[*]const u8, name_len: u32) ?[]const u8 {
    const bytes = name orelse return null;
    if (name_len == 0 or name_len > memory.name_bytes_max) return null;
    return bytes[0..name_len];
}

fn status(s: Status) i32 {
    return @backingInt(s);
}

// ---- exports: library and tables --------------------------------------------------------------

export fn irm_abi_version(out_version: ?*u32) i32 {
    const out = out_version orelse return status(.invalid_argument);
    out.* = abi_version;
    return status(.ok);
}

/// `*out_enabled` is 1 if this library was built with runtime safety checks (Debug or
/// ReleaseSafe: every assertion is checked and a failed one aborts), 0 if not (ReleaseFast).
export fn irm_runtime_safety(out_enabled: ?*u32) i32 {
    const out = out_enabled orelse return status(.invalid_argument);
    out.* = @intFromBool(std.debug.runtime_safety);
    return status(.ok);
}

/// Creates a table in private memory for up to `backends_max` backends and a prefix index of
/// `prefix_entries` entries (0: none; memory is fixed here, never allocated per request).
export fn irm_table_create(backends_max: u32, prefix_entries: u32, flags: u32, out_handle: ?*u32) i32 {
    const out = out_handle orelse return status(.invalid_argument);
    if (!sizesValid(backends_max, prefix_entries, flags)) return status(.invalid_argument);
    const layout = table_mod.Layout.init(backends_max, prefix_entries, 0);
    const region = memory.mapPrivate(layout.region_bytes) catch |err| return status(statusFrom(err));
    return finishCreate(region, backends_max, prefix_entries, flags, 0, out);
}

/// Creates a named shared-memory table; fails with `shared_exists` if the name is taken.
export fn irm_table_create_shared(name: ?[*]const u8, name_len: u32, backends_max: u32, prefix_entries: u32, flags: u32, out_handle: ?*u32) i32 {
    const out = out_handle orelse return status(.invalid_argument);
    const name_slice = nameFrom(name, name_len) orelse return status(.invalid_name);
    if (!sizesValid(backends_max, prefix_entries, flags)) return status(.invalid_argument);
    // A shared table always has owner records: workers attach with an owner index so that a
    // dead one's reservations can be reclaimed (owners.zig). They cost nothing until used.
    const layout = table_mod.Layout.init(backends_max, prefix_entries, owners.owners_max);
    const region = memory.createShared(name_slice, layout.region_bytes) catch |err| return status(statusFrom(err));
    return finishCreate(region, backends_max, prefix_entries, flags, owners.owners_max, out);
}

fn sizesValid(backends_max: u32, prefix_entries: u32, flags: u32) bool {
    if (backends_max == 0 or backends_max > table_mod.backends_max_limit) return false;
    if (prefix_entries > table_mod.prefix_entries_limit) return false;
    return flags & ~table_mod.flags_known == 0;
}

fn finishCreate(region: memory.Region, backends_max: u32, prefix_entries: u32, flags: u32, owners_max: u32, out: *u32) i32 {
    const table = Table.format(region, backends_max, prefix_entries, flags, owners_max);
    out.* = register(table) orelse {
        memory.unmap(region);
        return status(.too_many_tables);
    };
    return status(.ok);
}

/// Maps an existing named shared-memory table into this process.
export fn irm_table_attach_shared(name: ?[*]const u8, name_len: u32, out_handle: ?*u32) i32 {
    const out = out_handle orelse return status(.invalid_argument);
    const name_slice = nameFrom(name, name_len) orelse return status(.invalid_name);
    const region = memory.attachShared(name_slice) catch |err| return status(statusFrom(err));
    const table = Table.view(region) catch |err| {
        memory.unmap(region);
        return status(statusFrom(err));
    };
    out.* = register(table) orelse {
        memory.unmap(region);
        return status(.too_many_tables);
    };
    return status(.ok);
}

/// Removes the name of a shared-memory table; processes that mapped it keep their mapping.
export fn irm_shared_unlink(name: ?[*]const u8, name_len: u32) i32 {
    const name_slice = nameFrom(name, name_len) orelse return status(.invalid_name);
    memory.unlinkShared(name_slice) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Unmaps the table, safely while other threads use the handle: new calls on it get
/// `invalid_handle` at once, and the unmapping waits (bounded) for the calls in progress. `busy`
/// if they did not finish in time: the handle stays closed, and destroying it again finishes.
export fn irm_table_destroy(handle: u32) i32 {
    switch (unregister(handle)) {
        .closed => |closed| {
            // No call is in progress: an owner that holds nothing frees its index now.
            owners.detach(&closed.table);
            var requests = closed.requests;
            requests.deinit();
            memory.unmap(closed.table.region);
        },
        .failed => |failed| return status(failed),
    }
    return status(.ok);
}

export fn irm_table_info(handle: u32, out_backends_max: ?*u32, out_present_count: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out_max = out_backends_max orelse return status(.invalid_argument);
    const out_present = out_present_count orelse return status(.invalid_argument);
    out_max.* = t.backendsMax();
    out_present.* = t.presentCount();
    return status(.ok);
}

/// Seeds the table's random sequence (p2c) so a single caller gets reproducible decisions.
export fn irm_table_seed(handle: u32, seed: u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    t.header.rng_state.store(seed, .monotonic);
    return status(.ok);
}

/// Sets ε of the bounded-load strategies in per mille (0–10000): a backend may take up to
/// ⌈(1+ε) × its share of the fleet's load⌉ before affinity yields.
export fn irm_table_set_balance(handle: u32, epsilon_permille: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (epsilon_permille > 10_000) return status(.invalid_argument);
    t.header.balance_epsilon_permille.store(epsilon_permille, .monotonic);
    return status(.ok);
}

/// Sets how old (ms of CLOCK_MONOTONIC) a backend's reported signals may be before `queue_aware`
/// ignores them.
export fn irm_table_set_signal_age_max(handle: u32, age_max_ms: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    t.header.signal_age_max_ms.store(age_max_ms, .monotonic);
    return status(.ok);
}

/// Sets the share of capacity (per mille, 1–1000) that requests of `priority` may fill.
export fn irm_table_set_class_share(handle: u32, priority: u32, share_permille: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    if (share_permille == 0 or share_permille > 1000) return status(.invalid_argument);
    t.header.class_share_permille[priority].store(share_permille, .monotonic);
    return status(.ok);
}

export fn irm_table_get_class_share(handle: u32, priority: u32, out_share_permille: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_share_permille orelse return status(.invalid_argument);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    out.* = t.header.class_share_permille[priority].load(.monotonic);
    return status(.ok);
}

// ---- exports: backends --------------------------------------------------------------------------

export fn irm_backend_add(handle: u32, id: u64, capacity: i64, weight_milli: i64, out_slot: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_slot orelse return status(.invalid_argument);
    const capacity_checked = checkCapacity(capacity) orelse return status(.invalid_capacity);
    const weight_checked = checkWeight(weight_milli) orelse return status(.invalid_weight);
    out.* = t.add(id, capacity_checked, weight_checked) catch |err| return status(statusFrom(err));
    return status(.ok);
}

export fn irm_backend_remove(handle: u32, slot: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    t.remove(slot) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Changes capacity, weight and state (1 active, 2 draining, 3 down) while routing goes on.
export fn irm_backend_update(handle: u32, slot: u32, capacity: i64, weight_milli: i64, state: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    const capacity_checked = checkCapacity(capacity) orelse return status(.invalid_capacity);
    const weight_checked = checkWeight(weight_milli) orelse return status(.invalid_weight);
    if (state > 15) return status(.invalid_state);
    const state_checked: table_mod.State = @fromBackingInt(@intCast(state));
    t.update(slot, capacity_checked, weight_checked, state_checked) catch |err| return status(statusFrom(err));
    return status(.ok);
}

export fn irm_backend_find(handle: u32, id: u64, out_slot: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_slot orelse return status(.invalid_argument);
    out.* = t.find(id) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Places the backend on the consistent-hashing ring by `key` (e.g. a hash of its URL) rather
/// than by its id, so routers that number the same backends differently agree on owners; 0
/// places it by id again.
export fn irm_backend_set_ring_key(handle: u32, slot: u32, key: u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    t.setRingKey(slot, key) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Records load the server itself reports (queue depth, KV-cache use in per mille) and when it
/// was read (`time_ms` of CLOCK_MONOTONIC, i.e. Python's `time.monotonic() * 1000`).
export fn irm_backend_set_signals(handle: u32, slot: u32, queue_depth: u32, kv_permille: u32, time_ms: u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    if (kv_permille > 1000) return status(.invalid_argument);
    t.setSignals(slot, queue_depth, kv_permille, time_ms) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Records how many requests the backend's engine runs at once (its batch slots; 0 = not known):
/// least_ttft counts only the requests beyond them as a queue.
export fn irm_backend_set_batch_slots(handle: u32, slot: u32, batch_slots: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    t.setBatchSlots(slot, batch_slots) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Records when the backend's batch next frees a slot (`slot_free_ms`, CLOCK_MONOTONIC ms, as the
/// caller's books of its requests in flight expect it) and how long one request's service takes
/// there (`service_ms`); 0 and 0 = not known. least_ttft waits for a full batch only that long.
export fn irm_backend_set_batch_timing(handle: u32, slot: u32, slot_free_ms: u64, service_ms: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    t.setBatchTiming(slot, slot_free_ms, service_ms) catch |err| return status(statusFrom(err));
    return status(.ok);
}

// ---- exports: routing (hot path) ---------------------------------------------------------------

/// Picks a backend with `strategy` and reserves `cost` on it. `*out_ticket` names the
/// reservation (`incarnation << 32 | slot`: pass both halves to `irm_release`), or is 0xFFFFFFFF
/// when nothing fits (status ok: that is a normal result).
export fn irm_acquire(handle: u32, strategy: u32, cost: i32, priority: u32, out_ticket: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_ticket orelse return status(.invalid_argument);
    if (!strategies.isKnown(strategy)) return status(.invalid_strategy);
    const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    out.* = ticketFor(t, strategies.acquire(t, .ofTable(t), @fromBackingInt(@intCast(strategy)), cost_checked, priority));
    return status(.ok);
}

/// `irm_route`'s result when nothing fits: nothing was reserved or recorded.
pub const route_none: i32 = -(1 << 31);
/// `irm_route`'s results from this one down name a routed request whose backend has an id that
/// does not fit the result (2^31 and above) by its slot: `route_slot_base - result`.
pub const route_slot_base: i32 = -(1 << 30);

comptime {
    // Slot results lie strictly between `route_none` and every `-status`.
    assert(route_slot_base - @as(i64, table_mod.backends_max_limit) > route_none);
    assert(route_slot_base < -@as(i32, @intCast(@typeInfo(Status).@"enum".field_names.len)));
}

/// The seed API's per-call path in one foreign call: picks a backend with `strategy`, reserves
/// `cost` on it and records request `request_id` (passed in 32-bit halves) in this handle's
/// request records, with the reservation and the time, for `irm_complete`. Returns the chosen
/// backend's id when it is below 2^31 (else `route_slot_base - slot`), `route_none` when nothing
/// fits, or `-status` when refused: `duplicate_request` if the id is in flight already (nothing
/// reserved). Not a status and an out-pointer, and only 32-bit integers: the binding calls it
/// without ctypes converters or out-parameter objects, whose per-call cost exceeds the decision's.
///
/// The records are this process's, per handle, never in the table: on a shared table, only the
/// process that routed a request can complete it this way.
export fn irm_route(handle: u32, strategy: u32, request_id_low: u32, request_id_high: u32, cost: i32, priority: u32) i32 {
    const entry = enterEntry(handle) orelse return refused(.invalid_handle);
    defer leave(handle);
    if (!strategies.isKnown(strategy)) return refused(.invalid_strategy);
    const cost_checked = checkCost(cost) orelse return refused(.invalid_cost);
    if (priority >= table_mod.classes_count) return refused(.invalid_priority);
    const request_id = requestId(request_id_low, request_id_high);
    const t = &entry.table;
    // The id is checked before the decision, so a duplicate changes nothing (not even a cursor).
    const decision: RouteDecision = .{
        .table = t,
        .strategy = @fromBackingInt(@intCast(strategy)),
        .cost = cost_checked,
        .priority = priority,
    };
    const reservation = entry.requests.record(request_id, requests_mod.monotonicNs(), decision) catch |err| {
        return refused(statusFrom(err));
    };
    const slot: u32 = @truncate((reservation orelse return route_none).ticket);
    // The reservation keeps the slot from being freed, so its id cannot change under us; it is
    // the table's, so it is right also for a backend another process added.
    const id = t.slots[slot].id.load(.monotonic);
    if (id <= std.math.maxInt(i32)) return @intCast(id);
    assert(slot < table_mod.backends_max_limit);
    return route_slot_base - @as(i32, @intCast(slot));
}

/// `irm_route`'s decision, made by `Requests.record` once the id is known to be new.
const RouteDecision = struct {
    table: *const Table,
    strategy: strategies.Strategy,
    cost: u32,
    priority: u32,

    pub fn decide(d: RouteDecision) ?requests_mod.Reservation {
        const slot = strategies.acquire(d.table, .ofTable(d.table), d.strategy, d.cost, d.priority);
        if (slot == table_mod.slot_none) return null;
        return .{ .ticket = d.table.ticketOf(slot), .cost = d.cost };
    }
};

/// Completes a request `irm_route` recorded on this handle: releases exactly the reservation it
/// made, counts it completed (`ok` 1) or failed (0), and feeds `latency_us` to the latency EWMA;
/// a negative `latency_us` means "the time since it was routed". `unknown_request` if it is not
/// in flight (never routed here, or completed already); `stale_release` if its backend's slot
/// was reused since (the record is gone either way, the counters are unchanged).
export fn irm_complete(handle: u32, request_id_low: u32, request_id_high: u32, ok: u32, latency_us: i32) i32 {
    const entry = enterEntry(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (ok > 1) return status(.invalid_argument);
    const record = entry.requests.remove(requestId(request_id_low, request_id_high)) catch |err| return status(statusFrom(err));
    const latency: u32 = if (latency_us >= 0) @intCast(latency_us) else elapsedUs(record.started_ns);
    const slot: u32 = @truncate(record.ticket);
    // The record is this process's own memory, written by `irm_route` from a real reservation.
    assert(checkSlot(&entry.table, slot));
    entry.table.release(slot, @intCast(record.ticket >> 32), record.cost, latency, ok == 1) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// `*out_ticket` is the reservation of a request `irm_route` recorded (in flight);
/// `unknown_request` if there is none.
export fn irm_request_read(handle: u32, request_id_low: u32, request_id_high: u32, out_ticket: ?*u64) i32 {
    const entry = enterEntry(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_ticket orelse return status(.invalid_argument);
    const found = entry.requests.find(requestId(request_id_low, request_id_high)) catch |err| return status(statusFrom(err));
    const record = found orelse return status(.unknown_request);
    out.* = record.ticket;
    return status(.ok);
}

/// `*out_count`: the requests `irm_route` recorded on this handle and not yet completed.
export fn irm_requests_count(handle: u32, out_count: ?*u64) i32 {
    const entry = enterEntry(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_count orelse return status(.invalid_argument);
    out.* = entry.requests.recordsCount() catch |err| return status(statusFrom(err));
    return status(.ok);
}

fn requestId(low: u32, high: u32) u64 {
    return @as(u64, high) << 32 | low;
}

/// Microseconds since `started_ns` (CLOCK_MONOTONIC), saturated to a u32.
fn elapsedUs(started_ns: u64) u32 {
    const elapsed_us = (requests_mod.monotonicNs() -| started_ns) / std.time.ns_per_us;
    return @intCast(@min(elapsed_us, std.math.maxInt(u32)));
}

fn refused(s: Status) i32 {
    assert(s != .ok);
    return -@backingInt(s);
}

fn ticketFor(t: *const Table, slot: u32) table_mod.Ticket {
    if (slot == table_mod.slot_none) return table_mod.ticket_none;
    return t.ticketOf(slot);
}

/// Like `irm_acquire`, but chooses only among `slots[0..count]` (a pool: e.g. the backends
/// serving one model). `cursor` is the pool's round-robin position, owned by the caller.
export fn irm_acquire_among(handle: u32, strategy: u32, cost: i32, priority: u32, slots: ?[*]const u32, count: u32, cursor: ?*u64, out_ticket: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_ticket orelse return status(.invalid_argument);
    const cursor_checked = cursorFrom(cursor) orelse return status(.invalid_argument);
    if (!strategies.isKnown(strategy)) return status(.invalid_strategy);
    const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    if (count > t.backendsMax()) return status(.invalid_argument);
    if (count > 0 and slots == null) return status(.invalid_argument);
    const slot_list: []const u32 = if (count == 0) &.{} else slots.?[0..count];
    // Out-of-range slots in a pool are skipped by the strategies, never dereferenced.
    const candidates: strategies.Candidates = .{ .slots = slot_list, .cursor = cursor_checked, .whole_table = false };
    out.* = ticketFor(t, strategies.acquire(t, candidates, @fromBackingInt(@intCast(strategy)), cost_checked, priority));
    return status(.ok);
}

/// Like `irm_acquire_among` (or `irm_acquire` when `slots` is null) with affinity: a session key
/// (`has_key` 1) for consistent_hash, chained prefix hashes for prefix_affinity. `*out_outcome`
/// is 0 none, 1 hit, 2 miss, 3 overload (affinity yielded to load); `*out_matched_blocks` is the
/// length of the prefix found at the chosen backend.
export fn irm_acquire_affine(handle: u32, strategy: u32, cost: i32, priority: u32, key: u64, has_key: u32, hashes: ?[*]const u64, hashes_count: u32, slots: ?[*]const u32, slots_count: u32, cursor: ?*u64, out_ticket: ?*u64, out_outcome: ?*u32, out_matched_blocks: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_ticket orelse return status(.invalid_argument);
    const outcome_out = out_outcome orelse return status(.invalid_argument);
    const matched_out = out_matched_blocks orelse return status(.invalid_argument);
    if (!strategies.isKnown(strategy)) return status(.invalid_strategy);
    const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    if (has_key > 1 or hashes_count > hashes_max) return status(.invalid_argument);
    const prompt = promptHashes(hashes, hashes_count) orelse return status(.invalid_argument);
    const candidates = candidatesFrom(t, slots, slots_count, cursor) orelse return status(.invalid_argument);
    const input: strategies.Affinity = .{
        .key = if (has_key == 1) key else null,
        .hashes = prompt,
    };
    const decision = strategies.acquireAffine(t, candidates, @fromBackingInt(@intCast(strategy)), input, cost_checked, priority);
    out.* = ticketFor(t, decision.slot);
    outcome_out.* = @backingInt(decision.outcome);
    matched_out.* = decision.matched_blocks;
    return status(.ok);
}

/// Like `irm_acquire_affine` without a session key, with a price per prompt block
/// (`block_cost_milli`, thousandths of a cost unit) and `discount` (0 or 1): least_ttft values a
/// backend's uncached blocks at that price; with `discount` 1, prefix_affinity and least_ttft
/// reserve the cost less the value of the chosen backend's cached blocks (at least 1).
/// `*out_cost` is the cost reserved: release exactly that.
export fn irm_acquire_priced(handle: u32, strategy: u32, cost: i32, priority: u32, hashes: ?[*]const u64, hashes_count: u32, block_cost_milli: u32, discount: u32, slots: ?[*]const u32, slots_count: u32, cursor: ?*u64, out_ticket: ?*u64, out_outcome: ?*u32, out_matched_blocks: ?*u32, out_cost: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_ticket orelse return status(.invalid_argument);
    const outcome_out = out_outcome orelse return status(.invalid_argument);
    const matched_out = out_matched_blocks orelse return status(.invalid_argument);
    const cost_out = out_cost orelse return status(.invalid_argument);
    if (!strategies.isKnown(strategy)) return status(.invalid_strategy);
    const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    if (discount > 1 or hashes_count > hashes_max) return status(.invalid_argument);
    const prompt = promptHashes(hashes, hashes_count) orelse return status(.invalid_argument);
    const candidates = candidatesFrom(t, slots, slots_count, cursor) orelse return status(.invalid_argument);
    const input: strategies.Affinity = .{ .hashes = prompt };
    const pricing: strategies.Pricing = .{ .block_cost_milli = block_cost_milli, .discount = discount == 1 };
    const decision = strategies.acquirePriced(t, candidates, @fromBackingInt(@intCast(strategy)), input, cost_checked, priority, pricing);
    out.* = ticketFor(t, decision.slot);
    outcome_out.* = @backingInt(decision.outcome);
    matched_out.* = decision.matched_blocks;
    cost_out.* = decision.cost;
    return status(.ok);
}

/// The candidates of an affine or priced decision: a caller's pool (`slots`, with its cursor),
/// or the whole table when `slots` is null; null for a pool that cannot be.
fn candidatesFrom(t: *const Table, slots: ?[*]const u32, slots_count: u32, cursor: ?*u64) ?strategies.Candidates {
    const list = slots orelse return .ofTable(t);
    if (slots_count > t.backendsMax()) return null;
    const pool_cursor = cursorFrom(cursor) orelse return null;
    return .{ .slots = list[0..slots_count], .cursor = pool_cursor, .whole_table = false };
}

/// A prompt's block hashes as a slice (empty for none); null when a count comes without hashes.
fn promptHashes(hashes: ?[*]const u64, count: u32) ?[]const u64 {
    if (count == 0) return &.{};
    const list = hashes orelse return null;
    return list[0..count];
}

/// Prompts longer than this many blocks are routed on their first `hashes_max` blocks.
const hashes_max: u32 = 1 << 16;

/// Writes the chained hashes of `text`'s full blocks of `block_bytes` bytes (at most `capacity`)
/// to `out_hashes`; `*out_count` says how many.
export fn irm_prefix_hashes(text: ?[*]const u8, text_len: u32, block_bytes: u32, out_hashes: ?[*]u64, capacity: u32, out_count: ?*u32) i32 {
    const count_out = out_count orelse return status(.invalid_argument);
    if (block_bytes == 0) return status(.invalid_argument);
    if (text_len > 0 and text == null) return status(.invalid_argument);
    if (capacity > 0 and out_hashes == null) return status(.invalid_argument);
    const bytes: []const u8 = if (text_len == 0) &.{} else text.?[0..text_len];
    const out: []u64 = if (capacity == 0) &.{} else out_hashes.?[0..capacity];
    count_out.* = @import("affinity.zig").prefixHashes(bytes, block_bytes, out);
    return status(.ok);
}

/// Reserves `cost` on the given slot (a strategy outside the core chose it). `*out_ticket` names
/// the reservation, or is 0xFFFFFFFF when the slot cannot take the request.
export fn irm_acquire_on(handle: u32, slot: u32, cost: i32, priority: u32, out_ticket: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_ticket orelse return status(.invalid_argument);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    out.* = if (t.reserve(slot, cost_checked, priority)) t.ticketOf(slot) else table_mod.ticket_none;
    return status(.ok);
}

/// The most decisions (or releases) one batch call makes: bounds the time a call runs, and the
/// lengths the caller's arrays are trusted to have. Larger batches are refused
/// (`invalid_argument`); the binding splits them.
pub const batch_count_max: u32 = 1 << 16;

/// Makes `count` (at most `batch_count_max`) decisions in one call: `out_tickets[i]` is the ticket
/// for `costs[i]` or 0xFFFFFFFF.
export fn irm_acquire_batch(handle: u32, strategy: u32, priority: u32, count: u32, costs: ?[*]const i32, out_tickets: ?[*]u64, out_acquired: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out_count = out_acquired orelse return status(.invalid_argument);
    if (!strategies.isKnown(strategy)) return status(.invalid_strategy);
    if (priority >= table_mod.classes_count) return status(.invalid_priority);
    if (count > batch_count_max) return status(.invalid_argument);
    if (count == 0) {
        out_count.* = 0;
        return status(.ok);
    }
    const cost_list = (costs orelse return status(.invalid_argument))[0..count];
    const ticket_list = (out_tickets orelse return status(.invalid_argument))[0..count];
    // Validate every cost first, so a bad batch reserves nothing.
    for (cost_list) |cost| if (cost <= 0) return status(.invalid_cost);
    var acquired: u32 = 0;
    for (cost_list, ticket_list) |cost, *ticket| {
        const slot = strategies.acquire(t, .ofTable(t), @fromBackingInt(@intCast(strategy)), @intCast(cost), priority);
        ticket.* = ticketFor(t, slot);
        acquired += @intFromBool(slot != table_mod.slot_none);
    }
    out_count.* = acquired;
    return status(.ok);
}

/// Returns `cost` reserved on `slot` by the ticket `incarnation << 32 | slot`; `ok` (0/1) counts
/// it completed or failed, and `latency_us` feeds the latency EWMA. `stale_release` if the slot
/// was reused since (counters unchanged). The ticket comes in halves: the hot path passes only
/// 32-bit integers.
export fn irm_release(handle: u32, slot: u32, incarnation: u32, cost: i32, latency_us: u32, ok: u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
    if (ok > 1) return status(.invalid_argument);
    t.release(slot, incarnation, cost_checked, latency_us, ok == 1) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Releases `count` (at most `batch_count_max`) reservations by ticket; entries equal to
/// 0xFFFFFFFF are skipped (batch acquire output can be passed back as is). Stops at the first
/// error; `*out_released` says how far it got.
export fn irm_release_batch(handle: u32, count: u32, tickets: ?[*]const u64, costs: ?[*]const i32, latencies_us: ?[*]const u32, ok: u32, out_released: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out_count = out_released orelse return status(.invalid_argument);
    out_count.* = 0;
    if (ok > 1) return status(.invalid_argument);
    if (count > batch_count_max) return status(.invalid_argument);
    if (count == 0) return status(.ok);
    const ticket_list = (tickets orelse return status(.invalid_argument))[0..count];
    const cost_list = (costs orelse return status(.invalid_argument))[0..count];
    for (ticket_list, cost_list, 0..) |ticket, cost, index| {
        if (ticket != table_mod.ticket_none) {
            const slot: u32 = @truncate(ticket);
            if (!checkSlot(t, slot)) return status(.unknown_backend);
            const cost_checked = checkCost(cost) orelse return status(.invalid_cost);
            const latency = if (latencies_us) |list| list[index] else 0;
            t.release(slot, @intCast(ticket >> 32), cost_checked, latency, ok == 1) catch |err| return status(statusFrom(err));
        }
        out_count.* += 1;
    }
    return status(.ok);
}

// ---- exports: owners (a dead worker's reservations given back; owners.zig) -------------------

/// Makes this handle act as owner `owner` (1 … `irm_owners_max`-1) of its shared table: every
/// reservation and release it makes is recorded so that `irm_owner_reclaim` can give back what
/// it still holds if this process dies. Call it once, right after create or attach, before any
/// other call on the handle. `owner_in_use` if the index is out of range, the table is private,
/// or another live process (or what a dead one left) has it.
export fn irm_owner_attach(handle: u32, owner: u32) i32 {
    const entry = enterEntry(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    owners.attach(&entry.table, owner) catch |err| return status(statusFrom(err));
    return status(.ok);
}

/// Gives back everything owner `owner` still holds (its process is dead, or its handle closed):
/// `*out_leases` reservations of `*out_cost` in all. `owner_alive` if its process is alive and
/// attached, or `owner` is this handle's own; ok with zeros if it holds nothing.
export fn irm_owner_reclaim(handle: u32, owner: u32, out_leases: ?*u64, out_cost: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const leases_out = out_leases orelse return status(.invalid_argument);
    const cost_out = out_cost orelse return status(.invalid_argument);
    const result = owners.reclaim(t, owner) catch |err| return status(statusFrom(err));
    leases_out.* = result.leases;
    cost_out.* = result.cost;
    return status(.ok);
}

/// What owner `owner` holds now: reservations and their cost (a snapshot, for tests and
/// metrics). Zeros for a private table or an index out of range.
export fn irm_owner_held(handle: u32, owner: u32, out_leases: ?*u64, out_cost: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const leases_out = out_leases orelse return status(.invalid_argument);
    const cost_out = out_cost orelse return status(.invalid_argument);
    const result = owners.heldTotal(t, owner);
    leases_out.* = result.leases;
    cost_out.* = result.cost;
    return status(.ok);
}

/// `*out_owners_max`: owner records of the table (0 for a private table), and
/// `*out_owner`: this handle's owner index (0: unowned).
export fn irm_owner_info(handle: u32, out_owners_max: ?*u32, out_owner: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const max_out = out_owners_max orelse return status(.invalid_argument);
    const owner_out = out_owner orelse return status(.invalid_argument);
    max_out.* = @intCast(t.owner_records.len);
    owner_out.* = t.owner;
    return status(.ok);
}

/// `*out_generation`: the table's release generation, which moves on every release, change of
/// capacity or state, and reclaim (by any process): a worker with queued requests polls it.
export fn irm_release_generation(handle: u32, out_generation: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_generation orelse return status(.invalid_argument);
    out.* = owners.generation(t);
    return status(.ok);
}

/// Waits at most `timeout_ms` (≤ 1000: a destroy waits for calls in progress) for the release generation to differ from `seen`;
/// `*out_generation` is the generation then (still `seen` on a timeout: callers loop).
export fn irm_release_wait(handle: u32, seen: u64, timeout_ms: u32, out_generation: ?*u64) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_generation orelse return status(.invalid_argument);
    if (timeout_ms > 1000) return status(.invalid_argument);
    out.* = owners.waitGeneration(t, seen, timeout_ms);
    return status(.ok);
}

// ---- exports: observation --------------------------------------------------------------------------

/// Copies every backend that is present or still has requests in flight into `out` (up to
/// `capacity` rows). `*out_count` is the number of such backends; if it exceeds `capacity` the
/// status is `buffer_too_small` and the first `capacity` rows are filled.
export fn irm_table_snapshot(handle: u32, out: ?[*]BackendInfo, capacity: u32, out_count: ?*u32) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const count_out = out_count orelse return status(.invalid_argument);
    if (capacity > 0 and out == null) return status(.invalid_argument);
    // Clamped: the mark is shared memory, and `view` checked it only once.
    const high_water = @min(t.header.slots_high_water.load(.acquire), t.backendsMax());
    var count: u32 = 0;
    for (0..high_water) |index| {
        if (t.wordOf(@intCast(index)).state == .free) continue;
        if (count < capacity) out.?[count] = infoOf(t, @intCast(index));
        count += 1;
    }
    count_out.* = count;
    return status(if (count > capacity) .buffer_too_small else .ok);
}

/// Reads one backend's counters (present, or retired with requests still in flight).
export fn irm_backend_read(handle: u32, slot: u32, out_info: ?*BackendInfo) i32 {
    const t = enter(handle) orelse return status(.invalid_handle);
    defer leave(handle);
    const out = out_info orelse return status(.invalid_argument);
    if (!checkSlot(t, slot)) return status(.unknown_backend);
    if (t.wordOf(slot).state == .free) return status(.unknown_backend);
    out.* = infoOf(t, slot);
    return status(.ok);
}

fn infoOf(t: *const Table, slot: u32) BackendInfo {
    const s = &t.slots[slot];
    const word = t.wordOf(slot);
    return .{
        .id = s.id.load(.monotonic),
        .slot = slot,
        .state = @backingInt(word.state),
        .capacity = s.capacity.load(.monotonic),
        .weight_milli = s.weight_milli.load(.monotonic),
        .cost_in_flight = word.cost,
        .count_in_flight = word.count,
        .routed_total = s.routed_total.load(.monotonic),
        .completed_total = s.completed_total.load(.monotonic),
        .failed_total = s.failed_total.load(.monotonic),
        .latency_us_ewma = s.latency_us_ewma.load(.monotonic),
        .signal_queue_depth = s.signal_queue_depth.load(.monotonic),
        .signal_kv_permille = s.signal_kv_permille.load(.monotonic),
        // .acquire pairs with `setSignals`: the values above are at least as new as this stamp.
        .signal_time_ms = s.signal_time_ms.load(.acquire),
    };
}

comptime {
    assert(@sizeOf(BackendInfo) == 80);
}

test {
    _ = table_mod;
    _ = memory;
    _ = strategies;
    _ = @import("tree.zig");
    _ = @import("affinity.zig");
    _ = requests_mod;
    _ = owners;
    _ = @import("owners_test.zig");
}

test "a destroy waits for calls in progress and turns new ones away" {
    var handle: u32 = 0;
    try std.testing.expectEqual(status(.ok), irm_table_create(4, 0, 0, &handle));
    _ = enter(handle) orelse return error.TestUnexpectedResult; // A call in progress.
    var destroyed: i32 = -1;
    const closer = try std.Thread.spawn(.{}, destroyInto, .{ handle, &destroyed });
    const usage = &registry[handle % tables_max].usage;
    while (@as(Usage, @bitCast(usage.load(.acquire))).handle == handle) std.atomic.spinLoopHint();
    // Marked closing: new calls are refused, the table stays mapped for the call in progress.
    var ticket: u64 = 0;
    try std.testing.expectEqual(status(.invalid_handle), irm_acquire(handle, 0, 1, 0, &ticket));
    try std.testing.expectEqual(@as(u32, 1), @as(Usage, @bitCast(usage.load(.acquire))).calls);
    leave(handle);
    closer.join();
    // A slow machine may have made the destroy give up (busy); destroying again finishes it.
    if (destroyed == status(.busy)) destroyed = irm_table_destroy(handle);
    try std.testing.expectEqual(status(.ok), destroyed);
    try std.testing.expectEqual(status(.invalid_handle), irm_table_destroy(handle));
}

fn destroyInto(handle: u32, out: *i32) void {
    out.* = irm_table_destroy(handle);
}

test "bad handles and arguments return statuses" {
    var slot: u32 = 0;
    var ticket: u64 = 0;
    try std.testing.expectEqual(status(.invalid_handle), irm_acquire(0, 0, 1, 0, &ticket));
    try std.testing.expectEqual(status(.invalid_handle), irm_acquire(12345, 0, 1, 0, &ticket));
    var handle: u32 = 0;
    try std.testing.expectEqual(status(.ok), irm_table_create(4, 0, 0, &handle));
    defer _ = irm_table_destroy(handle);
    try std.testing.expectEqual(status(.invalid_capacity), irm_backend_add(handle, 1, 0, 1000, &slot));
    try std.testing.expectEqual(status(.ok), irm_backend_add(handle, 1, 10, 1000, &slot));
    try std.testing.expectEqual(status(.invalid_cost), irm_acquire(handle, 0, -3, 0, &ticket));
    try std.testing.expectEqual(status(.invalid_strategy), irm_acquire(handle, 99, 1, 0, &ticket));
    try std.testing.expectEqual(status(.invalid_priority), irm_acquire(handle, 0, 1, 8, &ticket));
    try std.testing.expectEqual(status(.invalid_argument), irm_acquire(handle, 0, 1, 0, null));
    try std.testing.expectEqual(status(.unknown_backend), irm_release(handle, 3, 1, 1, 0, 1));
    try std.testing.expectEqual(status(.release_mismatch), irm_release(handle, slot, 1, 1, 0, 1));
    try std.testing.expectEqual(status(.ok), irm_acquire(handle, 0, 1, 0, &ticket));
    try std.testing.expectEqual(@as(u64, 1) << 32 | slot, ticket);
    try std.testing.expectEqual(status(.stale_release), irm_release(handle, slot, 2, 1, 0, 1));
    try std.testing.expectEqual(status(.ok), irm_release(handle, slot, 1, 1, 0, 1));
}

/// A new table of `backends_max` holding one backend `id` of `capacity`; the caller destroys it.
fn testTableWithBackend(backends_max: u32, id: u64, capacity: i64) !struct { handle: u32, slot: u32 } {
    var handle: u32 = 0;
    try std.testing.expectEqual(status(.ok), irm_table_create(backends_max, 0, 0, &handle));
    errdefer _ = irm_table_destroy(handle);
    var slot: u32 = 0;
    try std.testing.expectEqual(status(.ok), irm_backend_add(handle, id, capacity, 1000, &slot));
    return .{ .handle = handle, .slot = slot };
}

test "route records a request, complete releases exactly it, once" {
    const created = try testTableWithBackend(4, 42, 3);
    const handle, const slot = .{ created.handle, created.slot };
    defer _ = irm_table_destroy(handle);
    const round_robin = 0;
    // An id above 2^32 travels in halves; the backend's id comes back.
    try std.testing.expectEqual(@as(i32, 42), irm_route(handle, round_robin, 7, 1, 2, 0));
    try std.testing.expectEqual(refused(.duplicate_request), irm_route(handle, round_robin, 7, 1, 1, 0));
    try std.testing.expectEqual(route_none, irm_route(handle, round_robin, 8, 0, 2, 0)); // 2 + 2 > 3
    try std.testing.expectEqual(status(.unknown_request), irm_complete(handle, 8, 0, 1, 0));
    var count: u64 = 0;
    try std.testing.expectEqual(status(.ok), irm_requests_count(handle, &count));
    try std.testing.expectEqual(@as(u64, 1), count);
    var ticket: u64 = 0;
    try std.testing.expectEqual(status(.ok), irm_request_read(handle, 7, 1, &ticket));
    try std.testing.expectEqual(@as(u64, 1) << 32 | slot, ticket);
    try std.testing.expectEqual(status(.invalid_argument), irm_complete(handle, 7, 1, 2, 0));
    try std.testing.expectEqual(status(.ok), irm_complete(handle, 7, 1, 0, 250));
    try std.testing.expectEqual(status(.unknown_request), irm_complete(handle, 7, 1, 1, 0));
    var info: BackendInfo = undefined;
    try std.testing.expectEqual(status(.ok), irm_backend_read(handle, slot, &info));
    try std.testing.expectEqual(@as(u32, 0), info.cost_in_flight);
    try std.testing.expectEqual(@as(u64, 1), info.failed_total);
    try std.testing.expectEqual(@as(u64, 250), info.latency_us_ewma);
}

test "a completion whose slot was reused since is refused, and wide ids come back by slot" {
    const created = try testTableWithBackend(1, 1, 10);
    const handle = created.handle;
    var slot = created.slot;
    defer _ = irm_table_destroy(handle);
    try std.testing.expectEqual(@as(i32, 1), irm_route(handle, 0, 5, 0, 1, 0));
    // A second, wrong release of the same slot frees it behind the record's back...
    var ticket: u64 = 0;
    try std.testing.expectEqual(status(.ok), irm_request_read(handle, 5, 0, &ticket));
    try std.testing.expectEqual(status(.ok), irm_backend_remove(handle, slot));
    try std.testing.expectEqual(status(.ok), irm_release(handle, slot, @intCast(ticket >> 32), 1, 0, 1));
    // ...so the slot is reused, and the record's release must not land on the new backend.
    try std.testing.expectEqual(status(.ok), irm_backend_add(handle, 1 << 31, 10, 1000, &slot));
    try std.testing.expectEqual(status(.stale_release), irm_complete(handle, 5, 0, 1, -1));
    var info: BackendInfo = undefined;
    try std.testing.expectEqual(status(.ok), irm_backend_read(handle, slot, &info));
    try std.testing.expectEqual(@as(u32, 0), info.cost_in_flight);
    try std.testing.expectEqual(@as(u64, 0), info.completed_total);
    // A record left in flight is freed with its handle (the testing allocator is not used here,
    // so `requests.zig`'s own tests check the freeing).
    try std.testing.expectEqual(route_slot_base - @as(i32, @intCast(slot)), irm_route(handle, 0, 6, 0, 1, 0));
}

// ---- exports: the seed API's builtins (python.zig) ---------------------------------------------

/// For the binding only: takes the addresses of the CPython functions and objects python.zig
/// uses (`functions[0..functions_count]`, in `python.Api`'s order, from `ctypes.pythonapi`) and
/// writes `python.bound_count` values to `out_values`: the addresses of the seed API's builtin
/// methods (route_request, complete) and of the request type's slot functions (new, init,
/// dealloc, traverse, clear), then that type's size and its fields' offsets, for the binding to make the
/// function objects and the type. `invalid_argument` for other counts or a null address; what an
/// address points to cannot be checked here, which is why only the binding calls this, with the
/// interpreter's own.
export fn irm_python_bind(functions: ?[*]const u64, functions_count: u32, out_values: ?[*]u64, values_count: u32) i32 {
    const addresses = functions orelse return status(.invalid_argument);
    const out = out_values orelse return status(.invalid_argument);
    if (functions_count != python.api_count) return status(.invalid_argument);
    if (values_count != python.bound_count) return status(.invalid_argument);
    if (!python.bind(addresses[0..functions_count])) return status(.invalid_argument);
    out[0..python.bound_count].* = python.boundValues(PythonMethods.addresses());
    return status(.ok);
}

const PythonMethods = python.Methods(struct {
    pub const route = irm_route;
    pub const complete = irm_complete;
    pub const route_none_result = route_none;
    pub const route_slot_base_result = route_slot_base;
    pub const unknown_request: i32 = status(.unknown_request);

    pub fn backendRead(handle: u32, slot: u32, out_id: *u64) i32 {
        var info: BackendInfo = undefined;
        const read = irm_backend_read(handle, slot, &info);
        if (read == status(.ok)) out_id.* = info.id;
        return read;
    }
});

test {
    _ = python;
}
