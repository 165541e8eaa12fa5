#!/usr/bin/env bash
# make demo: mounts the demo disk (fixtures/demo/overlay.qcow2, a compressed qcow2 overlay with
# a relative backing file base.qcow2) with qcow2fs and shows what ordinary tools read from the
# raw file it exposes: the MBR partition table (sfdisk), file(1), and the ext4 file system in
# partition 1 (debugfs). What they print is checked against fixtures/manifest.json. Then it
# creates a new image with `qcow2fs create`, mounts it read-write, puts an ext4 file system with
# a few files on the raw file (mkfs.ext4 -d), unmounts, and checks the image: e2fsck and debugfs
# through a read-only remount, and `qemu-img check` when qemu-img is installed. Needs no QEMU.
# Exits non-zero on any failure; the mounts are always undone on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=fixtures/demo/overlay.qcow2
MANIFEST=fixtures/manifest.json
qcow2fs() { node "$ROOT/dist/cli/main.js" "$@"; } # the package bin, built in dist/

if [[ -t 1 ]]; then BOLD=$'\e[1m' RESET=$'\e[0m'; else BOLD='' RESET=''; fi
step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$RESET"; }
say() { printf '$ %s\n' "$*"; } # the command line a reader would type
show() { # show CMD...: print the command line, then run it
  say "$@"
  "$@"
}
die() {
  printf 'demo: %s\n' "$*" >&2
  exit 1
}

# --- tools -------------------------------------------------------------------------------------
missing_packages=()
command -v sfdisk >/dev/null 2>&1 || missing_packages+=(fdisk)
command -v file >/dev/null 2>&1 || missing_packages+=(file)
command -v debugfs >/dev/null 2>&1 && command -v mkfs.ext4 >/dev/null 2>&1 || missing_packages+=(e2fsprogs)
command -v fusermount >/dev/null 2>&1 || missing_packages+=(fuse)
if ((${#missing_packages[@]} > 0)); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    step "installing ${missing_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing_packages[@]}"
  else
    die "missing tools: install the packages ${missing_packages[*]} (or run as root with apt-get)"
  fi
fi
[[ -e /dev/fuse ]] || die "/dev/fuse does not exist: FUSE is not available here"
[[ -f $IMAGE && -f $MANIFEST ]] || die "$IMAGE or $MANIFEST is missing"

if [[ ! -f dist/cli/main.js ]]; then
  step "building"
  make build
fi

# --- expected results, from the manifest --------------------------------------------------------
work=$(mktemp -d -t qcow2fs-demo.XXXXXX)
mnt=$work/mnt
mnt2=$work/mnt2
mkdir "$mnt" "$mnt2" "$work/expected"

is_mounted() { grep -q " $1 fuse" /proc/self/mounts; }
cleanup() {
  local status=$?
  for m in "$mnt" "$mnt2"; do
    if is_mounted "$m"; then
      qcow2fs unmount "$m" 2>/dev/null || fusermount -uz "$m" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Writes the manifest's partition table (sfdisk --dump) and file contents to $work/expected,
# and prints the partition's byte offset.
partition_offset=$(node --input-type=module - "$ROOT/$MANIFEST" "$IMAGE" "$work/expected" <<'EOF'
import { readFileSync, writeFileSync } from 'node:fs'
const [manifestPath, image, outDir] = process.argv.slice(2)
const entry = JSON.parse(readFileSync(manifestPath, 'utf8')).find((e) => `fixtures/${e.file}` === image)
if (!entry?.demo) throw new Error(`no demo entry for ${image} in the manifest`)
writeFileSync(`${outDir}/partition-table`, entry.demo.partitionTable)
writeFileSync(`${outDir}/files`, entry.demo.files.map((f) => f.path).join('\n') + '\n')
entry.demo.files.forEach((f, i) => writeFileSync(`${outDir}/file-${i}`, f.content))
console.log(entry.demo.partitionOffset)
EOF
)

# --- the demo ------------------------------------------------------------------------------------
step "what qcow2fs reads from the image header (overlay over a relative backing file)"
show qcow2fs info "$IMAGE"

step "mount: each image becomes MOUNTPOINT/STEM.raw"
say qcow2fs mount "$IMAGE" "$mnt"
mount_output=$(qcow2fs mount "$IMAGE" "$mnt") || die "qcow2fs mount failed (exit status $?)"
mapfile -t raw_paths <<<"$mount_output"
printf '%s\n' "${raw_paths[@]}"
raw=$mnt/overlay.raw
[[ ${#raw_paths[@]} == 1 && ${raw_paths[0]} == "$raw" ]] || die "mount printed '${raw_paths[*]}', expected $raw"
is_mounted "$mnt" || die "$mnt is not mounted after qcow2fs mount returned"
show ls -l "$mnt"

step "the partition table, as sfdisk reads it from the raw file"
show sfdisk -l "$raw"
# The manifest holds `sfdisk --dump overlay.raw` as run in the raw file's directory.
(cd "$mnt" && sfdisk --dump overlay.raw) >"$work/partition-table"
if ! diff -u "$work/expected/partition-table" "$work/partition-table"; then
  die "the partition table differs from the manifest's"
fi
echo "(matches the manifest's partition table)"

step "file(1) on the raw file"
show file -s "$raw"
file -s "$raw" | grep -q 'DOS/MBR boot sector' || die "file(1) does not see an MBR"

step "the ext4 file system in partition 1 (byte offset $partition_offset), read by debugfs"
fs="$raw?offset=$partition_offset"
if ! debugfs -R 'stats' "$fs" 2>/dev/null | grep -q '^Filesystem volume name'; then
  # debugfs older than 1.43 has no ?offset=: copy the partition out of the raw file instead.
  fs=$work/partition.img
  show dd if="$raw" of="$fs" bs=1M skip=$((partition_offset / 1048576)) status=none
fi
say "debugfs -R stats '$fs' | grep -E '^(Filesystem volume name|Filesystem UUID|Block count|Block size):'"
debugfs -R 'stats' "$fs" 2>/dev/null | grep -E '^(Filesystem volume name|Filesystem UUID|Block count|Block size):'
say debugfs -R "'ls -l /'" "'$fs'"
debugfs -R 'ls -l /' "$fs" 2>/dev/null
index=0
while read -r path; do
  say debugfs -R "'cat $path'" "'$fs'"
  debugfs -R "cat $path" "$fs" 2>/dev/null | tee "$work/file-$index"
  cmp -s "$work/expected/file-$index" "$work/file-$index" || die "$path differs from the manifest's content"
  echo "(matches the manifest)"
  index=$((index + 1))
done <"$work/expected/files"
((index > 0)) || die "the manifest lists no files"

step "unmount: returns once the images are closed and the mount is gone"
show qcow2fs unmount "$mnt" || die "qcow2fs unmount failed (exit status $?)"
echo "qcow2fs unmount returned 0"
if is_mounted "$mnt"; then die "$mnt is still mounted"; fi
echo "$mnt is no longer mounted"

step "create a new image (64 MiB, extended L2 entries) and mount it read-write"
new_image=$work/new.qcow2
show qcow2fs create --extended-l2 "$new_image" 64M
say qcow2fs mount "$new_image" "$mnt2"
new_raw=$(qcow2fs mount "$new_image" "$mnt2") || die "qcow2fs mount failed (exit status $?)"
echo "$new_raw"
[[ $new_raw == "$mnt2/new.raw" ]] || die "mount printed '$new_raw', expected $mnt2/new.raw"

step "write into it with ordinary tools: an ext4 file system holding a few files"
mkdir "$work/tree"
cp README.md "$work/tree/README.md"
seq 1 20000 >"$work/tree/numbers.txt"
show mkfs.ext4 -q -L qcow2fs-demo -d "$work/tree" "$new_raw"
show file -s "$new_raw"
file -s "$new_raw" | grep -q 'ext4 filesystem' || die "file(1) does not see the new ext4 file system"

step "unmount; the image is closed and consistent"
show qcow2fs unmount "$mnt2" || die "qcow2fs unmount failed (exit status $?)"
show qcow2fs info "$new_image"
if command -v qemu-img >/dev/null 2>&1; then
  show qemu-img check "$new_image" || die "qemu-img check found problems in $new_image"
else
  echo "(qemu-img is not installed: skipping qemu-img check; the checks below still run)"
fi

step "mount it again read-only and check what was written"
say qcow2fs mount -o ro "$new_image" "$mnt2"
qcow2fs mount -o ro "$new_image" "$mnt2" >/dev/null || die "qcow2fs mount failed (exit status $?)"
show e2fsck -fn "$new_raw" || die "e2fsck found errors in the new file system"
for name in README.md numbers.txt; do
  say debugfs -R "'cat /$name'" "'$new_raw'" "| cmp - $work/tree/$name"
  debugfs -R "cat /$name" "$new_raw" 2>/dev/null | cmp - "$work/tree/$name" || die "/$name differs from what was written"
  echo "(identical)"
done
show qcow2fs unmount "$mnt2" || die "qcow2fs unmount failed (exit status $?)"

step "demo finished: all checks passed"
