#!/usr/bin/env python3
"""A stand-in for a legacy app, for the sync tests.

Reads its JSON config file at start and again on SIGHUP (or POST /reload), serves on an
ephemeral loopback port (or --port):
  GET /healthz  200 when the config parsed and does not say {"healthy": false}, else 503
  GET /state    {"pid", "config", "reloads", "hups", "error"} as JSON
  POST /reload  reloads like SIGHUP
Config fields it obeys: "healthy": false (unhealthy), "ignore_signals": true (ignores SIGHUP and
SIGTERM from then on), "crash": true (exits at once, status 3). Prints "listening on
127.0.0.1:PORT pid PID" once ready, and one line per reload. With --child it starts a child
process in its own process group that prints "child got SIGHUP" when signalled (for
--process-group tests).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--pid-file")
parser.add_argument("--child", action="store_true")
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()

lock = threading.Lock()
state = {"pid": os.getpid(), "config": None, "reloads": 0, "hups": 0, "error": None}


def load():
    try:
        with open(args.config) as f:
            config = json.load(f)
        if config.get("crash"):
            os._exit(3)
        with lock:
            state["config"] = config
            state["error"] = None
    except Exception as e:  # a broken file: keep running, report unhealthy
        with lock:
            state["error"] = str(e)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be changed from the main thread
    config = state["config"] or {}
    if config.get("ignore_signals"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_term)


def reload(why):
    load()
    with lock:
        state["reloads"] += 1
        line = f"reloaded ({why}) {json.dumps(state['config'])} error={state['error']}"
    print(line, flush=True)


def on_hup(signum, frame):
    with lock:
        state["hups"] += 1
    reload("SIGHUP")


def on_term(signum, frame):
    print("terminating on SIGTERM", flush=True)
    os._exit(0)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, code, body, kind="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            snapshot = dict(state)
        if self.path == "/healthz":
            config = snapshot["config"] or {}
            healthy = snapshot["error"] is None and snapshot["config"] is not None and config.get("healthy", True)
            self.answer(200 if healthy else 503, "ok\n" if healthy else "unhealthy\n", "text/plain")
        elif self.path == "/state":
            self.answer(200, json.dumps(snapshot))
        else:
            self.answer(404, "{}")

    def do_POST(self):
        if self.path == "/reload":
            reload("POST /reload")
            self.answer(200, "{}")
        else:
            self.answer(404, "{}")


load()
server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
server.daemon_threads = True
if args.pid_file:
    with open(args.pid_file + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(args.pid_file + ".tmp", args.pid_file)
if args.child:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGHUP, lambda *a: print('child got SIGHUP', flush=True))\n"
        "print('child ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    subprocess.Popen([sys.executable, "-c", code])
print(f"listening on 127.0.0.1:{server.server_address[1]} pid {os.getpid()}", flush=True)
server.serve_forever(poll_interval=0.1)
