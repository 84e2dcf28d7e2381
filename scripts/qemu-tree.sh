#!/usr/bin/env bash
# A minimal Debian tree with that suite's QEMU, for the tests that migrate with a QEMU other than the
# host's: `qemu-tree.sh SUITE TREE VERSION`, e.g. `qemu-tree.sh trixie .cache/qemu-10 10.0`
# (scripts/qemu10.sh) or `qemu-tree.sh sid .cache/qemu-11 11.1` (scripts/qemu11.sh). Built once
# (debootstrap, needs root and the Debian mirror), then reused: the tree is complete when it holds
# .migtap-complete. The QEMU in it must be VERSION (its `--version` starts with it), or the build
# fails: a suite that has moved on is a loud error, not a silently different QEMU. Prints the
# tree's absolute path on stdout; everything else goes to stderr.
#
# The tree is never entered (no chroot, no mounts): the harness runs its qemu-system-x86_64 with
# the tree's own dynamic loader and -L firmware paths (tests/qemu/harness.py, Qemu.debian_tree).
#
# Environment: MIGTAP_DEBIAN_MIRROR overrides the mirror (by default the machine's own, read from
# its apt sources).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 3 ]; then
  echo "usage: qemu-tree.sh SUITE TREE VERSION (e.g. sid .cache/qemu-11 11.1)" >&2
  exit 2
fi
suite=$1
tree=$(realpath -m "$2")
want=$3
name="qemu-tree($suite)"
marker="$tree/.migtap-complete"
qemu="$tree/usr/bin/qemu-system-x86_64"

if [ -f "$marker" ] && [ -x "$qemu" ]; then
  echo "$tree"
  exit 0
fi
# Builds go to a temp dir and are renamed only when complete, so anything else at the path is not
# ours to delete.
if [ -e "$tree" ]; then
  echo "$name: $tree exists but is not a complete tree (no $marker); remove it and run again" >&2
  exit 1
fi

# The machine's Debian mirror: the first http(s) URI of its apt sources that serves debian/ (not
# debian-security), deb822 (*.sources) or one-line (*.list) format.
find_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    while read -r uri; do
      case "$uri" in
        *security*) ;;
        http://* | https://*) echo "${uri%/}"; return 0 ;;
      esac
    done < <(sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n')
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    while read -r uri; do
      case "$uri" in
        *security*) ;;
        http://* | https://*) echo "${uri%/}"; return 0 ;;
      esac
    done < <(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }' "$f")
  done
  return 1
}

mirror="${MIGTAP_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(find_mirror) || {
    echo "$name: no Debian mirror in /etc/apt/sources*; set MIGTAP_DEBIAN_MIRROR" >&2
    exit 1
  }
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
  echo "$name: installing debootstrap" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
debootstrap=$(command -v debootstrap || echo /usr/sbin/debootstrap)

# Build next to the final path, then rename: an interrupted build never looks complete, and a
# concurrent one does not clobber a finished tree.
parent=$(dirname "$tree")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.$(basename "$tree").build.XXXXXX")
cleanup() { [ -n "${work:-}" ] && $sudo rm -rf "$work"; }
trap cleanup EXIT

echo "$name: debootstrap $suite from $mirror into $work" >&2
t0=$(date +%s)
if ! $sudo "$debootstrap" --variant=minbase --include=qemu-system-x86,qemu-utils \
    "$suite" "$work/tree" "$mirror" >"$work/debootstrap.log" 2>&1; then
  echo "$name: debootstrap failed; last lines of its log:" >&2
  tail -n 30 "$work/debootstrap.log" >&2
  [ -f "$work/tree/debootstrap/debootstrap.log" ] && tail -n 30 "$work/tree/debootstrap/debootstrap.log" >&2
  exit 1
fi
# Downloaded .debs are not needed to run QEMU.
$sudo rm -rf "$work/tree/var/cache/apt/archives/"*.deb

[ -x "$work/tree/usr/bin/qemu-system-x86_64" ] || {
  echo "$name: the tree has no usr/bin/qemu-system-x86_64" >&2
  exit 1
}
version=$("$work/tree/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
  --library-path "$work/tree/usr/lib/x86_64-linux-gnu:$work/tree/usr/lib" \
  "$work/tree/usr/bin/qemu-system-x86_64" --version | head -n 1)
echo "$name: $version ($(($(date +%s) - t0)) s)" >&2
case "$version" in
  "QEMU emulator version $want".*) ;;
  *)
    echo "$name: wanted QEMU $want from $suite, the tree has: $version" >&2
    exit 1
    ;;
esac
echo "$version" | $sudo tee "$work/tree/.migtap-complete" >/dev/null

# -T: never move into an existing directory. If another run finished first, keep its tree.
if ! $sudo mv -T "$work/tree" "$tree" 2>/dev/null && [ ! -f "$marker" ]; then
  echo "$name: could not move the new tree to $tree" >&2
  exit 1
fi
echo "$tree"
