#!/usr/bin/env bash
# The coordinator's reverse proxy is nginx (fedtune deploy superlink); the deployment tests
# run it on loopback. Install it with apt where this is root on Debian/Ubuntu (a failed
# install fails `make test`); otherwise say in one line how to install it.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing nginx (apt-get) for the SuperLink's reverse proxy"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null
  exit 0
fi
echo "nginx not found: install it (Debian/Ubuntu: sudo apt-get install nginx; macOS: brew install nginx); the deployment tests are skipped without it" >&2
