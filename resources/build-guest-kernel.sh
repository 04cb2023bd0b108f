#!/usr/bin/env bash
# build-guest-kernel.sh - build hearth's minimal test guest kernel (cached).
#
# Usage:
#   resources/build-guest-kernel.sh                 build (or reuse) the kernel;
#                                                   last stdout line = vmlinux path
#   resources/build-guest-kernel.sh --print-dir     print the cache dir it would use
#   resources/build-guest-kernel.sh --check-config [FILE]
#                                                   check FILE (default: the
#                                                   in-repo guest-kernel.config)
#   resources/build-guest-kernel.sh --regen-config  regenerate guest-kernel.config
#                                                   from guest-kernel/config-fragment
#                                                   (tinyconfig + merge_config.sh -m
#                                                   + olddefconfig), then check it
#
# Inputs (all in resources/):
#   guest-kernel.config            full .config (generated, committed)
#   guest-kernel/config-fragment   the hand-written fragment it is generated from
#   guest-kernel/patches/*.patch   applied in name order with `patch -p1`
#   /usr/src/linux-source-6.1.tar.xz   Debian's kernel source (package linux-source-6.1)
#
# Output / cache layout (HEARTH_CACHE defaults to $HOME/.cache/hearth):
#   $HEARTH_CACHE/kernel/<hash>/vmlinux      ELF vmlinux with the PVH entry note
#   $HEARTH_CACHE/kernel/<hash>/bzImage      the same kernel as a bzImage
#   $HEARTH_CACHE/kernel/<hash>/config       the final .config used
#   $HEARTH_CACHE/kernel/<hash>/System.map
#   $HEARTH_CACHE/kernel/current -> <hash>   symlink to the latest successful build
#   <hash> = first 16 hex digits of the sha256 over guest-kernel.config, every patch
#   (name and content), this script, and the installed linux-source-6.1 version.
#
# A build runs in $HEARTH_CACHE/kernel/.tmp-<hash>.<pid>/ and the finished output is
# renamed into place, so an interrupted build is never taken as done; leftovers are
# removed by the next run. A second run with the same inputs just prints the path.
# Concurrent runs serialise on a lock file ($HEARTH_CACHE/kernel/.lock).
# Missing apt build dependencies are installed (needs root; CI is a fresh Debian 12).
#
# Environment:
#   HEARTH_CACHE            cache root (default $HOME/.cache/hearth)
#   HEARTH_KERNEL_JOBS      make -j value (default: nproc)
#   HEARTH_KEEP_KERNEL_TREE=1   keep the build tree in <hash>/linux (about 1.5 GB)
#
# All progress output goes to stderr; stdout carries only the result path.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CONFIG="$HERE/guest-kernel.config"
FRAGMENT="$HERE/guest-kernel/config-fragment"
PATCHDIR="$HERE/guest-kernel/patches"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
CACHE="${HEARTH_CACHE:-$HOME/.cache/hearth}"
KCACHE="$CACHE/kernel"
JOBS="${HEARTH_KERNEL_JOBS:-$(nproc)}"
DEPS=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils
      binutils patch perl util-linux)

log() { printf 'build-guest-kernel: %s\n' "$*" >&2; }
die() { printf 'build-guest-kernel: ERROR: %s\n' "$*" >&2; exit 1; }

# Options that must be =y in the final .config.
MUST_Y=(
  64BIT X86_64 SMP PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE
  BLK_DEV_INITRD RD_GZIP DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS SHMEM
  BINFMT_ELF BINFMT_SCRIPT MULTIUSER FUTEX EPOLL UNIX98_PTYS
  BLOCK EXT4_FS OVERLAY_FS
  VIRTIO VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET
  NET INET UNIX PACKET VSOCKETS VIRTIO_VSOCKETS HW_RANDOM HW_RANDOM_VIRTIO VIRT_DRIVERS VMGENID
  NAMESPACES UTS_NS IPC_NS PID_NS NET_NS USER_NS
  CGROUPS MEMCG CGROUP_SCHED FAIR_GROUP_SCHED CGROUP_PIDS CPUSETS
  SECCOMP SECCOMP_FILTER
  HYPERVISOR_GUEST PARAVIRT KVM_GUEST PVH ACPI IA32_EMULATION
  DEVMEM UNWINDER_FRAME_POINTER DEBUG_INFO_NONE
  FUSE_FS VIRTIO_FS VIRTIO_BALLOON PAGE_REPORTING
  BRIDGE VETH NETFILTER NF_TABLES NF_TABLES_IPV4 NFT_NAT NFT_MASQ
)
# Options that must be absent / "is not set" in the final .config.
MUST_OFF=(
  MODULES PCI RANDOMIZE_BASE RELOCATABLE
  FTRACE FUNCTION_TRACER KPROBES DEBUG_INFO DEBUG_INFO_BTF
  DEBUG_INFO_DWARF4 DEBUG_INFO_DWARF5 DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT
  UNWINDER_ORC JUMP_LABEL IO_STRICT_DEVMEM LEGACY_PTYS PTP_1588_CLOCK IPV6
)

# check_config FILE: every must-have option, and every line of the fragment, must
# be honoured by FILE. Prints all problems, then fails.
check_config() {
  local f="$1" bad=0 o line
  [[ -f "$f" ]] || die "no config file $f"
  for o in "${MUST_Y[@]}"; do
    grep -qx "CONFIG_$o=y" "$f" || { log "config check: CONFIG_$o=y missing"; bad=1; }
  done
  for o in "${MUST_OFF[@]}"; do
    if grep -q "^CONFIG_$o=" "$f"; then
      log "config check: must be off: $(grep "^CONFIG_$o=" "$f")"; bad=1
    fi
  done
  while IFS= read -r line; do
    if [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      o="${BASH_REMATCH[1]}"
      if grep -q "^$o=" "$f"; then
        log "config check: fragment wants $o off, got $(grep "^$o=" "$f")"; bad=1
      fi
    elif [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)= ]]; then
      grep -qxF -- "$line" "$f" || {
        log "config check: fragment wants '$line', got '$(grep -E "^${BASH_REMATCH[1]}=|^# ${BASH_REMATCH[1]} is not set" "$f" || true)'"
        bad=1
      }
    fi
  done < "$FRAGMENT"
  [[ $bad == 0 ]] || die "config check FAILED for $f (see above)"
  log "config check passed: $f"
}

ensure_deps() {
  local missing=() p
  for p in "${DEPS[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing missing packages: ${missing[*]}"
  [[ $(id -u) == 0 ]] || die "need root to install: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || log "apt-get update failed, trying install anyway"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

input_hash() {
  {
    printf 'config\n'; cat "$CONFIG"
    local p
    for p in "$PATCHDIR"/*.patch; do
      [[ -e "$p" ]] || continue
      printf 'patch %s\n' "$(basename "$p")"; cat "$p"
    done
    printf 'script\n'; cat "$SELF"
    printf 'source %s\n' "$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || echo unknown)"
  } | sha256sum | cut -c1-16
}

unpack_source() { # DEST
  mkdir -p "$1"
  log "unpacking $SRC_TARBALL"
  tar -xf "$SRC_TARBALL" -C "$1" --strip-components=1
}

regen_config() {
  ensure_deps
  local t
  t=$(mktemp -d "${TMPDIR:-/tmp}/hearth-kconfig.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$t'" EXIT
  unpack_source "$t/linux"
  (
    cd "$t/linux"
    make -s tinyconfig >&2
    scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >&2
    make -s olddefconfig >&2
  )
  check_config "$t/linux/.config"
  cp "$t/linux/.config" "$CONFIG"
  log "wrote $CONFIG"
}

artefacts_ok() { # DIR
  [[ -s "$1/vmlinux" && -s "$1/bzImage" && -f "$1/.complete" ]]
}

build() {
  ensure_deps
  [[ -f "$SRC_TARBALL" ]] || die "$SRC_TARBALL not found"
  check_config "$CONFIG"
  local hash dir tmp lockfd
  hash=$(input_hash)
  dir="$KCACHE/$hash"
  if artefacts_ok "$dir"; then
    log "cached: $dir"
    ln -sfn "$hash" "$KCACHE/.current.$$" && mv -T "$KCACHE/.current.$$" "$KCACHE/current"
    echo "$dir/vmlinux"
    return 0
  fi
  mkdir -p "$KCACHE"
  exec {lockfd}>"$KCACHE/.lock"
  log "waiting for lock $KCACHE/.lock"
  flock "$lockfd"
  if artefacts_ok "$dir"; then   # someone else built it meanwhile
    log "cached: $dir"
    echo "$dir/vmlinux"
    return 0
  fi
  # We hold the lock: any temp dir left behind is from an interrupted build.
  rm -rf "$KCACHE"/.tmp-* "$dir"
  tmp="$KCACHE/.tmp-$hash.$$"
  mkdir -p "$tmp/out"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  unpack_source "$tmp/linux"
  local p
  for p in "$PATCHDIR"/*.patch; do
    [[ -e "$p" ]] || continue
    log "applying $(basename "$p")"
    patch -d "$tmp/linux" -p1 --forward --batch -s < "$p" >&2 || die "patch $p failed"
  done
  cp "$CONFIG" "$tmp/linux/.config"
  make -C "$tmp/linux" -s olddefconfig >&2
  if ! diff -q <(grep '^CONFIG_' "$CONFIG" | grep -v '^CONFIG_CC_VERSION_TEXT\|^CONFIG_GCC_VERSION\|^CONFIG_AS_VERSION\|^CONFIG_LD_VERSION\|^CONFIG_PAHOLE_VERSION') \
                <(grep '^CONFIG_' "$tmp/linux/.config" | grep -v '^CONFIG_CC_VERSION_TEXT\|^CONFIG_GCC_VERSION\|^CONFIG_AS_VERSION\|^CONFIG_LD_VERSION\|^CONFIG_PAHOLE_VERSION') >/dev/null; then
    log "note: olddefconfig changed the config (different toolchain?); checking the result"
  fi
  check_config "$tmp/linux/.config"
  log "make -j$JOBS vmlinux bzImage (about 10-15 min on 2 cores)"
  local t0=$SECONDS
  make -C "$tmp/linux" -j"$JOBS" vmlinux bzImage >&2 || die "kernel build failed"
  log "compiled in $((SECONDS - t0)) s"
  cp "$tmp/linux/vmlinux" "$tmp/out/vmlinux"
  cp "$tmp/linux/arch/x86/boot/bzImage" "$tmp/out/bzImage"
  cp "$tmp/linux/System.map" "$tmp/out/System.map"
  cp "$tmp/linux/.config" "$tmp/out/config"
  # Sanity: ELF64 x86-64 with the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18).
  readelf -h "$tmp/out/vmlinux" | grep -q 'Class:.*ELF64' || die "vmlinux is not ELF64"
  readelf -h "$tmp/out/vmlinux" | grep -q 'Machine:.*X86-64' || die "vmlinux is not x86-64"
  readelf -n "$tmp/out/vmlinux" | grep -Eq 'PHYS32_ENTRY|Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+Unknown note type: \(0x0*12\)' \
    || die "vmlinux has no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY)"
  if [[ "${HEARTH_KEEP_KERNEL_TREE:-0}" == 1 ]]; then
    mv "$tmp/linux" "$tmp/out/linux"
  fi
  printf '%s\n' "$hash" > "$tmp/out/.complete"
  mv -T "$tmp/out" "$dir"
  rm -rf "$tmp"
  trap - EXIT
  ln -sfn "$hash" "$KCACHE/.current.$$" && mv -T "$KCACHE/.current.$$" "$KCACHE/current"
  log "done: $dir ($(stat -c %s "$dir/vmlinux") bytes vmlinux, $(stat -c %s "$dir/bzImage") bytes bzImage)"
  echo "$dir/vmlinux"
}

case "${1:-}" in
  "") build ;;
  --print-dir) echo "$KCACHE/$(input_hash)" ;;
  --check-config) check_config "${2:-$CONFIG}" ;;
  --regen-config) regen_config ;;
  -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac
