#!/usr/bin/env bash
# Installs the programs the tests drive for real: openssl and curl (proxy tests), etcd and nginx
# (sync sources), python3 (the stand-in legacy app of the sync tests), promtool (Debian's
# prometheus package: /metrics is checked with it), chromium and certutil (a real browser
# trusts the CA that `sidecar cert --install` put in its NSS database), and Python's grpcio (a real
# gRPC server and client for the h2c upstream tests). Idempotent: does nothing when they are
# already there. Needs root (or sudo) for apt-get.
set -euo pipefail

needed=()
command -v openssl >/dev/null || needed+=(openssl)
command -v curl >/dev/null || needed+=(curl)
# Debian's etcd-server ships /usr/bin/etcd; nginx-light is nginx without the extra modules.
command -v etcd >/dev/null || needed+=(etcd-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || needed+=(nginx-light)
command -v python3 >/dev/null || needed+=(python3)
command -v promtool >/dev/null || needed+=(prometheus)
command -v chromium >/dev/null || needed+=(chromium)
command -v certutil >/dev/null || needed+=(libnss3-tools)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#needed[@]} -gt 0 ]; then
    echo "installing test dependencies: ${needed[*]}" >&2
    $sudo apt-get update -qq
    # The etcd and nginx packages start their services when a service manager runs; the tests
    # start their own instances on free ports, so a running service does not get in the way.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${needed[@]}" >/dev/null
fi

# grpcio from PyPI, for the python3 the tests run (apt's python3-grpcio lags and may not match a
# python3 that is not Debian's). pip comes from apt when it is missing.
if ! python3 -c "import grpc" 2>/dev/null; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >/dev/null
    fi
    echo "installing test dependency: grpcio (pip)" >&2
    # Debian's python3 refuses pip installs outside a virtualenv unless told otherwise.
    python3 -m pip install --quiet grpcio 2>/dev/null || python3 -m pip install --quiet --break-system-packages grpcio
fi
