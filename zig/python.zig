//! The seed API's per-call pair as two CPython builtin functions: `Router.route_request` and
//! `Router.complete` on a router's instance, so a call is one vector call into the core instead of
//! a Python method around a ctypes foreign call (whose per-argument work exceeded the decision's);
//! and the type `Request` subclasses, whose construction runs no Python line either and whose
//! fields the route builtin reads in place.
//!
//! No Python headers and no undefined symbols: the binding passes the addresses of the CPython
//! functions used here, taken from `ctypes.pythonapi`, once (`irm_python_bind`), and makes the
//! function objects (`PyCFunction_NewEx`, METH_FASTCALL | METH_KEYWORDS) and the type
//! (`PyType_FromSpec`) itself. The one CPython layout read here is the stable ABI's object header
//! (reference count, then type), which the binding checks on the running interpreter first.
//!
//! Each builtin is bound to a tuple (`Item` names its entries) that holds the table's handle and
//! what the slow paths need; anything but the plain call (one request whose id, cost and
//! priority are ints in range, no keyword) goes to the router's Python method, so both behave
//! alike by construction. The interpreter calls these with the GIL held, as every CPython
//! function they call requires, and they keep it: the core's work is shorter than the GIL's round
//! trip, and the core's calls are thread-safe without it.

const std = @import("std");
const table_mod = @import("table.zig");

/// A CPython object; only its header is read (`Header`).
pub const Object = opaque {};

/// The stable ABI's object header (not a free-threaded or trace-refs build: the binding checks).
const Header = extern struct {
    refcount: isize,
    type: *Object,
};

/// The CPython functions and objects used here, in the order of their addresses in
/// `irm_python_bind` (`_native._PYTHON_API` names them; a test checks that the orders agree).
pub const Api = extern struct {
    PyTuple_GetItem: *const fn (*Object, isize) callconv(.c) ?*Object,
    PyDict_Size: *const fn (*Object) callconv(.c) isize,
    PyObject_GetAttr: *const fn (*Object, *Object) callconv(.c) ?*Object,
    PyObject_Vectorcall: *const fn (*Object, ?[*]const *Object, usize, ?*Object) callconv(.c) ?*Object,
    PyLong_AsUnsignedLongLong: *const fn (*Object) callconv(.c) u64,
    PyLong_AsLongLong: *const fn (*Object) callconv(.c) i64,
    PyLong_FromLongLong: *const fn (i64) callconv(.c) ?*Object,
    PyLong_FromUnsignedLongLong: *const fn (u64) callconv(.c) ?*Object,
    PyErr_Occurred: *const fn () callconv(.c) ?*Object,
    PyErr_Clear: *const fn () callconv(.c) void,
    Py_IncRef: *const fn (*Object) callconv(.c) void,
    Py_DecRef: *const fn (*Object) callconv(.c) void,
    PyTuple_Size: *const fn (*Object) callconv(.c) isize,
    PyObject_Call: *const fn (*Object, *Object, ?*Object) callconv(.c) ?*Object,
    PyType_GenericAlloc: *const fn (*Object, isize) callconv(.c) ?*Object,
    PyObject_GC_UnTrack: *const fn (*Object) callconv(.c) void,
    PyObject_GC_Del: *const fn (*Object) callconv(.c) void,
    /// `int` (`PyLong_Type`): an id, cost or priority must be exactly one for the fast path.
    int_type: *Object,
    /// `None`, which `route_request` returns when nothing fits and `complete` on success.
    none: *Object,
    /// `_native._request_fields(id, cost=1, priority=0)`: a request's checked fields as a tuple,
    /// for every construction but positional ints in range (it raises the errors).
    request_fields: *Object,
};

pub const api_count: u32 = @sizeOf(Api) / @sizeOf(u64);

comptime {
    // The binding passes one u64 per field: every field is a pointer of that size.
    std.debug.assert(@sizeOf(Api) % @sizeOf(u64) == 0);
    std.debug.assert(@sizeOf(usize) == @sizeOf(u64));
}

/// Set once by `bind` before the binding makes any builtin (so before any method runs).
var api: Api = undefined;

// ---- Request ---------------------------------------------------------------------------------

/// An instance of the core's request type (`_native.RequestBase`, which `Request` subclasses
/// without adding fields): its three fields follow the header, so the route builtin reads them
/// without an attribute lookup. A field is null only after `del request.field`.
const Request = extern struct {
    header: Header,
    id: ?*Object,
    cost: ?*Object,
    priority: ?*Object,
};

fn requestOf(object: *Object) *Request {
    return @ptrCast(@alignCast(object));
}

/// `tp_new`: an instance with no fields yet, as `object.__new__` makes one; `tp_init` sets them,
/// so a subclass's own `__init__` may call `super().__init__(id, cost, priority)` as before.
fn requestNew(request_type: *Object, args: *Object, keywords: ?*Object) callconv(.c) ?*Object {
    _ = args;
    _ = keywords;
    return api.PyType_GenericAlloc(request_type, 0);
}

/// `tp_init`: `Request(id, cost=1, priority=0)`. Positional ints in range are checked here; any
/// other call is `request_fields`', which raises the same errors as the Python class did.
fn requestInit(object: *Object, args: *Object, keywords: ?*Object) callconv(.c) c_int {
    var fields: [3]*Object = undefined;
    if (!positionalFields(args, keywords, &fields)) {
        const checked = api.PyObject_Call(api.request_fields, args, keywords) orelse return -1;
        defer api.Py_DecRef(checked);
        for (&fields, 0..) |*field, index| {
            field.* = api.PyTuple_GetItem(checked, @intCast(index)) orelse {
                for (fields[0..index]) |taken| api.Py_DecRef(taken);
                return -1;
            };
            api.Py_IncRef(field.*);
        }
    }
    const request = requestOf(object);
    const replaced = [3]?*Object{ request.id, request.cost, request.priority };
    request.id, request.cost, request.priority = .{ fields[0], fields[1], fields[2] };
    for (replaced) |field| {
        if (field) |present| api.Py_DecRef(present);
    }
    return 0;
}

/// `fields` (new references) from a call with 1 to 3 positional arguments and no keyword whose
/// cost and priority are ints in range; false (nothing taken) for any other call.
fn positionalFields(args: *Object, keywords: ?*Object, fields: *[3]*Object) bool {
    if (keywords) |dict| {
        if (api.PyDict_Size(dict) != 0) return false;
    }
    const count = api.PyTuple_Size(args);
    if (count < 1 or count > 3) return false;
    const id = api.PyTuple_GetItem(args, 0) orelse return false;
    const cost = if (count > 1) api.PyTuple_GetItem(args, 1) orelse return false else null;
    const priority = if (count > 2) api.PyTuple_GetItem(args, 2) orelse return false else null;
    if (cost) |given| {
        _ = smallInt(given, 1, std.math.maxInt(i32)) orelse return false;
    }
    if (priority) |given| {
        _ = smallInt(given, 0, table_mod.classes_count - 1) orelse return false;
    }
    // The defaults are CPython's cached small ints: new references that cannot fail.
    fields.* = .{ id, cost orelse api.PyLong_FromLongLong(1).?, priority orelse api.PyLong_FromLongLong(0).? };
    api.Py_IncRef(id);
    if (cost) |given| api.Py_IncRef(given);
    if (priority) |given| api.Py_IncRef(given);
    return true;
}

/// `tp_dealloc`. The type is a heap type: its instances hold a reference to it, dropped here.
fn requestDealloc(object: *Object) callconv(.c) void {
    const request_type = typeOf(object);
    api.PyObject_GC_UnTrack(object);
    _ = requestClear(object);
    api.PyObject_GC_Del(object);
    api.Py_DecRef(request_type);
}

const Visit = *const fn (*Object, ?*anyopaque) callconv(.c) c_int;

/// `tp_traverse`: an id may be any object, so a request can be part of a cycle.
fn requestTraverse(object: *Object, visit: Visit, argument: ?*anyopaque) callconv(.c) c_int {
    const request = requestOf(object);
    for ([_]?*Object{ request.id, request.cost, request.priority }) |field| {
        if (field) |present| {
            const result = visit(present, argument);
            if (result != 0) return result;
        }
    }
    // A heap type's instances visit their type too (the garbage collector's contract since 3.9).
    return visit(typeOf(object), argument);
}

/// `tp_clear`.
fn requestClear(object: *Object) callconv(.c) c_int {
    const request = requestOf(object);
    inline for (.{ "id", "cost", "priority" }) |name| {
        if (@field(request, name)) |present| {
            @field(request, name) = null;
            api.Py_DecRef(present);
        }
    }
    return 0;
}

pub const bound_count: u32 = 11;

/// What `irm_python_bind` gives the binding: the builtin methods' addresses (`methods`), the
/// request type's slot functions (tp_new, tp_init, tp_dealloc, tp_traverse, tp_clear), its size
/// and its fields' offsets.
pub fn boundValues(methods: [2]u64) [bound_count]u64 {
    return methods ++ [_]u64{
        @intFromPtr(&requestNew),
        @intFromPtr(&requestInit),
        @intFromPtr(&requestDealloc),
        @intFromPtr(&requestTraverse),
        @intFromPtr(&requestClear),
        @sizeOf(Request),
        @offsetOf(Request, "id"),
        @offsetOf(Request, "cost"),
        @offsetOf(Request, "priority"),
    };
}

// ---- the seed API's builtins -------------------------------------------------------------------

/// The builtins' tuple: its entries, in order (`_native._SEED_STATE` names them alike).
pub const Item = enum(isize) {
    /// The table's handle, an int (a closed one is refused by the core, as for `irm_route`).
    handle = 0,
    /// The router's strategy number, an int.
    strategy = 1,
    /// The router's own records (a dict): the fast path runs only while it is empty, since an
    /// id there is in flight already.
    in_flight = 2,
    /// `Request` (a `RequestBase` with no fields of its own): the builtins read the fields of
    /// exactly this type themselves.
    request_type = 3,
    /// `weakref.WeakMethod`s of the router's Python methods, called for everything else (weak:
    /// the router holds the builtins, which must not keep it alive).
    route_fallback = 4,
    complete_fallback = 5,
    /// `raise(result, request_id)` for a refused `irm_route`, `raise(status, request_id)` for a
    /// refused `irm_complete`; `raise()` for a router gone (a fallback's method died).
    route_refused = 6,
    complete_refused = 7,
    router_gone = 8,
    /// "id", "cost", "priority": the request's attribute names.
    id_name = 9,
    cost_name = 10,
    priority_name = 11,
};

pub const items_count: u32 = @typeInfo(Item).@"enum".field_names.len;

/// CPython's `METH_FASTCALL | METH_KEYWORDS`: the methods' calling convention.
pub const method_flags: u32 = 0x0080 | 0x0002;

/// Takes the interpreter's function addresses (`addresses[0..api_count]`, `Api`'s order); false
/// if one is null. The addresses cannot be checked beyond that: only the binding calls this,
/// with the interpreter's own.
pub fn bind(addresses: []const u64) bool {
    std.debug.assert(addresses.len == api_count);
    for (addresses) |address| {
        if (address == 0) return false;
    }
    var fresh: Api = undefined;
    @memcpy(std.mem.asBytes(&fresh), std.mem.sliceAsBytes(addresses));
    api = fresh;
    return true;
}

fn typeOf(object: *Object) *Object {
    const header: *const Header = @ptrCast(@alignCast(object));
    return header.type;
}

fn item(state: *Object, which: Item) ?*Object {
    return api.PyTuple_GetItem(state, @backingInt(which));
}

/// An exact int in `minimum..maximum`, or null (no exception left set): the caller takes the slow
/// path, where the Python method raises its own error for a value out of range.
fn smallInt(object: *Object, minimum: u64, maximum: u64) ?u64 {
    if (typeOf(object) != api.int_type) return null;
    const value = api.PyLong_AsUnsignedLongLong(object);
    if (value == std.math.maxInt(u64) and api.PyErr_Occurred() != null) {
        api.PyErr_Clear(); // Negative or above 2^64: not for the core.
        return null;
    }
    if (value < minimum or value > maximum) return null;
    return value;
}

fn none() *Object {
    api.Py_IncRef(api.none);
    return api.none;
}

/// Calls the router's Python method (a WeakMethod in `state`) with the call's own arguments.
fn fallback(state: *Object, which: Item, args: ?[*]const *Object, nargs: isize, kwnames: ?*Object) ?*Object {
    const weak = item(state, which) orelse return null;
    const method = api.PyObject_Vectorcall(weak, null, 0, null) orelse return null;
    defer api.Py_DecRef(method);
    if (method == api.none) {
        const gone = item(state, .router_gone) orelse return null;
        return api.PyObject_Vectorcall(gone, null, 0, null);
    }
    return api.PyObject_Vectorcall(method, args, @intCast(nargs), kwnames);
}

/// Calls `state[which](code, request_id)`, which raises the refusal's exception.
fn refuse(state: *Object, which: Item, code: i64, request_id: *Object) ?*Object {
    const raise = item(state, which) orelse return null;
    const code_object = api.PyLong_FromLongLong(code) orelse return null;
    defer api.Py_DecRef(code_object);
    const arguments = [2]*Object{ code_object, request_id };
    return api.PyObject_Vectorcall(raise, &arguments, arguments.len, null);
}

fn handleOf(state: *Object) ?u32 {
    const handle = item(state, .handle) orelse return null;
    // Made by the binding from a real handle; a bad value reaches the core as 0, which it refuses.
    return @truncate(smallInt(handle, 0, std.math.maxInt(u32)) orelse 0);
}

fn attribute(state: *Object, object: *Object, name: Item) ?*Object {
    const name_object = item(state, name) orelse return null;
    return api.PyObject_GetAttr(object, name_object);
}

/// A request the route builtin takes itself: its id (and the id object, a new reference), cost
/// and priority, each an int in range.
const Plain = struct { id_object: *Object, id: u64, cost: u32, priority: u32 };

const Read = union(enum) {
    plain: Plain,
    /// Not a plain request: the Python method takes the call.
    slow,
    /// An attribute could not be read: its exception is set.
    failed,
};

/// Reads a request as the Python method does (`request.id`, `.cost`, `.priority`), the fields
/// of exactly `Request` straight from the object.
fn readPlain(state: *Object, request: *Object) Read {
    const request_type = item(state, .request_type) orelse return .failed;
    if (typeOf(request) == request_type) {
        const fields = requestOf(request);
        if (fields.id != null and fields.cost != null and fields.priority != null) {
            // Borrowed: nothing below runs Python code before the values are taken, except
            // with the id, which is kept alive for the refusal's message.
            api.Py_IncRef(fields.id.?);
            return plainOf(fields.id.?, fields.cost.?, fields.priority.?);
        }
    }
    const id_object = attribute(state, request, .id_name) orelse return .failed;
    const cost_object = attribute(state, request, .cost_name) orelse {
        api.Py_DecRef(id_object);
        return .failed;
    };
    defer api.Py_DecRef(cost_object);
    const priority_object = attribute(state, request, .priority_name) orelse {
        api.Py_DecRef(id_object);
        return .failed;
    };
    defer api.Py_DecRef(priority_object);
    return plainOf(id_object, cost_object, priority_object);
}

/// The plain request of these fields (taking `id_object`'s reference), or `.slow` (dropping it).
fn plainOf(id_object: *Object, cost_object: *Object, priority_object: *Object) Read {
    const request_id = smallInt(id_object, 0, std.math.maxInt(u64));
    const cost = smallInt(cost_object, 1, std.math.maxInt(i32));
    const priority = smallInt(priority_object, 0, table_mod.classes_count - 1);
    if (request_id == null or cost == null or priority == null) {
        api.Py_DecRef(id_object);
        return .slow;
    }
    return .{ .plain = .{
        .id_object = id_object,
        .id = request_id.?,
        .cost = @intCast(cost.?),
        .priority = @intCast(priority.?),
    } };
}

/// The two methods over `Core`, the core's calls (abi.zig passes its own, so this file needs no
/// export of its own): `route` and `complete` as `irm_route` and `irm_complete`, `backendRead`
/// (a backend's id by slot; a status), and their result constants.
pub fn Methods(comptime Core: type) type {
    return struct {
        /// The addresses of the two methods, for the binding's method definitions.
        pub fn addresses() [2]u64 {
            return .{ @intFromPtr(&routeRequest), @intFromPtr(&complete) };
        }

        /// `route_request(request)`: the request's id, cost and priority read as the Python
        /// method reads them, then one `irm_route`.
        pub fn routeRequest(self: ?*Object, args: ?[*]const *Object, nargs: isize, kwnames: ?*Object) callconv(.c) ?*Object {
            const state = self.?;
            if (nargs != 1 or kwnames != null) return fallback(state, .route_fallback, args, nargs, kwnames);
            const in_flight = item(state, .in_flight) orelse return null;
            if (api.PyDict_Size(in_flight) != 0) return fallback(state, .route_fallback, args, nargs, kwnames);
            const plain = switch (readPlain(state, args.?[0])) {
                .plain => |plain| plain,
                .slow => return fallback(state, .route_fallback, args, nargs, kwnames),
                .failed => return null,
            };
            defer api.Py_DecRef(plain.id_object);
            const handle = handleOf(state) orelse return null;
            const strategy_object = item(state, .strategy) orelse return null;
            const strategy = smallInt(strategy_object, 0, std.math.maxInt(u32)) orelse std.math.maxInt(u32);
            const id_low: u32 = @truncate(plain.id);
            const id_high: u32 = @truncate(plain.id >> 32);
            const result = Core.route(handle, @intCast(strategy), id_low, id_high, @intCast(plain.cost), plain.priority);
            if (result >= 0) return api.PyLong_FromLongLong(result);
            if (result == Core.route_none_result) return none();
            if (result <= Core.route_slot_base_result) {
                return backendIdOf(state, handle, @intCast(Core.route_slot_base_result - result), plain.id_object);
            }
            return refuse(state, .route_refused, result, plain.id_object);
        }

        /// The id of the backend in `slot`, for an id that does not fit `irm_route`'s result.
        fn backendIdOf(state: *Object, handle: u32, slot: u32, request_id: *Object) ?*Object {
            var id: u64 = 0;
            const read = Core.backendRead(handle, slot, &id);
            if (read != 0) return refuse(state, .route_refused, -@as(i64, read), request_id);
            return api.PyLong_FromUnsignedLongLong(id);
        }

        /// `complete(request)` for a request (or id) the core recorded: one `irm_complete`, the
        /// latency measured in the core. An id it does not know goes to the Python method (the
        /// router's own records).
        pub fn complete(self: ?*Object, args: ?[*]const *Object, nargs: isize, kwnames: ?*Object) callconv(.c) ?*Object {
            const state = self.?;
            if (nargs != 1 or kwnames != null) return fallback(state, .complete_fallback, args, nargs, kwnames);
            const id_object = completedId(state, args.?[0]) orelse return null;
            defer api.Py_DecRef(id_object);
            const request_id = smallInt(id_object, 0, std.math.maxInt(u64)) orelse {
                return fallback(state, .complete_fallback, args, nargs, kwnames);
            };
            const handle = handleOf(state) orelse return null;
            const status = Core.complete(handle, @truncate(request_id), @truncate(request_id >> 32), 1, -1);
            if (status == 0) return none();
            if (status == Core.unknown_request) {
                return fallback(state, .complete_fallback, args, nargs, kwnames);
            }
            return refuse(state, .complete_refused, status, id_object);
        }
    };
}

/// The id `complete` was given, as the Python method takes it (a new reference): the id of exactly
/// a `Request`, else the argument itself (a subclass's instance is no int: the method takes it).
/// Null with AttributeError set for a Request whose id was deleted.
fn completedId(state: *Object, argument: *Object) ?*Object {
    const request_type = item(state, .request_type) orelse return null;
    if (typeOf(argument) != request_type) {
        api.Py_IncRef(argument);
        return argument;
    }
    const id = requestOf(argument).id orelse return attribute(state, argument, .id_name);
    api.Py_IncRef(id);
    return id;
}

test "bind refuses a null address; a request's fields follow the object header" {
    var addresses: [api_count]u64 = @splat(1);
    addresses[3] = 0;
    try std.testing.expect(!bind(&addresses));
    const values = boundValues(.{ 1, 2 });
    try std.testing.expectEqualSlices(u64, &.{ 1, 2 }, values[0..2]);
    try std.testing.expectEqual(@as(u64, 40), values[7]);
    try std.testing.expectEqualSlices(u64, &.{ 16, 24, 32 }, values[8..11]);
}
