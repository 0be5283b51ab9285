#!/usr/bin/env bash
# The privilege-separation tests run a site's SuperNode as a service account of their own;
# where this interpreter lives under a private folder (pyenv under /root), they grant that
# account traverse-only access to it with an ACL (setfacl, Debian's acl package). Install
# it with apt where this is root on Debian/Ubuntu; otherwise say in one line what to do.
set -euo pipefail
if command -v setfacl >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing acl (apt-get) for the privilege-separation tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends acl >/dev/null
  command -v setfacl >/dev/null
  exit 0
fi
echo "setfacl not found: install it (Debian/Ubuntu: sudo apt-get install acl); tests that need a second account may be skipped" >&2
