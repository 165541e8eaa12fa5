#!/usr/bin/env bash
#
# Sequential read of qcow2fs mounts: the working tree against another git revision, in one run,
# with qemu-storage-daemon's FUSE export of the same images as the baseline (as in make bench).
# For a change that should make reads faster (or did the opposite): per build and image, the
# throughput of `dd bs=1M` of the whole raw view, the CPU time of the server process, and how
# many bytes the server read from files (rchar of /proc/PID/io) to serve it.
#
# Usage: bash bench/compare-revs.sh REV [IMAGE...]
#   REV     any git revision (built from `git archive REV` in the work dir)
#   IMAGE   qcow2 images to mount; default: the images of `make bench` (run it once first)
# Environment: BENCH_WORK_DIR [.tmp/bench], BENCH_REPS [3],
#   BENCH_CACHE [warm]: warm = qcow2 file read into the host page cache before each run,
#   cold = all caches dropped.
# Needs root (drop_caches, FUSE).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WORK_DIR=${BENCH_WORK_DIR:-$ROOT/.tmp/bench}
REPS=${BENCH_REPS:-3}
CACHE=${BENCH_CACHE:-warm}

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

(($# >= 1)) || die "usage: bash bench/compare-revs.sh REV [IMAGE...]"
[[ $(id -u) -eq 0 ]] || die "run as root (drop_caches, FUSE mounts)"
[[ $CACHE == warm || $CACHE == cold ]] || die "BENCH_CACHE must be warm or cold"
rev=$(git rev-parse --verify --short "$1^{commit}") || die "unknown revision $1"
shift
images=("$@")
if ((${#images[@]} == 0)); then
  images=("$WORK_DIR/images/allocated.qcow2" "$WORK_DIR/images/compressed.qcow2")
fi
for image in "${images[@]}"; do [[ -f $image ]] || die "no image $image (run make bench once, or name images)"; done

MOUNTS=()
QSD_PIDS=()
cleanup() {
  local rc=$? mnt pid
  trap - EXIT INT TERM
  set +e
  for pid in "${QSD_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for mnt in "${MOUNTS[@]}"; do
    if findmnt -rn --mountpoint "$mnt" >/dev/null 2>&1; then
      # Both builds stop their server when the session ends.
      timeout 20 node "$ROOT/dist/cli/main.js" unmount "$mnt" >/dev/null 2>&1 || fusermount -uz "$mnt" 2>/dev/null
    fi
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Builds: the working tree in place, REV in the work dir (reused when already built).
log "building the working tree"
make build >/dev/null
rev_dir=$WORK_DIR/rev-$rev
if [[ ! -f $rev_dir/dist/cli/main.js ]]; then
  log "building $rev in $rev_dir"
  rm -rf "$rev_dir"
  mkdir -p "$rev_dir"
  git archive "$rev" | tar -x -C "$rev_dir"
  ln -s "$ROOT/node_modules" "$rev_dir/node_modules"
  # The native addons too (image locks, and whatever the revision has).
  make -C "$rev_dir" build >/dev/null
fi

server_pid() { # BUILD_ROOT MOUNTPOINT: asks the server over its control socket
  node --input-type=module -e '
    const control = await import(process.argv[1] + "/dist/lib/fuse/control.js")
    const answer = await control.sendControlRequest(control.controlSocketPath(process.argv[2]), { op: "status" }, 10000)
    answer.hangUp()
    console.log(answer.reply.pid)
  ' "$1" "$2"
}
cpu_ticks() { local stat fields; stat=$(<"/proc/$1/stat"); read -r -a fields <<<"${stat##*) }"; echo $((fields[11] + fields[12])); }
rchar() { awk '$1 == "rchar:" { print $2 }' "/proc/$1/io"; }

declare -A PID FILE
mnt_root=$WORK_DIR/compare-mnt
for stale in "$mnt_root"/*/ "$mnt_root"/*.raw; do
  if [[ -e $stale ]] && findmnt -rn --mountpoint "${stale%/}" >/dev/null 2>&1; then fusermount -uz "${stale%/}" || true; fi
done
rm -rf "$mnt_root"
mkdir -p "$mnt_root"
for image in "${images[@]}"; do
  stem=$(basename "$image" .qcow2)
  file=$mnt_root/qsd-$stem.raw
  : >"$file"
  MOUNTS+=("$file")
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file,filename=${image//,/,,},read-only=on,aio=threads,cache.direct=off" \
    --blockdev "driver=qcow2,node-name=qcow2,file=file,read-only=on" \
    --export "type=fuse,id=exp,node-name=qcow2,mountpoint=${file//,/,,},writable=off" \
    >"$WORK_DIR/compare-qsd-$stem.log" 2>&1 &
  QSD_PIDS+=($!)
  PID[qsd-$stem]=$!
  FILE[qsd-$stem]=$file
  for _ in $(seq 300); do
    findmnt -rn --mountpoint "$file" >/dev/null 2>&1 && break
    kill -0 "${PID[qsd-$stem]}" 2>/dev/null || die "qemu-storage-daemon failed, see $WORK_DIR/compare-qsd-$stem.log"
    sleep 0.1
  done
  findmnt -rn --mountpoint "$file" >/dev/null 2>&1 || die "qemu-storage-daemon did not mount $file"
done
BUILDS=(worktree "$rev")
for build in "${BUILDS[@]}"; do
  build_root=$ROOT
  [[ $build == worktree ]] || build_root=$rev_dir
  for image in "${images[@]}"; do
    stem=$(basename "$image" .qcow2)
    mnt=$mnt_root/$build-$stem
    mkdir -p "$mnt"
    MOUNTS+=("$mnt")
    # Read-only, as in make bench (qemu-storage-daemon serves the same images).
    node "$build_root/dist/cli/main.js" mount -o ro "$image" "$mnt" >/dev/null
    PID[$build-$stem]=$(server_pid "$build_root" "$mnt")
    FILE[$build-$stem]=$mnt/$stem.raw
  done
done

hz=$(getconf CLK_TCK)
samples=$WORK_DIR/compare-samples.tsv
: >"$samples"
for rep in $(seq "$REPS"); do
  for image in "${images[@]}"; do
    stem=$(basename "$image" .qcow2)
    for build in "${BUILDS[@]}" qsd; do
      pid=${PID[$build-$stem]}
      sync
      echo 3 >/proc/sys/vm/drop_caches
      [[ $CACHE == warm ]] && cat "$image" >/dev/null
      ticks=$(cpu_ticks "$pid")
      bytes=$(rchar "$pid")
      line=$(LC_ALL=C dd if="${FILE[$build-$stem]}" of=/dev/null bs=1M 2>&1 | tail -n 1)
      [[ $line =~ ^([0-9]+)\ bytes.*copied,\ ([0-9.e+-]+)\ s ]] || die "cannot parse dd output: $line"
      sleep 0.5 # background reads of the server finish
      read -r mbps cpu host_mib < <(awk -v b="${BASH_REMATCH[1]}" -v s="${BASH_REMATCH[2]}" \
        -v t=$(($(cpu_ticks "$pid") - ticks)) -v hz="$hz" -v r=$(($(rchar "$pid") - bytes)) \
        'BEGIN { printf "%.0f %.2f %.0f\n", b / s / 1e6, t / hz, r / 1048576 }')
      printf '%s\t%s\t%s\t%s\t%s\n' "$stem" "$build" "$mbps" "$cpu" "$host_mib" >>"$samples"
      log "rep $rep $stem $build: $mbps MB/s, server CPU $cpu s, read $host_mib MiB from files"
    done
  done
done

echo
echo "Sequential read (dd bs=1M), image file $([[ $CACHE == warm ]] && echo 'in host page cache' || echo 'cold'), median of $REPS:"
echo
echo "| Image | Build | MB/s | server CPU s | MiB read from files |"
echo "|---|---|---:|---:|---:|"
node -e '
  const rows = require("node:fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => l.split("\t"))
  const median = (v) => { const s = [...v].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2 }
  const keys = [...new Set(rows.map((r) => r[0] + "\t" + r[1]))]
  for (const key of keys) {
    const mine = rows.filter((r) => r[0] + "\t" + r[1] === key)
    const col = (i) => median(mine.map((r) => Number(r[i])))
    const [image, build] = key.split("\t")
    console.log(`| ${image} | ${build} | ${col(2)} | ${col(3).toFixed(2)} | ${col(4)} |`)
  }' "$samples"
