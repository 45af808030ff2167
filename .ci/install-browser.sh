#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's Chromium + driver and the
# Playwright Python client. Playwright's own browser download does not work
# here, so the test drives /usr/bin/chromium. Idempotent and quiet: skips what
# is there, prints one line (or the apt log when apt fails).
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    log="$(mktemp)"
    if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                chromium chromium-driver; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-browser: apt-get failed (log above)" >&2
        exit 1
    fi
    rm -f "$log"
fi

if ! python -c "import playwright.sync_api" >/dev/null 2>&1; then
    python -m pip install -q playwright
fi

echo "install-browser: $(chromium --version 2>/dev/null); playwright $(python -c 'import importlib.metadata as m; print(m.version("playwright"))')"
