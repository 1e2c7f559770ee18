#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with robaudit
# (editable) and its test tools, and, where we are root on Debian/Ubuntu, headless
# Chromium for the report's browser test. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# constraints.txt pins the torch/torchvision builds robaudit is tested with, so pip does
# not pull a newer multi-GB build; any torch >= 2.4 works if you drop it.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium + chromium-driver for the report's browser test" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium/chromedriver not found (need root + apt to install); the browser test will be skipped" >&2
  fi
fi
echo "setup: done. Try: .venv/bin/robaudit demo" >&2
