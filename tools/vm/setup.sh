#!/usr/bin/env bash
# Install what the VM test harness needs, only what is missing (idempotent).
#   - qemu-system-x86      the emulator (software emulation: no KVM is used)
#   - linux-image-amd64    Debian 12's 6.1 kernel + /lib/modules (KPROBES, fentry, openvswitch.ko with BTF)
#   - busybox-static       virtme-ng builds an initramfs with it (the Debian kernel's 9p/virtio are modules)
#   - openvswitch-switch   ovsdb-server / ovs-vswitchd / ovs-vsctl, run inside the guest
#   - debootstrap          the minimal Debian image vnet is installed into (tests/vmimage)
#   - virtme-ng (PyPI)     `vng`, in its own venv: tools/vm/.venv (not the project's .venv)
# Needs root. `apt-get update` runs once, and only if a package is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VNET_VM_VENV:-$HERE/.venv}"
VIRTME_NG="${VNET_VIRTME_NG:-virtme-ng==1.42}"
PKGS=(qemu-system-x86 linux-image-amd64 busybox-static openvswitch-switch debootstrap)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "tools/vm/setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! "$VENV/bin/vng" --version >/dev/null 2>&1; then
  echo "tools/vm/setup.sh: installing $VIRTME_NG into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$VIRTME_NG"
fi

ls /boot/vmlinuz-6.1.*-amd64 >/dev/null 2>&1 || { echo "tools/vm/setup.sh: no /boot/vmlinuz-6.1.*-amd64" >&2; exit 1; }
