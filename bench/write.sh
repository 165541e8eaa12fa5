#!/usr/bin/env bash
#
# make bench, second part: write performance of qcow2fs compared with qemu-storage-daemon's FUSE
# export (writable=on) of the same kind of image, measured in the same run, plus the no-I/O FUSE
# server (bench/zero-fuse.mjs, writable) that shows the ceiling of the FUSE binding itself.
#
# Every measurement of qcow2fs or qsd writes into an image created for it (qemu-img create,
# 64 KiB clusters), mounted only for that measurement; afterwards the server is stopped
# (`qcow2fs unmount MNT`, SIGTERM for qsd) and `qemu-img check` must pass, or the run stops.
#
# Cases, each run BENCH_REPS times per target (interleaved across targets), median reported:
#   seq-write      dd bs=1M conv=fsync,notrunc of BENCH_IMAGE_MIB MiB of realistic data
#                  (bench/make-data.mjs, read into the host page cache first) into an empty
#                  image; the image must then equal the data (qemu-img compare)
#   rand-qd1       fio 4 KiB random writes, psync, iodepth 1, time based, into an empty image
#   rand-qd16      the same with libaio, iodepth 16
#   scatter-plain  BENCH_SCATTER_WRITES fio 4 KiB writes at distinct random offsets (fixed seed
#                  and data) into an empty overlay over a fully allocated backing image
#   scatter-extl2  the same with an overlay with extended L2 entries (extended_l2=on)
# For the scatter cases the figure is the growth of the overlay's allocated size (stat %b x 512,
# after the server closed it) per guest byte written; the qcow2fs and qsd overlays of one
# repetition must have the same guest contents (qemu-img compare). The no-I/O server takes
# part in seq-write, rand-qd1 and rand-qd16 (it has no image).
#
# Environment knobs (defaults in brackets):
#   BENCH_WORK_DIR [.tmp/bench-write]  images, mountpoints, logs (needs ~3.5 GiB free)
#   BENCH_REPS [3]                  repetitions of each measurement
#   BENCH_FIO_RUNTIME [20]          seconds per time-based fio run
#   BENCH_IMAGE_MIB [1024]          guest size of the images and of the sequential write
#   BENCH_SCATTER_WRITES [4096]     4 KiB writes per scatter case
#   BENCH_QCOW2FS_OPTS []           extra arguments for `qcow2fs mount`
#   BENCH_TARGETS [qcow2fs qsd zero]  what to measure; a partial run never updates the doc
#   BENCH_CASES [all five]          which cases to run; a partial run never updates the doc
#   BENCH_UPDATE_DOC [1]            0: do not rewrite the write results section of
#                                   docs/PERFORMANCE.md
#
# Besides each figure, the CPU time the server process used for it is recorded (seconds per
# GiB, microseconds per write), the bytes the server process dirtied in the page cache
# (/proc/PID/io write_bytes) and the growth of the image file's allocated size. Results:
# bench/results/write-latest.md (git-ignored) and the section between the bench-write-results
# markers of docs/PERFORMANCE.md. About 10 to 15 minutes with the defaults.
#
# Requires root (drop_caches, FUSE mounts), qemu-img, qemu-storage-daemon, fio, fusermount.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_TAG=bench-write
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

REPS=${BENCH_REPS:-3}
FIO_RUNTIME_S=${BENCH_FIO_RUNTIME:-20}
IMAGE_MIB=${BENCH_IMAGE_MIB:-1024}
SCATTER_WRITES=${BENCH_SCATTER_WRITES:-4096}
QCOW2FS_OPTS=${BENCH_QCOW2FS_OPTS:-}
UPDATE_DOC=${BENCH_UPDATE_DOC:-1}
ALL_CASES="seq-write rand-qd1 rand-qd16 scatter-plain scatter-extl2"
TARGET_KINDS=" ${BENCH_TARGETS:-qcow2fs qsd zero} "
read -r -a CASES <<<"${BENCH_CASES:-$ALL_CASES}"
MOUNT_TIMEOUT_S=30
STOP_TIMEOUT_S=60
# Fixed offsets and data for the scatter cases, so that every target writes the same bytes.
SCATTER_SEED=20261121
SCATTER_PATTERN=0x71636f77

set_work_dir "$ROOT/.tmp/bench-write"
BASE=$IMAGE_DIR/base.qcow2
IMAGE_BYTES=$((IMAGE_MIB * 1024 * 1024))
# Bump when make-data.mjs or the conversion options change, so cached images are rebuilt.
IMAGE_RECIPE="v1 size=${IMAGE_MIB}MiB cluster=64KiB"

install_cleanup

# ---------------------------------------------------------------------------------------------
# Preconditions

require_root
require_tools node npx qemu-img qemu-storage-daemon fio fusermount findmnt dd stat sync timeout
require_positive_int BENCH_REPS "$REPS"
require_positive_int BENCH_FIO_RUNTIME "$FIO_RUNTIME_S"
require_positive_int BENCH_IMAGE_MIB "$IMAGE_MIB"
require_positive_int BENCH_SCATTER_WRITES "$SCATTER_WRITES"
((SCATTER_WRITES <= IMAGE_MIB * 256)) || die "BENCH_SCATTER_WRITES exceeds the 4 KiB blocks of the image ($((IMAGE_MIB * 256)))"

# shellcheck disable=SC2086 # TARGET_KINDS is a list of words
require_known BENCH_TARGETS kind "qcow2fs qsd zero" $TARGET_KINDS
((${#CASES[@]} > 0)) || die "BENCH_CASES is empty"
require_known BENCH_CASES case "$ALL_CASES" "${CASES[@]}"
wants_case() { [[ " ${CASES[*]} " == *" $1 "* ]]; }
if ! wants qcow2fs || ! wants qsd || ! wants zero || [[ ${CASES[*]} != "$ALL_CASES" ]]; then
  leave_doc_alone "partial run (BENCH_TARGETS=${BENCH_TARGETS:-}, BENCH_CASES=${BENCH_CASES:-})"
fi

prepare_work_dir

# ---------------------------------------------------------------------------------------------
# Build

if wants qcow2fs; then build_if_stale; fi

# ---------------------------------------------------------------------------------------------
# Source data and the backing image (cached in the work dir between runs)

if ! inputs_cached "$IMAGE_RECIPE" "$DATA_RAW" "$BASE"; then
  generate_data "$IMAGE_MIB" $((IMAGE_MIB * 1024 * 7 / 2 + 256 * 1024))
  log "converting to a fully allocated qcow2 image (the backing file of the scatter cases)"
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 -S 0 "$DATA_RAW" "$BASE"
  qemu-img check -q "$BASE" || die "qemu-img check failed for $BASE"
  holes=$(count_unallocated_extents "$BASE")
  [[ $holes -eq 0 ]] || die "$BASE has $holes unallocated or zero extents"
  inputs_made "$IMAGE_RECIPE"
else
  log "reusing data and backing image in $IMAGE_DIR"
fi

# The images written by the measurements: `qemu-img create`, as a user would make them.
# Commands are kept in arrays, so that the report shows exactly what ran.
create_command() { # CASE IMAGE -> CMD
  case $1 in
    seq-write | rand-*) CMD=(qemu-img create -q -f qcow2 -o cluster_size=64k "$2" "${IMAGE_MIB}M") ;;
    scatter-plain) CMD=(qemu-img create -q -f qcow2 -o cluster_size=64k -b "$(basename "$BASE")" -F qcow2 "$2") ;;
    scatter-extl2) CMD=(qemu-img create -q -f qcow2 -o "extended_l2=on,cluster_size=64k" -b "$(basename "$BASE")" -F qcow2 "$2") ;;
    *) die "no image recipe for case $1" ;;
  esac
}

create_image() { # CASE IMAGE (in IMAGE_DIR, next to the backing file it may name)
  rm -f "$2"
  create_command "$1" "$2"
  "${CMD[@]}" >>"$LOG_DIR/create.log" 2>&1 || die "${CMD[*]} failed (see $LOG_DIR/create.log)"
}

# ---------------------------------------------------------------------------------------------
# Servers. start_* set RAW (the file to write) and SERVER_PID; stop_* stop them and return once
# the image is closed.

RAW=
SERVER_PID=
QCOW2FS_MNT=$MNT_ROOT/qcow2fs
QSD_FILE=$MNT_ROOT/qsd.raw
ZERO_MNT=$MNT_ROOT/zero
UNMOUNT_FAILURES=0
mkdir -p "$QCOW2FS_MNT" "$ZERO_MNT"
: >"$QSD_FILE" # the FUSE export mounts over an existing regular file
MOUNTS+=("$QCOW2FS_MNT" "$QSD_FILE" "$ZERO_MNT")
QCOW2FS_MNTS+=("$QCOW2FS_MNT")

qcow2fs_mount_command() { # IMAGE MNT -> CMD
  # -o rw: an image that cannot be written is refused instead of mounted read-only.
  # shellcheck disable=SC2206 # QCOW2FS_OPTS is a list of words on purpose
  CMD=(node "$CLI" mount -o rw $QCOW2FS_OPTS "$1" "$2")
}

start_qcow2fs() { # IMAGE
  qcow2fs_mount_command "$1" "$QCOW2FS_MNT"
  run_qcow2fs_mount "$1" "$QCOW2FS_MNT" "$LOG_DIR/qcow2fs.log" "$LOG_DIR/qcow2fs-mount.out"
}

stop_qcow2fs() {
  local logfile=$LOG_DIR/qcow2fs.log deadline=$((SECONDS + STOP_TIMEOUT_S))
  if ! timeout "$STOP_TIMEOUT_S" node "$CLI" unmount "$QCOW2FS_MNT" >>"$logfile" 2>&1; then
    # Counted and reported: the server may still have unmounted and closed the image.
    UNMOUNT_FAILURES=$((UNMOUNT_FAILURES + 1))
    log "qcow2fs unmount $QCOW2FS_MNT reported a failure (see $logfile); waiting for the server"
  fi
  while process_running "$SERVER_PID"; do
    ((SECONDS < deadline)) || die "the qcow2fs server $SERVER_PID is still running ${STOP_TIMEOUT_S}s after unmount"
    sleep 0.1
  done
  unset "LIVE_PIDS[$SERVER_PID]"
  ! is_mounted "$QCOW2FS_MNT" || die "$QCOW2FS_MNT is still mounted after its server ended"
}

qsd_command() { # IMAGE EXPORT_FILE -> CMD
  # Commas in QEMU option values are escaped by doubling them.
  CMD=(qemu-storage-daemon
    --blockdev "driver=file,node-name=file,filename=${1//,/,,},aio=threads,cache.direct=off"
    --blockdev "driver=qcow2,node-name=qcow2,file=file"
    --export "type=fuse,id=exp,node-name=qcow2,mountpoint=${2//,/,,},writable=on")
}

start_qsd() { # IMAGE
  local logfile=$LOG_DIR/qsd.log
  qsd_command "$1" "$QSD_FILE"
  "${CMD[@]}" >>"$logfile" 2>&1 &
  SERVER_PID=$!
  LIVE_PIDS[$SERVER_PID]=qsd
  wait_mounted "$QSD_FILE" "$QSD_FILE" "$SERVER_PID" "$logfile" "qemu-storage-daemon ($1)"
  RAW=$QSD_FILE
}

stop_qsd() { # qsd flushes and closes the image on SIGTERM
  local rc=0
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || rc=$?
  unset "LIVE_PIDS[$SERVER_PID]"
  ((rc == 0)) || die "qemu-storage-daemon exited with status $rc (see $LOG_DIR/qsd.log)"
  ! is_mounted "$QSD_FILE" || die "$QSD_FILE is still mounted after qemu-storage-daemon ended"
}

ZERO_RAW=$ZERO_MNT/zero.raw
ZERO_PID=
ZERO_OPTIONS=
start_zero() { # once: the no-I/O server stays mounted for the whole run
  local logfile=$LOG_DIR/zero.log options=
  if [[ -f $ROOT/dist/lib/fuse/native.js ]]; then
    options=$(qcow2fs_option_string false "$LOG_DIR/zero.log") || {
      log "cannot read qcow2fs's FUSE options from dist/ (see $logfile)"
      options=
    }
  fi
  # Without `ro` in its options zero-fuse accepts writes; its own defaults are read-only.
  [[ -n $options ]] || options="-ofsname=zero-fuse,subtype=zero-fuse,default_permissions,max_read=131072,max_readahead=131072,big_writes,kernel_cache"
  ZERO_OPTIONS=$options
  node bench/zero-fuse.mjs "$ZERO_MNT" "$IMAGE_BYTES" "$options" >"$logfile" 2>&1 &
  ZERO_PID=$!
  LIVE_PIDS[$ZERO_PID]=zero
  wait_mounted "$ZERO_MNT" "$ZERO_RAW" "$ZERO_PID" "$logfile" "zero-fuse"
  [[ -w $ZERO_RAW ]] || die "zero-fuse mounted $ZERO_RAW read-only"
  log "no-I/O server: $ZERO_RAW"
}

start_server() { # KIND IMAGE
  case $1 in
    qcow2fs) start_qcow2fs "$2" ;;
    qsd) start_qsd "$2" ;;
    zero) RAW=$ZERO_RAW SERVER_PID=$ZERO_PID ;;
  esac
}

stop_server() { # KIND
  case $1 in
    qcow2fs) stop_qcow2fs ;;
    qsd) stop_qsd ;;
    zero) ;;
  esac
  RAW=''
  SERVER_PID=
}

# ---------------------------------------------------------------------------------------------
# Smoke test of every target, which also decides whether fio can use O_DIRECT: a 4 KiB write
# with oflag=direct into a scratch image, then unmount and qemu-img check.

if wants zero; then start_zero; fi

FIO_CACHE_FLAGS=(--direct=1)
FIO_CACHE_NOTE="O_DIRECT (--direct=1)"
for kind in $TARGET_KINDS; do
  probe=$IMAGE_DIR/run-probe.qcow2
  [[ $kind == zero ]] || create_image rand-qd1 "$probe"
  start_server "$kind" "$probe"
  if ! dd if=/dev/urandom of="$RAW" bs=4096 count=1 oflag=direct conv=notrunc status=none 2>>"$LOG_DIR/direct-probe.log"; then
    dd if=/dev/urandom of="$RAW" bs=4096 count=1 conv=notrunc,fsync status=none 2>>"$LOG_DIR/direct-probe.log" ||
      die "$kind: a 4 KiB write to $RAW failed (see $LOG_DIR/direct-probe.log)"
    log "$kind rejects O_DIRECT writes; fio runs buffered"
    FIO_CACHE_FLAGS=()
    FIO_CACHE_NOTE="buffered writes (a target rejected O_DIRECT)"
  fi
  stop_server "$kind"
  if [[ $kind != zero ]]; then
    qemu-img check -q "$probe" || die "qemu-img check failed for the image $kind wrote the probe into"
    rm -f "$probe"
  fi
done
log "every target accepts writes; fio uses ${FIO_CACHE_NOTE}"

# ---------------------------------------------------------------------------------------------
# Measurements

seq_command() { CMD=(dd "if=$1" "of=$2" bs=1M "conv=fsync,notrunc"); } # DATA RAW
fio_rand_command() { # RAW IOENGINE IODEPTH JSON
  CMD=(fio --name=randwrite "--filename=$1" --rw=randwrite --bs=4k "--ioengine=$2" "--iodepth=$3"
    "${FIO_CACHE_FLAGS[@]}" "--runtime=$FIO_RUNTIME_S" --time_based --norandommap --randrepeat=0
    --fallocate=none --output-format=json "--output=$4")
}
fio_scatter_command() { # RAW JSON
  # The random map (fio's default) makes every offset distinct; the seed and the pattern make
  # offsets and data the same for every target.
  CMD=(fio --name=scatter "--filename=$1" --rw=randwrite --bs=4k --ioengine=psync --iodepth=1
    "${FIO_CACHE_FLAGS[@]}" "--io_size=$((SCATTER_WRITES * 4096))" --randrepeat=1 "--randseed=$SCATTER_SEED"
    "--buffer_pattern=$SCATTER_PATTERN" --scramble_buffers=0 --fallocate=none --output-format=json "--output=$2")
}
workload_command() { # CASE RAW JSON -> CMD
  case $1 in
    seq-write) seq_command "$DATA_RAW" "$2" ;;
    rand-qd1) fio_rand_command "$2" psync 1 "$3" ;;
    rand-qd16) fio_rand_command "$2" libaio 16 "$3" ;;
    scatter-*) fio_scatter_command "$2" "$3" ;;
  esac
}

prepare_caches() { # CASE: everything written back and dropped; the data to write cached
  drop_caches
  case $1 in
    seq-write) cat "$DATA_RAW" >/dev/null ;;
    # The backing image cached, so that copying on write measures the servers, not the disk.
    scatter-*) cat "$BASE" >/dev/null ;;
  esac
}

# Bytes of page cache the process (all its threads) has dirtied so far: what it will cost the
# disk. A page dirtied again before it was written back counts once.
write_bytes() { # PID
  awk '/^write_bytes:/ { print $2; found = 1 } END { exit !found }' "/proc/$1/io" || die "cannot read /proc/$1/io"
}
allocated_bytes() { # FILE
  echo $(($(stat -c %b "$1") * 512))
}

run_dd() { # RAW -> "MB/s WRITES BYTES"
  local out
  seq_command "$DATA_RAW" "$1"
  out=$(LC_ALL=C "${CMD[@]}" 2>&1) || die "dd to $1 failed: $out"
  parse_dd_output "$out"
  [[ $DD_BYTES -eq $IMAGE_BYTES ]] || die "dd wrote $DD_BYTES of $IMAGE_BYTES bytes to $1"
  awk -v bytes="$DD_BYTES" -v secs="$DD_SECS" 'BEGIN { printf "%.1f %d %d\n", bytes / secs / 1e6, bytes / 1048576, bytes }'
}

run_fio() { # CASE RAW JSON -> "IOPS WRITES BYTES"
  local json=$3 expected_bytes=0
  [[ $1 != scatter-* ]] || expected_bytes=$((SCATTER_WRITES * 4096))
  workload_command "$1" "$2" "$json"
  "${CMD[@]}" >/dev/null 2>"$json.stderr" ||
    die "fio on $2 failed: $(tail -n 5 "$json.stderr" 2>/dev/null)"
  node -e '
    const fs = require("node:fs")
    const report = JSON.parse(fs.readFileSync(process.argv[1], "utf8"))
    const job = report.jobs[0]
    const expected = Number(process.argv[2])
    if (!job || job.error !== 0 || !(job.write.total_ios > 0) || (expected > 0 && job.write.io_bytes !== expected)) {
      console.error("fio job failed: " + JSON.stringify(job && { error: job.error, ios: job.write.total_ios, bytes: job.write.io_bytes }))
      process.exit(1)
    }
    console.log(job.write.iops.toFixed(1), job.write.total_ios, job.write.io_bytes)' "$json" "$expected_bytes" ||
    die "bad fio result in $json"
}

ms_since() { awk -v t0="$1" -v t1="$(date +%s%N)" 'BEGIN { printf "%.1f\n", (t1 - t0) / 1e6 }'; }

# One measurement: fresh image, caches dropped, server started, workload, `sync RAW` after fio
# (timed), counters read, server stopped, image checked. Appends a sample line.
measure() { # REP CASE KIND
  local rep=$1 case_name=$2 kind=$3 image=- out value writes guest cpu flush_ms=-
  local ticks0 wbytes0 ticks wbytes alloc0=0 alloc=- t0
  if [[ $kind != zero ]]; then
    image=$IMAGE_DIR/run-$case_name-$kind-$rep.qcow2
    create_image "$case_name" "$image"
    alloc0=$(allocated_bytes "$image")
  fi
  prepare_caches "$case_name"
  start_server "$kind" "$image"
  ticks0=$(cpu_ticks "$SERVER_PID")
  wbytes0=$(write_bytes "$SERVER_PID")
  if [[ $case_name == seq-write ]]; then
    out=$(run_dd "$RAW") || exit 1
  else
    out=$(run_fio "$case_name" "$RAW" "$LOG_DIR/fio-$case_name-$kind-$rep.json") || exit 1
    # fio does not fsync; this makes the writes durable (metadata included) before the counters
    # are read, and its time is reported next to the figure.
    t0=$(date +%s%N)
    sync "$RAW" || die "sync $RAW failed"
    flush_ms=$(ms_since "$t0")
  fi
  read -r value writes guest <<<"$out"
  ticks=$(($(cpu_ticks "$SERVER_PID") - ticks0))
  wbytes=$(($(write_bytes "$SERVER_PID") - wbytes0))
  stop_server "$kind"
  if [[ $kind != zero ]]; then
    qemu-img check "$image" >"$LOG_DIR/check.log" 2>&1 || {
      cat "$LOG_DIR/check.log" >&2
      die "qemu-img check failed for $image, written by $kind ($case_name, repetition $rep)"
    }
    if [[ $case_name == seq-write ]]; then
      qemu-img compare -f qcow2 -F raw "$image" "$DATA_RAW" >"$LOG_DIR/compare.log" 2>&1 || {
        cat "$LOG_DIR/compare.log" >&2
        die "$image, written by $kind, differs from the data written into it"
      }
    fi
    sync "$image"
    alloc=$(($(allocated_bytes "$image") - alloc0))
    # The scatter images are compared across targets after the repetition; the rest can go.
    [[ $case_name == scatter-* ]] || rm -f "$image"
  fi
  if [[ $case_name == seq-write ]]; then
    cpu=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v b="$guest" 'BEGIN { printf "%.3f", t / hz * 1073741824 / b }')
  else
    cpu=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$writes" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
  fi
  [[ -n $value && -n $cpu ]] || die "no result for $case_name on $kind"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$case_name" "$kind" "$value" "$cpu" \
    "$writes" "$guest" "$alloc" "$wbytes" "$flush_ms" >>"$SAMPLES"
  log "rep $rep/$REPS $case_name $kind: $value (server CPU $cpu, host allocated $alloc and dirtied $wbytes bytes for $guest guest bytes, sync after ${flush_ms} ms)"
}

TARGETS=()
for kind in qsd qcow2fs zero; do
  if wants "$kind"; then TARGETS+=("$kind"); fi
done

check_busy_before
printf 'rep\tcase\tkind\tvalue\tcpu\twrites\tguest_bytes\thost_alloc_bytes\thost_write_bytes\tflush_ms\n' >"$SAMPLES"
log "measuring: ${TARGETS[*]} x ${CASES[*]} x $REPS reps (fio ${FIO_RUNTIME_S}s each)"
for rep in $(seq "$REPS"); do
  rep_order "$rep"
  for case_name in "${CASES[@]}"; do
    for kind in "${ORDER[@]}"; do
      # The no-I/O server has no image to copy on write into.
      [[ $kind == zero && $case_name == scatter-* ]] && continue
      measure "$rep" "$case_name" "$kind"
    done
    if [[ $case_name == scatter-* ]]; then
      ours=$IMAGE_DIR/run-$case_name-qcow2fs-$rep.qcow2
      theirs=$IMAGE_DIR/run-$case_name-qsd-$rep.qcow2
      if [[ -f $ours && -f $theirs ]]; then
        qemu-img compare -f qcow2 -F qcow2 "$ours" "$theirs" >"$LOG_DIR/compare.log" 2>&1 || {
          cat "$LOG_DIR/compare.log" >&2
          die "$case_name, repetition $rep: the guest contents qcow2fs and qsd wrote differ"
        }
      fi
      rm -f "$ours" "$theirs"
    fi
  done
done

BUSY_AFTER=$(cpu_busy_pct)
if wants zero; then
  if ! kill -0 "$ZERO_PID" 2>/dev/null || [[ ! -e $ZERO_RAW ]]; then die "the no-I/O server ended during the run"; fi
fi

# ---------------------------------------------------------------------------------------------
# Report

# The commands as run (command_text), with placeholders for the per-measurement paths.
{
  machine_meta "$BUSY_BEFORE" "$BUSY_AFTER"
  printf 'image_mib=%s\n' "$IMAGE_MIB"
  printf 'base_bytes=%s\n' "$(stat -c %s "$BASE")"
  printf 'scatter_writes=%s\n' "$SCATTER_WRITES"
  printf 'reps=%s\n' "$REPS"
  printf 'fio_runtime=%s\n' "$FIO_RUNTIME_S"
  printf 'fio_cache=%s\n' "$FIO_CACHE_NOTE"
  printf 'unmount_failures=%s\n' "$UNMOUNT_FAILURES"
  printf 'zero_options=%s\n' "$ZERO_OPTIONS"
  CMD=(bash bench/write.sh)
  [[ $IMAGE_MIB == 1024 && $SCATTER_WRITES == 4096 && $REPS == 3 && $FIO_RUNTIME_S == 20 && -z $QCOW2FS_OPTS ]] ||
    CMD=(BENCH_IMAGE_MIB="$IMAGE_MIB" BENCH_SCATTER_WRITES="$SCATTER_WRITES" BENCH_REPS="$REPS"
      BENCH_FIO_RUNTIME="$FIO_RUNTIME_S" ${QCOW2FS_OPTS:+BENCH_QCOW2FS_OPTS="'$QCOW2FS_OPTS'"} bash bench/write.sh)
  meta_command cmd_run
  create_command seq-write IMAGE && meta_command cmd_create_empty
  create_command scatter-plain IMAGE && meta_command cmd_create_plain
  create_command scatter-extl2 IMAGE && meta_command cmd_create_extl2
  qcow2fs_mount_command IMAGE MNT && meta_command cmd_qcow2fs
  qsd_command IMAGE EXPORT && meta_command cmd_qsd
  for case_name in $ALL_CASES; do
    workload_command "$case_name" RAW OUT.json
    meta_command "cmd_$case_name"
  done
} >"$META"

write_report write 'qcow2fs write benchmark: latest run' <<'REPORT'
// Turns the samples of one bench/write.sh run into markdown: medians per case and target, the
// qcow2fs / qsd ratio with the goals, the no-I/O ceiling, every sample (the head and tail of
// the program: write_report in bench/lib.sh).
const rows = readSamples(['value', 'guest_bytes'])

const CASES = [
  { id: 'seq-write', label: `Sequential write of ${meta.image_mib} MiB, dd bs=1M conv=fsync, empty image`, unit: 'MB/s', cpuUnit: 'CPU s per GiB', goal: ['>=', 1.0] },
  { id: 'rand-qd1', label: '4 KiB random write, fio psync, iodepth 1, empty image', unit: 'IOPS', cpuUnit: 'CPU µs per write', goal: ['>=', 0.8] },
  { id: 'rand-qd16', label: '4 KiB random write, fio libaio, iodepth 16, empty image', unit: 'IOPS', cpuUnit: 'CPU µs per write' },
  { id: 'scatter-plain', label: `${meta.scatter_writes} scattered 4 KiB writes, overlay over a backing file`, unit: 'IOPS', cpuUnit: 'CPU µs per write' },
  { id: 'scatter-extl2', label: `${meta.scatter_writes} scattered 4 KiB writes, overlay with extended L2`, unit: 'IOPS', cpuUnit: 'CPU µs per write' },
]
const KINDS = { qsd: 'qsd FUSE export', qcow2fs: 'qcow2fs', zero: 'no-I/O fuse-native server' }
const EXTL2_GOAL = 1 / 8

const of = (caseId, kind) => rows.filter((r) => r.case === caseId && r.kind === kind)
const medianOf = (caseId, kind, pick) => median(of(caseId, kind).map(pick))
const perGuest = (field) => (r) => (r[field] === undefined ? undefined : r[field] / r.guest_bytes)
const fmtValue = (value) => fmt(value, 0)
const ratioText = (a, b) => (a === undefined || b === undefined || b === 0 ? 'n/a' : `${(a / b).toFixed(2)}x`)

out.push(`Run of ${meta.date}, commit ${meta.git}, command ${code(meta.cmd_run)} (part of ${code('make bench')}).`)
out.push('')
out.push(
  `Machine: ${meta.cpu}, ${meta.nproc} CPUs, ${meta.memory} RAM, ${meta.kernel}; ` +
    `Node.js ${meta.node}, ${meta.qemu}, ${meta.fio}, fuse-native ${meta.fuse_native}; ` +
    `${meta.load} (other work on the machine shows here).`,
)
out.push('')
out.push(
  `Each figure is the median of ${meta.reps} runs, each into an image made for it; time-based fio runs ` +
    `last ${meta.fio_runtime} s; fio uses ${meta.fio_cache}. After every run the server was stopped and ` +
    `${code('qemu-img check')} passed; the sequentially written images equal the data ` +
    `(${code('qemu-img compare')}), and the scatter overlays written by qcow2fs and qsd in the same ` +
    `repetition have the same guest contents. ${code('qcow2fs unmount')} reported a failure ` +
    `${meta.unmount_failures} times (the server still unmounted and closed the image).`,
)
out.push('')
out.push('Commands (RAW: the raw file of the target; IMAGE, MNT, EXPORT: per-run paths in the work dir):')
out.push('')
out.push(`- empty image: ${code(meta.cmd_create_empty)}`)
out.push(`- overlay: ${code(meta.cmd_create_plain)} (base.qcow2: the ${meta.image_mib} MiB of data, every cluster allocated)`)
out.push(`- overlay with extended L2: ${code(meta.cmd_create_extl2)}`)
out.push(`- qcow2fs: ${code(meta.cmd_qcow2fs)}, stopped with ${code('node dist/cli/main.js unmount MNT')}`)
out.push(`- qsd: ${code(meta.cmd_qsd)}, stopped with SIGTERM`)
out.push(`- no-I/O server: ${code(`node bench/zero-fuse.mjs MNT ${Number(meta.image_mib) * 1048576} '${meta.zero_options}'`)}`)
for (const c of CASES) {
  out.push(`- ${c.id}: ${code(meta[`cmd_${c.id}`])}` + (c.id === 'seq-write' ? '' : `, then ${code('sync RAW')}`))
}
out.push('')
// The scatter cases are about what the writes cost the host file: their first rows report the
// host bytes per guest byte (lower is better), the write rate follows.
const MAIN_ROWS = CASES.flatMap((c) =>
  c.id.startsWith('scatter-')
    ? [
        { c, unit: 'host bytes allocated per guest byte (lower is better)', pick: perGuest('host_alloc_bytes'), digits: 3 },
        { c, unit: c.unit, pick: (r) => r.value, digits: 0 },
      ]
    : [{ c, unit: c.unit, pick: (r) => r.value, digits: 0, goal: c.goal }],
)
out.push('| Case | Figure | qsd FUSE export | qcow2fs | qcow2fs / qsd | Goal | no-I/O FUSE ceiling |')
out.push('|---|---|---:|---:|---:|---|---:|')
for (const row of MAIN_ROWS) {
  const { c } = row
  const qsd = medianOf(c.id, 'qsd', row.pick)
  const ours = medianOf(c.id, 'qcow2fs', row.pick)
  const zero = medianOf(c.id, 'zero', row.pick)
  let goalText = ''
  if (row.goal) {
    const ratio = qsd && ours ? ours / qsd : undefined
    goalText = `${row.goal[0]} ${row.goal[1].toFixed(1)}x` + (ratio === undefined ? '' : `: ${ratio >= row.goal[1] ? 'met' : '**missed**'}`)
  }
  out.push(
    `| ${c.id}: ${c.label} | ${row.unit} | ${fmt(qsd, row.digits)} | ${fmt(ours, row.digits)} | ${ratioText(ours, qsd)} | ` +
      `${goalText} | ${zero === undefined ? '' : fmt(zero, row.digits)} |`,
  )
}
out.push('')
out.push(
  'Host bytes per guest byte written, scatter cases: the growth of the overlay file\'s allocated size ' +
    '(`stat -c %b` x 512, after the server closed it and `sync`) divided by the guest bytes fio wrote. ' +
    'This counts every block the writes made the host file system allocate (data copied on write from ' +
    'the backing file, new metadata clusters), not blocks rewritten in place. Next to it, the page ' +
    'cache bytes the server process dirtied during the writes and the `sync` (`write_bytes` of ' +
    '/proc/PID/io), which also counts rewritten metadata, but each page once until it is written back. ' +
    'Lower is better.',
)
out.push('')
out.push('| Case | Figure | qsd FUSE export | qcow2fs | qcow2fs / qsd |')
out.push('|---|---|---:|---:|---:|')
for (const caseId of ['scatter-plain', 'scatter-extl2']) {
  for (const [figure, field] of [['host bytes allocated per guest byte', 'host_alloc_bytes'], ['page cache bytes dirtied per guest byte', 'host_write_bytes']]) {
    const qsd = medianOf(caseId, 'qsd', perGuest(field))
    const ours = medianOf(caseId, 'qcow2fs', perGuest(field))
    if (qsd === undefined && ours === undefined) continue
    out.push(`| ${caseId} | ${figure} | ${fmt(qsd, 3)} | ${fmt(ours, 3)} | ${ratioText(ours, qsd)} |`)
  }
}
out.push('')
out.push('| Extended L2: host bytes allocated with it / without it | qsd FUSE export | qcow2fs | Goal (qcow2fs) |')
out.push('|---|---:|---:|---|')
{
  const cost = (kind, caseId) => medianOf(caseId, kind, perGuest('host_alloc_bytes'))
  const share = (kind) => {
    const plain = cost(kind, 'scatter-plain')
    const ext = cost(kind, 'scatter-extl2')
    return plain && ext !== undefined ? ext / plain : undefined
  }
  const ours = share('qcow2fs')
  const goalText = `<= 1/8 (${EXTL2_GOAL.toFixed(3)})` + (ours === undefined ? '' : `: ${ours <= EXTL2_GOAL ? 'met' : '**missed**'}`)
  out.push(`| ${meta.scatter_writes} scattered 4 KiB writes | ${fmt(share('qsd'), 3)} | ${fmt(ours, 3)} | ${goalText} |`)
}
out.push('')
out.push(
  'CPU time the server process used (user + system, all its threads) for the same runs, median: ' +
    'seconds per GiB written sequentially, microseconds per 4 KiB write; and the time of the ' +
    '`sync RAW` after each fio run (fio itself does not fsync). Lower is better.',
)
out.push('')
out.push('| Case | qsd CPU | qcow2fs CPU | qcow2fs / qsd | no-I/O server CPU | qsd sync after (ms) | qcow2fs sync after (ms) |')
out.push('|---|---:|---:|---:|---:|---:|---:|')
for (const c of CASES) {
  const digits = c.unit === 'MB/s' ? 2 : 1
  const qsd = medianOf(c.id, 'qsd', (r) => r.cpu)
  const ours = medianOf(c.id, 'qcow2fs', (r) => r.cpu)
  const zero = medianOf(c.id, 'zero', (r) => r.cpu)
  out.push(
    `| ${c.id} (${c.cpuUnit}) | ${fmt(qsd, digits)} | ${fmt(ours, digits)} | ${ratioText(ours, qsd)} | ${zero === undefined ? '' : fmt(zero, digits)} | ` +
      `${fmt(medianOf(c.id, 'qsd', (r) => r.flush_ms))} | ${fmt(medianOf(c.id, 'qcow2fs', (r) => r.flush_ms))} |`,
  )
}
out.push('')
out.push('All samples, in run order (host: bytes allocated per guest byte):')
out.push('')
out.push('| Case | Target | Samples | Median | CPU per sample | host per sample |')
out.push('|---|---|---|---:|---|---|')
for (const c of CASES) {
  for (const kind of Object.keys(KINDS)) {
    const list = of(c.id, kind)
    if (list.length === 0) continue
    out.push(
      `| ${c.id} (${c.unit}) | ${KINDS[kind]} | ${list.map((r) => fmtValue(r.value)).join(', ')} | ` +
        `${fmtValue(median(list.map((r) => r.value)))} | ${list.map((r) => fmt(r.cpu, c.unit === 'MB/s' ? 2 : 1)).join(', ')} | ` +
        // The time-based cases overwrite freely: their host bytes per guest byte mean nothing.
        `${c.id.startsWith('rand-') ? '' : list.map((r) => fmt(perGuest('host_alloc_bytes')(r), 3)).join(', ')} |`,
    )
  }
  // Both targets ran back to back in each repetition: the per-repetition ratio shows how much
  // of a difference is noise of the machine.
  const ours = of(c.id, 'qcow2fs')
  const qsd = of(c.id, 'qsd')
  if (ours.length > 0 && ours.length === qsd.length) {
    const ratios = ours.map((r, i) => r.value / qsd[i].value)
    out.push(`| ${c.id} | qcow2fs / qsd, same repetition | ${ratios.map((r) => r.toFixed(2) + 'x').join(', ')} | ${median(ratios).toFixed(2)}x | | |`)
  }
}
REPORT
