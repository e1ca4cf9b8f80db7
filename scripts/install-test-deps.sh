#!/usr/bin/env bash
# Installs the programs the tests drive for real: openssl and curl (proxy tests), etcd and nginx
# (sync sources), python3 (the stand-in legacy app of the sync tests), promtool (Debian's
# prometheus package: /metrics is checked with it), chromium and certutil (a real browser
# trusts the CA that `sidecar cert --install` put in its NSS database). Idempotent: does nothing
# when they are already there. Needs root (or sudo) for apt-get.
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
[ ${#needed[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing test dependencies: ${needed[*]}" >&2
$sudo apt-get update -qq
# The etcd and nginx packages start their services when a service manager runs; the tests
# start their own instances on free ports, so a running service does not get in the way.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${needed[@]}" >/dev/null
