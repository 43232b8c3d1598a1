//! For Zig developers: `zig build` makes zig-out/lib/libirm.so, `zig build test` runs the core's
//! unit tests. `pip install .` does not use this file (compiling the build runner costs ~100 s
//! cold); it runs `zig build-lib` with the same settings, all read from zig/native.zon.

const std = @import("std");
const builtin = @import("builtin");

const Native = struct {
    zig_version: []const u8,
    library_name: []const u8,
    root_source_file: []const u8,
    optimize: []const u8,
    cpu: []const u8,
};

const native: Native = @import("zig/native.zon");

comptime {
    // An upgrade of Zig is deliberate: change zig/native.zon and the pin in pyproject.toml together.
    if (!std.mem.eql(u8, builtin.zig_version_string, native.zig_version)) {
        @compileError("irmiddleware is pinned to Zig " ++ native.zig_version ++ ", this is " ++ builtin.zig_version_string);
    }
}

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{ .default_target = .{ .cpu_model = .baseline } });
    const optimize_option = b.option(std.builtin.Optimize, "optimize", "Optimization mode");
    const optimize = optimize_option orelse optimizeFromFlag(native.optimize);
    const module = b.createModule(.{
        .root_source_file = b.path(native.root_source_file),
        .target = target,
        .optimize = optimize,
    });
    const library = b.addLibrary(.{
        .name = native.library_name,
        .linkage = .dynamic,
        .root_module = module,
    });
    b.installArtifact(library);

    // Unit tests run with safety checks (assertions on) unless -Doptimize says otherwise. LLVM
    // also in Debug: the baseline x86-64 target has no 16-byte CAS in its feature set, so
    // zig/owners.zig spells it in inline assembly, which only the LLVM backend assembles.
    const tests = b.addTest(.{
        .root_module = b.createModule(.{
            .root_source_file = b.path(native.root_source_file),
            .target = target,
            .optimize = optimize_option orelse .debug,
        }),
        .use_llvm = true,
    });
    const run_tests = b.addRunArtifact(tests);
    const test_step = b.step("test", "Run the native core's unit tests");
    test_step.dependOn(&run_tests.step);
}

/// native.zon holds the command-line spelling (`-O ReleaseFast`) that hatch_build.py passes on.
fn optimizeFromFlag(comptime flag: []const u8) std.builtin.Optimize {
    const modes = .{
        .{ "Debug", .debug },
        .{ "ReleaseSafe", .safe },
        .{ "ReleaseFast", .fast },
        .{ "ReleaseSmall", .small },
    };
    inline for (modes) |mode| {
        if (comptime std.mem.eql(u8, flag, mode[0])) return mode[1];
    }
    @compileError("zig/native.zon: unknown optimize mode " ++ flag);
}
