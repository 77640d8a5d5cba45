#!/usr/bin/env bash
# The system Chromium that tests/server/test_server_page.py drives headless through Playwright
# (Playwright is pointed at it and never downloads a browser of its own).
# Debian/Ubuntu: apt's `chromium`. Elsewhere, install Chromium yourself and set CHROMIUM_PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM_PATH:-}" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser.sh: no apt-get here; install Chromium and set CHROMIUM_PATH for the chat-page test" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
