#!/usr/bin/env bash
# build-initramfs.sh - build hearth's tiny test initramfs (uncompressed newc cpio).
#
# Usage:
#   resources/build-initramfs.sh OUT.cpio [--modules DIR]
#
#   OUT.cpio        output file (uncompressed "newc" cpio; pass it to the VMM as initrd)
#   --modules DIR   a kernel's lib/modules/<version> tree (e.g. the stock Debian kernel's,
#                   see fetch-stock-kernel.sh). The virtio/virtio-mmio/blk/net/rng and
#                   vsock modules, plus their dependencies from DIR/modules.dep, are
#                   copied in (.ko.xz/.ko.zst/.ko.gz are decompressed) and /init loads
#                   them with insmod, in dependency order, before running the command.
#                   Override the module list with HEARTH_INITRAMFS_MODULES="a b c".
#                   Appended module signatures are removed (see strip_module_signature).
#
# Contents: /bin/busybox (Debian's busybox-static; its shell runs applets without
# symlinks), /bin/sh and a few applet links, /dev/console (5,1) and /dev/null, empty
# /proc /sys /tmp /root /mnt, /init, and optionally /lib/modules/*.ko + load order.
# Output is reproducible for the same inputs (fixed mtimes, owners 0:0, sorted).
# Needs root (for the device nodes) or fakeroot; installs busybox-static/cpio if
# missing (as root). The last stdout line is the path of OUT.cpio.
#
# ---------------------------------------------------------------------------------
# The /init contract (what a VMM/test can rely on)
# ---------------------------------------------------------------------------------
# 1. /init mounts proc on /proc, sysfs on /sys, devtmpfs on /dev.
# 2. It signals "guest user space is up" to hearth: `devmem 0xc0000000 8 123`
#    (a 1-byte write of 123 to guest-physical 0xC0000000, hearth's control page).
#    This happens before any module is loaded and before the command runs.
# 3. With --modules: it insmods the bundled modules in dependency order.
# 4. It runs the command given on the kernel command line after a standalone `--`:
#        console=ttyS0 ... -- uname -a
#        console=ttyS0 ... -- sh -c "echo hi; exit 3"
#    The text after the first ` -- ` in /proc/cmdline is run verbatim as
#    `sh -c TEXT` (busybox sh), with stdin/stdout/stderr on the console.
#    So the whole rest of the command line is one shell command line: quoting,
#    `;`, `&&`, pipes, redirections and $VARS work with shell semantics. Plain words and
#    "double-quoted" words mean the same as in the kernel's own argv parsing (the
#    kernel strips a pair of double quotes around a word and keeps spaces inside
#    it, e.g. `-- sh -c "exit 3"` -> argv sh,-c,exit 3), so both views agree.
#    Why not simply "$@": the kernel also hands every *unknown* bare boot option
#    before `--` (e.g. `nowatchdog` on a kernel without the watchdog) to init as an
#    argument, so argv cannot be trusted to contain only the command.
#    Limits: the kernel panics ("Too many boot init vars") if the text after `--`
#    has more than CONFIG_INIT_ENV_ARG_LIMIT (32) words as the kernel splits them,
#    and the whole command line is at most 2048 bytes on x86. Single quotes are not
#    special to the kernel (use double quotes for grouping). A `--` inside a quoted
#    boot option before the real one would confuse both the kernel and /init.
# 5. Without `--` (or with nothing after it) it starts an interactive shell on the
#    console: `setsid cttyhack sh` (job control, ctty = the active console).
# 6. Afterwards it prints the line `HEARTH-EXIT <status>` (status 0-255 of the
#    command or shell) and reports it with `devmem 0xc0000008 8 <status>`; hearth
#    then exits with that status. If that write fails (or the VMM ignores it) /init
#    runs `poweroff -f`, and then sleeps forever (init must never exit).
# /init also prints `HEARTH-INIT start` first and `HEARTH-RUN <command>` just before
# running the command (handy markers in the console log).
set -euo pipefail

usage() { sed -n '2,/^# ----/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() { printf 'build-initramfs: ERROR: %s\n' "$*" >&2; exit 1; }

# Drops a module's appended signature (struct module_signature, whose last 4 bytes are the
# big-endian signature length, then the magic string). Checking it would cost the guest
# kernel tens of seconds per module on a nested-PVM host, where kernel code is emulated;
# a test initramfs gains nothing from it (unsigned modules only taint the kernel).
strip_module_signature() {
  local file=$1 magic='~Module signature appended~' size siglen
  [[ "$(tail -c 28 "$file" | head -c 27)" == "$magic" ]] || return 0
  size=$(stat -c %s "$file")
  siglen=$(tail -c 32 "$file" | head -c 4 | od -An -tu1 | awk '{ print $1*16777216 + $2*65536 + $3*256 + $4 }')
  truncate -s $((size - 28 - 12 - siglen)) "$file"
}

OUT=""
MODDIR=""
while (($#)); do
  case "$1" in
    --modules) [[ $# -ge 2 ]] || usage; MODDIR="$2"; shift 2 ;;
    --modules=*) MODDIR="${1#--modules=}"; shift ;;
    -h|--help) usage ;;
    -*) die "unknown option $1" ;;
    *) [[ -z "$OUT" ]] || usage; OUT="$1"; shift ;;
  esac
done
[[ -n "$OUT" ]] || usage

BUSYBOX=/bin/busybox
DEFAULT_MODULES="virtio virtio_ring virtio_mmio virtio_blk virtio_net virtio_rng
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
WANT_MODULES="${HEARTH_INITRAMFS_MODULES:-$DEFAULT_MODULES}"
# Applet links in the image. busybox sh runs any applet without a link; these are
# for programs that exec by path (/bin/sh) and for convenience. Every entry costs
# boot time (the kernel unpacks the archive in emulated code), so keep this short.
APPLETS="sh ash cat cp cttyhack dd devmem dmesg echo env grep head hexdump insmod
  ls lsmod mkdir mknod mount poweroff ps reboot rm setsid sha256sum sleep sync
  tail test true false umount uname"

# --- dependencies --------------------------------------------------------------
need_pkg() { # package command...
  local pkg="$1" c missing=0; shift
  for c in "$@"; do [[ -e "$c" ]] || command -v "$c" >/dev/null 2>&1 || missing=1; done
  ((missing == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing $pkg (apt-get install $pkg, as root)"
  log "installing $pkg"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2 || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2
  }
}
need_pkg busybox-static "$BUSYBOX"
need_pkg cpio cpio
if file -b "$BUSYBOX" 2>/dev/null | grep -q dynamic; then
  die "$BUSYBOX is dynamically linked; install busybox-static"
fi

# Device nodes need root. Re-run ourselves under fakeroot if we are not root.
if [[ $(id -u) != 0 ]]; then
  if [[ -z "${HEARTH_IN_FAKEROOT:-}" ]] && command -v fakeroot >/dev/null; then
    HEARTH_IN_FAKEROOT=1 exec fakeroot -- "$0" ${MODDIR:+--modules "$MODDIR"} "$OUT"
  fi
  die "need root or fakeroot (for /dev/console)"
fi

OUT_ABS="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/hearth-initramfs.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
R="$STAGE/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,root,mnt,etc}
chmod 1777 "$R/tmp"
chmod 700 "$R/root"

cp "$BUSYBOX" "$R/bin/busybox"
BB_APPLETS=" $("$BUSYBOX" --list | tr '\n' ' ') "
for a in $APPLETS; do
  [[ "$BB_APPLETS" == *" $a "* ]] || die "busybox lacks applet $a"
  ln -s busybox "$R/bin/$a"
done
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"

# --- modules -------------------------------------------------------------------
if [[ -n "$MODDIR" ]]; then
  [[ -f "$MODDIR/modules.dep" ]] || die "$MODDIR/modules.dep missing (run depmod -b ROOT VERSION)"
  declare -A DEP PATHOF SEEN
  while IFS= read -r line; do
    mod="${line%%:*}"
    base=$(basename "$mod"); base="${base%%.ko*}"; base="${base//-/_}"
    PATHOF[$base]="$mod"
    DEP[$mod]="${line#*:}"
  done < "$MODDIR/modules.dep"
  ORDER=()
  visit() { # module path relative to MODDIR; appends deps first, then itself
    local m="$1" d
    [[ -n "${SEEN[$m]:-}" ]] && return 0
    SEEN[$m]=1
    for d in ${DEP[$m]}; do visit "$d"; done
    ORDER+=("$m")
  }
  for want in $WANT_MODULES; do
    w="${want//-/_}"
    if [[ -n "${PATHOF[$w]:-}" ]]; then
      visit "${PATHOF[$w]}"
    elif grep -Eq "/${w}\.ko$|/${want}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
      log "module $want is built into the kernel"
    else
      die "module $want not found in $MODDIR"
    fi
  done
  mkdir -p "$R/lib/modules"
  : > "$R/lib/modules/load-order"
  for m in "${ORDER[@]}"; do
    base=$(basename "$m"); name="${base%%.ko*}.ko"
    src="$MODDIR/$m"
    case "$base" in
      *.ko) cp "$src" "$R/lib/modules/$name" ;;
      *.ko.xz) xz -dc "$src" > "$R/lib/modules/$name" ;;
      *.ko.zst) zstd -qdc "$src" > "$R/lib/modules/$name" ;;
      *.ko.gz) gzip -dc "$src" > "$R/lib/modules/$name" ;;
      *) die "unknown module file type: $src" ;;
    esac
    strip_module_signature "$R/lib/modules/$name"
    echo "$name" >> "$R/lib/modules/load-order"
  done
  log "modules (load order): $(tr '\n' ' ' < "$R/lib/modules/load-order")"
fi

# --- /init ---------------------------------------------------------------------
cat > "$R/init" <<'INIT'
#!/bin/sh
# hearth test initramfs /init (generated by resources/build-initramfs.sh; the
# contract is documented in that script's header).
export PATH=/bin:/sbin HOME=/root TERM=linux
echo "HEARTH-INIT start"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -c /dev/mem ] || mknod /dev/mem c 1 1
[ -c /dev/null ] || mknod /dev/null c 1 3

# Boot complete: 1-byte write of 123 to hearth's control page.
devmem 0xc0000000 8 123 || echo "HEARTH-INIT warning: boot-complete devmem write failed"

if [ -f /lib/modules/load-order ]; then
  while read -r m; do
    insmod "/lib/modules/$m" || echo "HEARTH-INIT warning: insmod $m failed"
  done < /lib/modules/load-order
fi

# Everything after the first standalone "--" in the raw kernel command line.
cmd=""
read -r cmdline < /proc/cmdline
case " $cmdline " in
  *" -- "*)
    rest=" $cmdline "
    rest="${rest#* -- }"
    cmd="${rest% }"
    ;;
esac

if [ -n "$cmd" ]; then
  echo "HEARTH-RUN $cmd"
  sh -c "$cmd"
  status=$?
else
  setsid cttyhack sh
  status=$?
fi
echo "HEARTH-EXIT $status"
sync
devmem 0xc0000008 8 "$status" || echo "HEARTH-INIT warning: exit devmem write failed"
# Still running: the VMM did not act on the exit write. Power off instead.
poweroff -f
while :; do sleep 3600; done
INIT
chmod 755 "$R/init"

# --- archive -------------------------------------------------------------------
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc --owner=0:0 --reproducible) > "$OUT_ABS.tmp"
mv -f "$OUT_ABS.tmp" "$OUT_ABS"
log "wrote $OUT_ABS ($(stat -c %s "$OUT_ABS") bytes)"
echo "$OUT_ABS"
