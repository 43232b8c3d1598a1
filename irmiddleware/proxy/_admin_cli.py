"""`irmiddleware admin`: the admin API of a running router, from the command line.

    irmiddleware admin list
    irmiddleware admin --token-file /etc/irm/admin.token add http://10.0.0.7:8000 --capacity 64
    IRM_ADMIN_TOKEN=... irmiddleware admin drain 3 --wait 60
    irmiddleware admin remove 3

Exit codes: 0 done; 1 the router refused the call (its message is printed); 2 bad usage; 3 the
admin listener could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Final

import httpx

__all__ = ["admin_main"]

_TOKEN_ENV: Final = "IRM_ADMIN_TOKEN"
_POLL_S: Final = 0.2


class _Refused(Exception):
    """The admin API answered with an error status."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irmiddleware admin",
        description="Change a running router's fleet through its admin listener ([admin] listen).",
    )
    parser.add_argument(
        "--url",
        dest="admin_url",
        metavar="URL",
        default="http://127.0.0.1:9090",
        help="the admin listener (default http://127.0.0.1:9090)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the admin token (default: the {_TOKEN_ENV} environment variable)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="seconds per call (default 30)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="every backend with its state and load")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    add = commands.add_parser("add", help="add a backend (probed and asked its models first)")
    add.add_argument("url", metavar="URL", help="the backend's base URL")
    add.add_argument("--type", default="vllm", help="adapter (default vllm)")
    add.add_argument("--capacity", type=int, help="cost units it may hold (default 64)")
    add.add_argument("--weight", type=float, help="weight (default 1.0)")
    add.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model it serves (repeatable; default: ask it)",
    )
    drain = commands.add_parser("drain", help="no new requests; those in flight finish")
    drain.add_argument("id", type=int, metavar="ID")
    drain.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="then wait until it is drained, at most this long",
    )
    undrain = commands.add_parser("undrain", help="end a drain")
    undrain.add_argument("id", type=int, metavar="ID")
    remove = commands.add_parser("remove", help="remove a drained backend")
    remove.add_argument("id", type=int, metavar="ID")
    change = commands.add_parser("set", help="change a backend's capacity and/or weight")
    change.add_argument("id", type=int, metavar="ID")
    change.add_argument("--capacity", type=int)
    change.add_argument("--weight", type=float)
    return parser


def admin_main(argv: list[str] | None = None) -> int:
    """Runs one admin command; returns the exit code (module docstring)."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "set" and args.capacity is None and args.weight is None:
        parser.error("set needs --capacity and/or --weight")
    try:
        token = _token(args.token_file)
    except OSError as error:
        print(f"irmiddleware admin: cannot read {args.token_file}: {error.strerror}", file=sys.stderr)
        return 2
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(
            base_url=args.admin_url.rstrip("/"), headers=headers, timeout=args.timeout
        ) as client:
            _run(client, args)
    except _Refused as refused:
        print(f"irmiddleware admin: {refused}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        print(
            f"irmiddleware admin: cannot reach the admin listener at {args.admin_url}: {error}",
            file=sys.stderr,
        )
        return 3
    return 0


def _token(path: str | None) -> str | None:
    if path is not None:
        with open(path, encoding="utf-8") as file:
            return file.read().strip() or None
    return os.environ.get(_TOKEN_ENV, "").strip() or None


def _run(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.command == "list":
        backends = _call(client, "GET", "/admin/backends")["backends"]
        print(json.dumps(backends, indent=2) if args.json else _table(backends))
        return
    if args.command == "add":
        body: dict[str, Any] = {"url": args.url, "type": args.type}
        body.update(
            {k: v for k, v in (("capacity", args.capacity), ("weight", args.weight)) if v is not None}
        )
        if args.model:
            body["models"] = args.model
        print(_table([_call(client, "POST", "/admin/backends", body)]))
        return
    path = f"/admin/backends/{args.id}"
    if args.command == "remove":
        _call(client, "DELETE", path)
        print(f"backend {args.id} removed")
    elif args.command == "set":
        print(_table([_call(client, "PATCH", path, _given(capacity=args.capacity, weight=args.weight))]))
    else:
        backend = _call(client, "POST", f"{path}/{args.command}")
        if args.command == "drain" and args.wait is not None:
            backend = _wait_drained(client, path, args.wait)
        print(_table([backend]))


def _given(**values: object) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}


def _wait_drained(client: httpx.Client, path: str, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        backend: dict[str, Any] = _call(client, "GET", path)
        if backend["state"] == "drained":
            return backend
        if time.monotonic() >= deadline:
            raise _Refused(
                f"backend {backend['id']} is not drained after {wait_s:g} s "
                f"({backend['requests_in_flight']} in flight)"
            )
        time.sleep(_POLL_S)


def _call(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    response = client.request(method, path, json=body)
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": response.text.strip() or response.reason_phrase}
    if response.status_code >= 400:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise _Refused(f"{response.status_code} {message or response.reason_phrase}")
    return answer


def _table(backends: list[dict[str, Any]]) -> str:
    rows = [("ID", "URL", "TYPE", "STATE", "CAPACITY", "WEIGHT", "LOAD", "IN FLIGHT", "MODELS")]
    for b in backends:
        rows.append(
            (
                str(b["id"]),
                b["url"],
                b["type"],
                b["state"],
                str(b["capacity"]),
                f"{b['weight']:g}",
                str(b["load"]),
                str(b["requests_in_flight"]),
                ",".join(b["models"]) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
