#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite (extra args go to pytest).
# The Redis tests start their own redis-server and the playground's test drives Debian's chromium
# (Playwright's own browser downloads are not used); each is installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
updated=0
for tool in redis-server chromium; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      if [ "$updated" = 0 ]; then apt-get update -qq; updated=1; fi
      apt-get install -y -qq "$tool" >/dev/null
    else
      echo "test.sh: $tool is missing; install it (e.g. sudo apt-get install $tool)" >&2
      exit 1
    fi
  fi
done
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
