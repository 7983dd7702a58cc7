#!/usr/bin/env bash
# The whole test suite, set-up included: Python packages, and PostgreSQL's server
# binaries for the registry tests (the tests start and stop their own server).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
./scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
