//! The backend table: one contiguous region (ordinary memory or a shared-memory segment) holding a
//! header, a fixed array of backend slots, the dense list of present slots, the least-loaded tree
//! and the id index. It holds no pointers, only indices, so several processes can map it at
//! different addresses.
//!
//! Accounting rule: everything about a slot that must change together (cost and requests in flight,
//! state, and the epoch that moves when capacity or weight change) lives in one 64-bit word, so a
//! single compare-and-swap decides every reservation. Capacity is never exceeded under any
//! interleaving because the check and the reservation are that one CAS.

const std = @import("std");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const tree = @import("tree.zig");
const affinity = @import("affinity.zig");
const owners = @import("owners.zig");

pub const backends_max_limit: u32 = 1 << 20;
pub const classes_count: u32 = 8;
pub const slot_none: u32 = std.math.maxInt(u32);
/// A reservation's name: `incarnation << 32 | slot`. An incarnation is at least 1 (`add` moves it
/// before a slot takes work), so no ticket equals `ticket_none`, "nothing fits".
pub const Ticket = u64;
pub const ticket_none: Ticket = slot_none;
pub const capacity_max: u32 = std.math.maxInt(i32);
pub const weight_milli_max: u32 = 1_000_000;
pub const count_max: u32 = std.math.maxInt(u20);
pub const magic: u64 = 0x314C_4254_5F4D_5249; // "IRM_TBL1" read little-endian.
pub const layout_version: u32 = 7; // 5: owner records, the slot tag, the release generation, the ring key; 6: the incarnation in a slot's first line; 7: a slot's batch timing.
pub const header_bytes: u64 = 4096;

/// Test-only: reserve and release with a plain load/store instead of a compare-and-swap, so the
/// concurrency tests can prove that their checker catches a race.
pub const flag_racy_for_tests: u32 = 1 << 0;
pub const flags_known: u32 = flag_racy_for_tests;

/// Bounds for every retry loop: a CAS that loses this many races gives up (acquire reports
/// "none fits", which is always safe) instead of spinning forever.
const reserve_attempts_max: u32 = 64;
const release_attempts_max: u32 = 1 << 20;
const lock_attempts_max: u32 = 1 << 24;

pub const Error = error{
    UnknownBackend,
    DuplicateId,
    TableFull,
    ReleaseMismatch,
    Busy,
    InvalidState,
    Incompatible,
    /// A release names an incarnation the slot no longer has: its backend was removed and the
    /// slot reused since the reservation was made.
    StaleRelease,
    /// A shared table's header contradicts itself or the region it describes.
    Corrupt,
    /// An owner index is taken by a live process, or still holds what a dead one left
    /// (reclaim it first), or is out of range, or the table has no owner records.
    OwnerInUse,
    /// A reclaim of an owner whose process is still alive and attached: refused.
    OwnerAlive,
};

pub const State = enum(u4) {
    free = 0,
    active = 1,
    draining = 2,
    down = 3,
    /// Removed while requests were in flight; becomes free when the last one is released.
    retired = 4,
    _,
};

pub const Word = packed struct(u64) {
    cost: u32 = 0,
    count: u20 = 0,
    state: State = .free,
    epoch: u8 = 0,
};

pub const Slot = extern struct {
    word: Atomic(u64),
    /// On a table with owner records: the owned operation that last changed `word`
    /// (owners.zig `Tag`), written together with it by one 16-byte compare-and-swap. Unowned
    /// changes leave it as it is. Beside `word` and 16-byte aligned for that.
    tag: Atomic(u64),
    id: Atomic(u64),
    capacity: Atomic(u32),
    weight_milli: Atomic(u32),
    routed_total: Atomic(u64),
    completed_total: Atomic(u64),
    /// Moves on every add: an index entry naming (slot, incarnation) is stale once it differs.
    /// In the first cache line with the word, capacity and id: a reservation's ticket reads it,
    /// so a decision touches one line of its slot.
    incarnation: Atomic(u32),
    /// Requests the engine runs at once (its batch slots, e.g. vLLM's `max_num_seqs`) as its
    /// operator gave them; 0 = not known. least_ttft counts only the requests beyond them as a
    /// queue: a request that finds a free slot waits for nobody. In the first line, beside
    /// capacity, which a decision reads with it.
    batch_slots: Atomic(u32),
    latency_us_ewma: Atomic(u64),
    failed_total: Atomic(u64),
    signal_queue_depth: Atomic(u32),
    signal_kv_permille: Atomic(u32),
    signal_time_ms: Atomic(u64),
    /// Where the backend's points sit on the consistent-hashing ring: a name the caller chose
    /// (a hash of the backend's URL), so routers that number the same backends differently build
    /// the same ring; 0 (the default) places them by `id`. Changed under the lock.
    ring_key: Atomic(u64),
    /// When the backend's batch next frees a slot (CLOCK_MONOTONIC ms, as the caller's books of
    /// its requests in flight expect it), and how long one request's service takes there (ms);
    /// 0 = not known. least_ttft reads them for a backend whose batch is full: a slot that frees
    /// in a moment is worth waiting for, one that frees in a whole service is not. Second line:
    /// written on every request's start and end, read only by least_ttft.
    slot_free_ms: Atomic(u64),
    service_ms: Atomic(u32),
    reserved_word: u32,
    reserved: [2]u64,

    /// This slot's capacity × weight as configured, whatever its state.
    pub fn configuredWeightOf(s: *const Slot) u64 {
        return configuredWeight(s.capacity.load(.monotonic), s.weight_milli.load(.monotonic));
    }

    comptime {
        // Two cache lines: a slot never shares a line with its neighbour's hot word.
        assert(@sizeOf(Slot) == 128);
        assert(@offsetOf(Slot, "tag") == 8);
        // What a decision reads (word, id, capacity, weight, incarnation) and writes (word,
        // routed_total) shares the first line.
        assert(@offsetOf(Slot, "incarnation") + 4 <= 64);
        assert(@offsetOf(Slot, "batch_slots") + 4 <= 64);
        assert(@offsetOf(Slot, "routed_total") + 8 <= 64);
        assert(@offsetOf(Slot, "weight_milli") + 4 <= 64);
    }
};

pub const Header = extern struct {
    magic: u64,
    layout_version: u32,
    backends_max: u32,
    tree_leaves_count: u32,
    idmap_count: u32,
    region_bytes: u64,
    flags: u32,
    ready: Atomic(u32),
    lock: Atomic(u32),
    present_count: Atomic(u32),
    slots_high_water: Atomic(u32),
    index_enabled: Atomic(u32),
    rr_cursor: Atomic(u64),
    rng_state: Atomic(u64),
    class_share_permille: [classes_count]Atomic(u32),
    /// Cost in flight over all slots, and capacity × weight over active ones: the fleet average
    /// that bounded-load strategies compare against.
    cost_in_flight_total: Atomic(u64),
    weighted_capacity_total: Atomic(u64),
    /// Bounded-load slack ε in per mille: a backend may exceed its share of the average by ε.
    balance_epsilon_permille: Atomic(u32),
    ring_enabled: Atomic(u32),
    ring_count: Atomic(u32),
    ring_points_max: u32,
    ring_points_per_backend: u32,
    prefix_sets_count: u32,
    prefix_clock: Atomic(u64),
    /// Server-reported signals older than this are ignored by `queue_aware`.
    signal_age_max_ms: Atomic(u32),
    /// The largest configured capacity × weight of a present backend, whatever its state: the
    /// consistent-hash ring's weighting scale (affinity.zig `accepts`). Changed under the lock.
    weighted_max: Atomic(u64),
    /// A hash of the fields that fix the layout (`LayoutFields`), written once by `format`: a
    /// process attaching to a stale or damaged segment finds out before it trusts any size.
    layout_checksum: u64,
    /// Owner records (owners.zig): 0 in a private table. Fixed by `format`.
    owners_max: u32,
    /// One more than the largest owner index ever attached: sums over owners stop there.
    owners_high_water: Atomic(u32),
    /// Puts `release_generation` on a cache line of its own (asserted below).
    generation_line_before: [8]u8,
    /// Moves on every release and every change of capacity or state (owners.zig
    /// `bumpGeneration`), on its own cache line: a worker with queued requests polls it, or
    /// waits on it (a futex), to learn that capacity was freed anywhere.
    release_generation: Atomic(u64),
    /// Threads in `owners.waitGeneration`: a release wakes them only when there are some.
    generation_waiters: Atomic(u32),
    generation_line_rest: [52]u8,

    comptime {
        assert(@sizeOf(Header) <= header_bytes);
        assert(@offsetOf(Header, "release_generation") % 64 == 0);
    }
};

/// The header fields that never change after `format` and decide where everything lies, copied
/// out of the (shared, writable by others) header once, so that what is checked is what is used.
const LayoutFields = extern struct {
    magic: u64,
    region_bytes: u64,
    layout_version: u32,
    backends_max: u32,
    tree_leaves_count: u32,
    idmap_count: u32,
    flags: u32,
    ring_points_max: u32,
    ring_points_per_backend: u32,
    prefix_sets_count: u32,
    owners_max: u32,
    /// Always 0: keeps the struct free of padding (see below).
    reserved: u32 = 0,

    fn of(header: *const Header) LayoutFields {
        return .{
            .magic = header.magic,
            .region_bytes = header.region_bytes,
            .layout_version = header.layout_version,
            .backends_max = header.backends_max,
            .tree_leaves_count = header.tree_leaves_count,
            .idmap_count = header.idmap_count,
            .flags = header.flags,
            .ring_points_max = header.ring_points_max,
            .ring_points_per_backend = header.ring_points_per_backend,
            .prefix_sets_count = header.prefix_sets_count,
            .owners_max = header.owners_max,
        };
    }

    fn checksum(fields: LayoutFields) u64 {
        return std.hash.Wyhash.hash(layout_checksum_seed, std.mem.asBytes(&fields));
    }

    /// The layout the primary fields (backends_max, prefix_sets_count) give, if every derived
    /// field agrees with it.
    fn layout(fields: LayoutFields) Error!Layout {
        if (fields.backends_max < 1) return error.Corrupt;
        if (fields.backends_max > backends_max_limit) return error.Corrupt;
        if (fields.prefix_sets_count > prefix_entries_limit / prefix_ways) return error.Corrupt;
        if (fields.flags & ~flags_known != 0) return error.Corrupt;
        if (fields.owners_max > owners.owners_max) return error.Corrupt;
        const result = Layout.init(fields.backends_max, fields.prefix_sets_count * prefix_ways, fields.owners_max);
        if (fields.tree_leaves_count != result.tree_leaves_count) return error.Corrupt;
        if (fields.idmap_count != result.idmap_count) return error.Corrupt;
        if (fields.ring_points_max != result.ring_points_max) return error.Corrupt;
        if (fields.ring_points_per_backend != Layout.ringPointsPerBackend(fields.backends_max)) return error.Corrupt;
        if (fields.prefix_sets_count != result.prefix_sets_count) return error.Corrupt;
        if (fields.region_bytes != result.region_bytes) return error.Corrupt;
        return result;
    }

    comptime {
        // No padding: the checksum hashes every byte, so none may be undefined.
        assert(@sizeOf(LayoutFields) == 2 * 8 + 10 * 4);
    }
};

const layout_checksum_seed: u64 = 0x4952_4D5F_4C41_594F; // "IRM_LAYO"

pub const IdEntry = extern struct {
    id: u64,
    slot_plus_one: u32,
    reserved: u32,
};

/// A point of the consistent-hashing ring (affinity.zig).
pub const RingPoint = extern struct {
    hash: u64,
    slot: u32,
    reserved: u32,
};

/// One way of a set of the prefix index (affinity.zig): a block hash and the backends that
/// recently received a prompt with that prefix, most recent first.
pub const PrefixEntry = extern struct {
    hash: u64,
    stamp: u64,
    slots: [prefix_locations_max]u32,
    incarnations: [prefix_locations_max]u32,
};

pub const prefix_locations_max = 4;
pub const prefix_ways = 8;
pub const prefix_entries_limit: u32 = 1 << 24;
/// The ring keeps at most this many points in all; each backend gets an equal number (1 … 128).
const ring_points_budget: u32 = 1 << 21;

pub const Layout = struct {
    backends_max: u32,
    tree_leaves_count: u32,
    idmap_count: u32,
    ring_points_max: u32,
    prefix_sets_count: u32,
    slots_offset: u64,
    present_offset: u64,
    present_pos_offset: u64,
    tree_offset: u64,
    idmap_offset: u64,
    ring_offset: u64,
    prefix_locks_offset: u64,
    prefix_offset: u64,
    owners_max: u32,
    owners_offset: u64,
    held_offset: u64,
    region_bytes: u64,

    pub fn ringPointsPerBackend(backends_max: u32) u32 {
        return std.math.clamp(ring_points_budget / backends_max, 1, 128);
    }

    /// `prefix_entries` is rounded up to whole sets of `prefix_ways`; 0 disables the index.
    /// `owners_max` owner records (0: none, a private table) each count what their owner holds
    /// on every slot (owners.zig).
    pub fn init(backends_max: u32, prefix_entries: u32, owners_max: u32) Layout {
        assert(backends_max >= 1);
        assert(backends_max <= backends_max_limit);
        const leaves = std.math.ceilPowerOfTwoAssert(u32, @max(backends_max, 2));
        const idmap_count = std.math.ceilPowerOfTwoAssert(u32, backends_max * 2);
        const slots_offset = header_bytes;
        const present_offset = slots_offset + @as(u64, backends_max) * @sizeOf(Slot);
        const present_pos_offset = present_offset + @as(u64, backends_max) * 4;
        const tree_offset = std.mem.alignForward(u64, present_pos_offset + @as(u64, backends_max) * 4, 64);
        assert(prefix_entries <= prefix_entries_limit);
        const idmap_offset = tree_offset + @as(u64, leaves) * 8;
        const ring_points_max = ringPointsPerBackend(backends_max) * backends_max;
        const ring_offset = idmap_offset + @as(u64, idmap_count) * @sizeOf(IdEntry);
        const prefix_sets_count = std.math.divCeil(u32, prefix_entries, prefix_ways) catch unreachable;
        const prefix_locks_offset = ring_offset + @as(u64, ring_points_max) * @sizeOf(RingPoint);
        const prefix_offset = std.mem.alignForward(u64, prefix_locks_offset + @as(u64, prefix_sets_count) * 4, 64);
        assert(owners_max <= owners.owners_max);
        const prefix_end = prefix_offset + @as(u64, prefix_sets_count) * prefix_ways * @sizeOf(PrefixEntry);
        const owners_offset = std.mem.alignForward(u64, prefix_end, 128);
        const held_offset = owners_offset + @as(u64, owners_max) * @sizeOf(owners.OwnerRecord);
        const end = held_offset + @as(u64, owners_max) * backends_max * 8;
        return .{
            .backends_max = backends_max,
            .tree_leaves_count = leaves,
            .idmap_count = idmap_count,
            .ring_points_max = ring_points_max,
            .prefix_sets_count = prefix_sets_count,
            .slots_offset = slots_offset,
            .present_offset = present_offset,
            .present_pos_offset = present_pos_offset,
            .tree_offset = tree_offset,
            .idmap_offset = idmap_offset,
            .ring_offset = ring_offset,
            .prefix_locks_offset = prefix_locks_offset,
            .prefix_offset = prefix_offset,
            .owners_max = owners_max,
            .owners_offset = owners_offset,
            .held_offset = held_offset,
            .region_bytes = std.mem.alignForward(u64, end, header_bytes),
        };
    }
};

pub const default_balance_epsilon_permille: u32 = 250;
pub const balance_epsilon_permille_max: u32 = 10_000;
pub const default_signal_age_max_ms: u32 = 5000;

pub const default_class_share_permille = [classes_count]u32{ 1000, 900, 800, 700, 600, 500, 500, 500 };

/// A process-local view of a table region.
pub const Table = struct {
    header: *Header,
    slots: []Slot,
    present: []Atomic(u32),
    present_pos: []u32,
    tree_nodes: []Atomic(u64),
    idmap: []IdEntry,
    ring: []RingPoint,
    prefix_locks: []Atomic(u32),
    prefix_entries: []PrefixEntry,
    /// Empty in a private table.
    owner_records: []owners.OwnerRecord,
    /// What each owner holds on each slot: `held[owner * backends_max + slot]` (owners.zig).
    held: []Atomic(u64),
    region: []align(header_bytes) u8,
    /// This handle's owner index (process-local, set once by `owners.attach` before use): 0 is
    /// unowned, today's path.
    owner: u32 = 0,

    /// Formats a zeroed region as an empty table. The region must be `Layout.init(n).region_bytes`
    /// long and zero-filled (fresh anonymous or shared mappings are).
    pub fn format(region: []align(header_bytes) u8, backends_max: u32, prefix_entries: u32, flags: u32, owners_max: u32) Table {
        const layout = Layout.init(backends_max, prefix_entries, owners_max);
        assert(region.len == layout.region_bytes);
        assert(flags & ~flags_known == 0);
        const header: *Header = @ptrCast(region.ptr);
        header.magic = magic;
        header.layout_version = layout_version;
        header.backends_max = backends_max;
        header.tree_leaves_count = layout.tree_leaves_count;
        header.idmap_count = layout.idmap_count;
        header.region_bytes = layout.region_bytes;
        header.flags = flags;
        header.ring_points_max = layout.ring_points_max;
        header.ring_points_per_backend = Layout.ringPointsPerBackend(backends_max);
        header.prefix_sets_count = layout.prefix_sets_count;
        header.owners_max = owners_max;
        header.layout_checksum = LayoutFields.of(header).checksum();
        header.balance_epsilon_permille.store(default_balance_epsilon_permille, .monotonic);
        header.signal_age_max_ms.store(default_signal_age_max_ms, .monotonic);
        for (&header.class_share_permille, default_class_share_permille) |*share, value| {
            share.store(value, .monotonic);
        }
        const table = slicesOf(region, layout);
        for (table.tree_nodes) |*node| node.store(std.math.maxInt(u64), .monotonic);
        // .release: a process that attaches and sees `ready` also sees the formatted header.
        header.ready.store(1, .release);
        return table;
    }

    /// Interprets an already formatted region (a shared segment another process formatted, maybe
    /// stale or damaged), checking every header field before anything is read through it: the
    /// layout fields against their checksum and against the layout they imply, the region's size,
    /// and the bounds of every count that indexes an array.
    pub fn view(region: []align(header_bytes) u8) Error!Table {
        if (region.len < header_bytes) return error.Incompatible;
        const header: *const Header = @ptrCast(region.ptr);
        const fields = LayoutFields.of(header);
        if (fields.magic != magic) return error.Incompatible;
        if (fields.layout_version != layout_version) return error.Incompatible;
        if (header.layout_checksum != fields.checksum()) return error.Corrupt;
        const layout = try fields.layout();
        if (region.len != layout.region_bytes) return error.Corrupt;
        const table = slicesOf(region, layout);
        try table.checkCounters();
        return table;
    }

    fn slicesOf(region: []align(header_bytes) u8, layout: Layout) Table {
        assert(region.len == layout.region_bytes);
        const n = layout.backends_max;
        return .{
            .header = @ptrCast(region.ptr),
            .slots = sliceAt(Slot, region, layout.slots_offset, n),
            .present = sliceAt(Atomic(u32), region, layout.present_offset, n),
            .present_pos = sliceAt(u32, region, layout.present_pos_offset, n),
            .tree_nodes = sliceAt(Atomic(u64), region, layout.tree_offset, layout.tree_leaves_count),
            .idmap = sliceAt(IdEntry, region, layout.idmap_offset, layout.idmap_count),
            .ring = sliceAt(RingPoint, region, layout.ring_offset, layout.ring_points_max),
            .prefix_locks = sliceAt(Atomic(u32), region, layout.prefix_locks_offset, layout.prefix_sets_count),
            .prefix_entries = sliceAt(PrefixEntry, region, layout.prefix_offset, layout.prefix_sets_count * prefix_ways),
            .owner_records = sliceAt(owners.OwnerRecord, region, layout.owners_offset, layout.owners_max),
            .held = sliceAt(Atomic(u64), region, layout.held_offset, layout.owners_max * n),
            .region = region,
        };
    }

    /// The header's changing fields, checked only against bounds that hold at every instant, so
    /// that another process adding or removing backends meanwhile never makes this fail: flags
    /// are 0 or 1, counts fit their arrays, listed slots are below the high-water mark, shares and
    /// ε are in their ranges.
    fn checkCounters(t: *const Table) Error!void {
        const header = t.header;
        if (header.ready.load(.acquire) != 1) return error.Corrupt;
        if (header.lock.load(.monotonic) > 1) return error.Corrupt;
        if (header.index_enabled.load(.monotonic) > 1) return error.Corrupt;
        if (header.ring_enabled.load(.monotonic) > 1) return error.Corrupt;
        if (header.ring_count.load(.acquire) > t.ring.len) return error.Corrupt;
        if (header.owners_high_water.load(.monotonic) > t.owner_records.len) return error.Corrupt;
        if (header.balance_epsilon_permille.load(.monotonic) > balance_epsilon_permille_max) return error.Corrupt;
        for (&header.class_share_permille) |*share| {
            const value = share.load(.monotonic);
            if (value < 1) return error.Corrupt;
            if (value > 1000) return error.Corrupt;
        }
        // In this order: `add` raises the high-water mark before it lists a slot and publishes the
        // count (.release), so a count read first (.acquire) is covered by the mark read after.
        const present_count = header.present_count.load(.acquire);
        const high_water = header.slots_high_water.load(.acquire);
        if (high_water > t.slots.len) return error.Corrupt;
        if (present_count > high_water) return error.Corrupt;
        for (t.present[0..present_count]) |*entry| {
            if (entry.load(.monotonic) >= high_water) return error.Corrupt;
        }
    }

    /// From this process's view, never from the shared header: a size another process could
    /// overwrite is never trusted after `view` checked it.
    pub fn backendsMax(t: *const Table) u32 {
        return @intCast(t.slots.len);
    }

    /// The number of listed present slots, clamped to the list (the count is shared memory).
    pub fn presentCount(t: *const Table) u32 {
        // .acquire pairs with the .release stores of add/remove: entries below it are written.
        return @min(t.header.present_count.load(.acquire), t.backendsMax());
    }

    pub fn racy(t: *const Table) bool {
        return t.header.flags & flag_racy_for_tests != 0;
    }

    pub fn wordOf(t: *const Table, slot: u32) Word {
        // .acquire pairs with the .release CAS in `update`: the capacity and weight read after
        // this load are at least as new as the epoch in the word.
        return @bitCast(t.slots[slot].word.load(.acquire));
    }

    /// The cost a request of `class` may fill a backend of `capacity` up to.
    pub fn limitFor(t: *const Table, capacity: u32, class: u32) u64 {
        assert(class < classes_count);
        const share = t.header.class_share_permille[class].load(.monotonic);
        return @as(u64, capacity) * share / 1000;
    }

    /// Whether `slot` could take `cost` for `class` right now (a hint: `reserve` decides).
    pub fn fits(t: *const Table, slot: u32, cost: u32, class: u32) bool {
        const word = t.wordOf(slot);
        if (word.state != .active) return false;
        const limit = t.limitFor(t.slots[slot].capacity.load(.monotonic), class);
        return @as(u64, word.cost) + cost <= limit and word.count < count_max;
    }

    /// Reserves `cost` on `slot` for a request of `class`. Returns false when the backend is not
    /// active or the reservation would exceed its share of capacity; that is a normal result.
    /// An owned handle's reservation is also recorded for its owner (owners.zig).
    pub fn reserve(t: *const Table, slot: u32, cost: u32, class: u32) bool {
        assert(slot < t.backendsMax());
        assert(cost > 0);
        if (t.owner != 0) return owners.reserve(t, slot, cost, class);
        const s = &t.slots[slot];
        var attempts: u32 = 0;
        while (attempts < reserve_attempts_max) : (attempts += 1) {
            const old_raw = s.word.load(.acquire);
            const new = t.reservedWord(slot, @bitCast(old_raw), cost, class) orelse return false;
            if (t.racy()) {
                racyDelay();
                s.word.store(@bitCast(new), .monotonic);
            } else if (s.word.cmpxchgWeak(old_raw, @bitCast(new), .acq_rel, .monotonic) != null) {
                continue;
            }
            // Totals are statistics and hints (the fleet average), not decisions: .monotonic is
            // enough.
            _ = t.header.cost_in_flight_total.fetchAdd(cost, .monotonic);
            t.afterReserve(slot);
            return true;
        }
        return false;
    }

    /// `old` with `cost` and one request more, or null if the backend is not active or that
    /// would exceed the share of capacity `class` may fill.
    pub inline fn reservedWord(t: *const Table, slot: u32, old: Word, cost: u32, class: u32) ?Word {
        if (old.state != .active) return null;
        const limit = t.limitFor(t.slots[slot].capacity.load(.monotonic), class);
        if (@as(u64, old.cost) + cost > limit) return null;
        if (old.count >= count_max) return null;
        var new = old;
        new.cost += cost;
        new.count += 1;
        // Post-conditions: the reservation moves exactly `cost` and one request, and fits.
        assert(new.cost - old.cost == cost);
        assert(new.count - old.count == 1);
        assert(new.cost <= limit);
        return new;
    }

    pub inline fn afterReserve(t: *const Table, slot: u32) void {
        _ = t.slots[slot].routed_total.fetchAdd(1, .monotonic);
        tree.onLeafChanged(t, slot);
    }

    /// Cost in flight over all slots: unowned reservations in the header, each owner's in its
    /// record (so that a reclaim can zero a dead owner's share exactly).
    pub fn costInFlightTotal(t: *const Table) u64 {
        var total = t.header.cost_in_flight_total.load(.monotonic);
        if (t.owner_records.len == 0) return total;
        const high_water = @min(t.header.owners_high_water.load(.monotonic), t.owner_records.len);
        for (t.owner_records[0..high_water]) |*record| total +%= record.cost_in_flight.load(.monotonic);
        return total;
    }

    /// The ticket of a reservation just made on `slot`. Read after the reservation: a slot with a
    /// request in flight is never freed, so its incarnation cannot move until that release.
    pub fn ticketOf(t: *const Table, slot: u32) Ticket {
        assert(slot < t.backendsMax());
        return @as(u64, t.incarnationOf(slot)) << 32 | slot;
    }

    pub fn incarnationOf(t: *const Table, slot: u32) u32 {
        // .acquire: with the reservation's .acq_rel CAS, the incarnation `add` stored before it
        // published the slot active.
        return t.slots[slot].incarnation.load(.acquire);
    }

    /// Returns `cost` reserved on `slot` in `incarnation`, records the outcome and folds
    /// `latency_us` into the EWMA. A release for an earlier incarnation (the slot was reused
    /// since) is refused and changes nothing: it must never land on the new backend.
    pub fn release(t: *const Table, slot: u32, incarnation: u32, cost: u32, latency_us: u32, ok: bool) Error!void {
        assert(slot < t.backendsMax());
        assert(cost > 0);
        const s = &t.slots[slot];
        // While the reservation is held the slot cannot be freed, so a matching incarnation stays
        // matching until the CAS below (a second release of one reservation is the caller's bug).
        if (t.wordOf(slot).state == .free) return error.UnknownBackend;
        if (t.incarnationOf(slot) != incarnation) return error.StaleRelease;
        if (t.owner != 0) return owners.release(t, slot, cost, latency_us, ok);
        var attempts: u32 = 0;
        const freed = while (attempts < release_attempts_max) : (attempts += 1) {
            const old_raw = s.word.load(.monotonic);
            const new = try releasedWord(@bitCast(old_raw), cost, 1);
            if (t.racy()) {
                racyDelay();
                s.word.store(@bitCast(new), .monotonic);
            } else if (s.word.cmpxchgWeak(old_raw, @bitCast(new), .acq_rel, .monotonic) != null) {
                continue;
            }
            break new.state == .free;
        } else return error.Busy;
        _ = t.header.cost_in_flight_total.fetchSub(cost, .monotonic);
        t.afterRelease(slot, freed, 1, latency_us, ok);
    }

    /// `old` without `cost` and `count` requests (a retired slot left empty becomes free), or
    /// `ReleaseMismatch` if it does not hold them.
    pub inline fn releasedWord(old: Word, cost: u32, count: u32) Error!Word {
        assert(count > 0);
        if (old.state == .free) return error.UnknownBackend;
        if (old.count < count or old.cost < cost) return error.ReleaseMismatch;
        var new = old;
        new.cost -= cost;
        new.count -= @intCast(count);
        // Every reservation costs at least one unit, so cost in flight >= requests in flight.
        if (new.cost < new.count) return error.ReleaseMismatch;
        if (new.count == 0 and new.cost != 0) return error.ReleaseMismatch;
        if (new.state == .retired and new.count == 0) new.state = .free;
        assert(old.cost - new.cost == cost);
        assert(old.count - new.count == count);
        return new;
    }

    /// The statistics of `count` released requests, and (in a shared table) the generation that
    /// tells waiting workers capacity was freed.
    pub inline fn afterRelease(t: *const Table, slot: u32, freed: bool, count: u32, latency_us: u32, ok: bool) void {
        // Only shared tables have other processes to tell; a private table's release path stays
        // as it was (its generation moves on capacity and state changes).
        if (t.owner_records.len != 0) owners.bumpGeneration(t);
        if (freed) return; // The slot may already be reused by `add`: touch nothing more.
        const s = &t.slots[slot];
        if (ok) {
            _ = s.completed_total.fetchAdd(count, .monotonic);
        } else {
            _ = s.failed_total.fetchAdd(count, .monotonic);
        }
        ewmaUpdate(&s.latency_us_ewma, latency_us);
        tree.onLeafChanged(t, slot);
    }

    pub fn add(t: *const Table, id: u64, capacity: u32, weight_milli: u32) Error!u32 {
        assert(capacity >= 1);
        assert(capacity <= capacity_max);
        assert(weight_milli >= 1);
        assert(weight_milli <= weight_milli_max);
        try t.lock();
        defer t.unlock();
        if (t.idmapFind(id) != null) return error.DuplicateId;
        const id_index = t.idmapFreeIndex(id) orelse return error.Corrupt;
        const slot = t.freeSlot() orelse return error.TableFull;
        const s = &t.slots[slot];
        s.id.store(id, .monotonic);
        s.capacity.store(capacity, .monotonic);
        s.weight_milli.store(weight_milli, .monotonic);
        s.routed_total.store(0, .monotonic);
        s.completed_total.store(0, .monotonic);
        s.failed_total.store(0, .monotonic);
        s.latency_us_ewma.store(0, .monotonic);
        s.signal_queue_depth.store(0, .monotonic);
        s.signal_kv_permille.store(0, .monotonic);
        s.signal_time_ms.store(0, .monotonic);
        s.ring_key.store(0, .monotonic);
        s.batch_slots.store(0, .monotonic);
        s.service_ms.store(0, .monotonic);
        s.slot_free_ms.store(0, .monotonic);
        _ = s.incarnation.fetchAdd(1, .monotonic);
        const old: Word = t.wordOf(slot);
        assert(old.state == .free);
        assert(old.count == 0);
        const new: Word = .{ .state = .active, .epoch = old.epoch +% 1 };
        // .release: the fields stored above are visible to whoever sees the slot active.
        s.word.store(@bitCast(new), .release);
        t.idmap[id_index] = .{ .id = id, .slot_plus_one = slot + 1, .reserved = 0 };
        const position = t.header.present_count.load(.monotonic);
        t.present[position].store(slot, .monotonic);
        t.present_pos[slot] = position;
        // .release: a reader that sees the new count also sees the list entry.
        t.header.present_count.store(position + 1, .release);
        _ = t.header.weighted_capacity_total.fetchAdd(weighted(capacity, weight_milli, .active), .monotonic);
        _ = t.header.weighted_max.fetchMax(configuredWeight(capacity, weight_milli), .monotonic);
        affinity.onAdded(t, slot);
        tree.onLeafChanged(t, slot);
        owners.bumpGeneration(t);
        return slot;
    }

    pub fn remove(t: *const Table, slot: u32) Error!void {
        try t.lock();
        defer t.unlock();
        const s = &t.slots[slot];
        // Under the lock a present slot stays present and its id stays in the index; a present
        // slot whose id is missing is a damaged table, refused before anything changes.
        if (!isPresent(t.wordOf(slot).state)) return error.UnknownBackend;
        const id_index = t.idmapIndex(s.id.load(.monotonic)) orelse return error.Corrupt;
        var attempts: u32 = 0;
        while (attempts < release_attempts_max) : (attempts += 1) {
            const old_raw = s.word.load(.acquire);
            const old: Word = @bitCast(old_raw);
            if (!isPresent(old.state)) return error.UnknownBackend;
            var new = old;
            new.state = if (old.count == 0) .free else .retired;
            new.epoch = old.epoch +% 1;
            if (s.word.cmpxchgWeak(old_raw, @bitCast(new), .acq_rel, .monotonic) == null) {
                const contribution = weighted(s.capacity.load(.monotonic), s.weight_milli.load(.monotonic), old.state);
                _ = t.header.weighted_capacity_total.fetchSub(contribution, .monotonic);
                break;
            }
        } else return error.Busy;
        affinity.onRemoved(t, slot);
        t.idmapRemoveAt(id_index);
        const position = t.present_pos[slot];
        const last = t.header.present_count.load(.monotonic) - 1;
        assert(position <= last);
        const moved = t.present[last].load(.monotonic);
        t.present[position].store(moved, .monotonic);
        t.present_pos[moved] = position;
        t.header.present_count.store(last, .release);
        if (s.configuredWeightOf() >= t.header.weighted_max.load(.monotonic)) t.rescanWeightedMax();
        tree.onLeafChanged(t, slot);
        owners.bumpGeneration(t);
    }

    pub fn update(t: *const Table, slot: u32, capacity: u32, weight_milli: u32, state: State) Error!void {
        assert(capacity >= 1);
        assert(capacity <= capacity_max);
        assert(weight_milli >= 1);
        assert(weight_milli <= weight_milli_max);
        switch (state) {
            .active, .draining, .down => {},
            else => return error.InvalidState,
        }
        try t.lock(); // Serialises the weighted-capacity total with add and remove.
        defer t.unlock();
        const s = &t.slots[slot];
        const before = t.wordOf(slot);
        if (!isPresent(before.state)) return error.UnknownBackend;
        const configured_old = s.configuredWeightOf();
        const contribution_old = weighted(s.capacity.load(.monotonic), s.weight_milli.load(.monotonic), before.state);
        s.capacity.store(capacity, .monotonic);
        s.weight_milli.store(weight_milli, .monotonic);
        var attempts: u32 = 0;
        while (attempts < release_attempts_max) : (attempts += 1) {
            const old_raw = s.word.load(.acquire);
            const old: Word = @bitCast(old_raw);
            if (!isPresent(old.state)) return error.UnknownBackend;
            var new = old;
            new.state = state;
            // A reservation that read the old capacity compares against the old epoch and fails.
            new.epoch = old.epoch +% 1;
            if (s.word.cmpxchgWeak(old_raw, @bitCast(new), .acq_rel, .monotonic) == null) break;
        } else return error.Busy;
        _ = t.header.weighted_capacity_total.fetchSub(contribution_old, .monotonic);
        _ = t.header.weighted_capacity_total.fetchAdd(weighted(capacity, weight_milli, state), .monotonic);
        // A state change (health) leaves the scale alone; only shrinking the largest needs a scan.
        const configured_new = configuredWeight(capacity, weight_milli);
        if (configured_new >= t.header.weighted_max.load(.monotonic)) {
            t.header.weighted_max.store(configured_new, .monotonic);
        } else if (configured_old >= t.header.weighted_max.load(.monotonic)) {
            t.rescanWeightedMax();
        }
        tree.onLeafChanged(t, slot);
        owners.bumpGeneration(t);
    }

    /// Recomputes `weighted_max` from the present backends; called under the lock.
    fn rescanWeightedMax(t: *const Table) void {
        var largest: u64 = 0;
        for (t.present[0..t.presentCount()]) |*entry| {
            largest = @max(largest, t.slots[entry.load(.monotonic)].configuredWeightOf());
        }
        t.header.weighted_max.store(largest, .monotonic);
    }

    pub fn find(t: *const Table, id: u64) Error!u32 {
        try t.lock();
        defer t.unlock();
        return t.idmapFind(id) orelse error.UnknownBackend;
    }

    /// Moves the backend's ring points to where `key` puts them (0: where its id does); only its
    /// own keys move, as when it is removed and added back.
    pub fn setRingKey(t: *const Table, slot: u32, key: u64) Error!void {
        try t.lock();
        defer t.unlock();
        const s = &t.slots[slot];
        if (!isPresent(t.wordOf(slot).state)) return error.UnknownBackend;
        if (s.ring_key.load(.monotonic) == key) return;
        affinity.onRemoved(t, slot);
        s.ring_key.store(key, .monotonic);
        affinity.onAdded(t, slot);
    }

    pub fn setSignals(t: *const Table, slot: u32, queue_depth: u32, kv_permille: u32, time_ms: u64) Error!void {
        const s = &t.slots[slot];
        if (!isPresent(t.wordOf(slot).state)) return error.UnknownBackend;
        s.signal_queue_depth.store(queue_depth, .monotonic);
        s.signal_kv_permille.store(kv_permille, .monotonic);
        // .release: a reader that sees the new time also sees the values it stamps.
        s.signal_time_ms.store(time_ms, .release);
    }

    pub fn setBatchSlots(t: *const Table, slot: u32, batch_slots: u32) Error!void {
        if (!isPresent(t.wordOf(slot).state)) return error.UnknownBackend;
        t.slots[slot].batch_slots.store(batch_slots, .monotonic);
    }

    pub fn setBatchTiming(t: *const Table, slot: u32, slot_free_ms: u64, service_ms: u32) Error!void {
        const s = &t.slots[slot];
        if (!isPresent(t.wordOf(slot).state)) return error.UnknownBackend;
        s.service_ms.store(service_ms, .monotonic);
        // .release: a reader that sees the new time also sees the service it goes with.
        s.slot_free_ms.store(slot_free_ms, .release);
    }

    /// A pseudo-random number from the table's seeded sequence; thread-safe and deterministic for
    /// a single caller (the simulator relies on that).
    pub fn random(t: *const Table) u64 {
        const state = t.header.rng_state.fetchAdd(random_increment, .monotonic);
        return splitmix64(state);
    }

    /// What the next `random` returns unless another caller draws first: a guess, never a draw
    /// (the sequence does not move), for prefetching what the next decision will read.
    pub fn nextRandom(t: *const Table) u64 {
        return splitmix64(t.header.rng_state.load(.monotonic));
    }

    pub fn lock(t: *const Table) Error!void {
        var attempts: u32 = 0;
        while (attempts < lock_attempts_max) : (attempts += 1) {
            // .acquire: the critical section sees everything the previous holder wrote.
            if (t.header.lock.cmpxchgWeak(0, 1, .acquire, .monotonic) == null) return;
            if (attempts % 64 == 63) {
                _ = std.os.linux.sched_yield();
            } else {
                std.atomic.spinLoopHint();
            }
        }
        return error.Busy;
    }

    pub fn unlock(t: *const Table) void {
        // .release: publishes the critical section's writes to the next holder.
        t.header.lock.store(0, .release);
    }

    fn freeSlot(t: *const Table) ?u32 {
        const high_water = t.header.slots_high_water.load(.monotonic);
        if (high_water < t.backendsMax()) {
            t.header.slots_high_water.store(high_water + 1, .release);
            return high_water;
        }
        for (t.slots, 0..) |*s, index| {
            const word: Word = @bitCast(s.word.load(.acquire));
            if (word.state == .free) return @intCast(index);
        }
        return null;
    }

    fn idmapFind(t: *const Table, id: u64) ?u32 {
        const index = t.idmapIndex(id) orelse return null;
        return t.idmap[index].slot_plus_one - 1;
    }

    /// The entry holding `id`, if any: at most one pass over the map, so a full or damaged map
    /// ends the probe instead of looping.
    fn idmapIndex(t: *const Table, id: u64) ?usize {
        const mask = t.idmap.len - 1;
        var index = splitmix64(id) & mask;
        for (0..t.idmap.len) |_| {
            const entry = t.idmap[index];
            if (entry.slot_plus_one == 0) return null;
            if (entry.id == id) return index;
            index = (index + 1) & mask;
        }
        return null;
    }

    /// Where `id` would be inserted: the first empty entry from its home. The map has twice as
    /// many entries as slots, so one always exists unless the map is damaged (one bounded pass).
    fn idmapFreeIndex(t: *const Table, id: u64) ?usize {
        const mask = t.idmap.len - 1;
        var index = splitmix64(id) & mask;
        for (0..t.idmap.len) |_| {
            if (t.idmap[index].slot_plus_one == 0) return index;
            index = (index + 1) & mask;
        }
        return null;
    }

    /// Linear probing with backward-shift deletion: no tombstones, so lookups stay short forever.
    fn idmapRemoveAt(t: *const Table, index: usize) void {
        const mask = t.idmap.len - 1;
        assert(t.idmap[index].slot_plus_one != 0);
        var hole = index;
        var next = (hole + 1) & mask;
        // At most one pass: the map always has an empty entry (twice as many entries as slots),
        // and the bound keeps a damaged map from looping forever.
        for (0..t.idmap.len) |_| {
            if (t.idmap[next].slot_plus_one == 0) break;
            const home = splitmix64(t.idmap[next].id) & mask;
            // Move the entry back if its home is not cyclically within (hole, next].
            const distance_home = (next -% home) & mask;
            const distance_hole = (next -% hole) & mask;
            if (distance_home >= distance_hole) {
                t.idmap[hole] = t.idmap[next];
                hole = next;
            }
            next = (next + 1) & mask;
        }
        t.idmap[hole] = .{ .id = 0, .slot_plus_one = 0, .reserved = 0 };
    }
};

/// What a backend adds to the fleet's capacity × weight: only active backends take new work.
pub fn weighted(capacity: u32, weight_milli: u32, state: State) u64 {
    return if (state == .active) configuredWeight(capacity, weight_milli) else 0;
}

/// Capacity × weight as configured, whatever the state.
pub fn configuredWeight(capacity: u32, weight_milli: u32) u64 {
    return @as(u64, capacity) * weight_milli;
}

pub fn isPresent(state: State) bool {
    return switch (state) {
        .active, .draining, .down => true,
        else => false,
    };
}

/// The step of the table's random sequence (`Table.random`): splitmix64's golden-ratio increment.
const random_increment: u64 = 0x9E37_79B9_7F4A_7C15;

pub fn splitmix64(x: u64) u64 {
    var z = x +% 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)) *% 0xBF58_476D_1CE4_E5B9;
    z = (z ^ (z >> 27)) *% 0x94D0_49BB_1331_11EB;
    return z ^ (z >> 31);
}

/// EWMA with weight 1/8 on the new sample; the first sample is taken as is.
fn ewmaUpdate(ewma: *Atomic(u64), sample_us: u32) void {
    var attempts: u32 = 0;
    while (attempts < reserve_attempts_max) : (attempts += 1) {
        const old = ewma.load(.monotonic);
        const new: u64 = if (old == 0) @max(sample_us, 1) else blk: {
            const delta = @as(i64, sample_us) - @as(i64, @intCast(old));
            break :blk @intCast(@max(1, @as(i64, @intCast(old)) + @divTrunc(delta, 8)));
        };
        if (ewma.cmpxchgWeak(old, new, .monotonic, .monotonic) == null) return;
    }
}

fn racyDelay() void {
    for (0..200) |_| std.atomic.spinLoopHint();
}

fn sliceAt(comptime T: type, region: []align(header_bytes) u8, offset: u64, count: u32) []T {
    assert(offset % @alignOf(T) == 0);
    assert(offset + @as(u64, count) * @sizeOf(T) <= region.len);
    const base: [*]T = @ptrCast(@alignCast(region.ptr + offset));
    return base[0..count];
}

const testing = std.testing;

pub fn testTable(backends_max: u32) !Table {
    return testTableWithPrefix(backends_max, 64);
}

pub fn testTableWithPrefix(backends_max: u32, prefix_entries: u32) !Table {
    const layout = Layout.init(backends_max, prefix_entries, 0);
    const region = try testing.allocator.alignedAlloc(u8, .fromByteUnits(header_bytes), layout.region_bytes);
    @memset(region, 0);
    return Table.format(region, backends_max, prefix_entries, 0, 0);
}

pub fn testTableFree(t: Table) void {
    testing.allocator.free(t.region);
}

test "reserve never exceeds capacity and release returns it" {
    const t = try testTable(4);
    defer testTableFree(t);
    const slot = try t.add(7, 10, 1000);
    try testing.expect(t.reserve(slot, 6, 0));
    try testing.expect(!t.reserve(slot, 5, 0));
    try testing.expect(t.reserve(slot, 4, 0));
    try testing.expectEqual(@as(u32, 10), t.wordOf(slot).cost);
    try t.release(slot, t.incarnationOf(slot), 6, 100, true);
    try t.release(slot, t.incarnationOf(slot), 4, 100, false);
    try testing.expectError(error.ReleaseMismatch, t.release(slot, t.incarnationOf(slot), 1, 0, true));
    const word = t.wordOf(slot);
    try testing.expectEqual(@as(u32, 0), word.cost);
    try testing.expectEqual(@as(u20, 0), word.count);
    try testing.expectEqual(@as(u64, 1), t.slots[slot].completed_total.load(.monotonic));
    try testing.expectEqual(@as(u64, 1), t.slots[slot].failed_total.load(.monotonic));
}

test "priority classes fill only their share" {
    const t = try testTable(2);
    defer testTableFree(t);
    const slot = try t.add(1, 100, 1000);
    try testing.expect(t.reserve(slot, 80, 2)); // class 2 may fill 80 %.
    try testing.expect(!t.reserve(slot, 1, 2));
    try testing.expect(t.reserve(slot, 10, 1)); // class 1 may fill 90 %.
    try testing.expect(t.reserve(slot, 10, 0)); // class 0 may fill all of it.
    try testing.expect(!t.reserve(slot, 1, 0));
}

test "a removed backend with requests in flight retires, then frees on the last release" {
    const t = try testTable(2);
    defer testTableFree(t);
    const slot = try t.add(1, 10, 1000);
    try testing.expect(t.reserve(slot, 3, 0));
    try t.remove(slot);
    try testing.expectEqual(State.retired, t.wordOf(slot).state);
    try testing.expect(!t.reserve(slot, 1, 0));
    try testing.expectError(error.UnknownBackend, t.find(1));
    try t.release(slot, t.incarnationOf(slot), 3, 5, true);
    try testing.expectEqual(State.free, t.wordOf(slot).state);
    const again = try t.add(1, 10, 1000);
    try testing.expectEqual(again, try t.find(1));
    // A release from before the reuse carries the old incarnation: refused, counters unchanged.
    try testing.expect(t.reserve(again, 2, 0));
    try testing.expectError(error.StaleRelease, t.release(again, t.incarnationOf(again) - 1, 2, 5, true));
    try testing.expectEqual(@as(u32, 2), t.wordOf(again).cost);
    try t.release(again, t.incarnationOf(again), 2, 5, true);
    // The table is now full up to its high-water mark, so the next add reuses the freed slot.
    try testing.expectEqual(slot, try t.add(2, 10, 1000));
    try testing.expectError(error.TableFull, t.add(3, 10, 1000));
}

test "view refuses a header whose layout fields or counts are damaged, and accepts an intact one" {
    const t = try testTable(8);
    defer testTableFree(t);
    _ = try t.add(1, 10, 1000);
    _ = try Table.view(t.region);
    const bytes = std.mem.asBytes(t.header);
    const layout_end = @offsetOf(Header, "flags") + 4;
    // Every bit of the layout fields is covered by the checksum.
    const owners_start = @offsetOf(Header, "owners_max");
    for (0..layout_end) |byte| {
        bytes[byte] ^= 0x10;
        defer bytes[byte] ^= 0x10;
        try testing.expect(std.meta.isError(Table.view(t.region)));
    }
    for (owners_start..owners_start + 4) |byte| {
        bytes[byte] ^= 0x10;
        defer bytes[byte] ^= 0x10;
        try testing.expect(std.meta.isError(Table.view(t.region)));
    }
    const counts = [_]*Atomic(u32){ &t.header.present_count, &t.header.slots_high_water, &t.header.ring_count, &t.header.lock, &t.header.class_share_permille[3] };
    for (counts) |count| {
        const saved = count.load(.monotonic);
        count.store(std.math.maxInt(u32), .monotonic);
        defer count.store(saved, .monotonic);
        try testing.expectError(error.Corrupt, Table.view(t.region));
    }
    try testing.expectError(error.Corrupt, Table.view(t.region[0 .. t.region.len - header_bytes]));
    _ = try Table.view(t.region);
}

test "nextRandom names the next draw without moving the sequence" {
    const t = try testTable(4);
    defer testTableFree(t);
    const guess = t.nextRandom();
    try testing.expectEqual(guess, t.nextRandom());
    try testing.expectEqual(guess, t.random());
    try testing.expect(t.nextRandom() != guess);
}

test "duplicate ids and a full table are refused" {
    const t = try testTable(2);
    defer testTableFree(t);
    _ = try t.add(1, 10, 1000);
    try testing.expectError(error.DuplicateId, t.add(1, 10, 1000));
    _ = try t.add(2, 10, 1000);
    try testing.expectError(error.TableFull, t.add(3, 10, 1000));
}

test "id index survives many adds and removes" {
    const t = try testTable(64);
    defer testTableFree(t);
    var slots: [64]u32 = undefined;
    for (0..64) |round| {
        for (0..64) |i| slots[i] = try t.add(round * 1000 + i, 5, 1000);
        for (0..64) |i| try testing.expectEqual(slots[i], try t.find(round * 1000 + i));
        for (0..64) |i| try t.remove(slots[i]);
        try testing.expectEqual(@as(u32, 0), t.header.present_count.load(.monotonic));
    }
}

test "update lowers capacity for new reservations and changes state" {
    const t = try testTable(2);
    defer testTableFree(t);
    const slot = try t.add(1, 10, 1000);
    try t.update(slot, 4, 1000, .active);
    try testing.expect(!t.reserve(slot, 5, 0));
    try testing.expect(t.reserve(slot, 4, 0));
    try t.update(slot, 100, 1000, .draining);
    try testing.expect(!t.reserve(slot, 1, 0));
    try testing.expectError(error.InvalidState, t.update(slot, 10, 1000, .free));
}

test "the largest configured capacity × weight follows adds, updates and removals" {
    const t = try testTable(8);
    defer testTableFree(t);
    const small = try t.add(1, 100, 1000);
    const large = try t.add(2, 400, 1000);
    const middle = try t.add(3, 200, 1000);
    try testing.expectEqual(@as(u64, 400_000), t.header.weighted_max.load(.monotonic));
    try t.update(large, 400, 1000, .down); // a state change keeps the scale
    try testing.expectEqual(@as(u64, 400_000), t.header.weighted_max.load(.monotonic));
    try t.update(large, 50, 1000, .active); // the largest shrinks: rescanned
    try testing.expectEqual(@as(u64, 200_000), t.header.weighted_max.load(.monotonic));
    try t.remove(middle);
    try testing.expectEqual(@as(u64, 100_000), t.header.weighted_max.load(.monotonic));
    try t.update(small, 100, 3000, .active); // weight counts as much as capacity
    try testing.expectEqual(@as(u64, 300_000), t.header.weighted_max.load(.monotonic));
}
