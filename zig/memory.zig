//! Where a table's region lives: a private anonymous mapping, or a named shared-memory segment
//! (`/dev/shm/irm-<name>`, Linux) that several worker processes map to share one set of counters.
//! Raw Linux system calls keep the library free of libc.

const std = @import("std");
const assert = std.debug.assert;
const linux = std.os.linux;
const table_mod = @import("table.zig");

pub const Region = []align(table_mod.header_bytes) u8;

pub const Error = error{
    OutOfMemory,
    SharedExists,
    SharedNotFound,
    SharedIncompatible,
    SharedCorrupt,
    InvalidName,
    SystemError,
};

pub const name_bytes_max: u32 = 200;
const path_prefix = "/dev/shm/irm-";
/// How long `attach` waits for a creator that has not finished formatting (yields, bounded).
const attach_wait_attempts_max: u32 = 1 << 20;

pub fn mapPrivate(bytes: u64) Error!Region {
    const rc = linux.mmap(null, @intCast(bytes), .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .ANONYMOUS = true }, -1, 0);
    if (linux.errno(rc) != .SUCCESS) return error.OutOfMemory;
    return regionFrom(rc, bytes);
}

/// Creates the segment exclusively (an existing one is reported, never reused silently) and maps
/// it; the caller formats it.
pub fn createShared(name: []const u8, bytes: u64) Error!Region {
    var path_buffer: [path_prefix.len + name_bytes_max + 1]u8 = undefined;
    const path = try pathFor(name, &path_buffer);
    const flags: linux.O = .{ .ACCMODE = .RDWR, .CREAT = true, .EXCL = true, .CLOEXEC = true };
    const fd_rc = linux.open(path, flags, 0o600);
    switch (linux.errno(fd_rc)) {
        .SUCCESS => {},
        .EXIST => return error.SharedExists,
        else => return error.SystemError,
    }
    const fd: linux.fd_t = @intCast(fd_rc);
    defer _ = linux.close(fd);
    errdefer _ = linux.unlink(path);
    if (linux.errno(linux.ftruncate(fd, @intCast(bytes))) != .SUCCESS) return error.SystemError;
    return mapShared(fd, bytes);
}

/// Maps an existing segment after checking that it is big enough and formatted.
pub fn attachShared(name: []const u8) Error!Region {
    var path_buffer: [path_prefix.len + name_bytes_max + 1]u8 = undefined;
    const path = try pathFor(name, &path_buffer);
    const fd_rc = linux.open(path, .{ .ACCMODE = .RDWR, .CLOEXEC = true }, 0);
    switch (linux.errno(fd_rc)) {
        .SUCCESS => {},
        .NOENT => return error.SharedNotFound,
        else => return error.SystemError,
    }
    const fd: linux.fd_t = @intCast(fd_rc);
    defer _ = linux.close(fd);
    // Mapping beyond the end of a file faults on access (SIGBUS), so check the size first.
    const file_bytes = try sizeOf(fd);
    if (file_bytes < table_mod.header_bytes) return error.SharedIncompatible;
    const head = try mapShared(fd, table_mod.header_bytes);
    const header: *table_mod.Header = @ptrCast(head.ptr);
    var attempts: u32 = 0;
    // .acquire pairs with the creator's .release of `ready`: the header is complete after it.
    while (header.ready.load(.acquire) == 0) : (attempts += 1) {
        if (attempts >= attach_wait_attempts_max) break;
        _ = linux.sched_yield();
    }
    const ready = header.ready.load(.acquire) != 0;
    const region_bytes = header.region_bytes;
    unmap(head);
    if (!ready) return error.SharedIncompatible;
    // A size the file does not have is a damaged header; `Table.view` checks it against the rest.
    if (region_bytes < table_mod.header_bytes) return error.SharedCorrupt;
    if (region_bytes > file_bytes) return error.SharedCorrupt;
    return mapShared(fd, region_bytes);
}

pub fn unlinkShared(name: []const u8) Error!void {
    var path_buffer: [path_prefix.len + name_bytes_max + 1]u8 = undefined;
    const path = try pathFor(name, &path_buffer);
    switch (linux.errno(linux.unlink(path))) {
        .SUCCESS => {},
        .NOENT => return error.SharedNotFound,
        else => return error.SystemError,
    }
}

pub fn unmap(region: Region) void {
    _ = linux.munmap(region.ptr, region.len);
}

/// Names are 1–200 bytes of `[A-Za-z0-9._-]`, not starting with a dot: no path can escape
/// /dev/shm.
pub fn validName(name: []const u8) bool {
    if (name.len == 0 or name.len > name_bytes_max) return false;
    if (name[0] == '.') return false;
    for (name) |c| {
        const ok = std.ascii.isAlphanumeric(c) or c == '.' or c == '_' or c == '-';
        if (!ok) return false;
    }
    return true;
}

fn pathFor(name: []const u8, buffer: *[path_prefix.len + name_bytes_max + 1]u8) Error![*:0]const u8 {
    if (!validName(name)) return error.InvalidName;
    @memcpy(buffer[0..path_prefix.len], path_prefix);
    @memcpy(buffer[path_prefix.len..][0..name.len], name);
    buffer[path_prefix.len + name.len] = 0;
    return @ptrCast(buffer);
}

fn mapShared(fd: linux.fd_t, bytes: u64) Error!Region {
    const rc = linux.mmap(null, @intCast(bytes), .{ .READ = true, .WRITE = true }, .{ .TYPE = .SHARED }, fd, 0);
    if (linux.errno(rc) != .SUCCESS) return error.SystemError;
    return regionFrom(rc, bytes);
}

fn sizeOf(fd: linux.fd_t) Error!u64 {
    const rc = linux.lseek(fd, 0, linux.SEEK.END);
    if (linux.errno(rc) != .SUCCESS) return error.SystemError;
    return rc;
}

fn regionFrom(address: usize, bytes: u64) Region {
    assert(address % table_mod.header_bytes == 0);
    const base: [*]align(table_mod.header_bytes) u8 = @ptrFromInt(address);
    return base[0..@intCast(bytes)];
}

test "names cannot escape /dev/shm" {
    try std.testing.expect(validName("router-1.workers_a"));
    try std.testing.expect(!validName(""));
    try std.testing.expect(!validName("../etc"));
    try std.testing.expect(!validName(".hidden"));
    try std.testing.expect(!validName("a/b"));
}
