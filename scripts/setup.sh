#!/usr/bin/env bash
# Install the system packages Portcullis needs to build and test, when they
# are missing: cmake and a C compiler (Pingora builds zlib-ng), Python's venv
# module (the OpenAI SDK tests), redis-server (the shared-limit tests),
# Node.js with npm (the Node.js SDK tests) and promtool, from Debian's
# prometheus package (the alert rules' checks; the server is not started).
# Debian/Ubuntu; uses sudo when not root.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if command -v python3 >/dev/null 2>&1; then
  probe=$(mktemp -d)
  if ! python3 -m venv "$probe/v" >/dev/null 2>&1; then need+=(python3-venv); fi
  rm -rf "$probe"
fi
lean=()
command -v promtool >/dev/null 2>&1 || lean+=(prometheus)
if [ "${#need[@]}" -gt 0 ] || [ "${#lean[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]} ${lean[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  if [ "${#need[@]}" -gt 0 ]; then
    $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [ "${#lean[@]}" -gt 0 ]; then
    $sudo apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
  fi
fi
