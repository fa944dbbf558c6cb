#!/usr/bin/env bash
# Install everything fastpull needs on Debian 12 (as root): the CNCF distribution registry
# (tests, demo, bench), containerd, runc and skopeo (the real clients of the tests of `fastpull serve`)
# and a virtualenv in .venv with fastpull built from source.
# With --bench, also the tools of the far-registry bench (openssl, GNU time, iproute2, matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
bench=false
[ "${1:-}" = "--bench" ] && bench=true
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v curl >/dev/null || need+=(curl)
for tool in skopeo containerd; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v tinyproxy >/dev/null || need+=(tinyproxy)  # tests: pulls through an HTTP proxy
command -v runc >/dev/null || need+=(runc)  # tests: containers run on the snapshotter's mounts
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)  # tests: a static shell inside the test images
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if $bench; then
    command -v openssl >/dev/null || need+=(openssl)
    [ -x /usr/bin/time ] || need+=(time)
    command -v tc >/dev/null || need+=(iproute2)
fi
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if $bench; then
    .venv/bin/python -m pip install -q -e '.[test,bench]'
else
    .venv/bin/python -m pip install -q -e '.[test]'
fi
