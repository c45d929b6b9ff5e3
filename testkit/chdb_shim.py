#!/usr/bin/env python3
"""ClickHouse's HTTP interface on top of chdb, for the store tests on a
current engine.

Debian's clickhouse-server is 18.16; the profiler's ClickHouse store must
also work on a current ClickHouse. chdb (PyPI `chdb-core`, installed by
`cargo xtask setup`) embeds a current ClickHouse engine in Python, without a
server. This script puts the subset of the HTTP interface that the store and
profiler_testkit::current use in front of it:

* POST (or GET) `/`: the SQL is the `query` URL parameter followed by the
  body on a new line, or the body alone. Answers in TabSeparated unless the
  SQL says `FORMAT X`; the bytes are passed through as the engine writes them.
* `INSERT INTO t [(columns)] FORMAT F` in `query` with rows in the body: the
  rows go to chdb's streaming insert, so the engine parses them (RowBinary
  or any input format), not this script.
* External data: a multipart/form-data body whose part NAME becomes a
  temporary table NAME of columns `NAME_structure`, read in `NAME_format`
  (TabSeparated if absent), for the duration of the request.
* Any other URL parameter is a setting, set for the request and then put
  back; an unknown one fails as on ClickHouse.
* `/ping` and an empty `/` answer `Ok.`.
* An error answers HTTP 500 with the engine's message
  (`Code: N. DB::Exception: …`).

Limits: one engine session serves one request at a time; no authentication
(the Authorization header is ignored), no compression, no HTTP sessions, no
`database` parameter (name tables with their database), no `param_*` query
parameters, no streaming of answers (each is built in memory).

Usage: chdb_shim.py --path DIR [--host 127.0.0.1] [--port 0] [--verbose]
Prints `LISTENING <port>` on stdout once it accepts connections.
"""
import argparse
import email.parser
import email.policy
import re
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

try:
    from chdb import session as chdb_session
except ImportError as e:
    sys.exit(f"chdb_shim: cannot import chdb ({e}): `cargo xtask setup` installs chdb-core for python3")

# URL parameters of the HTTP interface that are not settings.
NOT_SETTINGS = {
    "query", "database", "user", "password", "query_id", "session_id",
    "session_timeout", "session_check", "default_format", "compress",
    "decompress", "buffer_size", "wait_end_of_query", "quota_key",
    "stacktrace", "role",
}
INSERT_WITH_ROWS = re.compile(r"(?is)^\s*(INSERT\s+INTO\s+.+?)\s+FORMAT\s+(\w+)\s*;?\s*$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EngineError(Exception):
    """A request the engine (or this script) refuses: answered with HTTP 500."""


class Engine:
    """One chdb session on a data dir, used by one request at a time."""

    def __init__(self, path):
        self.session = chdb_session.Session(path)
        self.lock = threading.Lock()

    def run(self, sql):
        try:
            result = self.session.query(sql, "TabSeparated")
        except Exception as e:  # chdb raises on a failed query
            raise EngineError(str(e)) from None
        if result is None:
            return b""
        if result.has_error():
            raise EngineError(result.error_message())
        return result.bytes()

    def insert(self, statement, fmt, rows):
        try:
            with self.session.send_insert(statement, fmt) as inserter:
                if rows:
                    inserter.append(rows)
                inserter.finish()
        except Exception as e:
            raise EngineError(str(e)) from None

    def serve(self, params, body, content_type):
        """Runs one request; returns the answer's body or raises EngineError."""
        query = params.get("query", "")
        externals = []
        if content_type.lower().startswith("multipart/form-data"):
            externals = external_tables(params, content_type, body)
            body = b""
        external_params = {f"{name}_{what}" for name, *_ in externals for what in ("structure", "format")}
        settings = [
            (key, value)
            for key, value in params.items()
            if key not in NOT_SETTINGS and key not in external_params
        ]
        restore, created = [], []
        try:
            for key, value in settings:
                if not IDENTIFIER.match(key):
                    raise EngineError(f"bad setting name {key!r}")
                old = self.run(f"SELECT toString(getSetting({literal(key)}))").decode().rstrip("\n")
                self.run(f"SET {key} = {literal(value)}")
                restore.append((key, old))
            for name, structure, fmt, rows in externals:
                self.run(f"DROP TEMPORARY TABLE IF EXISTS {name}")
                self.run(f"CREATE TEMPORARY TABLE {name} ({structure}) ENGINE = Memory")
                created.append(name)
                self.insert(f"INSERT INTO {name}", fmt, rows)
            insert = INSERT_WITH_ROWS.match(query) if body else None
            if insert:
                self.insert(insert.group(1), insert.group(2), body)
                return b""
            sql = "\n".join(
                part for part in (query, body.decode("utf-8", "surrogateescape")) if part
            )
            if not sql.strip():
                raise EngineError("Empty query")
            return self.run(sql)
        finally:
            # Best effort: a failure here must not hide the request's own error.
            for name in created:
                try:
                    self.run(f"DROP TEMPORARY TABLE IF EXISTS {name}")
                except EngineError:
                    pass
            for key, old in restore:
                try:
                    self.run(f"SET {key} = {literal(old)}")
                except EngineError:
                    pass


def literal(text):
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def external_tables(params, content_type, body):
    """[(name, structure, format, rows)] of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise EngineError("cannot parse the multipart/form-data body")
    tables = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name or not IDENTIFIER.match(name):
            raise EngineError(f"bad external table name {name!r}")
        structure = params.get(f"{name}_structure")
        if structure is None:
            raise EngineError(f"external table {name} has no {name}_structure parameter")
        fmt = params.get(f"{name}_format", "TabSeparated")
        tables.append((name, structure, fmt, part.get_payload(decode=True) or b""))
    return tables


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body
    # would wait for the client's delayed ACK of the headers (~40 ms a request).
    disable_nagle_algorithm = True
    engine = None  # set by main()
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("chdb_shim: " + fmt % args + "\n")

    def do_GET(self):
        self.answer(b"")

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.answer(self.read_chunked())
        else:
            self.answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def read_chunked(self):
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                # Skip the trailer up to its empty line.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def answer(self, body):
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if url.path == "/ping" or (url.path == "/" and not params and not body):
            return self.reply(200, b"Ok.\n")
        with self.engine.lock:
            try:
                status, out = 200, self.engine.serve(params, body, self.headers.get("Content-Type", ""))
            except EngineError as e:
                status, out = 500, (str(e).strip() + "\n").encode("utf-8", "replace")
            except Exception:  # a bug of this script: show it to the client
                status, out = 500, traceback.format_exc().encode()
        if status != 200 or self.verbose:
            # Errors always go to stderr, which the test harness shows on failure.
            sql = params.get("query") or body[:200].decode("utf-8", "replace")
            sys.stderr.write(f"chdb_shim: {status} {sql[:2000]!r}: {out[:2000]!r}\n")
        self.reply(status, out)

    def reply(self, status, out):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="the engine's data dir (kept across runs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()
    Handler.engine = Engine(args.path)
    Handler.verbose = args.verbose
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
