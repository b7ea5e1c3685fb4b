#!/usr/bin/env bash
# Build a minimal Debian 12 root filesystem with vnet installed, to boot as a VM's
# root (tools/vm/run_minimal_image.py):
#
#   tools/vm/minimal_image.sh IMAGE_DIR WHEEL
#
#   1. base: `debootstrap --variant=minbase --include=python3,libbpf1,iproute2,kmod bookworm`
#      (no compiler), cached as a tarball under tools/vm/cache/ (about 40 s the first
#      time, then a few seconds to unpack);
#   2. vnet: the wheel and its dependencies, all downloaded on the HOST as binary wheels
#      for CPython 3.11 / manylinux x86_64 (`pip download --only-binary=:all:`), then
#      installed inside the image (chroot) into the venv /opt/vnet with no index and no
#      compiler; /usr/local/bin/vnet -> /opt/vnet/bin/vnet. pip itself runs from its
#      wheel file and is not left in the image. Fails if a C compiler is in the image.
#   3. IMAGE_DIR.ext4: the same tree as an ext4 filesystem image (`mkfs.ext4 -d`), what
#      the VM boots as its root disk (read-only: the guest writes to tmpfs overlays);
#   4. prints the size of the base and what vnet + its dependencies add; records them
#      in IMAGE_DIR/.vnet-image (key=value lines).
#
# Idempotent: when IMAGE_DIR/.vnet-image names the same wheel (sha256) and the same
# version of this script and IMAGE_DIR.ext4 exists, nothing is rebuilt (the sizes are
# printed again). Otherwise IMAGE_DIR is deleted and rebuilt from the cached base.
#
# Needs root (debootstrap, chroot), the Debian mirror (first build only) and the
# package index (pip download, on the host). Installs `debootstrap` with apt-get if it
# is missing (mkfs.ext4 is e2fsprogs, always there on Debian).
#
# Environment: VNET_DEBIAN_MIRROR (default http://deb.debian.org/debian),
# VNET_IMAGE_CACHE (default tools/vm/cache), VNET_HOST_PYTHON (a Python with pip used
# on the host to download wheels; default the project's .venv, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SUITE=bookworm
MIRROR="${VNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
INCLUDE=python3,libbpf1,iproute2,kmod
CACHE="${VNET_IMAGE_CACHE:-$HERE/cache}"
# The image's Python and platform: what the wheels are chosen for.
PY_VERSION=3.11
GLIBC_MINOR=36                    # bookworm's glibc 2.36: wheels for manylinux_2_5 .. manylinux_2_36
VENV=/opt/vnet
COMPILERS_RE='^(.*-)?(cc|gcc|g\+\+|c\+\+|clang|clang\+\+|tcc|c89|c99)(-[0-9.]+)?$'

say() { echo "minimal_image: $*"; }
die() { echo "minimal_image: error: $*" >&2; exit 1; }

(($# == 2)) || die "usage: $0 IMAGE_DIR WHEEL"
[[ $EUID == 0 ]] || die "needs root (debootstrap, chroot)"
IMAGE="$(realpath -m "$1")"
WHEEL="$(realpath "$2")"
[[ -f $WHEEL && $WHEEL == *.whl ]] || die "not a wheel: $2"
[[ $IMAGE != / && $IMAGE != "$ROOT" ]] || die "refusing IMAGE_DIR=$IMAGE"

WHEEL_SHA="$(sha256sum "$WHEEL" | cut -d' ' -f1)"
SCRIPT_SHA="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP="$IMAGE/.vnet-image"
DISK="$IMAGE.ext4"

# pip's noise about index locations this machine's pip.conf names but lacks.
quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }
bytes() { du -sxB1 "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

report() {
  # shellcheck disable=SC1090
  . "$STAMP"
  say "image:            $IMAGE"
  say "base image:       $(mib "$base_bytes") (debootstrap minbase + $INCLUDE)"
  say "vnet + deps add:  $(mib "$added_bytes") (the venv $VENV: $(mib "$venv_bytes"))"
  say "whole image:      $(mib "$image_bytes"); as an ext4 disk: $DISK ($(mib "$disk_bytes"))"
}

if [[ -f $STAMP && -f $DISK ]] && grep -qx "wheel_sha256=$WHEEL_SHA" "$STAMP" && grep -qx "script_sha256=$SCRIPT_SHA" "$STAMP"; then
  say "up to date (same wheel, same builder): $IMAGE"
  report
  exit 0
fi

# -- 1. the base, cached ------------------------------------------------------
key="$(printf '%s\n' "$SUITE" "$MIRROR" "$INCLUDE" minbase | sha256sum | cut -c1-12)"
BASE_TAR="$CACHE/debootstrap-$SUITE-minbase-$key.tar"
if [[ ! -f $BASE_TAR ]]; then
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends debootstrap >/dev/null 2>&1 ||
      { apt-get update -q && apt-get install -y -q --no-install-recommends debootstrap; }
  fi
  mkdir -p "$CACHE"
  work="$(mktemp -d "$CACHE/debootstrap.XXXXXX")"
  cleanup() {  # debootstrap mounts /proc and /sys in the target: never rm -rf through them
    { grep -o " $work/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$work"
  }
  trap cleanup EXIT
  say "debootstrap --variant=minbase --include=$INCLUDE $SUITE (about 1 minute)"
  t0=$SECONDS
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$work/root" "$MIRROR" >"$work/log" 2>&1 ||
    { tail -30 "$work/log" >&2; die "debootstrap failed (log above)"; }
  # Nothing the image needs at run time: the package cache and lists.
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  tar -C "$work/root" --numeric-owner --xattrs -cpf "$work/base.tar" .
  mv "$work/base.tar" "$BASE_TAR"
  cleanup
  trap - EXIT
  say "base cached in $BASE_TAR ($((SECONDS - t0)) s)"
fi

say "unpacking the base into $IMAGE"
rm -rf "$IMAGE" "$DISK"
mkdir -p "$IMAGE"
tar -C "$IMAGE" --numeric-owner --xattrs -xpf "$BASE_TAR"
# The VM runner mounts its results directory on /mnt (the root is read-only there).
mkdir -p "$IMAGE/mnt"
base_bytes="$(bytes "$IMAGE")"

# -- 2. vnet and its dependencies, binary wheels only ---------------------------
host_py="${VNET_HOST_PYTHON:-}"
if [[ -z $host_py ]]; then
  for cand in "$ROOT/.venv/bin/python" python3; do
    if "$cand" -m pip --version >/dev/null 2>&1; then host_py="$cand"; break; fi
  done
fi
[[ -n $host_py ]] || die "no Python with pip on the host (set VNET_HOST_PYTHON)"
wheels="$IMAGE/tmp/vnet-wheels"
mkdir -p "$wheels"
# pip does not widen a manylinux_2_Y platform to older ones: name every one the image runs.
platforms=(--platform any)
for ((y = GLIBC_MINOR; y >= 5; y--)); do platforms+=(--platform "manylinux_2_${y}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
say "downloading binary wheels for CPython $PY_VERSION, manylinux (glibc <= 2.$GLIBC_MINOR) x86_64 (host pip: $host_py)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$host_py" -m pip download -q --dest "$wheels" --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" "$WHEEL" 2>&1 | quiet_pip
"$host_py" -m pip download -q --dest "$wheels" --only-binary=:all: --no-deps pip 2>&1 | quiet_pip
pip_whl="$(cd "$wheels" && ls pip-*.whl | head -1)"
[[ -n $pip_whl ]] || die "no pip wheel downloaded"
if ls "$wheels" | grep -v '\.whl$'; then die "something other than a wheel was downloaded (above)"; fi

say "installing into $VENV inside the image (chroot, --no-index)"
in_image() {
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 \
    chroot "$IMAGE" "$@"
}
in_image /usr/bin/python3 -m venv --without-pip "$VENV"
in_image "$VENV/bin/python" "/tmp/vnet-wheels/$pip_whl/pip" install -q --no-index --only-binary=:all: \
  --find-links /tmp/vnet-wheels "/tmp/vnet-wheels/$(basename "$WHEEL")"
rm -rf "$wheels"
ln -sfn "$VENV/bin/vnet" "$IMAGE/usr/local/bin/vnet"
in_image vnet --version >/dev/null || die "vnet does not start in the image"

# No compiler anywhere on the image's PATH (nor in the venv).
found="$(for d in bin sbin usr/bin usr/sbin usr/local/bin usr/local/sbin "${VENV#/}/bin"; do
  [[ -d $IMAGE/$d ]] && ls "$IMAGE/$d"; done | grep -E "$COMPILERS_RE" || true)"
[[ -z $found ]] || die "compilers in the image: $found"

# -- 3. the ext4 disk image ------------------------------------------------------
image_bytes="$(bytes "$IMAGE")"
venv_bytes="$(bytes "$IMAGE$VENV")"
files="$(find "$IMAGE" -xdev | wc -l)"
# Room for the tree plus ext4's own overhead; the guest never writes to it.
size_mib=$((image_bytes * 5 / 4 / 1048576 + 64))
say "mkfs.ext4 -d: $DISK (${size_mib} MiB, $files files)"
mkfs.ext4 -q -F -L vnet-root -N $((files * 2 + 8192)) -d "$IMAGE" "$DISK.tmp" "${size_mib}M" >/dev/null
mv "$DISK.tmp" "$DISK"
disk_bytes="$(du -B1 "$DISK" | cut -f1)"

# -- 4. sizes --------------------------------------------------------------------
cat >"$STAMP" <<EOF
wheel=$(basename "$WHEEL")
wheel_sha256=$WHEEL_SHA
script_sha256=$SCRIPT_SHA
base_bytes=$base_bytes
added_bytes=$((image_bytes - base_bytes))
venv_bytes=$venv_bytes
image_bytes=$image_bytes
disk_bytes=$disk_bytes
EOF
say "installed: $(in_image vnet --version)"
say "largest packages in $VENV:"
# sed, not head: head would leave sort writing to a closed pipe (SIGPIPE, 141 under pipefail)
du -sxB1 "$IMAGE$VENV"/lib/python3*/site-packages/* | sort -rn | sed -n 1,8p |
  while read -r b p; do say "  $(mib "$b")  ${p##*/}"; done
report
