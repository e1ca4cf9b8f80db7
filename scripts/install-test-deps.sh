#!/usr/bin/env bash
# Installs the programs the tests drive for real (openssl, curl). Idempotent: does nothing
# when they are already there. Needs root (or sudo) for apt-get.
set -euo pipefail

needed=()
command -v openssl >/dev/null || needed+=(openssl)
command -v curl >/dev/null || needed+=(curl)
[ ${#needed[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing test dependencies: ${needed[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${needed[@]}" >/dev/null
