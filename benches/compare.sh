#!/usr/bin/env bash
# Side-by-side benchmark: sidecar against nginx and HAProxy as TLS-terminating proxies, in one
# run, on loopback.
#
# usage: benches/compare.sh            (as root on Debian it installs what is missing)
#
# The three proxies sit in front of the same upstream (nginx, 1 worker, plain HTTP: a short body
# on `/`, a 1 MiB file on `/big`); the upstream reached directly is the plaintext floor. Scenarios:
#   keepalive  HTTP/1.1 keep-alive, small body      wrk -t2 -c64 --latency
#   h2         HTTP/2, small body                   h2load -t2 -c64 -m10
#   handshake  a new TLS handshake per request      wrk -t2 -c16 -H "Connection: close"
#   big        1 MiB responses                      wrk -t2 -c16 on /big, offering only
#                                                   TLS_AES_128_GCM_SHA256 (OPENSSL_CONF)
#   grpc       gRPC-shaped HTTP/2 to an h2c app     h2load -t2 -c64 -m10, POST of a gRPC-framed
#                                                   body with content-type application/grpc;
#                                                   nginx grpc_pass, HAProxy `proto h2`, sidecar
#                                                   --upstream h2c://
#   unix       HTTP/1.1 keep-alive, app on a Unix   wrk -t2 -c64; the same app through its socket
#              socket                               (nginx `server unix:`, HAProxy `unix@`,
#                                                   sidecar --upstream unix://)
#   memory     RSS idle, after load, and per idle keep-alive TLS connection, HTTP/1.1 and HTTP/2
#              (benches/idle_conns.py)
# For each: requests/s, p50/p99 latency, proxy CPU microseconds per request (utime+stime+cutime+
# cstime from /proc/PID/stat of every process of the proxy, before and after, over requests
# completed), the app's (upstream's) CPU per request over the same window, the TLS suite each
# proxy picks from the tool's offer, peak RSS (VmHWM summed over the proxy's processes, reset
# before each run where the kernel allows) and errors. The table goes to stdout and to
# bench-results/compare-<date>.md.
#
# Environment (all optional):
#   DUR=8            seconds per measured run (a WARM-second unmeasured run precedes each)
#   WARM=1
#   ROUNDS=1         measured runs per proxy and load scenario, taken in turn (nginx, haproxy,
#                    sidecar, floor, nginx, ...); the table shows each figure's median over the
#                    rounds, errors summed over them, and each round's CPU (and keep-alive p99)
#   SCENARIOS='keepalive h2 handshake big grpc unix memory'
#                    which scenarios run, space-separated (default: all); the report shows only
#                    those, e.g. SCENARIOS=grpc for the gRPC one alone (~2 min)
#   IDLE_CONNS=10000 idle TLS connections held for the per-connection memory figure
#   IDLE_SETTLE=13   seconds the idle connections are held before the RSS is read
#   BENCH_UPSTREAM_PORT=18080 BENCH_UPSTREAM_H2C_PORT=18081 BENCH_NGINX_PORT=18443
#   BENCH_SIDECAR_PORT=18444 BENCH_HAPROXY_PORT=18445
#                              fixed loopback ports; without them, the next free port from these
#   SIDECAR_BIN=path           use this binary instead of `cargo build --release`
#   SIDECAR_ARGS='...'         extra flags for `sidecar proxy`
#   BENCH_OUT=dir              where the Markdown goes (default: bench-results/ in the repo)
#   KEEP_WORK=1                keep the temporary folder (configs, logs, tool outputs)
set -euo pipefail

DUR=${DUR:-8}
WARM=${WARM:-1}
ROUNDS=${ROUNDS:-1}
ALL_SCENARIOS="keepalive h2 handshake big grpc unix memory"
SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
IDLE_CONNS=${IDLE_CONNS:-10000}
IDLE_SETTLE=${IDLE_SETTLE:-13}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${BENCH_OUT:-$ROOT/bench-results}
RUN_LIMIT=$((DUR + 15))   # a wrk/h2load run that takes longer than this is killed

say() { printf '%s\n' "$*" >&2; }
die() { say "compare.sh: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools

install_tools() {
    local missing=() tool
    export PATH="$PATH:/usr/sbin:/sbin"
    for tool in nginx haproxy wrk h2load bc openssl python3 timeout; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "missing: ${missing[*]}; installing"
    [ "$(id -u)" -eq 0 ] || die "run as root to install ${missing[*]}, or install them yourself"
    command -v apt-get >/dev/null || die "no apt-get: install nginx, haproxy, wrk, h2load (nghttp2), bc, openssl, python3"
    # Keep the packages' postinst from starting a system nginx (port 80) or haproxy (Debian's
    # policy-rc.d).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && POLICY_PLACED=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy wrk nghttp2-client bc openssl python3 coreutils >/dev/null
    if [ -n "$POLICY_PLACED" ]; then rm -f /usr/sbin/policy-rc.d; POLICY_PLACED=""; fi
    for tool in "${missing[@]}"; do command -v "$tool" >/dev/null || die "$tool still missing after install"; done
}

# ---------------------------------------------------------------------------------------------
# Processes: everything started is recorded here and ended on exit.

STARTED=()
WORK=""
POLICY_PLACED=""
cleanup() {
    local pid
    if [ -n "$POLICY_PLACED" ]; then rm -f /usr/sbin/policy-rc.d; fi
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        local alive=0
        for pid in "${STARTED[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && break
        sleep 0.2
    done
    for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ -n "$WORK" ]; then
        if [ -n "${KEEP_WORK:-}" ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops the processes given (a proxy's main process) and forgets them.
stop() {
    local pid keep=()
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        timeout 10 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do [[ " $* " == *" $pid "* ]] || keep+=("$pid"); done
    STARTED=("${keep[@]}")
}

# A port is taken when something accepts a connection on it.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

CHOSEN=" "
# pick_port VAR DEFAULT: VAR from the environment must be free; otherwise the first free port
# from DEFAULT on that this run has not taken yet.
pick_port() {
    local var=$1 port=${!1:-}
    if [ -n "$port" ]; then
        port_busy "$port" && die "$var=$port is in use"
    else
        port=$2
        while port_busy "$port" || [[ "$CHOSEN" == *" $port "* ]]; do
            port=$((port + 1))
            [ "$port" -lt $(($2 + 200)) ] || die "no free port near $2"
        done
    fi
    CHOSEN+="$port "
    printf -v "$var" '%s' "$port"
}

# wait_http URL [BYTES]: the URL answers 200 (with a body of BYTES) within 15 s. TLS is not
# verified: the benchmark certificate is self-signed.
wait_http() {
    timeout 20 python3 - "$1" "${2:-}" <<'PY' || die "$1 did not answer 200${2:+ with $2 bytes} in time"
import ssl, sys, time, urllib.request
ctx = ssl._create_unverified_context()
deadline = time.monotonic() + 15
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], context=ctx, timeout=2) as r:
            body = r.read()
            if r.status == 200 and sys.argv[2] in ("", str(len(body))):
                print(f"  ok {sys.argv[1]} ({len(body)} bytes)", file=sys.stderr)
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
PY
}

# The processes of a proxy: nginx's master and its children, or HAProxy's or the sidecar's one
# process (their threads are counted in it).
pids_of() {
    local main=$1
    printf '%s\n' "$main"
    awk -v p="$main" '{ sub(/^.*\) /, ""); if ($2 == p) { split(FILENAME, f, "/"); print f[3] } }' \
        /proc/[0-9]*/stat 2>/dev/null || true
}

# CPU ticks (utime + stime + cutime + cstime) summed over the PIDs; the command name may hold
# spaces, so fields are counted from its closing parenthesis (state = 1, utime = 12).
cpu_ticks() {
    local p
    for p in "$@"; do sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null || true; done |
        awk '{ t += $12 + $13 + $14 + $15 } END { print t + 0 }'
}

status_kb() {  # status_kb FIELD PID...: FIELD (VmRSS, VmHWM) summed, in kB
    local field=$1 p; shift
    for p in "$@"; do cat "/proc/$p/status" 2>/dev/null || true; done |
        awk -v f="$field:" '$1 == f { t += $2 } END { print t + 0 }'
}

reset_hwm() { local p; for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done; }

calc() { echo "scale=6; $*" | bc -l; }
fmt() { printf "%.${2:-1}f" "$1"; }

# ---------------------------------------------------------------------------------------------
# Setup

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS=$ROUNDS: a positive whole number, please"
for s in $SCENARIOS; do
    [[ " $ALL_SCENARIOS " == *" $s "* ]] || die "SCENARIOS: no scenario '$s' (there are: $ALL_SCENARIOS)"
done
[ -n "${SCENARIOS// /}" ] || die "SCENARIOS is empty (there are: $ALL_SCENARIOS)"
# wanted SCENARIO: true when SCENARIOS names it.
wanted() { [[ " $SCENARIOS " == *" $1 "* ]]; }
install_tools
TICK=$(getconf CLK_TCK)
# The proxies and the idle-connection client each hold IDLE_CONNS sockets (plus a few).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((IDLE_CONNS + 512)) ] ||
    die "open-file limit $(ulimit -n) is too low for IDLE_CONNS=$IDLE_CONNS (needs $((IDLE_CONNS + 512)))"

if [ -n "${SIDECAR_BIN:-}" ]; then
    [ -x "$SIDECAR_BIN" ] || die "SIDECAR_BIN=$SIDECAR_BIN is not executable"
else
    command -v cargo >/dev/null || die "cargo not found"
    say "building: cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet --bin sidecar) || die "cargo build --release failed"
    SIDECAR_BIN=$ROOT/target/release/sidecar
fi

pick_port BENCH_UPSTREAM_PORT 18080
pick_port BENCH_UPSTREAM_H2C_PORT 18081
pick_port BENCH_NGINX_PORT 18443
pick_port BENCH_SIDECAR_PORT 18444
pick_port BENCH_HAPROXY_PORT 18445
UP=$BENCH_UPSTREAM_PORT UP_H2C=$BENCH_UPSTREAM_H2C_PORT NGX=$BENCH_NGINX_PORT SC=$BENCH_SIDECAR_PORT
HAP=$BENCH_HAPROXY_PORT

WORK=$(mktemp -d /tmp/sidecar-bench.XXXXXX)
chmod 755 "$WORK"  # nginx workers run as an unprivileged user when started as root
# The certificate has a directory of its own, as a mounted Secret does: the sidecar watches it,
# and the logs and tool outputs written in $WORK would otherwise be events it has to look at.
mkdir -p "$WORK/tmp" "$WORK/tls"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/tls/ec.key" -out "$WORK/tls/ec.crt" 2>/dev/null || die "openssl could not make the certificate"
# HAProxy takes the certificate and its key in one file; outside tls/, which the sidecar watches.
cat "$WORK/tls/ec.crt" "$WORK/tls/ec.key" >"$WORK/haproxy.pem"
head -c 1048576 /dev/urandom >"$WORK/big.bin"
chmod 644 "$WORK/big.bin"

# nginx >= 1.25.1 wants `http2 on;`; older ones take `http2` on the listen line.
NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if printf '1.25.1\n%s\n' "$NGINX_VERSION" | sort -V -C; then H2_LISTEN="" H2_ON="http2 on;"; else H2_LISTEN=" http2" H2_ON=""; fi
HAPROXY_VERSION=$(haproxy -v 2>&1 | sed -n '1s/.*version \([^ ]*\).*/\1/p')

# The "legacy app". One worker, as a small app would have; the same for every proxy.
cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp/up-body;
  proxy_temp_path $WORK/tmp/up-proxy;
  server {
    listen 127.0.0.1:$UP reuseport backlog=4096;
    # The same app on a Unix socket, for the unix scenario (nginx makes it mode 0666).
    listen unix:$WORK/app.sock backlog=4096;
    location / { return 200 "hello from the legacy app\n"; }
    location /big { alias $WORK/big.bin; }
  }
  # Prior-knowledge cleartext HTTP/2: the HTTP/2 floor, and the gRPC-shaped scenario's app.
  upstream self { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$UP_H2C$H2_LISTEN reuseport backlog=4096;
    $H2_ON
    location / { return 200 "hello from the legacy app\n"; }
    # A gRPC server reads a call's message before it answers; \`return\` answers at once and
    # resets the stream's unread body (RST_STREAM NO_ERROR), which nginx's grpc_pass counts as
    # an error. Passing the POST on reads it first.
    location /bench.Echo/ {
      proxy_pass http://self/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

# nginx as the TLS sidecar, tuned as a careful operator would: a worker per core, a keep-alive
# pool to the app larger than 64 clients x 10 streams, HTTP/2, a shared session cache, no access
# log, unbuffered streaming of bodies. nginx preallocates (and touches) worker_connections slots,
# so the load runs use the reference 4096 and only the idle-connection run, whose baseline is
# taken with the same setting, gets enough for IDLE_CONNS clients.
nginx_sidecar_conf() {  # nginx_sidecar_conf NAME WORKER_CONNECTIONS [APP_ADDRESS]
cat >"$WORK/$1.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections $2; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp/sc-body;
  proxy_temp_path $WORK/tmp/sc-proxy;
  upstream app { server ${3:-127.0.0.1:$UP}; keepalive 1024; }
  ssl_session_cache shared:SSL:10m;
  ssl_protocols TLSv1.2 TLSv1.3;
  server {
    listen 127.0.0.1:$NGX ssl$H2_LISTEN reuseport backlog=4096;
    $H2_ON
    ssl_certificate     $WORK/tls/ec.crt;
    ssl_certificate_key $WORK/tls/ec.key;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_buffering off;
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
      proxy_busy_buffers_size 128k;
    }
  }
}
EOF
}
nginx_sidecar_conf nginx-sidecar 4096
nginx_sidecar_conf nginx-sidecar-conns $((IDLE_CONNS + 4096))
nginx_sidecar_conf nginx-unix 4096 "unix:$WORK/app.sock"

# nginx in front of an h2c (gRPC) app: grpc_pass with the same keep-alive pool and headers.
cat >"$WORK/nginx-grpc.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/nginx-grpc.pid;
error_log $WORK/nginx-grpc.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp/gr-body;
  upstream grpc_app { server 127.0.0.1:$UP_H2C; keepalive 1024; }
  ssl_session_cache shared:SSL:10m;
  ssl_protocols TLSv1.2 TLSv1.3;
  server {
    listen 127.0.0.1:$NGX ssl$H2_LISTEN reuseport backlog=4096;
    $H2_ON
    ssl_certificate     $WORK/tls/ec.crt;
    ssl_certificate_key $WORK/tls/ec.key;
    location / {
      grpc_pass grpc://grpc_app;
      grpc_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      grpc_set_header X-Forwarded-Proto https;
      grpc_set_header X-Forwarded-Host \$host;
    }
  }
}
EOF
# A gRPC message as a client frames it: not compressed, a 4-byte length, then 16 bytes.
printf '\0\0\0\0\020sixteen byte msg' >"$WORK/grpc.bin"

# HAProxy as the TLS sidecar, tuned as nginx is: a thread per core, server connections shared
# between clients (`http-reuse always`), at most 1024 as nginx's pool, ALPN h2 and http/1.1, a
# session cache, no logs, the same forwarding headers. HAProxy reserves two descriptors per
# connection (client and server side) and by default refuses to start when the open-file limit
# is below that, so the load runs get the reference maxconn within the limit. The idle run needs
# IDLE_CONNS client connections, which share a few server connections: there `no strict-limits`
# lets it start with one descriptor per connection (it then warns in haproxy-sidecar-conns.log).
haproxy_sidecar_conf() {  # haproxy_sidecar_conf NAME MAXCONN [GLOBAL_LINE] [SERVER_ADDRESS_AND_OPTIONS]
cat >"$WORK/$1.cfg" <<EOF
global
    nbthread $(nproc)
    maxconn $2
    tune.ssl.cachesize 20000
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ${3:-}
defaults
    mode http
    no log
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout http-request 60s
frontend fe
    bind 127.0.0.1:$HAP ssl crt $WORK/haproxy.pem alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend app
backend app
    server app ${4:-127.0.0.1:$UP} maxconn 1024
EOF
}
NOFILE=$(ulimit -n)
HAPROXY_MAXCONN=9000
[ "$NOFILE" = unlimited ] || [ $((2 * HAPROXY_MAXCONN + 64)) -le "$NOFILE" ] || HAPROXY_MAXCONN=$(((NOFILE - 64) / 2))
haproxy_sidecar_conf haproxy-sidecar "$HAPROXY_MAXCONN"
haproxy_sidecar_conf haproxy-sidecar-conns $((IDLE_CONNS + 512)) "no strict-limits"
haproxy_sidecar_conf haproxy-grpc "$HAPROXY_MAXCONN" "" "127.0.0.1:$UP_H2C proto h2"
haproxy_sidecar_conf haproxy-unix "$HAPROXY_MAXCONN" "" "unix@$WORK/app.sock"

# The 1 MiB scenario compares bulk encryption, so every proxy must use the same cipher. The
# sidecar has no flag for its suites, so the client pins it: wrk (OpenSSL) offers only
# TLS_AES_128_GCM_SHA256 under this file, and a TLS 1.3 server can only pick what is offered.
# Unpinned, wrk offers AES-256-GCM first; nginx takes it, HAProxy picks it by its own order.
cat >"$WORK/pin-aes128.cnf" <<EOF
openssl_conf = pin
[pin]
ssl_conf = pin_ssl
[pin_ssl]
system_default = pin_tls
[pin_tls]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
EOF
PIN_CONF=$WORK/pin-aes128.cnf

start_nginx() {  # start_nginx NAME: runs $WORK/NAME.conf, sets NGINX_PID
    nginx -t -q -p "$WORK" -e "$WORK/$1.err" -c "$WORK/$1.conf" || die "nginx rejects $1.conf"
    nginx -p "$WORK" -e "$WORK/$1.err" -c "$WORK/$1.conf" &
    NGINX_PID=$!
    STARTED+=("$NGINX_PID")
}

start_haproxy() {  # start_haproxy NAME: runs $WORK/NAME.cfg in the foreground, sets HAPROXY_PID
    haproxy -c -q -f "$WORK/$1.cfg" || die "haproxy rejects $1.cfg"
    haproxy -db -f "$WORK/$1.cfg" >>"$WORK/$1.log" 2>&1 &
    HAPROXY_PID=$!
    STARTED+=("$HAPROXY_PID")
}

start_sidecar() {  # start_sidecar [idle]; sets SIDECAR_PID; the app is SC_UPSTREAM (default: the app over TCP)
    # No load balancer has to stop sending here first: on SIGTERM it drains at once instead of
    # accepting for the default 5 s, which outlasted cleanup's wait (it then got SIGKILL). No
    # request cap per connection, as nginx's keepalive_requests above: h2load does not reconnect.
    # An older binary (SIDECAR_BIN from before the cap existed) has no such flag and no cap.
    local uncapped=""
    if "$SIDECAR_BIN" proxy --help 2>/dev/null | grep -q -- --max-requests-per-connection; then
        uncapped="--max-requests-per-connection 1000000"
    fi
    # The idle connections of the memory scenario wait for their next request as long as
    # HAProxy's (timeout http-keep-alive 60s) and nginx's (keepalive_timeout, 75 s by default)
    # do, rather than the sidecar's default 20 s, which would close them before the reading.
    local keep_idle=""
    [ "${1:-}" = idle ] && keep_idle="--header-read-timeout 60s"
    # shellcheck disable=SC2086
    "$SIDECAR_BIN" proxy --upstream "${SC_UPSTREAM:-http://127.0.0.1:$UP}" --listen "127.0.0.1:$SC" \
        --cert "$WORK/tls/ec.crt" --key "$WORK/tls/ec.key" --log-level warn --shutdown-delay 0s $uncapped $keep_idle ${SIDECAR_ARGS:-} \
        >>"$WORK/sidecar.log" 2>&1 &
    SIDECAR_PID=$!
    STARTED+=("$SIDECAR_PID")
}

start_proxies() {  # start_proxies NGINX_CONF_NAME HAPROXY_CONF_NAME [idle]
    start_nginx "$1"; NGX_MAIN=$NGINX_PID
    start_haproxy "$2"; HAP_MAIN=$HAPROXY_PID
    start_sidecar "${3:-}"; SC_MAIN=$SIDECAR_PID
    wait_http "https://127.0.0.1:$NGX/"
    wait_http "https://127.0.0.1:$HAP/"
    wait_http "https://127.0.0.1:$SC/"
    sleep 1  # let nginx's workers settle before the idle reading
}

PROXIES=(nginx haproxy sidecar)
say "upstream :$UP (h2c :$UP_H2C), nginx :$NGX, haproxy :$HAP, sidecar :$SC ($SIDECAR_BIN); nginx $NGINX_VERSION, HAProxy $HAPROXY_VERSION; DUR=${DUR}s, ROUNDS=$ROUNDS; scenarios: $SCENARIOS"
start_nginx upstream; UP_MAIN=$NGINX_PID
wait_http "http://127.0.0.1:$UP/"
start_proxies nginx-sidecar haproxy-sidecar

# main_of WHO: the main PID of what is measured (the upstream itself for the floor).
main_of() {
    case $1 in nginx) echo "$NGX_MAIN" ;; haproxy) echo "$HAP_MAIN" ;; sidecar) echo "$SC_MAIN" ;; floor) echo "$UP_MAIN" ;; esac
}
port_of() { case $1 in nginx) echo "$NGX" ;; haproxy) echo "$HAP" ;; sidecar) echo "$SC" ;; esac; }

declare -A R  # R[scenario.who.metric]
for who in "${PROXIES[@]}"; do
    mapfile -t pids < <(pids_of "$(main_of "$who")")
    R[idle.$who.rss]=$(status_kb VmRSS "${pids[@]}")
done
# Every proxy must stream the 1 MiB body whole before anything is measured.
for who in "${PROXIES[@]}"; do wait_http "https://127.0.0.1:$(port_of "$who")/big" 1048576; done

# The pin must reach wrk: a server that prefers AES-256-GCM (Python's ssl, without the pin) says
# which suite wrk ends up with under PIN_CONF.
pin_probe() {
    local probe_pid port="" suite
    : >"$WORK/probe.out"
    env -u OPENSSL_CONF python3 - "$WORK/tls/ec.crt" "$WORK/tls/ec.key" >"$WORK/probe.out" 2>"$WORK/probe.err" <<'PY' &
import socket, ssl, sys, time
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0))
srv.settimeout(10)
print(srv.getsockname()[1], flush=True)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:  # wrk first connects once without TLS to test the address
    conn, _ = srv.accept()
    conn.settimeout(5)
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            print(tls.cipher()[0], flush=True)
            break
    except OSError:
        pass
PY
    probe_pid=$!
    STARTED+=("$probe_pid")
    for _ in $(seq 50); do port=$(head -1 "$WORK/probe.out"); [ -n "$port" ] && break; sleep 0.1; done
    [ -n "$port" ] || die "the cipher probe did not start: $(head -c 300 "$WORK/probe.err")"
    OPENSSL_CONF=$PIN_CONF timeout 5 wrk -t1 -c1 -d1 "https://127.0.0.1:$port/" >/dev/null 2>&1 || true
    timeout 5 tail --pid="$probe_pid" -f /dev/null 2>/dev/null || true
    stop "$probe_pid"
    suite=$(sed -n 2p "$WORK/probe.out")
    [ "$suite" = TLS_AES_128_GCM_SHA256 ] ||
        die "wrk did not take the pinned suite from OPENSSL_CONF (got '${suite:-nothing}'); the 1 MiB run would not be comparable"
    say "  wrk under $PIN_CONF negotiates $suite with a server that prefers AES-256"
}
wanted big && pin_probe

# suite_of PORT [s_client flags]: the TLS suite the server on PORT picks from the offer that
# openssl s_client makes (OpenSSL's default offer, as wrk's, unless flags or OPENSSL_CONF say).
suite_of() {
    local out
    out=$(timeout 10 openssl s_client -connect "127.0.0.1:$1" -brief "${@:2}" </dev/null 2>&1) || true
    awk -F': *' '/^Ciphersuite/ && !f { sub(/^TLS_/, "", $2); print $2; f = 1 } END { if (!f) print "?" }' <<<"$out"
}
# h2load makes its own TLS 1.3 offer (AES-128-GCM first); `h2load --help` gives it.
H2LOAD_TLS13=$(h2load --help 2>/dev/null | awk '/--tls13-ciphers/ { f = 1 } f && /Default:/ && !d { print $2; d = 1 }') || true
for who in "${PROXIES[@]}"; do
    port=$(port_of "$who")
    R[keepalive.$who.suite]=$(suite_of "$port")
    R[handshake.$who.suite]=${R[keepalive.$who.suite]}
    R[h2.$who.suite]=$(suite_of "$port" ${H2LOAD_TLS13:+-ciphersuites "$H2LOAD_TLS13"})
    R[big.$who.suite]=$(OPENSSL_CONF=$PIN_CONF suite_of "$port")
done
for who in "${PROXIES[@]}"; do R[grpc.$who.suite]=${R[h2.$who.suite]} R[unix.$who.suite]=${R[keepalive.$who.suite]}; done
for s in keepalive h2 handshake big grpc unix; do R[$s.floor.suite]="-"; done

# ---------------------------------------------------------------------------------------------
# Load runs

# to_ms VALUE: wrk's "1.23ms" / "456.00us" / "1.02s" in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# measure SCENARIO WHO TOOL ARGS...: one warm-up, then the measured run with CPU and RSS taken,
# the app's CPU too (for the floor, the app is what is measured).
measure() {
    local scenario=$1 who=$2 tool=$3; shift 3
    local pids app_pids out log="$WORK/$scenario.$who.log"
    if [ "$tool" = wrk ]; then
        timeout $((WARM + 10)) wrk -d"${WARM}s" "$@" >/dev/null 2>&1 || true
    else
        timeout $((WARM + 10)) h2load -D "$WARM" "$@" >/dev/null 2>&1 || true
    fi
    # Read after the warm-up and again after the run: a worker that died and was replaced
    # meanwhile would take its CPU out of the count, and its successor's would be missed.
    mapfile -t pids < <(pids_of "$(main_of "$who")")
    mapfile -t app_pids < <(pids_of "$UP_MAIN")
    reset_hwm "${pids[@]}"
    local before after app_before app_after
    app_before=$(cpu_ticks "${app_pids[@]}")
    before=$(cpu_ticks "${pids[@]}")
    if [ "$tool" = wrk ]; then
        out=$(timeout "$RUN_LIMIT" wrk -d"${DUR}s" --latency "$@" 2>&1) || say "  wrk exited $? for $scenario/$who"
    else
        out=$(timeout "$RUN_LIMIT" h2load -D "$DUR" --log-file="$log" "$@" 2>&1) || say "  h2load exited $? for $scenario/$who"
    fi
    after=$(cpu_ticks "${pids[@]}")
    app_after=$(cpu_ticks "${app_pids[@]}")
    local same_proxy=1 same_app=1
    [ "$(pids_of "$(main_of "$who")" | sort)" = "$(printf '%s\n' "${pids[@]}" | sort)" ] || same_proxy=0
    [ "$(pids_of "$UP_MAIN" | sort)" = "$(printf '%s\n' "${app_pids[@]}" | sort)" ] || same_app=0
    R[$scenario.$who.hwm]=$(status_kb VmHWM "${pids[@]}")
    printf '%s\n' "$out" >"$WORK/$scenario.$who.out"

    local reqs rps p50 p99 errs
    if [ "$tool" = wrk ]; then
        reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
        rps=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
        p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
        p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
        errs=$(awk '/Socket errors/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 }
                    /Non-2xx or 3xx/ { e += $NF } END { print e + 0 }' <<<"$out")
    else
        # requests: 1 total, 1 started, 1 done, 1 succeeded, 0 failed, 0 errored, 0 timeout
        reqs=$(awk '/^requests:/ { print $8 }' <<<"$out")
        rps=$(awk '/^finished in/ { print $4 }' <<<"$out")
        errs=$(awk '/^requests:/ { e += $10 + $12 + $14 } /^status codes:/ { e += $7 + $9 } END { print e + 0 }' <<<"$out")
        read -r p50 p99 < <(awk -F'\t' '$2 != -1 { print $3 }' "$log" 2>/dev/null | sort -n |
            awk '{ v[NR] = $1 } END { if (NR == 0) { print "nan nan"; exit }
                   i = int(NR * 0.50); if (i < 1) i = 1; j = int(NR * 0.99); if (j < 1) j = 1
                   printf "%.3f %.3f\n", v[i] / 1000, v[j] / 1000 }')
        rm -f "$log"
    fi
    if ! [ "${reqs:-0}" -gt 0 ] 2>/dev/null; then say "  no requests completed for $scenario/$who:"; say "$out"; reqs=0; fi
    R[$scenario.$who.rps]=${rps:-0}
    R[$scenario.$who.p50]=${p50:-nan}
    R[$scenario.$who.p99]=${p99:-nan}
    R[$scenario.$who.err]=$errs
    R[$scenario.$who.reqs]=$reqs
    if [ "$reqs" -gt 0 ]; then
        R[$scenario.$who.cpu]=$(fmt "$(calc "($after - $before) * 1000000 / $TICK / $reqs")" 1)
        R[$scenario.$who.app]=$(fmt "$(calc "($app_after - $app_before) * 1000000 / $TICK / $reqs")" 1)
    else
        R[$scenario.$who.cpu]=nan R[$scenario.$who.app]=nan
    fi
    if [ $same_proxy = 0 ]; then say "  $scenario/$who: the proxy's processes changed during the run: CPU not counted"; R[$scenario.$who.cpu]=nan; fi
    if [ $same_app = 0 ]; then say "  $scenario/$who: the app's processes changed during the run: app CPU not counted"; R[$scenario.$who.app]=nan; fi
    say "  $scenario/$who: ${R[$scenario.$who.rps]} req/s, p50 ${R[$scenario.$who.p50]} ms, p99 ${R[$scenario.$who.p99]} ms, ${R[$scenario.$who.cpu]} us CPU/req (app ${R[$scenario.$who.app]}), $errs errors"
}

url_of() { if [ "$1" = floor ]; then echo "http://127.0.0.1:$UP"; else echo "https://127.0.0.1:$(port_of "$1")"; fi; }

# One measured run of a scenario for WHO.
keepalive_run() { measure keepalive "$1" wrk -t2 -c64 "$(url_of "$1")/"; }
h2_run() {
    local url; url=$(url_of "$1")/; [ "$1" = floor ] && url=http://127.0.0.1:$UP_H2C/
    measure h2 "$1" h2load -t2 -c64 -m10 "$url"
}
handshake_run() { measure handshake "$1" wrk -t2 -c16 -H "Connection: close" "$(url_of "$1")/"; }
# OPENSSL_CONF reaches wrk through measure's environment: warm-up and measured run alike.
big_run() { OPENSSL_CONF=$PIN_CONF measure big "$1" wrk -t2 -c16 "$(url_of "$1")/big"; }
# A unary gRPC call's shape: POST, content-type application/grpc, TE: trailers, a framed body.
grpc_run() {
    local url; url=$(url_of "$1")/bench.Echo/Unary; [ "$1" = floor ] && url=http://127.0.0.1:$UP_H2C/bench.Echo/Unary
    measure grpc "$1" h2load -t2 -c64 -m10 -d "$WORK/grpc.bin" -H 'content-type: application/grpc' -H 'te: trailers' "$url"
}
unix_run() { measure unix "$1" wrk -t2 -c64 "$(url_of "$1")/"; }

FIELDS=(rps p50 p99 err reqs cpu app hwm)
# settle SCENARIO WHO: over the rounds, the median of each of requests/s, latencies and CPU per
# request, the sum of the errors and the highest peak RSS; each round's CPU and p99 are kept
# for the table.
settle() {
    local s=$1 who=$2 n f values errs=0 hwm=0
    for f in rps p50 p99 reqs cpu app; do
        values=$(for ((n = 1; n <= ROUNDS; n++)); do echo "${R[$s.$who.r$n.$f]}"; done)
        # A round that could not be counted (nan) is left out; with none left, nan.
        R[$s.$who.$f]=$({ grep -vx nan <<<"$values" || true; } | sort -g |
            awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else print v[int((NR + 1) / 2)] }')
        R[$s.$who.$f.rounds]=$(paste -sd' ' <<<"$values")
    done
    for ((n = 1; n <= ROUNDS; n++)); do
        errs=$((errs + ${R[$s.$who.r$n.err]:-0}))
        [ "${R[$s.$who.r$n.hwm]:-0}" -gt "$hwm" ] && hwm=${R[$s.$who.r$n.hwm]}
    done
    R[$s.$who.err]=$errs
    R[$s.$who.hwm]=$hwm
}

# in_rounds SCENARIO: ROUNDS rounds of nginx, HAProxy, the sidecar and the floor in turn, so
# that a slow stretch of the machine falls on every proxy alike.
in_rounds() {
    local round who f
    for ((round = 1; round <= ROUNDS; round++)); do
        [ "$ROUNDS" -gt 1 ] && say "  round $round of $ROUNDS"
        for who in "${PROXIES[@]}" floor; do
            "${1}_run" "$who"
            for f in "${FIELDS[@]}"; do R[$1.$who.r$round.$f]=${R[$1.$who.$f]}; done
        done
    done
    for who in "${PROXIES[@]}" floor; do settle "$1" "$who"; done
}

if wanted keepalive; then
say "scenario keepalive: wrk -t2 -c64"
in_rounds keepalive
fi

if wanted h2; then
say "scenario h2: h2load -t2 -c64 -m10"
in_rounds h2
fi

if wanted handshake; then
say "scenario handshake: wrk -t2 -c16 -H 'Connection: close'"
in_rounds handshake
fi

if wanted big; then
say "scenario big: wrk -t2 -c16 /big (1 MiB), offering only TLS_AES_128_GCM_SHA256"
in_rounds big
fi

for who in "${PROXIES[@]}"; do
    mapfile -t pids < <(pids_of "$(main_of "$who")")
    R[load.$who.rss]=$(status_kb VmRSS "${pids[@]}")
    peak=0
    for s in keepalive h2 handshake big; do wanted $s && [ "${R[$s.$who.hwm]}" -gt "$peak" ] && peak=${R[$s.$who.hwm]}; done
    R[load.$who.hwm]=$peak
done

# The same proxies again, each in front of the app as an h2c (gRPC) server, then through its Unix
# socket; the memory run below starts them afresh.
if wanted grpc; then
say "scenario grpc: h2load -t2 -c64 -m10, gRPC-framed POSTs to the h2c app (nginx grpc_pass, HAProxy proto h2)"
stop "$NGX_MAIN" "$HAP_MAIN" "$SC_MAIN"
SC_UPSTREAM="h2c://127.0.0.1:$UP_H2C" start_proxies nginx-grpc haproxy-grpc
in_rounds grpc
fi

if wanted unix; then
say "scenario unix: wrk -t2 -c64, the app through its Unix socket"
stop "$NGX_MAIN" "$HAP_MAIN" "$SC_MAIN"
SC_UPSTREAM="unix://$WORK/app.sock" start_proxies nginx-unix haproxy-unix
in_rounds unix
fi

# ---------------------------------------------------------------------------------------------
# Memory per idle TLS connection, on freshly started proxies so that load leftovers do not blur it.

# HTTP/1.1 (key conns) and HTTP/2 (key conns2), each on freshly started proxies. The RSS is read
# IDLE_SETTLE seconds after the last connection is set up, for every proxy alike: the sidecar
# frees an idle HTTP/1.1 connection's buffers 1-2 s after its last byte, and its allocator hands
# freed memory back to the system every 10 s.
for proto in h1 h2; do
wanted memory || break
key=conns; flag=""
[ "$proto" = h2 ] && { key=conns2; flag=--h2; }
say "scenario memory ($proto): $IDLE_CONNS idle keep-alive TLS connections per proxy (fresh processes)"
stop "$NGX_MAIN" "$HAP_MAIN" "$SC_MAIN"
start_proxies nginx-sidecar-conns haproxy-sidecar-conns idle
for who in "${PROXIES[@]}"; do
    port=$(port_of "$who")
    mapfile -t pids < <(pids_of "$(main_of "$who")")
    R[$key.$who.base]=$(status_kb VmRSS "${pids[@]}")
    rm -f "$WORK/idle.in" "$WORK/idle.out"; mkfifo "$WORK/idle.in" "$WORK/idle.out"
    timeout $((150 + IDLE_SETTLE)) python3 "$ROOT/benches/idle_conns.py" 127.0.0.1 "$port" "$IDLE_CONNS" --timeout 100 $flag \
        <"$WORK/idle.in" >"$WORK/idle.out" 2>"$WORK/idle.$who.err" &
    idle_pid=$!
    STARTED+=("$idle_pid")
    exec {to_idle}>"$WORK/idle.in" {from_idle}<"$WORK/idle.out"
    ready="" held=""
    read -r -t 120 ready <&"$from_idle" || true
    sleep "$IDLE_SETTLE"
    mapfile -t pids < <(pids_of "$(main_of "$who")")
    R[$key.$who.rss]=$(status_kb VmRSS "${pids[@]}")
    trap '' PIPE  # the client may have died; its stderr tells below
    printf 'done\n' 1>&"$to_idle" 2>/dev/null || true
    trap - PIPE
    read -r -t 30 held <&"$from_idle" || true
    exec {to_idle}>&- {from_idle}<&-
    stop "$idle_pid"
    open=$(sed -n 's/.*open=\([0-9]*\).*/\1/p' <<<"$held")
    R[$key.$who.open]=${open:-0}
    say "  $who: ${ready:-no READY line} / ${held:-no HELD line} ($(head -c 300 "$WORK/idle.$who.err"))"
    if [ "${open:-0}" -gt 0 ]; then
        R[$key.$who.kb]=$(fmt "$(calc "(${R[$key.$who.rss]} - ${R[$key.$who.base]}) / $open")" 1)
    else
        R[$key.$who.kb]=nan
    fi
done
done

# ---------------------------------------------------------------------------------------------
# Report

ratio() {  # ratio A B: A / B, or "-" when not computable
    awk -v s="$1" -v n="$2" 'BEGIN { if (s == "nan" || n == "nan" || s == "" || n == "" || n + 0 == 0) print "-"; else printf "%.2f", s / n }'
}
# verdict VALUE OP LIMIT: PASS or MISS ("-" when VALUE is not a number)
verdict() {
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        if (v == "-" || v == "nan" || v == "") { print "MISS (no data)"; exit }
        ok = (op == "<=") ? (v + 0 <= l + 0) : (v + 0 == l + 0); print ok ? "PASS" : "MISS" }'
}
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

ROWS=()  # scenario|metric|nginx|haproxy|sidecar|sidecar/nginx|sidecar/haproxy|floor|target|verdict
row() { ROWS+=("$1|$2|$3|$4|$5|$6|$7|$8|${9:-}|${10:-}"); }
# cmp_row SCENARIO METRIC KIND NGINX HAPROXY SIDECAR FLOOR [TARGET VERDICT]: the proxies' raw
# values shown as KIND (int, mb, or as they are), with the sidecar's ratio to each peer.
cmp_row() {
    local k=$3 shown=() v
    for v in "$4" "$5" "$6"; do
        case $k in int) shown+=("$(fmt "$v" 0)") ;; mb) shown+=("$(mb "$v")") ;; *) shown+=("$v") ;; esac
    done
    row "$1" "$2" "${shown[@]}" "$(ratio "$6" "$4")" "$(ratio "$6" "$5")" "$7" "${8:-}" "${9:-}"
}
# of SCENARIO FIELD: the field for nginx, HAProxy and the sidecar, as three words.
of() { printf '%s\n' "${R[$1.nginx.$2]}" "${R[$1.haproxy.$2]}" "${R[$1.sidecar.$2]}"; }
VERDICTS=()

names=(keepalive "h1 keep-alive" h2 "h2" handshake "handshake" big "1 MiB" grpc "gRPC (h2c app)" unix "h1, app on a Unix socket")
LEGEND="h1 keep-alive: wrk -t2 -c64 on /, HTTP/1.1 keep-alive. h2: h2load -t2 -c64 -m10 on / (floor: h2c).
handshake: wrk -t2 -c16 -H 'Connection: close', a new TLS handshake per request (wrk resumes its TLS 1.3 session: PSK + X25519, no signature). 1 MiB: wrk -t2 -c16 on /big.
app CPU: the upstream's processes over the same run, per request through that proxy (a proxy that opens
an app connection per client moves cost there). TLS suite: what each proxy picks from the tool's offer
(openssl s_client making the same offer): wrk offers OpenSSL's default list (AES-256-GCM first), h2load
its own (AES-128-GCM first); in the 1 MiB run wrk offers only TLS_AES_128_GCM_SHA256 (OPENSSL_CONF), so
every proxy encrypts with it.
gRPC (h2c app): h2load -t2 -c64 -m10, POSTs of a 21-byte gRPC frame with content-type application/grpc and
TE: trailers, to the app over prior-knowledge HTTP/2 (nginx grpc_pass with keepalive 1024, HAProxy proto h2;
floor: the h2c app directly). h1, app on a Unix socket: as h1 keep-alive, the app reached through its socket.
memory: RSS summed over the proxy's processes; per-connection KB = (RSS with N idle keep-alive TLS
connections - RSS before) / N, on freshly started proxies."
declare -A cpu_target=([keepalive]=0.75 [h2]=0.75 [handshake]=0.55 [big]=0.8 [grpc]=0.75)
for ((i = 0; i < ${#names[@]}; i += 2)); do
    s=${names[i]} title=${names[i+1]}
    wanted "$s" || continue
    mapfile -t v3 < <(of "$s" rps)
    cmp_row "$title" "requests/s" int "${v3[@]}" "$(fmt "${R[$s.floor.rps]}" 0)"
    mapfile -t v3 < <(of "$s" p50)
    cmp_row "$title" "p50 latency (ms)" - "${v3[@]}" "${R[$s.floor.p50]}"
    mapfile -t v3 < <(of "$s" p99)
    if [ "$s" = keepalive ]; then
        r=$(ratio "${v3[2]}" "${v3[0]}"); v=$(verdict "$r" "<=" 1)
        cmp_row "$title" "p99 latency (ms)" - "${v3[@]}" "${R[$s.floor.p99]}" "/nginx <= 1" "$v"
        VERDICTS+=("h1 keep-alive p99 <= nginx|$r|$v")
    else
        cmp_row "$title" "p99 latency (ms)" - "${v3[@]}" "${R[$s.floor.p99]}"
    fi
    mapfile -t v3 < <(of "$s" cpu)
    t=${cpu_target[$s]:-}
    if [ -n "$t" ]; then
        r=$(ratio "${v3[2]}" "${v3[0]}"); v=$(verdict "$r" "<=" "$t")
        VERDICTS+=("$title CPU/request <= $t x nginx|$r|$v")
        target="/nginx <= $t"
    else
        # The Unix socket's target is the sidecar's own TCP path, measured above.
        r=$(ratio "${v3[2]}" "${R[keepalive.sidecar.cpu]}"); v=$(verdict "$r" "<=" 1)
        VERDICTS+=("$title CPU/request <= the sidecar's over TCP|$r|$v")
        target="<= sidecar h1 keep-alive"
    fi
    if [ "$s" = keepalive ] || [ "$s" = h2 ]; then
        rh=$(ratio "${v3[2]}" "${v3[1]}"); vh=$(verdict "$rh" "<=" 1)
        VERDICTS+=("$title CPU/request <= HAProxy|$rh|$vh")
        target+=", /haproxy <= 1"
        [ "$v" = PASS ] && [ "$vh" = PASS ] || v=MISS
    fi
    cmp_row "$title" "CPU us/req" - "${v3[@]}" "${R[$s.floor.cpu]}" "$target" "$v"
    mapfile -t v3 < <(of "$s" app)
    cmp_row "$title" "app CPU us/req" - "${v3[@]}" "${R[$s.floor.app]}"
    if [ "$ROUNDS" -gt 1 ]; then
        mapfile -t v3 < <(of "$s" cpu.rounds)
        row "$title" "CPU us/req, each round" "${v3[@]}" "-" "-" "${R[$s.floor.cpu.rounds]}"
        if [ "$s" = keepalive ]; then
            mapfile -t v3 < <(of "$s" p99.rounds)
            row "$title" "p99 (ms), each round" "${v3[@]}" "-" "-" "${R[$s.floor.p99.rounds]}"
        fi
    fi
    mapfile -t v3 < <(of "$s" hwm)
    cmp_row "$title" "peak RSS (MB)" mb "${v3[@]}" "-"
    e_label="errors (socket, non-2xx)"
    if [ "$s" = h2 ] || [ "$s" = grpc ]; then e_label="errors (failed, errored, non-2xx)"; fi
    mapfile -t v3 < <(of "$s" err)
    if [ "$s" = keepalive ] || [ "$s" = h2 ] || [ "$s" = grpc ] || [ "$s" = unix ]; then
        v=$(verdict "${v3[2]}" "==" 0)
        row "$title" "$e_label" "${v3[@]}" "-" "-" "${R[$s.floor.err]}" "sidecar = 0" "$v"
        VERDICTS+=("$title errors = 0|${v3[2]}|$v")
    else
        row "$title" "$e_label" "${v3[@]}" "-" "-" "${R[$s.floor.err]}"
    fi
    mapfile -t v3 < <(of "$s" suite)
    row "$title" "TLS suite" "${v3[@]}" "-" "-" "${R[$s.floor.suite]}"
done
mem="memory"
# The idle RSS is read whatever ran; after load, only after the first four scenarios (any of
# them); the idle-connection rows only when the memory scenario ran.
mapfile -t v3 < <(of idle rss)
r=$(ratio "${v3[2]}" "${v3[0]}"); v=$(verdict "$r" "<=" 0.5)
cmp_row "$mem" "RSS idle (MB)" mb "${v3[@]}" "-" "/nginx <= 0.5" "$v"
VERDICTS+=("RSS idle <= 0.5 x nginx|$r|$v")
if wanted keepalive || wanted h2 || wanted handshake || wanted big; then
mapfile -t v3 < <(of load rss)
r=$(ratio "${v3[2]}" "${v3[0]}"); v=$(verdict "$r" "<=" 1)
cmp_row "$mem" "RSS after load (MB)" mb "${v3[@]}" "-" "/nginx <= 1" "$v"
VERDICTS+=("RSS after load <= nginx|$r|$v")
mapfile -t v3 < <(of load hwm)
cmp_row "$mem" "peak RSS, all load (MB)" mb "${v3[@]}" "-"
fi
for key in conns conns2; do
wanted memory || break
proto="HTTP/1.1"; [ "$key" = conns2 ] && proto="HTTP/2"
mapfile -t v3 < <(of $key open)
row "$mem" "idle $proto TLS conns held (of $IDLE_CONNS)" "${v3[@]}" "-" "-" "-"
mapfile -t v3 < <(of $key rss)
cmp_row "$mem" "RSS with them (MB)" mb "${v3[@]}" "-"
# Issue 26's target: at most 16 KB, and less than HAProxy's in the same run.
v=$(verdict "${R[$key.sidecar.kb]}" "<=" 16)
if [ "$v" = PASS ] && [ "$(ratio "${R[$key.sidecar.kb]}" "${R[$key.haproxy.kb]}")" != "-" ]; then
    v=$(awk -v s="${R[$key.sidecar.kb]}" -v h="${R[$key.haproxy.kb]}" 'BEGIN { print (s + 0 < h + 0) ? "PASS" : "MISS" }')
fi
[ "${R[$key.sidecar.open]}" = "$IDLE_CONNS" ] || v="MISS (held ${R[$key.sidecar.open]})"
mapfile -t v3 < <(of $key kb)
cmp_row "$mem" "KB per idle $proto TLS conn" - "${v3[@]}" "-" "<= 16, < haproxy" "$v"
VERDICTS+=("per idle $proto TLS connection <= 16 KB and below HAProxy|${R[$key.sidecar.kb]} KB|$v")
done

# What the proxies logged (warn and up) during the whole run, most frequent message first;
# HAProxy's start-up notices (its version and path) are left out.
LOGS=""
for f in sidecar.log nginx-sidecar.err nginx-sidecar-conns.err nginx-grpc.err nginx-unix.err haproxy-sidecar.log haproxy-sidecar-conns.log haproxy-grpc.log haproxy-unix.log upstream.err; do
    [ -f "$WORK/$f" ] || continue
    lines=$(grep -v '^\[NOTICE\]' "$WORK/$f" || true)
    [ -n "$lines" ] || continue
    top=$(sed -E 's/^[0-9TZ:./ -]+//; s/\*[0-9]+ //; s/, client: .*//; s/^(\[[A-Z]+\]) +\([0-9]+\) :/\1/' <<<"$lines" |
        sort | uniq -c | sort -rn | head -3 |
        awk '{ n = $1; $1 = ""; printf "    %d x%s\n", n, substr($0, 1, 160) }')
    LOGS+="$f: $(wc -l <<<"$lines") lines"$'\n'"$top"$'\n'
done

DATE=$(date +%Y-%m-%d-%H%M%S)
HEADER="scenario|metric|nginx|haproxy|sidecar|sidecar/nginx|sidecar/haproxy|floor|target|verdict"
print_table() {
    local line
    printf '\n'
    { echo "$HEADER"; printf '%s\n' "${ROWS[@]}"; } |
        awk -F'|' '{ for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } n = NR; m = NF }
            END { for (r = 1; r <= n; r++) { for (i = 1; i <= m; i++) printf "%-*s  ", w[i], c[r, i]; printf "\n" } }' |
        sed 's/ *$//'
    printf '%s\n' "$LEGEND" "floor: the upstream reached directly in plaintext; its CPU figure is the app's own."
    printf '\nTargets (from the issues), sidecar against nginx and HAProxy:\n'
    for line in "${VERDICTS[@]}"; do IFS='|' read -r t val v <<<"$line"; printf '  %-44s %-9s %s\n' "$t" "$val" "$v"; done
}
print_table
[ -n "$LOGS" ] && printf '\nProxy logs (warn and up):\n%s' "$LOGS"

mkdir -p "$OUT_DIR"
MD="$OUT_DIR/compare-$DATE.md"
{
    echo "# sidecar vs nginx and HAProxy, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Host: $(nproc) cores, $(uname -r); nginx $NGINX_VERSION, HAProxy $HAPROXY_VERSION; wrk and h2load on the same cores."
    echo "DUR=${DUR}s per run (after a ${WARM}s warm-up), ROUNDS=$ROUNDS (each figure is the median over the rounds); scenarios: $SCENARIOS; sidecar: \`$SIDECAR_BIN\` ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))."
    echo "CPU = utime+stime(+children) of the proxy's processes per completed request (app CPU: the upstream's, over the same run); RSS summed over them."
    echo "The floor is the upstream reached directly in plaintext (its CPU column is the app's own)."
    echo
    echo "$LEGEND"
    echo
    echo "| ${HEADER//|/ | } |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|---|"
    for line in "${ROWS[@]}"; do echo "| ${line//|/ | } |"; done
    echo
    echo "| target | sidecar | verdict |"
    echo "|---|---:|---|"
    for line in "${VERDICTS[@]}"; do echo "| ${line//|/ | } |"; done
    fence='```'
    if [ -n "$LOGS" ]; then printf '\nProxy logs (warn and up):\n\n%s\n%s%s\n' "$fence" "$LOGS" "$fence"; fi
} >"$MD"
say ""
say "written: $MD"
