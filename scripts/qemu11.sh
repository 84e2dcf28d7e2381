#!/usr/bin/env bash
# A minimal Debian sid tree with QEMU 11.1 (1:11.1.x) in .cache/qemu-11, for the tests that migrate
# with a third QEMU (tests/qemu/test_qemu11.py). Built once (debootstrap, needs root and the Debian
# mirror), then reused. Prints the tree's absolute path on stdout; everything else goes to stderr.
# How the tree is built and run: scripts/qemu-tree.sh. When sid has moved past 11.1 the build
# fails and says what sid has (never a silently different QEMU).
#
# Environment: MIGTAP_QEMU11_DIR overrides the tree path; MIGTAP_DEBIAN_MIRROR overrides the mirror
# (by default the machine's own, read from its apt sources).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/qemu-tree.sh sid "${MIGTAP_QEMU11_DIR:-$PWD/.cache/qemu-11}" 11.1
