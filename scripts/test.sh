#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite (extra args go to pytest).
# The Redis tests start their own redis-server; it is installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "test.sh: redis-server is missing; install it (e.g. sudo apt-get install redis-server)" >&2
    exit 1
  fi
fi
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
