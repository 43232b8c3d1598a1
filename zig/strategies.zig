//! Routing strategies: each picks a slot and reserves the request's cost on it with the table's
//! CAS, or returns `slot_none` when nothing fits (a normal result). One `acquire` switch selects
//! them; they are leaf functions over the table.

const std = @import("std");
const assert = std.debug.assert;
const Atomic = std.atomic.Value;
const table_mod = @import("table.zig");
const tree = @import("tree.zig");
const affinity = @import("affinity.zig");
const Table = table_mod.Table;
const slot_none = table_mod.slot_none;

pub const Strategy = enum(u32) {
    round_robin = 0,
    least_connections = 1,
    p2c = 2,
    /// By session key, consistent hashing with bounded loads; without a key, p2c.
    consistent_hash = 3,
    /// To the backend holding the longest cached prompt prefix unless it is overloaded, else the
    /// least loaded; without prefix hashes, least connections.
    prefix_affinity = 4,
    /// p2c on our load plus what backends report (queue depth, KV-cache use) while fresh.
    queue_aware = 5,
    /// The lowest expected time to first token: (queue ahead + the uncached part of the prompt on
    /// that backend) / its capacity × weight (weight = learned speed); near-ties go to the backend
    /// holding the longest prefix; bounded loads as prefix_affinity.
    least_ttft = 6,
    _,
};

/// How an affinity decision went (for hit / miss / overload metrics).
pub const Outcome = enum(u32) {
    /// No key or hashes were given, or the strategy has no notion of affinity.
    none = 0,
    /// The key's owner (or the backend holding the longest prefix) took the request.
    hit = 1,
    /// Nothing was remembered for this key or prefix.
    miss = 2,
    /// The affine backend was overloaded (bounded load) or full; another one took it.
    overload = 3,
};

pub const Affinity = struct {
    key: ?u64 = null,
    hashes: []const u64 = &.{},
};

pub const Decision = struct {
    slot: u32,
    outcome: Outcome = .none,
    matched_blocks: u32 = 0,
    /// The cost reserved on `slot` when it differs from the request's (a priced decision
    /// discounts the blocks the backend has cached); 0 = the request's cost.
    cost: u32 = 0,
};

/// How a priced decision (`acquirePriced`) values a prompt block, in thousandths of a cost unit:
/// least_ttft adds the uncached blocks' value to a backend's queue; with `discount`, the
/// reservation itself is the request's cost less the value of the blocks the chosen backend has
/// cached (never below 1), so the caller must release `Decision.cost`.
pub const Pricing = struct {
    block_cost_milli: u32 = default_block_cost_milli,
    discount: bool = false,
};

/// A prompt block's value when the caller gives none: 0.05 cost units (a request of cost 1 is
/// worth about 20 blocks of prompt, ~1,300 characters).
pub const default_block_cost_milli: u32 = 50;

/// How far the bounded-load walk goes round the ring before giving up to p2c.
const ring_walk_points_max: u32 = 1024;

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
        const count = t.presentCount();
        const slots: [*]const u32 = @ptrCast(t.present.ptr);
        return .{ .slots = slots[0..count], .cursor = &t.header.rr_cursor, .whole_table = true };
    }

    fn contains(candidates: Candidates, slot: u32) bool {
        if (candidates.whole_table) return true;
        for (0..candidates.slots.len) |index| {
            if (candidates.at(index) == slot) return true;
        }
        return false;
    }

    /// The cost in flight and capacity × weight of the candidates, and the largest configured
    /// capacity × weight among them (whole table: all three kept in the header).
    fn totals(candidates: Candidates, t: *const Table) affinity.Totals {
        if (candidates.whole_table) return .{
            .cost = t.costInFlightTotal(),
            .weighted_capacity = t.header.weighted_capacity_total.load(.monotonic),
            .weighted_max = t.header.weighted_max.load(.monotonic),
        };
        var result: affinity.Totals = .{ .cost = 0, .weighted_capacity = 0, .weighted_max = 0 };
        for (0..candidates.slots.len) |index| {
            const slot = candidates.at(index);
            if (slot >= t.backendsMax()) continue;
            const word = t.wordOf(slot);
            result.cost += word.cost;
            const s = &t.slots[slot];
            const capacity = s.capacity.load(.monotonic);
            const weight_milli = s.weight_milli.load(.monotonic);
            result.weighted_capacity += table_mod.weighted(capacity, weight_milli, word.state);
            if (table_mod.isPresent(word.state)) {
                result.weighted_max = @max(result.weighted_max, table_mod.configuredWeight(capacity, weight_milli));
            }
        }
        return result;
    }

    fn at(candidates: Candidates, index: u64) u32 {
        // Present-list entries move under concurrent removal: read each one atomically.
        return @atomicLoad(u32, &candidates.slots[@intCast(index)], .monotonic);
    }
};

pub fn acquire(t: *const Table, candidates: Candidates, strategy: Strategy, cost: u32, class: u32) u32 {
    assert(cost > 0);
    assert(class < table_mod.classes_count);
    const slot = switch (strategy) {
        .round_robin => roundRobinFromCursor(t, candidates, cost, class),
        .least_connections => leastConnections(t, candidates, cost, class),
        .p2c, .consistent_hash => powerOfTwoChoices(t, candidates, cost, class),
        .prefix_affinity => leastConnections(t, candidates, cost, class),
        .queue_aware => twoChoices(t, candidates, cost, class, .reported),
        .least_ttft => leastTtft(t, candidates, &.{}, cost, class, .{}).slot,
        _ => unreachable, // The ABI edge validates the strategy.
    };
    // Post-condition: none, or a slot of this table on which `reserve` took `cost` (its own
    // post-conditions check that the reservation moved exactly `cost` and fits).
    if (slot != slot_none) assert(slot < t.backendsMax());
    return slot;
}

/// Like `acquire`, with a session key (consistent_hash) or chained prefix hashes
/// (prefix_affinity); other strategies ignore them.
pub fn acquireAffine(t: *const Table, candidates: Candidates, strategy: Strategy, input: Affinity, cost: u32, class: u32) Decision {
    switch (strategy) {
        .consistent_hash => if (input.key) |key| return decided(t, consistentHash(t, candidates, key, cost, class)),
        .prefix_affinity => if (input.hashes.len > 0 and affinity.prefixEnabled(t)) {
            return decided(t, prefixAffinity(t, candidates, input.hashes, cost, class, .{}));
        },
        .least_ttft => return decided(t, leastTtft(t, candidates, input.hashes, cost, class, .{})),
        else => {},
    }
    return .{ .slot = acquire(t, candidates, strategy, cost, class) };
}

/// Like `acquireAffine`, with `pricing` (see `Pricing`): least_ttft values the uncached blocks
/// with it, and with `pricing.discount` prefix_affinity and least_ttft reserve the discounted
/// cost. `Decision.cost` is always set: the cost to release.
pub fn acquirePriced(t: *const Table, candidates: Candidates, strategy: Strategy, input: Affinity, cost: u32, class: u32, pricing: Pricing) Decision {
    var decision = switch (strategy) {
        .least_ttft => leastTtft(t, candidates, input.hashes, cost, class, pricing),
        .prefix_affinity => if (input.hashes.len > 0 and affinity.prefixEnabled(t))
            prefixAffinity(t, candidates, input.hashes, cost, class, pricing)
        else
            acquireAffine(t, candidates, strategy, input, cost, class),
        else => acquireAffine(t, candidates, strategy, input, cost, class),
    };
    if (decision.cost == 0) decision.cost = cost;
    assert(decision.cost >= 1 and decision.cost <= cost);
    return decided(t, decision);
}

/// The request's cost less the value of `matched` cached blocks, never below 1 (at least the last
/// token is computed); the request's cost without `discount`.
pub fn discounted(cost: u32, matched: u32, pricing: Pricing) u32 {
    if (!pricing.discount) return cost;
    const value = @as(u64, matched) * pricing.block_cost_milli / 1000;
    return @intCast(@max(1, @as(u64, cost) -| value));
}

/// Post-condition of an affine decision: as `acquire`'s, and a hit always names a slot.
fn decided(t: *const Table, decision: Decision) Decision {
    if (decision.slot != slot_none) assert(decision.slot < t.backendsMax());
    if (decision.outcome == .hit) assert(decision.slot != slot_none);
    return decision;
}

pub fn isKnown(strategy: u32) bool {
    return switch (@as(Strategy, @fromBackingInt(@intCast(strategy)))) {
        .round_robin, .least_connections, .p2c, .consistent_hash, .prefix_affinity, .queue_aware, .least_ttft => true,
        _ => false,
    };
}

/// Consistent hashing with bounded loads: the key goes to the first backend clockwise from its
/// point on the ring that takes it (points of smaller backends take a key only in proportion to
/// their capacity × weight, `affinity.accepts`) and stays within ⌈(1+ε) × its share of the
/// average⌉; adding or removing a backend moves only the keys of its own arcs. If the walk finds
/// none, p2c decides.
fn consistentHash(t: *const Table, candidates: Candidates, key: u64, cost: u32, class: u32) Decision {
    if (!affinity.ensureRing(t)) return .{ .slot = powerOfTwoChoices(t, candidates, cost, class), .outcome = .miss };
    const count = affinity.ringCount(t);
    if (count == 0) return .{ .slot = slot_none, .outcome = .miss };
    const totals = candidates.totals(t);
    const position = table_mod.splitmix64(key);
    const start = affinity.upperBound(t, count, position);
    var owner_seen = false;
    for (0..@min(count, ring_walk_points_max)) |step| {
        const point = affinity.pointAt(t, @intCast((start + step) % count));
        const slot = point.slot;
        if (slot >= t.backendsMax() or !candidates.contains(slot)) continue;
        if (!affinity.accepts(t, slot, position, point.hash, totals.weighted_max)) continue;
        const is_owner = !owner_seen;
        owner_seen = true;
        if (!affinity.withinBound(t, slot, cost, totals)) continue;
        if (t.reserve(slot, cost, class)) return .{ .slot = slot, .outcome = if (is_owner) .hit else .overload };
    }
    return .{ .slot = powerOfTwoChoices(t, candidates, cost, class), .outcome = .overload };
}

/// The backend holding the longest remembered prefix wins unless it is over its bounded load (or
/// full); then the least-loaded backend takes the request. Either way the index learns where the
/// prompt went, block by block.
fn prefixAffinity(t: *const Table, candidates: Candidates, hashes: []const u64, cost: u32, class: u32, pricing: Pricing) Decision {
    var decision: Decision = .{ .slot = slot_none, .outcome = .miss };
    const match = longestPrefix(t, candidates, hashes);
    if (match.blocks > 0) {
        decision.outcome = .overload;
        const totals = candidates.totals(t);
        const charged = discounted(cost, match.blocks, pricing);
        for (match.locations.slots, match.locations.incarnations) |slot, incarnation| {
            if (slot == slot_none) break;
            if (!affinity.locationValid(t, slot, incarnation) or !candidates.contains(slot)) continue;
            if (!affinity.withinBound(t, slot, charged, totals) or !t.reserve(slot, charged, class)) continue;
            decision = .{ .slot = slot, .outcome = .hit, .matched_blocks = match.blocks, .cost = charged };
            break;
        }
    }
    if (decision.slot == slot_none) decision.slot = leastConnections(t, candidates, cost, class);
    if (decision.slot != slot_none) {
        for (hashes) |hash| affinity.prefixRecord(t, hash, decision.slot);
    }
    return decision;
}

/// How many backends least_ttft learns the cached prefix of per decision, and in how many rounds
/// of lookups (each round finds the next-longest prefix among backends not yet seen).
const ttft_tracked_max: u32 = 16;
const ttft_rounds_max: u32 = 4;
/// The backend holding the longest prefix wins when its expected time is within this much
/// (thousandths) of the best: a near-tie keeps the cache warm where it is.
const ttft_near_tie_permille: u32 = 250;

/// Backends' cached prefix lengths for one prompt, as far as the prefix index knows.
const SlotMatches = struct {
    slots: [ttft_tracked_max]u32 = @splat(slot_none),
    blocks: [ttft_tracked_max]u32 = @splat(0),
    count: u32 = 0,

    fn of(matches: *const SlotMatches, slot: u32) u32 {
        for (matches.slots[0..matches.count], matches.blocks[0..matches.count]) |known, blocks| {
            if (known == slot) return blocks;
        }
        return 0;
    }

    fn seen(matches: *const SlotMatches, slot: u32) bool {
        return std.mem.indexOfScalar(u32, matches.slots[0..matches.count], slot) != null;
    }
};

/// The lowest expected time to first token: each candidate that fits and is within its bounded
/// load is scored (queue ahead, from our books and the backend's fresh report, + the uncached
/// blocks' value × the batch's slowdown, see `queueAhead`) / capacity × weight; the backend
/// holding the longest prefix wins a near-tie.
/// O(candidates) per decision, plus O(rounds × log blocks) prefix lookups. The index learns
/// where the prompt went, as prefix_affinity's does.
fn leastTtft(t: *const Table, candidates: Candidates, hashes: []const u64, cost: u32, class: u32, pricing: Pricing) Decision {
    const matches = if (hashes.len > 0 and affinity.prefixEnabled(t)) slotMatches(t, candidates, hashes) else SlotMatches{};
    const affine: u32 = if (matches.count > 0) matches.slots[0] else slot_none;
    var decision: Decision = .{ .slot = slot_none, .outcome = if (affine == slot_none) .miss else .overload };
    var attempts: u32 = 0;
    while (attempts < least_root_attempts_max) : (attempts += 1) {
        const chosen = bestExpected(t, candidates, hashes.len, &matches, affine, cost, class, pricing);
        if (chosen == slot_none) break;
        const matched = matches.of(chosen);
        const charged = discounted(cost, matched, pricing);
        if (!t.reserve(chosen, charged, class)) continue;
        decision = .{ .slot = chosen, .outcome = decision.outcome, .matched_blocks = matched, .cost = charged };
        if (chosen == affine) decision.outcome = .hit;
        break;
    }
    if (decision.slot == slot_none) {
        decision.slot = leastConnections(t, candidates, cost, class);
        decision.cost = cost;
    }
    if (decision.slot != slot_none) {
        for (hashes) |hash| affinity.prefixRecord(t, hash, decision.slot);
    }
    return decision;
}

/// The candidate with the lowest expected time to first token (see `leastTtft`), or the affine
/// one on a near-tie (unless the conversation is new, see `placing_new`); none when no candidate
/// fits within its bound. Starts at a random candidate so exact ties (an idle fleet) spread.
fn bestExpected(t: *const Table, candidates: Candidates, blocks: usize, matches: *const SlotMatches, affine: u32, cost: u32, class: u32, pricing: Pricing) u32 {
    const count = candidates.slots.len;
    if (count == 0) return slot_none;
    const totals = candidates.totals(t);
    const now_ms = monotonicMs();
    const start = t.random() % count;
    var best: u32 = slot_none;
    var best_score = std.math.inf(f64);
    var affine_score = std.math.inf(f64);
    const affine_matched = if (affine == slot_none) 0 else matches.of(affine);
    // Placing: another backend holds as much of the prompt as the affine one (a new
    // conversation, whose shared prefix every backend holds). With the affine backend's batch
    // slots known, it is then only the last to take that prefix: it has no cache to keep, pays
    // for its batch's fill as the others do, and gets no near-tie, which would otherwise send a
    // new conversation to wait in its full batch beside a free slot. Without batch slots, every
    // request in flight is a whole unit of queue: the scores are coarse, and the near-tie keeps
    // new conversations from scattering on their noise.
    var holders: u32 = 0;
    for (matches.blocks[0..matches.count]) |held| holders += @intFromBool(held >= affine_matched);
    const placing_new = affine != slot_none and holders > 1 and t.slots[affine].batch_slots.load(.monotonic) > 0;
    for (0..count) |offset| {
        const slot = candidates.at((start + offset) % count);
        if (slot >= t.backendsMax()) continue;
        const matched = matches.of(slot);
        const charged = discounted(cost, matched, pricing);
        if (!t.fits(slot, charged, class)) continue;
        const weight = t.slots[slot].configuredWeightOf();
        if (weight == 0) continue;
        const queue, const slowdown, const fill = queueAhead(t, slot, t.wordOf(slot), now_ms);
        // A backend with a free batch slot is not overrun, whatever the fleet's average: the
        // bounded load refuses only a backend whose batch is full (or not known). Otherwise, at
        // light load, a bound of one or two requests sends a conversation away from its cache
        // to wait for nothing.
        const free_slot = queue == 0 and t.slots[slot].batch_slots.load(.monotonic) > 0;
        if (!free_slot and !affinity.withinBound(t, slot, charged, totals)) continue;
        const uncached: f64 = @floatFromInt(@as(u64, blocks -| matched) * pricing.block_cost_milli);
        // Among backends holding as much of the prompt as the affine one (a conversation being
        // placed, not moved), a fuller batch counts too: its next turns want a free slot there.
        // Not when leaving the cache: that would keep a request waiting in a queue.
        const placing = if ((slot != affine or placing_new) and matched >= affine_matched) fill else 0;
        const score = (queue + placing + slowdown * uncached / 1000) / @as(f64, @floatFromInt(weight));
        if (slot == affine) affine_score = score;
        if (score < best_score) {
            best_score = score;
            best = slot;
        }
    }
    const margin = 1 + @as(f64, @floatFromInt(ttft_near_tie_permille)) / 1000;
    if (affine != slot_none and !placing_new and affine_score <= best_score * margin) return affine;
    return best;
}

/// A running request's share of a continuous-batching step: each one ahead of a new request in
/// the batch makes its prefill this much slower (the simulator's `batch_slowdown` default).
const batch_step_slowdown: f64 = 0.05;

/// What delays a new request's first token on `slot`, as (queue ahead in cost units, factor on
/// its prefill, how full the batch is in cost units). Batch slots not known: all the cost in
/// flight (our books plus the backend's fresh report) is queue, as in an engine where every
/// request running slows every other, and the other two are 1 and 0. With `batch_slots` known, a
/// request that finds a free slot waits for nobody: only the cost beyond the batch is queue (it
/// runs before this request starts), each request beside it in the batch slows its prefill by
/// `batch_step_slowdown`, and the batch's fill is the cost in it over `batch_slots` (less than one
/// request). So short queues are near-free and affinity keeps its cache there, while a queue past
/// the batch of a slow backend is avoided.
fn queueAhead(t: *const Table, slot: u32, word: table_mod.Word, now_ms: u64) struct { f64, f64, f64 } {
    const total: f64 = @floatFromInt(reportedCost(t, slot, word, now_ms));
    const batch_slots = t.slots[slot].batch_slots.load(.monotonic);
    if (batch_slots == 0) return .{ total, 1, 0 };
    const cost_per_request: f64 = if (word.count == 0) 1 else @max(1, @as(f64, @floatFromInt(word.cost)) / @as(f64, @floatFromInt(word.count)));
    // The batch holds the new request and `batch_slots - 1` requests ahead of it.
    const in_batch = @min(total, @as(f64, @floatFromInt(batch_slots - 1)) * cost_per_request);
    const slots: f64 = @floatFromInt(batch_slots);
    // A full batch: the first request's worth of the queue is the wait for a slot to free, a
    // whole service when nothing better is known, the part of one still to run when it is.
    var queue = total - in_batch;
    if (queue > 0) queue -= @min(queue, cost_per_request) * (1 - slotWait(&t.slots[slot], now_ms));
    return .{ queue, 1 + batch_step_slowdown * in_batch / cost_per_request, in_batch / slots };
}

/// The wait for the slot's batch to free a slot, as a fraction of one request's service there:
/// from the batch timing the caller keeps (`Table.setBatchTiming`), 1 when it is not known. A
/// slot due any moment is 0; one overdue counts more and more, 1 from half a service late.
fn slotWait(s: *const table_mod.Slot, now_ms: u64) f64 {
    // .acquire pairs with `setBatchTiming`: the service read next goes with this time.
    const free_ms = s.slot_free_ms.load(.acquire);
    const service_ms = s.service_ms.load(.monotonic);
    if (free_ms == 0 or service_ms == 0) return 1;
    const service: f64 = @floatFromInt(service_ms);
    // Overdue: the request expected to end first has not, maybe because it waited in the
    // engine's queue before it ran. Trust in the books fades over half a service.
    if (now_ms >= free_ms) return @min(1, 2 * @as(f64, @floatFromInt(now_ms - free_ms)) / service);
    return @min(1, @as(f64, @floatFromInt(free_ms - now_ms)) / service);
}

/// Which candidates hold how much of the prompt: round by round, the longest prefix that some
/// candidate not yet seen holds (binary search, as `longestPrefix`), until every recorded
/// location is seen, the rounds run out or nothing more matches. The first entry holds the
/// longest prefix (its most recent location).
fn slotMatches(t: *const Table, candidates: Candidates, hashes: []const u64) SlotMatches {
    var matches: SlotMatches = .{};
    var high: u32 = @intCast(hashes.len); // blocks that may match for an unseen backend
    var round: u32 = 0;
    while (round < ttft_rounds_max and high > 0 and matches.count < ttft_tracked_max) : (round += 1) {
        var found: u32 = 0;
        var found_locations: affinity.Locations = .{};
        if (unseenUsable(t, candidates, hashes[high - 1], &matches)) |locations| {
            found, found_locations = .{ high, locations };
        } else {
            var low: u32 = 0;
            var top: u32 = high - 1;
            while (low < top) {
                const middle = low + (top - low + 1) / 2;
                if (unseenUsable(t, candidates, hashes[middle - 1], &matches)) |locations| {
                    found, found_locations = .{ middle, locations };
                    low = middle;
                } else {
                    top = middle - 1;
                }
            }
        }
        if (found == 0) break;
        for (found_locations.slots, found_locations.incarnations) |slot, incarnation| {
            if (slot == slot_none or matches.count >= ttft_tracked_max) break;
            if (!affinity.locationValid(t, slot, incarnation) or !candidates.contains(slot)) continue;
            if (matches.seen(slot)) continue;
            matches.slots[matches.count] = slot;
            matches.blocks[matches.count] = found;
            matches.count += 1;
        }
        high = found;
    }
    return matches;
}

fn unseenUsable(t: *const Table, candidates: Candidates, hash: u64, matches: *const SlotMatches) ?affinity.Locations {
    const locations = affinity.prefixLookup(t, hash);
    if (!locations.found) return null;
    for (locations.slots, locations.incarnations) |slot, incarnation| {
        if (slot == slot_none) break;
        if (matches.seen(slot)) continue;
        if (affinity.locationValid(t, slot, incarnation) and candidates.contains(slot)) return locations;
    }
    return null;
}

const PrefixMatch = struct {
    blocks: u32 = 0,
    locations: affinity.Locations = .{},
};

/// The longest prefix with at least one usable location. The longest is tried first (a repeated
/// prompt); otherwise a binary search, since a prefix recorded implies its shorter prefixes were
/// recorded with it (eviction can break that; then a shorter match is found, never a wrong one).
fn longestPrefix(t: *const Table, candidates: Candidates, hashes: []const u64) PrefixMatch {
    const count: u32 = @intCast(hashes.len);
    if (usable(t, candidates, hashes[count - 1])) |locations| return .{ .blocks = count, .locations = locations };
    var best: PrefixMatch = .{};
    var low: u32 = 0; // blocks known to match (0 = none)
    var high: u32 = count - 1; // blocks that may match
    while (low < high) {
        const middle = low + (high - low + 1) / 2;
        if (usable(t, candidates, hashes[middle - 1])) |locations| {
            best = .{ .blocks = middle, .locations = locations };
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    return best;
}

fn usable(t: *const Table, candidates: Candidates, hash: u64) ?affinity.Locations {
    const locations = affinity.prefixLookup(t, hash);
    if (!locations.found) return null;
    for (locations.slots, locations.incarnations) |slot, incarnation| {
        if (slot == slot_none) break;
        if (affinity.locationValid(t, slot, incarnation) and candidates.contains(slot)) return locations;
    }
    return null;
}

/// Round robin from the shared cursor. When it had to skip backends, it moves the cursor past
/// them too, so the skipped share is spread instead of all landing on the next backend.
fn roundRobinFromCursor(t: *const Table, candidates: Candidates, cost: u32, class: u32) u32 {
    const start = candidates.cursor.fetchAdd(1, .monotonic);
    const count = candidates.slots.len;
    for (0..count) |offset| {
        // `start` is any u64 (a wrapping cursor, a random number): reduced first, never overflowed.
        const slot = candidates.at((start % count + offset) % count);
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
        // `start` is any u64 (a wrapping cursor, a random number): reduced first, never overflowed.
        const slot = candidates.at((start % count + offset) % count);
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
            best_value = @min(best_value, candidate(t, candidates, index, cost, class, .local, 0));
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
    return twoChoices(t, candidates, cost, class, .local);
}

/// What a two-choice decision compares: the load we put on a backend ourselves, or that plus the
/// queue and KV-cache use the backend itself reports (load from other routers and from clients
/// that bypass us), when the report is fresh.
const LoadView = enum { local, reported };

fn twoChoices(t: *const Table, candidates: Candidates, cost: u32, class: u32, comptime view: LoadView) u32 {
    const count = candidates.slots.len;
    if (count == 0) return slot_none;
    if (count == 1) return roundRobin(t, candidates, cost, class, 0);
    const now_ms = if (view == .reported) monotonicMs() else 0;
    var rounds: u32 = 0;
    while (rounds < p2c_rounds_max) : (rounds += 1) {
        const r = t.random();
        const pair = pairOf(r, count);
        prefetchSlot(t, candidates, pair.second);
        const first = candidate(t, candidates, pair.first, cost, class, view, now_ms);
        const second = candidate(t, candidates, pair.second, cost, class, view, now_ms);
        var better = @min(first, second);
        var worse = @max(first, second);
        // Equal loads (an idle fleet) must not always favour the lower slot: break ties at random,
        // with a bit of `r` mixed again (independent of the indices it chose) rather than a
        // second draw from the shared generator, an atomic on the header's line per decision.
        if (first >> 32 == second >> 32 and better != tree.node_none and table_mod.splitmix64(r) & 1 == 1) {
            std.mem.swap(u64, &better, &worse);
        }
        if (better == tree.node_none) continue;
        if (t.reserve(@truncate(better), cost, class)) return prefetchNextPair(t, candidates, @truncate(better));
        if (worse != tree.node_none and t.reserve(@truncate(worse), cost, class)) {
            return prefetchNextPair(t, candidates, @truncate(worse));
        }
    }
    return roundRobin(t, candidates, cost, class, t.random());
}

/// The two distinct candidates (by index) that the random number `r` names, of `count` (2 or
/// more).
fn pairOf(r: u64, count: usize) struct { first: u64, second: u64 } {
    assert(count >= 2);
    const first = (r & 0xFFFF_FFFF) % count;
    const second = (first + 1 + (r >> 32) % (count - 1)) % count;
    assert(first != second);
    return .{ .first = first, .second = second };
}

/// Starts loading the slots of the pair the next draw will name unless another caller draws
/// first (the sequence is a counter, so its next value is known): two random slots among
/// thousands are two cache misses, which then load while the caller does its own work between
/// decisions instead of within the next one. Returns `slot`, the decision made.
fn prefetchNextPair(t: *const Table, candidates: Candidates, slot: u32) u32 {
    const pair = pairOf(t.nextRandom(), candidates.slots.len);
    prefetchSlot(t, candidates, pair.first);
    prefetchSlot(t, candidates, pair.second);
    return slot;
}

/// Starts loading the slot of candidate `index` while the other candidate is read: two random
/// slots among thousands are two cache misses, which then overlap instead of following each other.
fn prefetchSlot(t: *const Table, candidates: Candidates, index: u64) void {
    const slot = candidates.at(index);
    if (slot >= t.backendsMax()) return;
    @prefetch(&t.slots[slot], .{ .rw = .write, .locality = 3, .cache = .data });
}

/// The value (relative load, slot) of a candidate that could take the request, else none.
fn candidate(t: *const Table, candidates: Candidates, index: u64, cost: u32, class: u32, comptime view: LoadView, now_ms: u64) u64 {
    const slot = candidates.at(index);
    if (slot >= t.backendsMax() or !t.fits(slot, cost, class)) return tree.node_none;
    if (view == .local) return tree.leafValue(t, slot);
    const word = t.wordOf(slot);
    return (tree.relativeLoadKey(t, slot, reportedCost(t, slot, word, now_ms)) << 32) | slot;
}

/// Our cost in flight plus, when the backend's own report is fresh, its waiting queue (each queued
/// request counted at our average cost per request) and its KV-cache use above 90 % (a nearly full
/// cache preempts: counted as up to a quarter of capacity more). Stale reports are ignored.
fn reportedCost(t: *const Table, slot: u32, word: table_mod.Word, now_ms: u64) u32 {
    const s = &t.slots[slot];
    // .acquire pairs with `setSignals`: the values read next are at least as new as the stamp.
    const stamp_ms = s.signal_time_ms.load(.acquire);
    const age_max_ms = t.header.signal_age_max_ms.load(.monotonic);
    if (stamp_ms == 0 or now_ms < stamp_ms or now_ms - stamp_ms > age_max_ms) return word.cost;
    const cost_per_request: u64 = if (word.count == 0) 1 else @max(1, word.cost / word.count);
    const queued = @as(u64, s.signal_queue_depth.load(.monotonic)) * cost_per_request;
    const kv_permille = s.signal_kv_permille.load(.monotonic);
    const kv_pressure = if (kv_permille <= 900) 0 else @as(u64, s.capacity.load(.monotonic)) * (kv_permille - 900) / 400;
    return @intCast(@min(@as(u64, word.cost) + queued + kv_pressure, std.math.maxInt(u32)));
}

/// Milliseconds of CLOCK_MONOTONIC: the clock of Python's `time.monotonic()` on Linux, which the
/// scrapers stamp signals with.
pub fn monotonicMs() u64 {
    var now: std.os.linux.timespec = undefined;
    if (std.os.linux.errno(std.os.linux.clock_gettime(.MONOTONIC, &now)) != .SUCCESS) return 0;
    return @as(u64, @intCast(now.sec)) * 1000 + @as(u64, @intCast(now.nsec)) / 1_000_000;
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

test "consistent hashing keeps a key on its backend and bounds the load" {
    const t = try table_mod.testTable(16);
    defer table_mod.testTableFree(t);
    for (0..8) |i| _ = try t.add(i, 1000, 1000);
    const whole = Candidates.ofTable(&t);
    const first = acquireAffine(&t, whole, .consistent_hash, .{ .key = 77 }, 1, 0);
    try t.release(first.slot, t.incarnationOf(first.slot), 1, 0, true);
    const again = acquireAffine(&t, whole, .consistent_hash, .{ .key = 77 }, 1, 0);
    try testing.expectEqual(first.slot, again.slot);
    try testing.expectEqual(Outcome.hit, again.outcome);
    // One hot key: the bound spreads it once its owner is above (1 + 0.25) × average.
    var per_slot: [16]u32 = @splat(0);
    for (0..400) |_| per_slot[acquireAffine(&t, whole, .consistent_hash, .{ .key = 77 }, 1, 0).slot] += 1;
    const total: f64 = 401;
    for (per_slot) |count| try testing.expect(@as(f64, @floatFromInt(count)) <= @ceil(1.25 * total / 8) + 1);
}

test "consistent hashing gives each backend keys in proportion to its capacity × weight" {
    const t = try table_mod.testTable(16);
    defer table_mod.testTableFree(t);
    // Capacity 1:1:2:4, and the same 1:1:2:4 through weight on a second set of ids.
    const capacities = [_]u32{ 100, 100, 200, 400, 100, 100, 100, 100 };
    const weights = [_]u32{ 1000, 1000, 1000, 1000, 1000, 1000, 2000, 4000 };
    var slots: [8]u32 = undefined;
    for (&slots, capacities, weights, 0..) |*slot, capacity, weight, id| slot.* = try t.add(id, capacity, weight);
    // Idle fleet (each key released at once): the bound never interferes, so this is the ring's own split.
    const keys = 80_000;
    var per_slot: [16]u32 = @splat(0);
    for (0..keys) |key| {
        const decision = acquireAffine(&t, .ofTable(&t), .consistent_hash, .{ .key = key }, 1, 0);
        try testing.expectEqual(Outcome.hit, decision.outcome);
        per_slot[decision.slot] += 1;
        try t.release(decision.slot, t.incarnationOf(decision.slot), 1, 0, true);
    }
    var total_weight: f64 = 0;
    for (capacities, weights) |capacity, weight| total_weight += @floatFromInt(@as(u64, capacity) * weight);
    for (slots, capacities, weights) |slot, capacity, weight| {
        const expected = @as(f64, @floatFromInt(@as(u64, capacity) * weight)) / total_weight;
        const got = @as(f64, @floatFromInt(per_slot[slot])) / keys;
        // Points are placed by hash: with the table's points per backend a share lands within ~25 %.
        try testing.expect(got > expected * 0.75 and got < expected * 1.25);
    }
}

test "removing a smaller backend moves only the keys it had" {
    const t = try table_mod.testTable(16);
    defer table_mod.testTableFree(t);
    for (0..6) |id| _ = try t.add(id, if (id < 3) 400 else 100, 1000);
    const keys = 20_000;
    var before: [keys]u32 = undefined;
    for (&before, 0..) |*owner, key| {
        const decision = acquireAffine(&t, .ofTable(&t), .consistent_hash, .{ .key = key }, 1, 0);
        owner.* = decision.slot;
        try t.release(decision.slot, t.incarnationOf(decision.slot), 1, 0, true);
    }
    const gone = try t.find(4);
    try t.remove(gone);
    var moved: u32 = 0;
    for (before, 0..) |owner, key| {
        const decision = acquireAffine(&t, .ofTable(&t), .consistent_hash, .{ .key = key }, 1, 0);
        try t.release(decision.slot, t.incarnationOf(decision.slot), 1, 0, true);
        if (owner == gone) {
            moved += 1;
        } else {
            try testing.expectEqual(owner, decision.slot);
        }
    }
    try testing.expect(moved > 0);
}

test "prefix affinity follows the longest prefix and learns new locations" {
    const t = try table_mod.testTableWithPrefix(8, 1024);
    defer table_mod.testTableFree(t);
    for (0..4) |i| _ = try t.add(i, 1000, 1000);
    const whole = Candidates.ofTable(&t);
    const shared = [_]u64{ 11, 22, 33 };
    const first = acquireAffine(&t, whole, .prefix_affinity, .{ .hashes = &shared }, 1, 0);
    try testing.expectEqual(Outcome.miss, first.outcome);
    try t.release(first.slot, t.incarnationOf(first.slot), 1, 0, true);
    const longer = [_]u64{ 11, 22, 33, 44 };
    const second = acquireAffine(&t, whole, .prefix_affinity, .{ .hashes = &longer }, 1, 0);
    try testing.expectEqual(first.slot, second.slot);
    try testing.expectEqual(Outcome.hit, second.outcome);
    try testing.expectEqual(@as(u32, 3), second.matched_blocks);
    try t.release(second.slot, t.incarnationOf(second.slot), 1, 0, true);
    try t.update(first.slot, 1000, 1000, .down); // never routed to a down backend
    const third = acquireAffine(&t, whole, .prefix_affinity, .{ .hashes = &longer }, 1, 0);
    try testing.expect(third.slot != first.slot);
    try testing.expectEqual(Outcome.miss, third.outcome);
}

test "queue-aware p2c avoids a backend reporting a long queue, until the report is stale" {
    const t = try table_mod.testTable(4);
    defer table_mod.testTableFree(t);
    const busy = try t.add(1, 100, 1000);
    _ = try t.add(2, 100, 1000);
    const now_ms = monotonicMs();
    try t.setSignals(busy, 50, 0, now_ms);
    for (0..20) |_| {
        const slot = acquire(&t, .ofTable(&t), .queue_aware, 1, 0);
        try testing.expect(slot != busy);
    }
    t.header.signal_age_max_ms.store(0, .monotonic);
    try t.setSignals(busy, 50, 0, now_ms -| 10);
    var chosen_busy = false;
    for (0..40) |_| chosen_busy = chosen_busy or acquire(&t, .ofTable(&t), .queue_aware, 1, 0) == busy;
    try testing.expect(chosen_busy);
}

test "p2c breaks ties between equally loaded backends at random" {
    const t = try table_mod.testTable(4);
    defer table_mod.testTableFree(t);
    for (0..3) |i| _ = try t.add(i, 100, 1000);
    var chosen: [3]u32 = @splat(0);
    for (0..300) |_| {
        const slot = acquire(&t, .ofTable(&t), .p2c, 1, 0);
        chosen[slot] += 1;
        try t.release(slot, t.incarnationOf(slot), 1, 0, true); // always idle again: every decision is a tie
    }
    for (chosen) |count| try testing.expect(count >= 60 and count <= 140);
}

test "least_ttft prefers the cached backend, leaves it when its queue outweighs the cache, and weighs speed" {
    const t = try table_mod.testTableWithPrefix(8, 1024);
    defer table_mod.testTableFree(t);
    const a = try t.add(1, 1000, 1000);
    const b = try t.add(2, 1000, 1000);
    const whole = Candidates.ofTable(&t);
    var prompt: [40]u64 = undefined;
    for (&prompt, 0..) |*hash, i| hash.* = 1000 + i;
    const pricing: Pricing = .{ .block_cost_milli = 1000 }; // one cost unit per block
    for (prompt) |hash| affinity.prefixRecord(&t, hash, a); // a holds the whole prompt
    const cached = acquirePriced(&t, whole, .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
    try testing.expectEqual(a, cached.slot);
    try testing.expectEqual(Outcome.hit, cached.outcome);
    try testing.expectEqual(@as(u32, 40), cached.matched_blocks);
    try t.release(a, t.incarnationOf(a), 1, 0, true);
    // a's queue (60 units) outweighs b's uncached prompt (40 units): b, though a holds the prefix.
    try testing.expect(t.reserve(a, 60, 0));
    const queued = acquirePriced(&t, whole, .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
    try testing.expectEqual(b, queued.slot);
    try testing.expectEqual(Outcome.overload, queued.outcome);
    try t.release(b, t.incarnationOf(b), 1, 0, true);
    try t.release(a, t.incarnationOf(a), 60, 0, true);
    // With no cache anywhere and equal queues, the faster (heavier) backend wins.
    try t.update(b, 1000, 3000, .active);
    try testing.expect(t.reserve(a, 10, 0));
    try testing.expect(t.reserve(b, 10, 0));
    const fresh = [_]u64{ 7, 8, 9 };
    const fast = acquirePriced(&t, whole, .least_ttft, .{ .hashes = &fresh }, 1, 0, pricing);
    try testing.expectEqual(b, fast.slot);
    try testing.expectEqual(Outcome.miss, fast.outcome);
}

/// Four backends: b holds the first 8 blocks of `prompt`, d the first 19, a the first 20;
/// b and c carry 10 units of background load (so a stays within its bound), a `a_queued`.
fn ttftFixture(t: *const Table, prompt: []const u64, a_queued: u32) ![4]u32 {
    const a = try t.add(1, 1000, 1000);
    const b = try t.add(2, 1000, 1000);
    const c = try t.add(3, 1000, 1000);
    const d = try t.add(4, 1000, 1000);
    for (prompt[0..8]) |hash| affinity.prefixRecord(t, hash, b);
    for (prompt[0..19]) |hash| affinity.prefixRecord(t, hash, d);
    for (prompt[0..20]) |hash| affinity.prefixRecord(t, hash, a);
    try testing.expect(t.reserve(b, 10, 0));
    try testing.expect(t.reserve(c, 10, 0));
    try testing.expect(t.reserve(a, a_queued, 0));
    return .{ a, b, c, d };
}

test "least_ttft sees each backend's own cached prefix and keeps near-ties on the longest" {
    var prompt: [32]u64 = undefined;
    for (&prompt, 0..) |*hash, i| hash.* = 5000 + i;
    const pricing: Pricing = .{ .block_cost_milli = 1000 };
    {
        const t = try table_mod.testTableWithPrefix(8, 1024);
        defer table_mod.testTableFree(t);
        const a, const b, const c, const d = try ttftFixture(&t, &prompt, 1);
        const matches = slotMatches(&t, .ofTable(&t), &prompt);
        try testing.expectEqual(@as(u32, 3), matches.count);
        try testing.expectEqual(a, matches.slots[0]);
        try testing.expectEqual(@as(u32, 20), matches.of(a));
        try testing.expectEqual(@as(u32, 19), matches.of(d));
        try testing.expectEqual(@as(u32, 8), matches.of(b));
        try testing.expectEqual(@as(u32, 0), matches.of(c));
        // a: 1 queued + 12 uncached = 13, d: 0 + 13 = 13, within 25 %: the near-tie stays on a.
        const near = acquirePriced(&t, .ofTable(&t), .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
        try testing.expectEqual(a, near.slot);
        try testing.expectEqual(Outcome.hit, near.outcome);
    }
    {
        const t = try table_mod.testTableWithPrefix(8, 1024);
        defer table_mod.testTableFree(t);
        _, _, _, const d = try ttftFixture(&t, &prompt, 5);
        // a: 5 + 12 = 17 against d's 13: no longer a near-tie.
        const far = acquirePriced(&t, .ofTable(&t), .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
        try testing.expectEqual(d, far.slot);
        try testing.expectEqual(Outcome.overload, far.outcome);
        try testing.expectEqual(@as(u32, 19), far.matched_blocks);
    }
}

/// Three backends with `batch_slots` each: b holds the first `b_blocks` of `prompt`, a the first
/// `a_blocks` (recorded last) and runs `a_running` requests of cost 1, c carries 20 units of
/// background load (so a stays within its bound). Returns a and b.
fn batchFixture(t: *const Table, prompt: []const u64, batch_slots: u32, b_blocks: usize, a_blocks: usize, a_running: u32) ![2]u32 {
    const a = try t.add(1, 1000, 1000);
    const b = try t.add(2, 1000, 1000);
    const c = try t.add(3, 1000, 1000);
    for ([_]u32{ a, b, c }) |slot| try t.setBatchSlots(slot, batch_slots);
    for (prompt[0..b_blocks]) |hash| affinity.prefixRecord(t, hash, b);
    for (prompt[0..a_blocks]) |hash| affinity.prefixRecord(t, hash, a);
    for (0..a_running) |_| try testing.expect(t.reserve(a, 1, 0));
    try testing.expect(t.reserve(c, 20, 0));
    return .{ a, b };
}

test "least_ttft with batch slots: a conversation stays while its backend has a free slot, leaves once requests wait" {
    var prompt: [32]u64 = undefined;
    for (&prompt, 0..) |*hash, i| hash.* = 9000 + i;
    const pricing: Pricing = .{ .block_cost_milli = 1000 }; // one cost unit per block
    const Case = struct { batch_slots: u32, running: u32, stays: bool };
    const cases = [_]Case{
        // Batch slots not known: a scores 3 running + 2 uncached = 5, b 0 + 3: not a near-tie.
        .{ .batch_slots = 0, .running = 3, .stays = false },
        // 3 running beside it in a batch of 4: a scores 2 uncached x 1.15 = 2.3, below b's 3.
        .{ .batch_slots = 4, .running = 3, .stays = true },
        // 8 running in a batch of 4: 5 wait ahead, a scores 5 + 2.3: b.
        .{ .batch_slots = 4, .running = 8, .stays = false },
    };
    for (cases) |case| {
        const t = try table_mod.testTableWithPrefix(8, 1024);
        defer table_mod.testTableFree(t);
        const a, const b = try batchFixture(&t, &prompt, case.batch_slots, 29, 30, case.running);
        const decision = acquirePriced(&t, .ofTable(&t), .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
        try testing.expectEqual(if (case.stays) a else b, decision.slot);
        try testing.expectEqual(if (case.stays) Outcome.hit else Outcome.overload, decision.outcome);
    }
}

test "least_ttft waits for a full batch only as long as its next slot takes to free" {
    var prompt: [32]u64 = undefined;
    for (&prompt, 0..) |*hash, i| hash.* = 11000 + i;
    const pricing: Pricing = .{ .block_cost_milli = 250 }; // a quarter of a cost unit per block
    // a runs a full batch of 4 and holds 30 blocks; b runs nothing and holds 29. b scores 3
    // uncached = 0.75; a its wait + 2 uncached x 1.15 = wait + 0.575: a near-tie (within 25 %)
    // while the wait is under 0.36 of a service.
    const Case = struct { free_in_ms: i64, service_ms: u32, stays: bool };
    const cases = [_]Case{
        .{ .free_in_ms = 0, .service_ms = 0, .stays = false }, // not known: a whole service
        .{ .free_in_ms = 100, .service_ms = 1000, .stays = true }, // a tenth of one
        .{ .free_in_ms = 900, .service_ms = 1000, .stays = false },
        .{ .free_in_ms = 5000, .service_ms = 1000, .stays = false }, // at most one service
        .{ .free_in_ms = -50, .service_ms = 1000, .stays = true }, // overdue: any moment
        .{ .free_in_ms = -400, .service_ms = 1000, .stays = false }, // overdue: less trusted
        .{ .free_in_ms = -2500, .service_ms = 1000, .stays = false }, // stale: not known
    };
    for (cases) |case| {
        const t = try table_mod.testTableWithPrefix(8, 1024);
        defer table_mod.testTableFree(t);
        const a, const b = try batchFixture(&t, &prompt, 4, 29, 30, 4);
        if (case.service_ms != 0) {
            const now: i64 = @intCast(monotonicMs());
            try t.setBatchTiming(a, @intCast(now + case.free_in_ms), case.service_ms);
        }
        const decision = acquirePriced(&t, .ofTable(&t), .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
        try testing.expectEqual(if (case.stays) a else b, decision.slot);
    }
}

test "least_ttft places a new conversation by time and fill alone: the last holder of its shared prefix has no near-tie" {
    var prompt: [32]u64 = undefined;
    for (&prompt, 0..) |*hash, i| hash.* = 13000 + i;
    const pricing: Pricing = .{ .block_cost_milli = 1000 };
    const t = try table_mod.testTableWithPrefix(8, 1024);
    defer table_mod.testTableFree(t);
    // Both hold the shared 20 blocks, a most recently; a runs 3 (a free slot, its batch 3/4 full).
    _, const b = try batchFixture(&t, &prompt, 4, 20, 20, 3);
    // a: 0.75 fill + 12 x 1.15 = 14.55, b: 12. Within 25 % of b, but a keeps no cache: b.
    const decision = acquirePriced(&t, .ofTable(&t), .least_ttft, .{ .hashes = &prompt }, 1, 0, pricing);
    try testing.expectEqual(b, decision.slot);
    try testing.expectEqual(@as(u32, 20), decision.matched_blocks);
}

test "least_ttft: the bounded load never refuses a backend with a free batch slot" {
    var prompt: [30]u64 = undefined;
    for (&prompt, 0..) |*hash, i| hash.* = 7000 + i;
    for ([_]u32{ 0, 4 }) |batch_slots| {
        const t = try table_mod.testTableWithPrefix(8, 1024);
        defer table_mod.testTableFree(t);
        var slots: [4]u32 = undefined;
        for (&slots, 0..) |*slot, i| {
            slot.* = try t.add(i + 1, 1000, 1000);
            try t.setBatchSlots(slot.*, batch_slots);
        }
        const a = slots[0];
        for (prompt) |hash| affinity.prefixRecord(&t, hash, a);
        // a runs 2 requests, the rest of the fleet none: a third is over ⌈1.25 × 3 / 4⌉ = 1.
        for (0..2) |_| try testing.expect(t.reserve(a, 1, 0));
        try testing.expect(!affinity.withinBound(&t, a, 1, Candidates.ofTable(&t).totals(&t)));
        const decision = acquirePriced(&t, .ofTable(&t), .least_ttft, .{ .hashes = &prompt }, 1, 0, .{});
        if (batch_slots == 0) {
            try testing.expect(decision.slot != a);
        } else {
            // Two of a's four slots are free: the conversation stays on its cache.
            try testing.expectEqual(a, decision.slot);
            try testing.expectEqual(Outcome.hit, decision.outcome);
        }
    }
}

test "a priced reservation is released exactly; a discount never goes below one" {
    try testing.expectEqual(@as(u32, 1), discounted(5, 100, .{ .block_cost_milli = 1000, .discount = true }));
    try testing.expectEqual(@as(u32, 5), discounted(5, 100, .{ .block_cost_milli = 1000 }));
    try testing.expectEqual(@as(u32, 3), discounted(5, 2, .{ .block_cost_milli = 1000, .discount = true }));
    const t = try table_mod.testTableWithPrefix(8, 1024);
    defer table_mod.testTableFree(t);
    for (0..4) |i| _ = try t.add(i, 10_000, 1000);
    const prompt = [_]u64{ 1, 2, 3, 4, 5, 6, 7, 8 };
    const pricing: Pricing = .{ .block_cost_milli = 2000, .discount = true };
    for ([_]Strategy{ .least_ttft, .prefix_affinity, .p2c, .consistent_hash }) |strategy| {
        var held: [64]Decision = undefined;
        for (&held) |*decision| {
            decision.* = acquirePriced(&t, .ofTable(&t), strategy, .{ .hashes = &prompt }, 20, 0, pricing);
            try testing.expect(decision.slot != slot_none);
        }
        for (held) |decision| try t.release(decision.slot, t.incarnationOf(decision.slot), decision.cost, 0, true);
        for (0..4) |slot| try testing.expectEqual(@as(u32, 0), t.wordOf(@intCast(slot)).cost);
    }
}
