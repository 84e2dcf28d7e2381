#!/usr/bin/env bash
# A minimal Debian trixie tree with QEMU 10.0 in .cache/qemu-10, for the tests that migrate with a
# second QEMU (tests/qemu/test_qemu10.py). Built once (about 35 s, ~72 MB of downloads, needs root
# for debootstrap), then reused. Prints the tree's absolute path on stdout; everything else goes to
# stderr. How the tree is built and run: scripts/qemu-tree.sh.
#
# Environment: MIGTAP_QEMU10_DIR overrides the tree path; MIGTAP_DEBIAN_MIRROR overrides the mirror
# (by default the machine's own, read from its apt sources).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/qemu-tree.sh trixie "${MIGTAP_QEMU10_DIR:-$PWD/.cache/qemu-10}" 10.0
