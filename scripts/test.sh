#!/usr/bin/env bash
# The whole test suite, set-up included: Python packages, PostgreSQL's server binaries for
# the registry tests (the tests start and stop their own server) and Chromium for the web view.
set -euo pipefail
cd "$(dirname "$0")/.."
# PostgreSQL's server binaries (registry tests) and Chromium (the web view's browser test), Debian packages
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
./scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
