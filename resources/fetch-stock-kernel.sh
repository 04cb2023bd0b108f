#!/usr/bin/env bash
# fetch-stock-kernel.sh - fetch Debian's stock cloud kernel (unpatched) for hearth's
# "stock distro kernel" tests, and extract an ELF vmlinux from it (cached).
#
# Usage:
#   resources/fetch-stock-kernel.sh          fetch (or reuse); last stdout line = vmlinux path
#   resources/fetch-stock-kernel.sh --print-dir   print the cache dir of the current pick
#   resources/fetch-stock-kernel.sh --symbols     also write the kernel's real System.map
#                                                 beside vmlinux (for hearth run --sample-rip)
#
# What it does:
#   1. Resolves the image package that the metapackage linux-image-cloud-amd64
#      depends on (apt-cache depends), e.g. linux-image-6.1.0-57-cloud-amd64.
#      Override with HEARTH_STOCK_PACKAGE=linux-image-<release>.
#   2. `apt-get download`s that .deb (it is not installed) and unpacks it with
#      dpkg-deb -x.
#   3. Extracts the ELF vmlinux from boot/vmlinuz-<release>: the bzImage's
#      protected-mode part starts at (setup_sects + 1) * 512 (setup_sects at 0x1f1;
#      0 means 4); the compressed payload is payload_length bytes (u32 at 0x24c) at
#      payload_offset (u32 at 0x248) from there. Debian's payload is legacy LZ4
#      (lz4 -dc); gzip/xz/zstd payloads are handled too. The result must be ELF64
#      x86-64.
#   4. Runs depmod (the .deb ships no modules.dep) so the modules tree is usable by
#      build-initramfs.sh --modules.
#   5. With --symbols: Debian's /boot/System.map is a stub; the real one is in the
#      linux-image-<release>-dbg package (~280 MB, same version). Downloads it (or takes
#      the .deb at $HEARTH_STOCK_DBG_DEB) and keeps only usr/lib/debug/boot/System.map-<release>,
#      as System.map beside vmlinux, where `hearth run --sample-rip` looks by default.
#
# Cache layout (HEARTH_CACHE defaults to $HOME/.cache/hearth):
#   $HEARTH_CACHE/stock/<release>/vmlinux        ELF vmlinux (has the PVH note)
#   $HEARTH_CACHE/stock/<release>/bzImage        the package's /boot/vmlinuz-<release>
#   $HEARTH_CACHE/stock/<release>/config         /boot/config-<release>
#   $HEARTH_CACHE/stock/<release>/lib/modules/<release>/   modules tree (+ modules.dep)
#   $HEARTH_CACHE/stock/<release>/modules -> lib/modules/<release>
#   $HEARTH_CACHE/stock/<release>/deb-version    Debian package version
#   $HEARTH_CACHE/stock/<release>/System.map     the real symbols (--symbols only)
#   $HEARTH_CACHE/stock/current -> <release>
# Work happens in $HEARTH_CACHE/stock/.tmp-*, renamed into place when complete,
# so an interrupted run is never taken as done. If apt cannot resolve the package
# (offline) but a previous fetch exists, that one is used.
# Installs missing tools (lz4, binutils, kmod, ...) with apt-get (needs root).
# Progress goes to stderr; stdout carries only the result path.
set -euo pipefail

CACHE="${HEARTH_CACHE:-$HOME/.cache/hearth}"
SCACHE="$CACHE/stock"
META=linux-image-cloud-amd64

log() { printf 'fetch-stock-kernel: %s\n' "$*" >&2; }
die() { printf 'fetch-stock-kernel: ERROR: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_update_once() {
  ((apt_updated)) && return 0
  apt_updated=1
  [[ $(id -u) == 0 ]] || return 0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || log "apt-get update failed"
}

download_deb() { # PKG[=VERSION] DIR: download the package into DIR; prints the .deb's path
  local pkg="$1" dir="$2" deb
  # apt-get download drops privileges to _apt; it needs a writable cwd.
  chmod 777 "$dir"
  (cd "$dir" && apt-get download -q "$pkg" >&2) || {
    apt_update_once
    (cd "$dir" && apt-get download -q "$pkg" >&2)
  } || die "apt-get download $pkg failed"
  deb=$(find "$dir" -maxdepth 1 -name '*.deb' | head -n1)
  [[ -n "$deb" ]] || die "no .deb downloaded for $pkg"
  echo "$deb"
}

ensure_tools() {
  local missing=() p
  # package:command pairs
  for p in lz4:lz4 binutils:readelf kmod:depmod xz-utils:xz zstd:zstd gzip:gzip \
           dpkg:dpkg-deb apt:apt-get util-linux:flock; do
    command -v "${p#*:}" >/dev/null 2>&1 || missing+=("${p%%:*}")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing tools, install as root: apt-get install ${missing[*]}"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || {
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  }
}

resolve_package() {
  if [[ -n "${HEARTH_STOCK_PACKAGE:-}" ]]; then
    echo "$HEARTH_STOCK_PACKAGE"; return 0
  fi
  local pkg
  pkg=$(apt-cache depends "$META" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1 || true)
  if [[ -z "$pkg" ]]; then
    apt_update_once
    pkg=$(apt-cache depends "$META" 2>/dev/null |
          sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1 || true)
  fi
  echo "$pkg"
}

le32() { # FILE OFFSET -> unsigned 32-bit little-endian value
  od -An -tu4 -j "$2" -N4 --endian=little "$1" | tr -d ' '
}

extract_vmlinux() { # BZIMAGE OUT
  local bz="$1" out="$2" setup_sects pm_start poff plen magic payload
  [[ "$(od -An -c -j 0x202 -N4 "$bz" | tr -d ' ')" == "HdrS" ]] || die "$bz: no bzImage setup header"
  setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
  ((setup_sects == 0)) && setup_sects=4
  pm_start=$(((setup_sects + 1) * 512))
  poff=$(le32 "$bz" $((0x248)))
  plen=$(le32 "$bz" $((0x24c)))
  log "setup_sects=$setup_sects payload_offset=$poff payload_length=$plen"
  payload="$out.payload"
  dd if="$bz" of="$payload" bs=1M iflag=skip_bytes,count_bytes \
     skip=$((pm_start + poff)) count="$plen" status=none
  magic=$(od -An -tx1 -N4 "$payload" | tr -d ' ')
  case "$magic" in
    02214c18*) # legacy LZ4. The kernel appends the decompressed size (u32 LE),
      # which lz4 would take for a broken next block: cut it off and check it.
      local want
      want=$(le32 "$payload" $((plen - 4)))
      head -c $((plen - 4)) "$payload" | lz4 -dc > "$out" 2>"$out.err" ||
        { cat "$out.err" >&2; die "lz4 -dc failed"; }
      [[ $(stat -c %s "$out") == "$want" ]] ||
        die "lz4 output is $(stat -c %s "$out") bytes, the trailer says $want" ;;
    1f8b*) gzip -dc < "$payload" > "$out" 2>"$out.err" || true ;;
    fd377a58*) xz -dc < "$payload" > "$out" 2>"$out.err" || true ;;
    28b52ffd*) zstd -qdc < "$payload" > "$out" 2>"$out.err" || true ;;
    *) die "unknown payload compression (magic $magic)" ;;
  esac
  # Decompressors may complain about the trailing size word; judge by the result.
  if ! readelf -h "$out" 2>/dev/null | grep -q 'Class:.*ELF64' ||
     ! readelf -h "$out" 2>/dev/null | grep -q 'Machine:.*X86-64'; then
    cat "$out.err" >&2 || true
    die "extracted vmlinux is not an ELF64 x86-64 file"
  fi
  rm -f "$payload" "$out.err"
}

fetch() {
  ensure_tools
  mkdir -p "$SCACHE"
  local pkg release dir tmp lockfd
  pkg=$(resolve_package)
  if [[ -z "$pkg" ]]; then
    if [[ -f "$SCACHE/current/.complete" ]]; then
      log "cannot resolve $META (offline?); using the cached $(readlink "$SCACHE/current")"
      echo "$SCACHE/current/vmlinux"; return 0
    fi
    die "cannot resolve the package $META depends on"
  fi
  release="${pkg#linux-image-}"
  dir="$SCACHE/$release"
  if [[ -f "$dir/.complete" ]]; then
    log "cached: $dir"
  else
    exec {lockfd}>"$SCACHE/.lock"
    flock "$lockfd"
    if [[ ! -f "$dir/.complete" ]]; then
      rm -rf "$SCACHE"/.tmp-* "$dir"
      tmp="$SCACHE/.tmp-$release.$$"
      mkdir -p "$tmp/deb" "$tmp/out"
      # shellcheck disable=SC2064
      trap "rm -rf '$tmp'" EXIT
      trap 'exit 130' INT
      trap 'exit 143' TERM
      log "downloading $pkg"
      local deb
      deb=$(download_deb "$pkg" "$tmp/deb") || exit 1
      dpkg-deb -f "$deb" Version > "$tmp/out/deb-version"
      log "unpacking $(basename "$deb")"
      dpkg-deb -x "$deb" "$tmp/root"
      [[ -f "$tmp/root/boot/vmlinuz-$release" ]] || die "no boot/vmlinuz-$release in $deb"
      cp "$tmp/root/boot/vmlinuz-$release" "$tmp/out/bzImage"
      cp "$tmp/root/boot/config-$release" "$tmp/out/config" 2>/dev/null || true
      mkdir -p "$tmp/out/lib/modules"
      mv "$tmp/root/lib/modules/$release" "$tmp/out/lib/modules/$release"
      ln -s "lib/modules/$release" "$tmp/out/modules"
      # (Debian's System.map is a stub pointing to the -dbg package: see --symbols.)
      depmod -b "$tmp/out" "$release"
      extract_vmlinux "$tmp/out/bzImage" "$tmp/out/vmlinux"
      if ! readelf -n "$tmp/out/vmlinux" |
           grep -Eq 'PHYS32_ENTRY|Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+Unknown note type: \(0x0*12\)'; then
        log "warning: vmlinux has no Xen PVH entry note"
      fi
      printf '%s\n' "$pkg" > "$tmp/out/.complete"
      mv -T "$tmp/out" "$dir"
      rm -rf "$tmp"
      trap - EXIT
      log "done: $dir ($(stat -c %s "$dir/vmlinux") bytes vmlinux)"
    fi
  fi
  ln -sfn "$release" "$SCACHE/.current.$$" && mv -T "$SCACHE/.current.$$" "$SCACHE/current"
  echo "$dir/vmlinux"
}

fetch_symbols() { # DIR: the real System.map from the -dbg package, as DIR/System.map
  local dir="$1" release version tmp deb map
  if [[ -s "$dir/System.map" ]]; then
    log "cached: $dir/System.map"; return 0
  fi
  release=$(basename "$(readlink -f "$dir")")
  version=$(cat "$dir/deb-version")
  tmp=$(mktemp -d "$SCACHE/.tmp-dbg.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  if [[ -n "${HEARTH_STOCK_DBG_DEB:-}" ]]; then
    deb="$HEARTH_STOCK_DBG_DEB"
  else
    log "downloading linux-image-$release-dbg $version (~280 MB) for its System.map"
    deb=$(download_deb "linux-image-$release-dbg=$version" "$tmp") || exit 1
  fi
  [[ "$(dpkg-deb -f "$deb" Version)" == "$version" ]] ||
    die "$deb is version $(dpkg-deb -f "$deb" Version), the kernel is $version"
  map="./usr/lib/debug/boot/System.map-$release"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" "$map" ||
    die "no $map in $deb"
  grep -Eq '^[0-9a-f]+ T _text$' "$tmp/$map" || die "$map has no _text symbol"
  mv "$tmp/$map" "$dir/System.map"
  rm -rf "$tmp"
  trap - EXIT
  log "done: $dir/System.map ($(grep -c ' [tTwW] ' "$dir/System.map") code symbols)"
}

case "${1:-}" in
  "") fetch ;;
  --symbols) vmlinux=$(fetch); fetch_symbols "$(dirname "$vmlinux")"; echo "$vmlinux" ;;
  --print-dir) pkg=$(resolve_package); [[ -n "$pkg" ]] || die "cannot resolve"; echo "$SCACHE/${pkg#linux-image-}" ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac
