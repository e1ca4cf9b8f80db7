#!/usr/bin/env python3
"""A real gRPC server (grpcio) for the h2c upstream tests, with generic handlers on raw bytes, so
that no protoc or generated code is needed.

Usage: grpc_app.py ADDRESS EVENTS_FILE, where ADDRESS is HOST:PORT (port 0: any free port) or
unix:/PATH. Prints "listening on PORT" (0 for a Unix socket) once it serves. Appends what the
tests check afterwards to EVENTS_FILE, one line each: "peer PEER" for every call (the proxy's
connection it came on), "cancelled METHOD" when Sleep, Wait or ClientStream saw its call
cancelled, "deadline SECONDS" with the time left that Sleep saw, "streamed N" every 100 messages
ServerStream has handed on, "got ClientStream N" for the first 3 messages ClientStream took and
"done ClientStream COUNT:BYTES" when its request ended cleanly, "ticking Wait" at Wait's fifth tick. SIGTERM stops it gracefully (GOAWAY, 5 s for calls under way).

Service test.Echo:
  Unary         echoes the request; x-* metadata comes back as initial metadata, and the
                trailing metadata carries x-trailer-bin = b"\\x00\\x01\\xfe\\xff".
                A request b"abort" fails with INVALID_ARGUMENT, a non-ASCII message and binary
                trailing metadata; b"cancel" is cancelled by the app.
  Sleep         sleeps as many milliseconds as the request says, then echoes it.
  ServerStream  request b"COUNT:SIZE": COUNT messages of SIZE bytes.
  ClientStream  answers b"COUNT:BYTES" for the messages it got.
  Bidi          echoes every message as it comes.
  Wait          sends one message, then one every 50 ms until the client cancels.
"""
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

address, events_path = sys.argv[1], sys.argv[2]
events_lock = threading.Lock()
MAX_MESSAGE = 64 * 1024 * 1024


def event(line):
    with events_lock, open(events_path, "a") as f:
        f.write(line + "\n")


def seen(context):
    event("peer " + context.peer())


def unary(request, context):
    seen(context)
    if request == b"abort":
        context.set_trailing_metadata((("x-detail-bin", b"\xde\xad\xbe\xef"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request: d\u00e9j\u00e0 vu")
    if request == b"cancel":
        context.cancel()
        return b""
    echoed = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-"))
    context.send_initial_metadata(echoed)
    context.set_trailing_metadata((("x-trailer-bin", b"\x00\x01\xfe\xff"),))
    return request


def sleep(request, context):
    seen(context)
    remaining = context.time_remaining()
    event("deadline " + ("none" if remaining is None else "%.3f" % remaining))
    end = time.monotonic() + int(request) / 1000
    while time.monotonic() < end and context.is_active():
        time.sleep(0.01)
    if not context.is_active():
        event("cancelled Sleep")
    return request


def server_stream(request, context):
    seen(context)
    count, size = (int(n) for n in request.split(b":"))
    payload = b"s" * size
    for n in range(1, count + 1):
        yield payload
        if n % 100 == 0:
            event("streamed %d" % n)


def client_stream(requests, context):
    seen(context)
    count = total = 0
    try:
        for message in requests:
            count += 1
            total += len(message)
            if count <= 3:
                event("got ClientStream %d" % count)
    except grpc.RpcError:
        # The request stream was reset, not ended: grpcio raises rather than stop iterating.
        event("cancelled ClientStream")
        raise
    # grpcio may end the iteration instead when a reset races its read; the call then turns
    # inactive moments later, where a request that really ended keeps it active until the
    # answer goes.
    settle = time.monotonic() + 0.3
    while context.is_active() and time.monotonic() < settle:
        time.sleep(0.01)
    if not context.is_active():
        event("cancelled ClientStream")
        return b""
    event("done ClientStream %d:%d" % (count, total))
    return b"%d:%d" % (count, total)


def bidi(requests, context):
    seen(context)
    for message in requests:
        yield message


def wait(request, context):
    seen(context)
    # Wait never ends by itself: its end is the client's cancel reaching the app.
    context.add_callback(lambda: event("cancelled Wait"))
    yield b"first"
    ticks = 0
    while context.is_active():
        time.sleep(0.05)
        yield b"tick"
        ticks += 1
        if ticks == 5:
            event("ticking Wait")


handlers = grpc.method_handlers_generic_handler(
    "test.Echo",
    {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Wait": grpc.unary_stream_rpc_method_handler(wait),
    },
)
server = grpc.server(
    futures.ThreadPoolExecutor(max_workers=64),
    handlers=(handlers,),
    options=(
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_concurrent_streams", 1000),
    ),
    maximum_concurrent_rpcs=None,
)
port = server.add_insecure_port(address)
server.start()
print("listening on %d" % port, flush=True)

stopped = threading.Event()


def stop(*_):
    server.stop(5).wait()
    stopped.set()


signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop).start())
while not stopped.wait(0.2):
    pass
