#!/usr/bin/env bash
# The audit report's test renders it in headless Chromium (Debian's package; no browser download).
# `make test` runs this first: it installs chromium with apt-get when it is missing and we may
# (root, or passwordless sudo), and otherwise says what to install.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "Chromium is needed by tests/test_audit.py: install Debian's 'chromium' package (apt-get install chromium)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
