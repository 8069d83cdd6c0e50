#!/usr/bin/env bash
# Install the headless browser used by tests/test_human_eval_browser.py.
#
# Idempotent: installs Debian's `chromium` and `chromium-driver` packages with
# apt-get only when /usr/bin/chromium or /usr/bin/chromedriver is missing
# (running `apt-get update` first in that case). Uses sudo only when not root.
# The Python side (selenium) is a dev dependency: pip install -e '.[dev]'.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
    echo "install_browser: $CHROMIUM and $CHROMEDRIVER already present; nothing to do."
else
    missing=()
    [[ -x "$CHROMIUM" ]] || missing+=("$CHROMIUM")
    [[ -x "$CHROMEDRIVER" ]] || missing+=("$CHROMEDRIVER")
    echo "install_browser: missing ${missing[*]}; installing chromium + chromium-driver with apt-get."

    if [[ "$(id -u)" -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
        echo "install_browser: not root, using sudo."
    else
        echo "install_browser: ERROR: not root and sudo is not available; run this script as root." >&2
        exit 1
    fi

    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_browser: ERROR: apt-get not found; install Chromium and chromedriver by hand" \
             "so that $CHROMIUM and $CHROMEDRIVER exist." >&2
        exit 1
    fi

    echo "install_browser: running apt-get update"
    ${SUDO[@]+"${SUDO[@]}"} apt-get update
    echo "install_browser: running apt-get install -y chromium chromium-driver"
    ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y \
        chromium chromium-driver
    echo "install_browser: installed."
fi

for bin in "$CHROMIUM" "$CHROMEDRIVER"; do
    if [[ ! -x "$bin" ]]; then
        echo "install_browser: ERROR: $bin still missing after install." >&2
        exit 1
    fi
    echo "install_browser: $bin -> $("$bin" --version 2>/dev/null | head -n1 || echo 'version unknown')"
done
