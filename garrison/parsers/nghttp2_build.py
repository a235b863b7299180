"""Build the cffi binding of nghttp2 that `garrison.parsers.nghttp2` uses; `make setup` runs it.

    .venv/bin/python -m garrison.parsers.nghttp2_build           # build if missing or stale
    .venv/bin/python -m garrison.parsers.nghttp2_build --force   # build again

An API-mode cffi extension (`garrison/parsers/_nghttp2*.so`, git-ignored) compiled against
Debian's `libnghttp2-dev`: the C declarations below, a little C of garrison's own (header
blocks collected per block and submitted from one buffer, a DATA frame's chunks joined, frame
filters passing a stream frame's numbers, so that Python is called once per header block or
frame it acts on rather than once per field or chunk), and the callbacks nghttp2 calls as
`extern "Python"` functions. The extension carries a digest of this
file's declarations (`garrison_build_digest()`); `garrison.parsers.nghttp2` refuses to load one
that does not match, with the command that fixes it. Nothing here runs at import time of garrison.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import shutil
import sys
import tempfile
from pathlib import Path

MODULE = "garrison.parsers._nghttp2"
PACKAGE_DIR = Path(__file__).resolve().parent

CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;
typedef struct nghttp2_stream nghttp2_stream;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags; ...; }
    nghttp2_frame_hd;
typedef int... nghttp2_headers_category;
typedef struct { nghttp2_frame_hd hd; nghttp2_headers_category cat; ...; } nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
                 uint8_t *opaque_data; size_t opaque_data_len; ...; } nghttp2_goaway;
typedef union { nghttp2_frame_hd hd; nghttp2_headers headers; nghttp2_rst_stream rst_stream;
                nghttp2_goaway goaway; ...; } nghttp2_frame;
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
#define NGHTTP2_FLAG_NONE ...
#define NGHTTP2_FLAG_END_STREAM ...
#define NGHTTP2_FLAG_ACK ...
#define NGHTTP2_NV_FLAG_NO_INDEX ...
#define NGHTTP2_DATA ...
#define NGHTTP2_HEADERS ...
#define NGHTTP2_RST_STREAM ...
#define NGHTTP2_SETTINGS ...
#define NGHTTP2_GOAWAY ...
#define NGHTTP2_HCAT_REQUEST ...
#define NGHTTP2_HCAT_RESPONSE ...
#define NGHTTP2_HCAT_HEADERS ...
#define NGHTTP2_ERR_DEFERRED ...
#define NGHTTP2_ERR_CALLBACK_FAILURE ...
#define NGHTTP2_ERR_BAD_CLIENT_MAGIC ...
#define NGHTTP2_ERR_FLOODED ...
#define NGHTTP2_SETTINGS_HEADER_TABLE_SIZE ...
#define NGHTTP2_SETTINGS_ENABLE_PUSH ...
#define NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS ...
#define NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE ...
#define NGHTTP2_SETTINGS_MAX_FRAME_SIZE ...
#define NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE ...
#define NGHTTP2_STREAM_STATE_OPEN ...
#define NGHTTP2_STREAM_STATE_HALF_CLOSED_REMOTE ...

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, void *));
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
            const uint8_t *, size_t, uint8_t, void *));
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *));
void nghttp2_session_callbacks_set_on_begin_frame_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame_hd *, void *));
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, void *));
void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, void *));
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, int, void *));
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, int32_t, uint32_t, void *));

int nghttp2_option_new(nghttp2_option **);
void nghttp2_option_del(nghttp2_option *);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int);
void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *, uint32_t);
void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *, size_t);
void nghttp2_option_set_max_continuations(nghttp2_option *, size_t);
void nghttp2_option_set_no_closed_streams(nghttp2_option *, int);
void nghttp2_option_set_max_send_header_block_length(nghttp2_option *, size_t);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t);

int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
    const nghttp2_option *);
int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
    const nghttp2_option *);
void nghttp2_session_del(nghttp2_session *);
ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
int nghttp2_session_resume_data(nghttp2_session *, int32_t);
int nghttp2_session_consume(nghttp2_session *, int32_t, size_t);
int nghttp2_session_consume_connection(nghttp2_session *, size_t);
int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_stream_effective_local_window_size(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_stream_effective_recv_data_length(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_effective_local_window_size(nghttp2_session *);
int32_t nghttp2_session_get_local_window_size(nghttp2_session *);
int32_t nghttp2_session_get_stream_local_window_size(nghttp2_session *, int32_t);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int);
uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *);
size_t nghttp2_session_get_hd_deflate_dynamic_table_size(nghttp2_session *);
nghttp2_stream *nghttp2_session_find_stream(nghttp2_session *, int32_t);
int nghttp2_stream_get_state(nghttp2_stream *);
int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t);
int32_t nghttp2_submit_headers(nghttp2_session *, uint8_t, int32_t, const void *,
    const nghttp2_nv *, size_t, void *);
int nghttp2_submit_data(nghttp2_session *, uint8_t, int32_t, const nghttp2_data_provider *);
int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);
int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t);
int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *,
    size_t);
int nghttp2_session_terminate_session2(nghttp2_session *, int32_t, uint32_t);
const char *nghttp2_strerror(int);
int nghttp2_check_header_name(const uint8_t *, size_t);
int nghttp2_check_header_value(const uint8_t *, size_t);

const char *garrison_build_digest(void);
typedef struct {
    void *handle;
    uint8_t *buf; size_t len;
    size_t *lengths; uint8_t *flags; size_t count;
    size_t list_size; size_t max_list_size; int oversize;
    uint8_t *data; size_t data_len;
    ...;
} garrison_block;
garrison_block *garrison_block_new(void *, size_t);
void garrison_block_free(garrison_block *);
int garrison_on_begin_headers_c(nghttp2_session *, const nghttp2_frame *, void *);
int garrison_on_begin_frame_c(nghttp2_session *, const nghttp2_frame_hd *, void *);
int garrison_on_data_chunk_c(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t,
    void *);
int garrison_on_frame_recv_c(nghttp2_session *, const nghttp2_frame *, void *);
int garrison_on_frame_send_c(nghttp2_session *, const nghttp2_frame *, void *);
int garrison_on_header_c(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
    const uint8_t *, size_t, uint8_t, void *);
int32_t garrison_submit_headers(nghttp2_session *, uint8_t, int32_t, const uint8_t *,
    const size_t *, const uint8_t *, size_t);

extern "Python" int garrison_on_frame_recv(nghttp2_session *, const nghttp2_frame *, void *);
extern "Python" int garrison_on_stream_frame(void *, uint8_t, int32_t, uint8_t, int);
extern "Python" int garrison_on_frame_send(nghttp2_session *, const nghttp2_frame *, void *);
extern "Python" int garrison_on_invalid_frame(nghttp2_session *, const nghttp2_frame *, int,
    void *);
extern "Python" int garrison_on_stream_close(nghttp2_session *, int32_t, uint32_t, void *);
extern "Python" ssize_t garrison_read_data(nghttp2_session *, int32_t, uint8_t *, size_t,
    uint32_t *, nghttp2_data_source *, void *);
"""

SOURCE_TEMPLATE = """
#include <stdlib.h>
#include <nghttp2/nghttp2.h>
#include <string.h>
static const char *garrison_build_digest(void) {{ return "{digest}"; }}

/* The header block being received, collected in C (one Python call per block instead of one
   per field): the names and values one after the other in `buf`, their lengths (name, value,
   ...) in `lengths`, nghttp2's flags per field (NO_INDEX: the sender marked it never-indexed)
   in `flags`. `list_size` counts RFC 9113 §6.5.2 sizes; past `max_list_size` the field is
   refused and `oversize` set. Likewise the payload of the DATA frame being received, in
   `data` (its chunks joined; read once, when the frame is complete). The session's user
   data; `handle` is the Python object. */
typedef struct {{
    void *handle;
    uint8_t *buf; size_t len, cap;
    size_t *lengths; uint8_t *flags; size_t count, fields_cap;
    size_t list_size, max_list_size; int oversize;
    uint8_t *data; size_t data_len, data_cap;
}} garrison_block;

static garrison_block *garrison_block_new(void *handle, size_t max_list_size) {{
    garrison_block *b = calloc(1, sizeof(garrison_block));
    if (b == NULL) return NULL;
    b->handle = handle;
    b->max_list_size = max_list_size;
    return b;
}}

static void garrison_block_free(garrison_block *b) {{
    if (b == NULL) return;
    free(b->buf); free(b->lengths); free(b->flags); free(b->data); free(b);
}}

/* Only the frames the Python side acts on cross into Python; DATA, HEADERS and RST_STREAM
   with the few numbers it reads (no frame struct to read field by field from Python). */
static int garrison_on_frame_recv(nghttp2_session *, const nghttp2_frame *, void *);
static int garrison_on_stream_frame(void *, uint8_t, int32_t, uint8_t, int);
static int garrison_on_frame_send(nghttp2_session *, const nghttp2_frame *, void *);

static int garrison_on_frame_recv_c(nghttp2_session *s, const nghttp2_frame *f, void *u) {{
    switch (f->hd.type) {{
    case NGHTTP2_DATA: case NGHTTP2_RST_STREAM:
        return garrison_on_stream_frame(u, f->hd.type, f->hd.stream_id, f->hd.flags, 0);
    case NGHTTP2_HEADERS:
        return garrison_on_stream_frame(u, f->hd.type, f->hd.stream_id, f->hd.flags,
                                        (int)f->headers.cat);
    case NGHTTP2_GOAWAY:
        return garrison_on_frame_recv(s, f, u);
    default:
        return 0;
    }}
}}

static int garrison_on_frame_send_c(nghttp2_session *s, const nghttp2_frame *f, void *u) {{
    if (f->hd.type == NGHTTP2_RST_STREAM || f->hd.type == NGHTTP2_GOAWAY)
        return garrison_on_frame_send(s, f, u);
    return 0;
}}

/* A DATA frame's chunks are joined in C: its payload reaches Python once, with the frame.
   A frame's chunks come between its header and its end (nghttp2 reads one frame at a time),
   so a new DATA frame header starts an empty payload (dropping chunks of a frame nghttp2
   then ignored). */
static int garrison_on_begin_frame_c(nghttp2_session *s, const nghttp2_frame_hd *hd, void *u) {{
    if (hd->type == NGHTTP2_DATA) ((garrison_block *)u)->data_len = 0;
    return 0;
}}

static int garrison_on_data_chunk_c(nghttp2_session *s, uint8_t flags, int32_t sid,
    const uint8_t *data, size_t len, void *u) {{
    garrison_block *b = u;
    if (b->data_len + len > b->data_cap) {{
        size_t cap = b->data_cap ? b->data_cap : 1024;
        while (cap < b->data_len + len) cap *= 2;
        uint8_t *nb = realloc(b->data, cap);
        if (nb == NULL) return NGHTTP2_ERR_CALLBACK_FAILURE;
        b->data = nb; b->data_cap = cap;
    }}
    memcpy(b->data + b->data_len, data, len);
    b->data_len += len;
    return 0;
}}

static int garrison_on_begin_headers_c(nghttp2_session *s, const nghttp2_frame *f, void *u) {{
    garrison_block *b = u;
    b->len = 0; b->count = 0; b->list_size = 0;
    return 0;
}}

static int garrison_on_header_c(nghttp2_session *s, const nghttp2_frame *f,
    const uint8_t *name, size_t namelen, const uint8_t *value, size_t valuelen,
    uint8_t flags, void *u) {{
    garrison_block *b = u;
    b->list_size += namelen + valuelen + 32;
    if (b->list_size > b->max_list_size) {{ b->oversize = 1; return NGHTTP2_ERR_CALLBACK_FAILURE; }}
    if (b->len + namelen + valuelen > b->cap) {{
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + namelen + valuelen) cap *= 2;
        uint8_t *nb = realloc(b->buf, cap);
        if (nb == NULL) return NGHTTP2_ERR_CALLBACK_FAILURE;
        b->buf = nb; b->cap = cap;
    }}
    if (b->count == b->fields_cap) {{
        size_t cap = b->fields_cap ? b->fields_cap * 2 : 32;
        size_t *nl = realloc(b->lengths, 2 * cap * sizeof(size_t));
        if (nl == NULL) return NGHTTP2_ERR_CALLBACK_FAILURE;
        b->lengths = nl;
        uint8_t *nf = realloc(b->flags, cap);
        if (nf == NULL) return NGHTTP2_ERR_CALLBACK_FAILURE;
        b->flags = nf; b->fields_cap = cap;
    }}
    memcpy(b->buf + b->len, name, namelen); b->len += namelen;
    memcpy(b->buf + b->len, value, valuelen); b->len += valuelen;
    b->lengths[2 * b->count] = namelen;
    b->lengths[2 * b->count + 1] = valuelen;
    b->flags[b->count] = flags;
    b->count++;
    return 0;
}}

/* nghttp2_submit_headers for a header block given as one buffer: the names and values one
   after the other, their lengths (name, value, name, ...) and one nghttp2_nv flag per field.
   Saves building the nghttp2_nv array field by field from Python; nghttp2 copies it. */
static int32_t garrison_submit_headers(nghttp2_session *session, uint8_t flags,
    int32_t stream_id, const uint8_t *blob, const size_t *lengths, const uint8_t *nvflags,
    size_t n) {{
    nghttp2_nv local[32] = {{{{0}}}};
    nghttp2_nv *nva = n <= 32 ? local : malloc(n * sizeof(nghttp2_nv));
    if (nva == NULL) return NGHTTP2_ERR_NOMEM;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {{
        nva[i].name = (uint8_t *)blob + off;
        nva[i].namelen = lengths[2 * i];
        off += lengths[2 * i];
        nva[i].value = (uint8_t *)blob + off;
        nva[i].valuelen = lengths[2 * i + 1];
        off += lengths[2 * i + 1];
        nva[i].flags = nvflags[i];
    }}
    int32_t rv = nghttp2_submit_headers(session, flags, stream_id, NULL, nva, n, NULL);
    if (nva != local) free(nva);
    return rv;
}}
"""


def digest() -> str:
    """What a fresh build carries: the declarations and the C source, hashed."""
    return hashlib.sha256((CDEF + SOURCE_TEMPLATE).encode()).hexdigest()[:32]


def extension_path() -> Path:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return PACKAGE_DIR / ("_nghttp2" + suffix)


def is_fresh() -> bool:
    """The extension exists and was built from these declarations (read from the file, so
    that nothing is imported)."""
    path = extension_path()
    return path.exists() and digest().encode() in path.read_bytes()


def build() -> Path:
    """Compile the extension into the package directory; returns its path."""
    import cffi  # type: ignore[import-untyped]

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(
        MODULE, SOURCE_TEMPLATE.format(digest=digest()), libraries=["nghttp2"]
    )
    with tempfile.TemporaryDirectory(prefix="garrison-nghttp2-") as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        target = extension_path()
        tmp_target = target.with_suffix(".tmp")
        shutil.copyfile(built, tmp_target)
        tmp_target.replace(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even if up to date")
    args = parser.parse_args()
    if not args.force and is_fresh():
        print("nghttp2 binding: up to date", file=sys.stderr)
        return 0
    try:
        path = build()
    except Exception as exc:  # one line: what failed and what fixes it
        print(
            f"nghttp2 binding: build failed ({type(exc).__name__}: {exc}); it needs gcc, the "
            "Python headers and nghttp2's (Debian: apt-get install gcc python3-dev "
            "libnghttp2-dev) and cffi (pip install -e .)",
            file=sys.stderr,
        )
        return 1
    print(f"nghttp2 binding: built {path.relative_to(PACKAGE_DIR.parent.parent)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
