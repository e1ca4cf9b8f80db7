#!/usr/bin/env python3
"""Opens N keep-alive TLS connections to a proxy and holds them idle, for memory measurements.

Usage: idle_conns.py HOST PORT N [--path /] [--parallel 200] [--timeout 120] [--h2]

Each connection completes the TLS handshake (ALPN http/1.1, or h2 with --h2; no certificate
check: the benchmark certificate is self-signed) and one GET request, whose response is read
whole; then it stays open and silent. With --h2 the client sends the connection preface, an
empty SETTINGS frame and the request on stream 1, acknowledges the server's SETTINGS, and reads
until the response's END_STREAM. When all are done (or the timeout passed), one line goes to stdout:
    READY open=N failed=F seconds=S
and the connections are held until a line (or EOF) arrives on stdin. Then it reports how many
the server had closed meanwhile, as
    HELD open=N closed=C
and exits, closing everything. Used by benches/compare.sh; standard library only.
"""

import argparse
import errno
import resource
import selectors
import socket
import ssl
import sys
import time


def raise_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS_ACK = bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])


def h2_frame(kind, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_request(path):
    """Preface, empty SETTINGS, and GET `path` as HEADERS on stream 1 (END_STREAM|END_HEADERS).
    HPACK as curl and browsers send a first request: :method GET and :scheme https from the
    static table, :path literal without indexing, and :authority, user-agent and accept literal
    with incremental indexing (static names 1, 58, 19), so that the server keeps them in its
    dynamic table for the connection's life as it does for a real client. Not Huffman-coded:
    the standard library has no coder."""
    def literal(index, value, indexed):
        value = value.encode()
        assert index < 63 and len(value) < 127
        return bytes([(0x40 | index) if indexed else index, len(value)]) + value

    block = (bytes([0x82, 0x87]) + literal(4, path, False) + literal(1, "localhost", True)
             + literal(58, "idle_conns.py/1", True) + literal(19, "*/*", True))
    return H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_frame(1, 0x5, 1, block)


def h2_response_complete(conn):
    """Consumes whole frames from conn.buf; True once stream 1 has ended with status 200.
    Acknowledges the server's SETTINGS; GOAWAY or RST_STREAM fails the connection."""
    while len(conn.buf) >= 9:
        length = int.from_bytes(conn.buf[:3], "big")
        if len(conn.buf) < 9 + length:
            return False
        kind, flags, stream = conn.buf[3], conn.buf[4], int.from_bytes(conn.buf[5:9], "big") & 0x7FFFFFFF
        payload, conn.buf = conn.buf[9:9 + length], conn.buf[9 + length:]
        if kind == 4 and not flags & 1:
            conn.tls.sendall(H2_SETTINGS_ACK)
        elif kind == 7:
            raise ConnectionError(f"GOAWAY {payload[4:8].hex()}")
        elif kind == 3 and stream == 1:
            raise ConnectionError(f"RST_STREAM {payload.hex()}")
        elif kind == 1 and stream == 1 and payload[:1] != b"\x88":
            raise ConnectionError(f"response HEADERS not :status 200: {payload[:8].hex()}")
        if stream == 1 and kind in (0, 1) and flags & 1:
            return True
    return False


class Conn:
    __slots__ = ("sock", "tls", "state", "buf", "need")

    def __init__(self, sock):
        self.sock = sock
        self.tls = None
        self.state = "connect"
        self.buf = b""
        self.need = None  # total bytes of head + body once the head is parsed


def response_complete(conn):
    """True once a whole response (Content-Length framed) is in conn.buf."""
    if conn.need is None:
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = conn.buf[:end].decode("latin-1").split("\r\n")
        if not (head[0].startswith("HTTP/1.") and head[0][9:10] == "2"):
            raise ConnectionError(f"status line {head[0]!r}")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "transfer-encoding":
                raise ConnectionError("chunked response; this client expects Content-Length")
        conn.need = end + 4 + length
    return len(conn.buf) >= conn.need


def h2_goaway(conn, data):
    """True if `data` (frames read from an idle HTTP/2 connection) holds a GOAWAY."""
    conn.buf = data
    while len(conn.buf) >= 9:
        length, kind = int.from_bytes(conn.buf[:3], "big"), conn.buf[3]
        if kind == 7:
            return True
        conn.buf = conn.buf[9 + length:]
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--path", default="/")
    ap.add_argument("--parallel", type=int, default=200, help="connections in setup at once")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--h2", action="store_true", help="HTTP/2 (ALPN h2) instead of HTTP/1.1")
    args = ap.parse_args()

    limit = raise_fd_limit(args.n + 64)
    if limit < args.n + 16:
        sys.exit(f"idle_conns: open-file limit {limit} is too low for {args.n} connections")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"] if args.h2 else ["http/1.1"])
    request = f"GET {args.path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: idle_conns\r\n\r\n".encode()
    complete = response_complete
    if args.h2:
        request, complete = h2_request(args.path), h2_response_complete

    sel = selectors.DefaultSelector()
    idle, failed, started, in_setup = [], 0, 0, 0
    deadline = time.monotonic() + args.timeout
    t0 = time.monotonic()

    def fail(conn, why):
        nonlocal failed, in_setup
        failed += 1
        in_setup -= 1
        if failed <= 5:
            print(f"idle_conns: connection failed: {why}", file=sys.stderr)
        try:
            sel.unregister(conn.sock if conn.tls is None else conn.tls)
        except (KeyError, ValueError):
            pass
        (conn.tls or conn.sock).close()

    def wait_for(conn, events):
        fileobj = conn.tls or conn.sock
        try:
            sel.modify(fileobj, events, conn)
        except KeyError:
            sel.register(fileobj, events, conn)

    def step(conn):
        """Advances one connection as far as it can go without blocking."""
        nonlocal in_setup
        if conn.state == "connect":
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ConnectionError(f"connect: {errno.errorcode.get(err, err)}")
            sel.unregister(conn.sock)
            conn.tls = ctx.wrap_socket(conn.sock, server_hostname="localhost", do_handshake_on_connect=False)
            conn.state = "handshake"
        if conn.state == "handshake":
            try:
                conn.tls.do_handshake()
            except ssl.SSLWantReadError:
                return wait_for(conn, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return wait_for(conn, selectors.EVENT_WRITE)
            if args.h2 and conn.tls.selected_alpn_protocol() != "h2":
                raise ConnectionError(f"ALPN {conn.tls.selected_alpn_protocol()!r}, not h2")
            conn.state = "send"
            conn.buf = request
        if conn.state == "send":
            while conn.buf:
                try:
                    sent = conn.tls.send(conn.buf)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    return wait_for(conn, selectors.EVENT_WRITE)
                conn.buf = conn.buf[sent:]
            conn.state = "read"
        if conn.state == "read":
            while True:
                try:
                    data = conn.tls.recv(65536)
                except ssl.SSLWantReadError:
                    return wait_for(conn, selectors.EVENT_READ)
                if not data:
                    raise ConnectionError("closed before the response was complete")
                conn.buf += data
                if complete(conn):
                    break
            conn.state = "idle"
            conn.buf = b""
            try:
                sel.unregister(conn.tls)
            except KeyError:
                pass  # done without ever waiting
            in_setup -= 1
            idle.append(conn)

    while len(idle) + failed < args.n and time.monotonic() < deadline:
        while started < args.n and in_setup < args.parallel:
            sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            conn = Conn(sock)
            started += 1
            in_setup += 1
            rc = sock.connect_ex((args.host, args.port))
            if rc not in (0, errno.EINPROGRESS):
                fail(conn, f"connect: {errno.errorcode.get(rc, rc)}")
                continue
            sel.register(sock, selectors.EVENT_WRITE, conn)
        for key, _ in sel.select(timeout=0.5):
            conn = key.data
            try:
                step(conn)
            except (OSError, ConnectionError, ValueError) as e:
                fail(conn, e)

    seconds = time.monotonic() - t0
    print(f"READY open={len(idle)} failed={args.n - len(idle)} seconds={seconds:.1f}", flush=True)
    sys.stdin.readline()

    # A silent connection the server has closed is readable (close_notify or EOF); one that
    # only got a late TLS record with no application data (a session ticket) is still open.
    closed = 0
    probe = selectors.DefaultSelector()
    for conn in idle:
        probe.register(conn.tls, selectors.EVENT_READ, conn)
    for key, _ in probe.select(timeout=0):
        try:
            data = key.data.tls.recv(65536)
            # HTTP/1.1: EOF, or data nobody asked for: either way not an idle keep-alive.
            # HTTP/2: EOF or a GOAWAY; late control frames (a SETTINGS ack) are not a close.
            if not args.h2 or not data or h2_goaway(key.data, data):
                closed += 1
        except ssl.SSLWantReadError:
            pass
        except (OSError, ValueError):
            closed += 1
    print(f"HELD open={len(idle) - closed} closed={closed}", flush=True)
    for conn in idle:
        conn.tls.close()


if __name__ == "__main__":
    main()
