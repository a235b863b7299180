"""Probe: the HTTP/2 codec work of one proxied gRPC unary call, h2 against nghttp2 (cffi).

Run: .venv/bin/python bench/probe_h2codec.py [--calls N] [--rounds R]

Issue 17 asks to measure a C codec before the HTTP/2 path is rebuilt. A proxy relaying a gRPC
unary call does this codec work, on two connections that each stay open for many calls:

- client-facing connection (server role): receive the call (HEADERS + DATA, HPACK decode),
  later send the answer (HEADERS, DATA, trailers: HPACK encode, framing, flow control);
- upstream connection (client role): send the call on, receive the answer.

Both codecs run exactly that on warm connections (HPACK dynamic tables filled, as a
connection's second and later calls are), with the same header blocks and messages (grpcio's
`GetLocation` call as captured in tests/data/http2/grpc_unary.client.bin, and its answer). The
peers (the gRPC client and server) run the same codec and are not timed: only the proxy's two
sessions are, with the thread's CPU clock (`time.thread_time_ns`, so other work on the machine
does not count) around each of their calls. Reported: µs per call, best of R rounds
(alternating), and the ratio h2 / nghttp2.

nghttp2 (Debian `libnghttp2-dev`, the library behind curl and h2load) is reached through a
cffi extension compiled on first use into a temporary directory; nothing is kept. What the
probe does not measure: the per-call Python work of a proxy around either codec (policy,
records), which is the same for both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags; ...; }
    nghttp2_frame_hd;
typedef union { nghttp2_frame_hd hd; ...; } nghttp2_frame;
typedef struct { uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen;
                 uint8_t flags; } nghttp2_nv;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(nghttp2_session *, int32_t, uint8_t *,
    size_t, uint32_t *, nghttp2_data_source *, void *);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; }
    nghttp2_data_provider;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;

#define NGHTTP2_DATA_FLAG_EOF ...
#define NGHTTP2_DATA_FLAG_NO_END_STREAM ...
#define NGHTTP2_HEADERS ...
#define NGHTTP2_DATA ...
#define NGHTTP2_FLAG_END_STREAM ...

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
            const uint8_t *, size_t, uint8_t, void *));
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *));
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, void *));
int nghttp2_session_server_new(nghttp2_session **, const nghttp2_session_callbacks *, void *);
int nghttp2_session_client_new(nghttp2_session **, const nghttp2_session_callbacks *, void *);
void nghttp2_session_del(nghttp2_session *);
ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t);
int32_t nghttp2_submit_request(nghttp2_session *, const void *, const nghttp2_nv *, size_t,
    const nghttp2_data_provider *, void *);
int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
    const nghttp2_data_provider *);
int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);

extern "Python" int on_header(nghttp2_session *, const nghttp2_frame *, const uint8_t *,
    size_t, const uint8_t *, size_t, uint8_t, void *);
extern "Python" int on_data(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t,
    void *);
extern "Python" int on_frame(nghttp2_session *, const nghttp2_frame *, void *);
extern "Python" ssize_t read_body(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *,
    nghttp2_data_source *, void *);
"""

RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
TRAILERS = ((b"grpc-status", b"0"), (b"grpc-message", b""))
RESPONSE_BODY = b"\x00\x00\x00\x00\x0c\n\nthe vault\x10\x01"


def build_nghttp2(workdir: Path) -> Any:
    """The cffi extension for this run, compiled into `workdir`."""
    import cffi  # type: ignore[import-untyped]

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(
        "_garrison_probe_nghttp2", "#include <nghttp2/nghttp2.h>", libraries=["nghttp2"]
    )
    ffibuilder.compile(tmpdir=str(workdir), verbose=False)
    sys.path.insert(0, str(workdir))
    import _garrison_probe_nghttp2 as mod  # type: ignore[import-not-found]

    return mod


class NgSession:
    """One nghttp2 session with the events a proxy needs: header blocks, data, stream ends."""

    def __init__(self, mod: Any, server: bool) -> None:
        ffi, lib = mod.ffi, mod.lib
        self.ffi, self.lib = ffi, lib
        self.handle = ffi.new_handle(self)
        cbs = ffi.new("nghttp2_session_callbacks **")
        lib.nghttp2_session_callbacks_new(cbs)
        lib.nghttp2_session_callbacks_set_on_header_callback(cbs[0], lib.on_header)
        lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs[0], lib.on_data)
        lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs[0], lib.on_frame)
        ptr = ffi.new("nghttp2_session **")
        new = lib.nghttp2_session_server_new if server else lib.nghttp2_session_client_new
        if new(ptr, cbs[0], self.handle) != 0:
            raise RuntimeError("nghttp2_session_new failed")
        lib.nghttp2_session_callbacks_del(cbs[0])
        self.session = ptr[0]
        lib.nghttp2_submit_settings(self.session, 0, ffi.NULL, 0)
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, list[bytes]] = {}
        self.ended: list[int] = []
        self.bodies: dict[int, bytes] = {}
        self.trailers: dict[int, tuple[tuple[bytes, bytes], ...]] = {}
        self._keep: list[Any] = []

    def receive(self, data: bytes) -> None:
        n = self.lib.nghttp2_session_mem_recv(self.session, data, len(data))
        if n != len(data):
            raise RuntimeError(f"nghttp2_session_mem_recv: {n}")

    def send(self) -> bytes:
        out = []
        buf = self.ffi.new("const uint8_t **")
        while True:
            n = self.lib.nghttp2_session_mem_send(self.session, buf)
            if n <= 0:
                break
            out.append(bytes(self.ffi.buffer(buf[0], n)))
        self._keep.clear()
        return b"".join(out)

    def _nva(self, headers: tuple[tuple[bytes, bytes], ...]) -> Any:
        nva = self.ffi.new("nghttp2_nv[]", len(headers))
        for i, (name, value) in enumerate(headers):
            n = self.ffi.from_buffer(name)
            v = self.ffi.from_buffer(value)
            self._keep += (n, v)
            nva[i].name = self.ffi.cast("uint8_t *", n)
            nva[i].value = self.ffi.cast("uint8_t *", v)
            nva[i].namelen = len(name)
            nva[i].valuelen = len(value)
            nva[i].flags = 0
        self._keep.append(nva)
        return nva

    def _provider(self, trailers: bool) -> Any:
        prd = self.ffi.new("nghttp2_data_provider *")
        prd.source.ptr = self.handle if trailers else self.ffi.NULL
        prd.read_callback = self.lib.read_body
        self._keep.append(prd)
        return prd

    def request(self, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> int:
        stream_id = int(
            self.lib.nghttp2_submit_request(
                self.session, self.ffi.NULL, self._nva(headers), len(headers),
                self._provider(False), self.ffi.NULL,
            )
        )
        self.bodies[stream_id] = body
        return stream_id

    def respond(self, stream_id: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes,
                trailers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.bodies[stream_id] = body
        self.trailers[stream_id] = trailers  # submitted when the body is read (nghttp2's way)
        self.lib.nghttp2_submit_response(
            self.session, stream_id, self._nva(headers), len(headers), self._provider(True)
        )

    def submit_trailers(self, stream_id: int) -> None:
        trailers = self.trailers.pop(stream_id)
        self.lib.nghttp2_submit_trailer(self.session, stream_id, self._nva(trailers),
                                        len(trailers))


def install_callbacks(mod: Any) -> None:
    ffi, lib = mod.ffi, mod.lib

    @ffi.def_extern()  # type: ignore[untyped-decorator]
    def on_header(session: Any, frame: Any, name: Any, namelen: int, value: Any,
                  valuelen: int, flags: int, user: Any) -> int:
        me: NgSession = ffi.from_handle(user)
        sid = frame.hd.stream_id
        me.headers.setdefault(sid, []).append(
            (ffi.unpack(ffi.cast("char *", name), namelen),
             ffi.unpack(ffi.cast("char *", value), valuelen))
        )
        return 0

    @ffi.def_extern()  # type: ignore[untyped-decorator]
    def on_data(session: Any, flags: int, sid: int, data: Any, length: int, user: Any) -> int:
        me: NgSession = ffi.from_handle(user)
        me.data.setdefault(sid, []).append(bytes(ffi.buffer(data, length)))
        return 0

    @ffi.def_extern()  # type: ignore[untyped-decorator]
    def on_frame(session: Any, frame: Any, user: Any) -> int:
        if frame.hd.flags & lib.NGHTTP2_FLAG_END_STREAM and frame.hd.type in (
            lib.NGHTTP2_HEADERS, lib.NGHTTP2_DATA
        ):
            me: NgSession = ffi.from_handle(user)
            me.ended.append(frame.hd.stream_id)
        return 0

    @ffi.def_extern()  # type: ignore[untyped-decorator]
    def read_body(session: Any, sid: int, buf: Any, length: int, flags: Any, source: Any,
                  user: Any) -> int:
        me: NgSession = ffi.from_handle(user)
        body = me.bodies.pop(sid, b"")
        n = min(len(body), length)
        ffi.memmove(buf, body, n)
        flags[0] = lib.NGHTTP2_DATA_FLAG_EOF
        if source.ptr != ffi.NULL:  # the answer ends with trailers, not with this DATA
            flags[0] |= lib.NGHTTP2_DATA_FLAG_NO_END_STREAM
            me.submit_trailers(sid)
        return n


class H2Session:
    """The same events with h2 (the library garrison's HTTP/2 path uses today)."""

    def __init__(self, server: bool) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=not server, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, list[bytes]] = {}
        self.ended: list[int] = []

    def receive(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived,
                               h2.events.TrailersReceived)):
                self.headers.setdefault(ev.stream_id, []).extend(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                self.data.setdefault(ev.stream_id, []).append(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if isinstance(ev, h2.events.StreamEnded):
                self.ended.append(ev.stream_id)

    def send(self) -> bytes:
        return self.conn.data_to_send()

    def request(self, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, list(headers))
        self.conn.send_data(sid, body, end_stream=True)
        return sid

    def respond(self, stream_id: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes,
                trailers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.conn.send_headers(stream_id, list(headers))
        self.conn.send_data(stream_id, body)
        self.conn.send_headers(stream_id, list(trailers), end_stream=True)


def run(make: Callable[[bool], Any], calls: int, request: tuple[tuple[bytes, bytes], ...],
        body: bytes) -> float:
    """µs of proxy codec work per call over `calls` calls on warm connections."""
    client, proxy_in = make(False), make(True)  # gRPC client -> proxy (server role)
    proxy_out, server = make(False), make(True)  # proxy (client role) -> gRPC server
    proxy_in.receive(client.send())
    client.receive(proxy_in.send())
    server.receive(proxy_out.send())
    proxy_out.receive(server.send())
    clock = time.thread_time_ns  # CPU time: other work on the machine does not count
    spent = 0
    for _ in range(calls):
        client.request(request, body)
        wire = client.send()
        t0 = clock()
        proxy_in.receive(wire)  # the call arrives
        sid_in = proxy_in.ended.pop()
        headers = tuple(proxy_in.headers.pop(sid_in))
        data = b"".join(proxy_in.data.pop(sid_in))
        proxy_out.request(headers, data)  # and goes on upstream
        wire = proxy_out.send() + proxy_in.send()
        spent += clock() - t0
        server.receive(wire[: len(wire)])
        sid_srv = server.ended.pop()
        server.headers.pop(sid_srv), server.data.pop(sid_srv)
        server.respond(sid_srv, RESPONSE_HEADERS, RESPONSE_BODY, TRAILERS)
        wire = server.send()
        t0 = clock()
        proxy_out.receive(wire)  # the answer comes back
        sid_out = proxy_out.ended.pop()
        fields = proxy_out.headers.pop(sid_out)
        answer = b"".join(proxy_out.data.pop(sid_out))
        head, trailers = tuple(fields[:2]), tuple(fields[2:])
        proxy_in.respond(sid_in, head, answer, trailers)  # and goes to the client
        wire = proxy_in.send() + proxy_out.send()
        spent += clock() - t0
        client.receive(wire)
        sid_c = client.ended.pop()
        assert client.data.pop(sid_c) and sid_c == sid_in
        client.headers.pop(sid_c)
    return spent / calls / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from parsers_http2 import captured_call

    request, body = captured_call()
    with tempfile.TemporaryDirectory(prefix="garrison-probe-") as tmp:
        try:
            mod = build_nghttp2(Path(tmp))
        except Exception as exc:  # a probe reports what is missing, in one line
            print(f"probe_h2codec: cannot build the nghttp2 binding ({exc}); run 'apt-get "
                  "install libnghttp2-dev' and '.venv/bin/pip install -e .[bench]'",
                  file=sys.stderr)
            return 1
        install_callbacks(mod)
        results: dict[str, list[float]] = {"h2": [], "nghttp2": []}
        for _ in range(args.rounds):  # alternate, so machine noise hits both alike
            results["h2"].append(run(H2Session, args.calls, request, body))
            results["nghttp2"].append(
                run(lambda server: NgSession(mod, server), args.calls, request, body)
            )
    best = {name: min(values) for name, values in results.items()}
    print(f"proxy codec work per gRPC unary call ({args.calls} calls, best of {args.rounds}):")
    for name, values in results.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:8} {best[name]:7.1f} µs   (rounds: {spread})")
    print(f"  h2 / nghttp2: {best['h2'] / best['nghttp2']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
