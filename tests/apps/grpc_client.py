#!/usr/bin/env python3
"""A real gRPC client (grpcio) over TLS, for the h2c upstream tests: runs one scenario against
test.Echo (tests/apps/grpc_app.py) through the proxy and prints its outcome as one JSON line.

Usage: grpc_client.py CA_FILE HOST:PORT SCENARIO [ARGS...]; HOST is checked against the
proxy's certificate (localhost). Scenarios:
  unary                    one call with text and binary metadata
  call METHOD TEXT [MS]    one unary call, with a deadline of MS milliseconds if given
  server_stream COUNT SIZE
  client_stream COUNT SIZE
  bidi COUNT               COUNT messages, each echoed before the next goes
  large SIZE               a unary call of SIZE bytes each way
  concurrent COUNT         COUNT unary calls at once
  cancel                   Wait, cancelled by the client after its first message
  watch                    Wait, read until the call fails (the app goes away): its code
  cancel_upload            ClientStream, its connection closed while the client still sends
  load SECONDS THREADS     unary calls back to back on THREADS threads for SECONDS
"""
import base64
import json
import sys
import threading
import time
from concurrent import futures

import grpc

ca, target, scenario, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
MAX_MESSAGE = 64 * 1024 * 1024
channel = grpc.secure_channel(
    target,
    grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read()),
    options=(
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ),
)


def method(name, kind="unary_unary"):
    return getattr(channel, kind)("/test.Echo/" + name)


def metadata(pairs):
    out = {}
    for key, value in pairs or ():
        out[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return out


def failure(error):
    return {
        "code": error.code().name,
        "details": error.details(),
        "trailing": metadata(error.trailing_metadata()),
    }


def run():
    if scenario == "unary":
        response, call = method("Unary").with_call(
            b"hello", metadata=(("x-text", "t1"), ("x-data-bin", b"\x00\xff\x10")), timeout=10
        )
        return {
            "code": call.code().name,
            "response": response.decode(),
            "initial": metadata(call.initial_metadata()),
            "trailing": metadata(call.trailing_metadata()),
        }
    if scenario == "call":
        timeout = int(args[2]) / 1000 if len(args) > 2 else 30
        try:
            response = method(args[0])(args[1].encode(), timeout=timeout)
            return {"code": "OK", "response": response.decode()}
        except grpc.RpcError as e:
            return failure(e)
    if scenario == "server_stream":
        count = total = 0
        for message in method("ServerStream", "unary_stream")(("%s:%s" % (args[0], args[1])).encode(), timeout=60):
            count += 1
            total += len(message)
        return {"count": count, "bytes": total}
    if scenario == "client_stream":
        count, size = int(args[0]), int(args[1])
        response = method("ClientStream", "stream_unary")((b"c" * size for _ in range(count)), timeout=60)
        return {"response": response.decode()}
    if scenario == "bidi":
        count = int(args[0])
        outgoing = []
        ready = threading.Condition()

        def requests():
            for i in range(count):
                with ready:
                    ready.wait_for(lambda: len(outgoing) == i)
                yield b"m%d" % i

        matched = 0
        for i, echoed in enumerate(method("Bidi", "stream_stream")(requests(), timeout=60)):
            matched += echoed == b"m%d" % i
            with ready:
                outgoing.append(echoed)
                ready.notify_all()
        return {"matched": matched}
    if scenario == "large":
        size = int(args[0])
        payload = bytes(range(256)) * (size // 256)
        response = method("Unary")(payload, timeout=60)
        return {"same": response == payload, "bytes": len(response)}
    if scenario == "concurrent":
        count = int(args[0])
        calls = [method("Sleep").future(b"200", timeout=30) for _ in range(count)]
        ok = sum(1 for call in calls if call.result() == b"200")
        return {"ok": ok}
    if scenario == "cancel":
        call = method("Wait", "unary_stream")(b"", timeout=30)
        first = next(call)
        call.cancel()
        return {"first": first.decode(), "code": call.code().name}
    if scenario == "watch":
        call = method("Wait", "unary_stream")(b"", timeout=60)
        count = 0
        try:
            for _ in call:
                count += 1
        except grpc.RpcError as e:
            return {"count": count, "code": e.code().name, "details": e.details()}
        return {"count": count, "code": call.code().name}
    if scenario == "cancel_upload":
        # A client stream cancelled while its request body is still open.
        release = threading.Event()

        def requests():
            yield b"one"
            release.wait(30)

        call = method("ClientStream", "stream_unary").future(requests(), timeout=30)
        time.sleep(0.5)
        # The whole connection goes, as when a client process dies mid-upload.
        channel.close()
        release.set()
        return {"code": call.exception().code().name}
    if scenario == "load":
        seconds, threads = float(args[0]), int(args[1])
        end = time.monotonic() + seconds
        counts = {"ok": 0, "failed": 0}
        errors = []
        lock = threading.Lock()

        def worker():
            call = method("Unary")
            while time.monotonic() < end:
                try:
                    call(b"load", timeout=10)
                    outcome = "ok"
                except grpc.RpcError as e:
                    outcome = "failed"
                    with lock:
                        errors.append("%s: %s" % (e.code().name, e.details()))
                with lock:
                    counts[outcome] += 1

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        counts["errors"] = errors[:5]
        return counts
    raise SystemExit("unknown scenario " + scenario)


print(json.dumps(run()), flush=True)
