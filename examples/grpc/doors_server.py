#!/usr/bin/env python3
"""The door manager: a grpcio server for `doors.DoorManager` (doors.proto).

    python examples/grpc/doors_server.py --listen 127.0.0.1:50051

Methods: GetName, GetLocation, SetAccessCode (unary), RequestMaintenance (client-streaming),
GetStatus (server-streaming, three updates). Once listening it prints
`doors_server listening on HOST:PORT` (port 0 picks a free port) and serves until SIGTERM or
SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import doors  # the service next to this file


def serve(listen: str, workers: int) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers([doors.handler()])
    port = server.add_insecure_port(listen)
    if not port:
        sys.exit(f"doors_server: cannot listen on {listen}")
    server.start()
    host = listen.rsplit(":", 1)[0]
    print(f"doors_server listening on {host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0).wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT")
    parser.add_argument("--workers", type=int, default=8, help="handler threads")
    args = parser.parse_args(argv)
    serve(args.listen, args.workers)


if __name__ == "__main__":
    main()
