"""The binding's copies of the core's definitions match the Zig sources: status names and numbers,
the enums (strategies, backend states, affinity outcomes), the record `irm_table_snapshot` fills
(field names, order, sizes), the shared header the corruption test writes, the limits the binding
checks before a call, and every exported function's parameter types.

Each is parsed out of zig/*.zig, so a change on one side only fails here instead of
misreading memory at run time. The parsers are strict: a definition they cannot find fails."""

from __future__ import annotations

import ctypes
import enum
import re
from pathlib import Path
from typing import Any

import pytest

from irmiddleware import _native
from tests.test_shared_tables import HEADER

ZIG = Path(__file__).resolve().parent.parent / "zig"


def source(name: str) -> str:
    return (ZIG / name).read_text()


def block(text: str, opening: str) -> str:
    """The body of the first `opening ... {` declaration, up to its matching brace."""
    opening_brace = text.index("{", text.index(opening))
    depth = 0
    for index in range(opening_brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening_brace + 1 : index]
    raise AssertionError(f"unbalanced braces after {opening!r}")


def zig_enum(text: str, name: str) -> dict[str, int]:
    """`pub const <name> = enum(...) { a = 0, ... }`: name -> value (doc comments skipped)."""
    body = block(text, f"pub const {name} = enum(")
    members = dict(re.findall(r"^\s*(\w+)\s*=\s*(\d+),", body, re.MULTILINE))
    assert members, f"no members parsed from {name}"
    return {member: int(value) for member, value in members.items()}


def zig_fields(text: str, name: str) -> list[tuple[str, str]]:
    """`pub const <name> = extern struct { field: type, ... }`: (field, type) in order."""
    body = block(text, f"pub const {name} = extern struct")
    body = re.sub(r"comptime\s*\{.*?\n    \}", "", body, flags=re.DOTALL)
    fields = re.findall(r"^\s{4}(\w+):\s*([^,=]+?)\s*(?:=[^,]*)?,\s*(?://.*)?$", body, re.MULTILINE)
    assert fields, f"no fields parsed from {name}"
    return fields


def python_enum(members: type[enum.IntEnum]) -> dict[str, int]:
    return {member.name.lower(): int(member) for member in members}


# ---- statuses and enums ----------------------------------------------------------------------


def test_status_names_and_numbers_match() -> None:
    zig = zig_enum(source("abi.zig"), "Status")
    python = {name: number for number, name in enumerate(_native._STATUS_NAMES)}
    assert python == zig
    assert set(_native._STATUS_ERRORS) == set(zig) - {"ok"}  # every failure has an exception type


def test_strategy_codes_match() -> None:
    assert python_enum(_native.StrategyCode) == zig_enum(source("strategies.zig"), "Strategy")


def test_affinity_outcomes_match() -> None:
    assert python_enum(_native.Outcome) == zig_enum(source("strategies.zig"), "Outcome")


def test_backend_states_match() -> None:
    zig = zig_enum(source("table.zig"), "State")
    # `free` is never reported: a free slot is not a backend (snapshot and read skip it).
    assert python_enum(_native.State) == {name: value for name, value in zig.items() if name != "free"}


# ---- records -----------------------------------------------------------------------------------

CTYPES_OF: dict[str, Any] = {
    "u8": ctypes.c_uint8,
    "u32": ctypes.c_uint32,
    "i32": ctypes.c_int32,
    "u64": ctypes.c_uint64,
    "i64": ctypes.c_int64,
    "Atomic(u32)": ctypes.c_uint32,
    "Atomic(u64)": ctypes.c_uint64,
}


def ctypes_of(zig_type: str, constants: dict[str, int]) -> Any:
    array = re.fullmatch(r"\[(\w+)\](.+)", zig_type)
    if array:
        length = array.group(1)
        count = int(length) if length.isdigit() else constants[length]
        return ctypes_of(array.group(2), constants) * count
    return CTYPES_OF[zig_type]


def assert_same_layout(
    structure: type[ctypes.Structure], zig: list[tuple[str, str]], constants: dict[str, int]
) -> None:
    python = [(name, field_type) for name, field_type in structure._fields_]
    assert [name for name, _ in python] == [name for name, _ in zig]
    for (name, python_type), (_, zig_type) in zip(python, zig, strict=True):
        expected = ctypes_of(zig_type, constants)
        assert ctypes.sizeof(python_type) == ctypes.sizeof(expected), name
        assert getattr(python_type, "_type_", python_type) == getattr(expected, "_type_", expected), name


def test_the_snapshot_record_matches_backend_info() -> None:
    text = source("abi.zig")
    assert_same_layout(_native.SlotRecord, zig_fields(text, "BackendInfo"), {})
    size = re.search(r"assert\(@sizeOf\(BackendInfo\) == (\d+)\)", text)
    assert size is not None
    assert ctypes.sizeof(_native.SlotRecord) == int(size.group(1))


def test_the_corruption_test_header_matches_the_table_header() -> None:
    constants = {"classes_count": _native.CLASSES_COUNT}
    assert_same_layout(HEADER, zig_fields(source("table.zig"), "Header"), constants)


# ---- constants and signatures ----------------------------------------------------------------

CONSTANTS = [
    ("abi.zig", "abi_version", "ABI_VERSION"),
    ("abi.zig", "batch_count_max", "BATCH_COUNT_MAX"),
    ("table.zig", "backends_max_limit", "BACKENDS_MAX_LIMIT"),
    ("table.zig", "classes_count", "CLASSES_COUNT"),
    ("table.zig", "weight_milli_max", "WEIGHT_MILLI_MAX"),
    ("table.zig", "prefix_entries_limit", "PREFIX_ENTRIES_LIMIT"),
    ("table.zig", "flag_racy_for_tests", "FLAG_RACY_FOR_TESTS"),
    ("abi.zig", "hashes_max", "PREFIX_HASHES_MAX"),
    ("abi.zig", "route_none", "ROUTE_NONE"),
    ("abi.zig", "route_slot_base", "ROUTE_SLOT_BASE"),
]


def zig_integer(expression: str) -> int:
    """A constant's value: a literal (with `_`), `1 << n`, or either negated as `-(...)`."""
    expression = expression.replace("_", "")
    negated = re.fullmatch(r"-\((.+)\)", expression)
    if negated:
        return -zig_integer(negated.group(1))
    shift = re.fullmatch(r"(\d+)\s*<<\s*(\d+)", expression)
    if shift:
        return int(shift.group(1)) << int(shift.group(2))
    assert expression.isdigit(), expression
    return int(expression)


@pytest.mark.parametrize(("file", "zig_name", "python_name"), CONSTANTS)
def test_limits_match(file: str, zig_name: str, python_name: str) -> None:
    found = re.search(rf"const {zig_name}: \w+ = ([^;]+);", source(file))
    assert found is not None, zig_name
    assert zig_integer(found.group(1)) == getattr(_native, python_name)


PARAMETER_TYPES: dict[str, set[Any]] = {
    "u32": {ctypes.c_uint32},
    "i32": {ctypes.c_int32},
    "u64": {ctypes.c_uint64},
    "i64": {ctypes.c_int64},
    "?*u32": {ctypes.POINTER(ctypes.c_uint32)},
    "?*u64": {ctypes.POINTER(ctypes.c_uint64)},
    "?[*]u32": {ctypes.POINTER(ctypes.c_uint32)},
    "?[*]const u32": {ctypes.POINTER(ctypes.c_uint32)},
    "?[*]const i32": {ctypes.POINTER(ctypes.c_int32)},
    "?[*]u64": {ctypes.POINTER(ctypes.c_uint64)},
    "?[*]const u64": {ctypes.POINTER(ctypes.c_uint64)},
    "?[*]const u8": {ctypes.c_char_p, ctypes.c_void_p},
    "?*BackendInfo": {ctypes.POINTER(_native.SlotRecord)},
    "?[*]BackendInfo": {ctypes.POINTER(_native.SlotRecord)},
}


RESULT_TYPES: dict[str, Any] = {"i32": ctypes.c_int32, "i64": ctypes.c_int64}


def test_every_export_is_declared_with_its_parameter_and_result_types() -> None:
    exports = re.findall(r"^export fn (\w+)\(([^)]*)\) (\w+) \{", source("abi.zig"), re.MULTILINE)
    assert exports
    assert {name for name, _, _ in exports} == set(_native._SIGNATURES)
    for name, _parameters, result in exports:
        assert _native._RESULT_TYPES.get(name, ctypes.c_int32) is RESULT_TYPES[result], name
        assert getattr(_native._lib, name).restype is RESULT_TYPES[result], name
    for name, parameters, _result in exports:
        zig_types = [part.split(":")[1].strip() for part in parameters.split(",") if part.strip()]
        declared = _native._SIGNATURES[name]
        assert len(declared) == len(zig_types), name
        for position, (zig_type, python_type) in enumerate(zip(zig_types, declared, strict=True)):
            assert python_type in PARAMETER_TYPES[zig_type], (name, position, zig_type, python_type)
