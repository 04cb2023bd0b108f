#!/usr/bin/env bash
# quickstart.sh - set up everything on a fresh Debian 12 machine and boot a real Linux
# guest under hearth, which prints its `uname -a` and exits.
#
#   resources/quickstart.sh [COMMAND...]     (default command: uname -a)
#
# Steps: build hearth (release), build or reuse the minimal guest kernel (about 5-15
# minutes the first time, cached under ~/.cache/hearth), build the busybox test
# initramfs, then `hearth run` it. Missing Debian packages are installed when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests, `hearth container run` and every `hearth bench` case use; the kernel
# build script installs its own build dependencies.
if [ "$(id -u)" = 0 ] && command -v dpkg >/dev/null; then
    need=()
    for p in busybox-static cpio e2fsprogs binutils crun runc qemu-system-x86; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "quickstart: installing ${need[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
fi

command=("$@")
[ ${#command[@]} -gt 0 ] || command=(uname -a)

echo "quickstart: building hearth" >&2
cargo build --release --quiet --bins
echo "quickstart: building (or reusing) the minimal guest kernel" >&2
kernel=$(resources/build-guest-kernel.sh | tail -n1)
initrd="${HEARTH_CACHE:-$HOME/.cache/hearth}/quickstart-initramfs.cpio"
mkdir -p "$(dirname "$initrd")"
resources/build-initramfs.sh "$initrd" >/dev/null
echo "quickstart: booting $kernel (this takes 30-60 s on a nested-PVM host)" >&2
exec target/x86_64-unknown-linux-gnu/release/hearth run \
    --kernel "$kernel" \
    --initrd "$initrd" \
    --memory 128M \
    --boot-timer \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet -- ${command[*]}"
