#!/usr/bin/env python3
"""A grpcio client for the door manager: one call, its answer or its status on stdout.

    python examples/grpc/doors_client.py --target 127.0.0.1:50050 GetName --door front
    python examples/grpc/doors_client.py --target 127.0.0.1:50050 SetAccessCode --code 1234
    python examples/grpc/doors_client.py --target 127.0.0.1:50050 GetStatus
    python examples/grpc/doors_client.py --target 127.0.0.1:50050 RequestMaintenance \\
        --reason hinge --reason lock

Prints the decoded reply fields (`{1: 'door front'}`), or `<STATUS>: <details>` for a failed
call (`PERMISSION_DENIED: Access denied` when policy denies it). Exit status 0 on success,
1 when the call failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import doors  # the service next to this file


def call(target: str, method: str, door: str, code: str, reasons: list[str]) -> list[dict]:
    """Make one call; returns the decoded replies (several for GetStatus)."""
    with grpc.insecure_channel(target) as channel:
        path = doors.path(method)
        request = (
            doors.message((1, door), (2, code))
            if method == "SetAccessCode"
            else (doors.message((1, door)))
        )
        if method in doors.SERVER_STREAMING:
            return [doors.decode(r) for r in channel.unary_stream(path)(request, timeout=10)]
        if method in doors.CLIENT_STREAMING:
            items = iter([doors.message((1, door), (2, r)) for r in reasons or ["check"]])
            return [doors.decode(channel.stream_unary(path)(items, timeout=10))]
        return [doors.decode(channel.unary_unary(path)(request, timeout=10))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--target", default="127.0.0.1:50050", metavar="HOST:PORT")
    parser.add_argument("method", choices=doors.METHODS)
    parser.add_argument("--door", default="front")
    parser.add_argument("--code", default="0000", help="SetAccessCode's new code")
    parser.add_argument("--reason", action="append", default=[], help="RequestMaintenance")
    args = parser.parse_args(argv)
    try:
        replies = call(args.target, args.method, args.door, args.code, args.reason)
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}")
        return 1
    for reply in replies:
        print({k: v.decode() if isinstance(v, bytes) else v for k, v in reply.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
