#!/usr/bin/env bash
# Set up sdlab on a fresh machine: CPU torch, the project with its lab and dev extras, and
# Debian's Chromium for the browser tests. Safe to run again.
#
# On a GPU machine, install a CUDA build of torch first (see README), then run this with
# SDLAB_TORCH=skip so the CPU wheel does not replace it.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP="python -m pip"
if [ "${SDLAB_TORCH:-cpu}" != "skip" ]; then
  # Pin first: a looser requirement lets pip pick the newest torch and its GBs of CUDA wheels.
  $PIP install --quiet "torch==2.13.0"
fi
$PIP install --quiet -e ".[lab,dev]"

if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser tests will be skipped"
fi
echo "sdlab is installed: 'sdlab lab' opens the lab, 'python -m pytest' runs the tests"
