#!/usr/bin/env bash
# One-time set-up on a fresh machine: QEMU, socat, Chromium and libvirt from Debian, then a venv
# with migtap and its test and lint extras. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)  # tests/test_live_view.py: a real terminal
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # tests/qemu/test_report.py
# tests/libvirt: libvirtd (9.0, QEMU driver) and virsh; the package also creates user libvirt-qemu
[ -x /usr/sbin/libvirtd ] || need_apt+=(libvirt-daemon-system)  # in sbin: not on every PATH
command -v virsh >/dev/null 2>&1 || need_apt+=(libvirt-clients)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import migtap, pytest, pytest_asyncio, qemu.qmp, ruff, importlinter" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing migtap and its test extras into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,lint]'
  touch .venv/.installed
fi
