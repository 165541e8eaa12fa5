#!/usr/bin/env bash
#
# make bench: read throughput of qcow2fs compared with qemu-storage-daemon's FUSE export of the
# same qcow2 image, measured in the same run, plus a no-I/O FUSE server (bench/zero-fuse.mjs)
# that shows the ceiling of the FUSE binding itself.
#
# Images (cached in the work dir between runs): 1 GiB of mixed data (machine code from /usr and
# pseudo-random blocks, see bench/make-data.mjs) converted to a fully allocated qcow2 image and
# to a compressed one (qemu-img convert -c), both with 64 KiB clusters.
#
# Cases, each run BENCH_REPS times per target (interleaved across targets), median reported:
#   seq-cold   dd bs=1M of the whole raw view after `sync; echo 3 > drop_caches`
#   seq-warm   the same, but with the qcow2 file read back into the host page cache first
#   rand-qd1   fio 4 KiB random read, psync, iodepth 1, time based
#   rand-qd16  fio 4 KiB random read, libaio, iodepth 16, time based
# The random cases run with the image file in the host page cache and the raw view cold, and
# use O_DIRECT when every target accepts it (else --invalidate=1 after dropping caches).
#
# Environment knobs (defaults in brackets):
#   BENCH_WORK_DIR [.tmp/bench]     images, mountpoints, logs (needs ~3 GiB free)
#   BENCH_REPS [3]                  repetitions of each measurement
#   BENCH_FIO_RUNTIME [20]          seconds per fio run
#   BENCH_IMAGE_MIB [1024]          guest size of the images
#   BENCH_QCOW2FS_OPTS [-o ro]      arguments for `qcow2fs mount` (read-only: qemu-storage-daemon
#                                   serves the same images at the same time, and both lock them)
#   BENCH_TARGETS [qcow2fs qsd engine zero]  what to measure (engine: qcow2fs's engine without
#                                   FUSE, bench/engine-read.mjs); a partial run never updates the doc
#   BENCH_UPDATE_DOC [1]            0: do not rewrite the results section of docs/PERFORMANCE.md
#   BENCH_CPU_PROFILE [0]           1: run the qcow2fs servers with node --cpu-prof (slower;
#                                   profiles land in the work dir; the doc is left alone)
#
# Besides each figure, the CPU time the server process used for it is recorded (seconds per
# GiB, microseconds per random read). Results: bench/results/latest.md (git-ignored) and the
# section between the bench-results markers of docs/PERFORMANCE.md. About 15 minutes.
#
# Requires root (drop_caches, FUSE mounts), qemu-img, qemu-storage-daemon, fio, fusermount.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_TAG=bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

REPS=${BENCH_REPS:-3}
FIO_RUNTIME_S=${BENCH_FIO_RUNTIME:-20}
IMAGE_MIB=${BENCH_IMAGE_MIB:-1024}
QCOW2FS_OPTS=${BENCH_QCOW2FS_OPTS:--o ro}
UPDATE_DOC=${BENCH_UPDATE_DOC:-1}
CPU_PROFILE=${BENCH_CPU_PROFILE:-0}
TARGET_KINDS=" ${BENCH_TARGETS:-qcow2fs qsd engine zero} "
MOUNT_TIMEOUT_S=30

set_work_dir "$ROOT/.tmp/bench"
IMAGE_BYTES=$((IMAGE_MIB * 1024 * 1024))
# Bump when make-data.mjs or the conversion options change, so cached images are rebuilt.
IMAGE_RECIPE="v1 size=${IMAGE_MIB}MiB cluster=64KiB"

install_cleanup

# ---------------------------------------------------------------------------------------------
# Preconditions

require_root
require_tools node npx qemu-img qemu-storage-daemon fio fusermount findmnt dd cmp
require_positive_int BENCH_REPS "$REPS"
require_positive_int BENCH_FIO_RUNTIME "$FIO_RUNTIME_S"
require_positive_int BENCH_IMAGE_MIB "$IMAGE_MIB"

prepare_work_dir

# shellcheck disable=SC2086 # TARGET_KINDS is a list of words
require_known BENCH_TARGETS kind "qcow2fs qsd engine zero" $TARGET_KINDS
if ! wants qcow2fs || ! wants qsd || ! wants engine || ! wants zero; then
  leave_doc_alone "partial run (BENCH_TARGETS=$BENCH_TARGETS)"
fi
if [[ $CPU_PROFILE == 1 ]]; then leave_doc_alone "profiling run"; fi

# ---------------------------------------------------------------------------------------------
# Build

if wants qcow2fs || wants engine; then build_if_stale; fi

# ---------------------------------------------------------------------------------------------
# Images

ALLOCATED=$IMAGE_DIR/allocated.qcow2
COMPRESSED=$IMAGE_DIR/compressed.qcow2

if ! inputs_cached "$IMAGE_RECIPE" "$DATA_RAW" "$ALLOCATED" "$COMPRESSED"; then
  generate_data "$IMAGE_MIB" $((IMAGE_MIB * 1024 * 5 / 2 + 256 * 1024))
  log "converting to a fully allocated qcow2 image"
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 -S 0 "$DATA_RAW" "$ALLOCATED"
  log "converting to a compressed qcow2 image (takes a while)"
  qemu-img convert -W -m 4 -f raw -O qcow2 -o cluster_size=65536 -c "$DATA_RAW" "$COMPRESSED"
  # Every guest cluster must be allocated in both images, or the benchmark reads holes.
  for img in "$ALLOCATED" "$COMPRESSED"; do
    qemu-img check -q "$img" || die "qemu-img check failed for $img"
    holes=$(count_unallocated_extents "$img")
    [[ $holes -eq 0 ]] || die "$img has $holes unallocated or zero extents"
  done
  inputs_made "$IMAGE_RECIPE"
else
  log "reusing images in $IMAGE_DIR"
fi
compressed_pct=$(qemu-img check "$COMPRESSED" 2>/dev/null | sed -n 's/.* \([0-9.]*\)% compressed clusters.*/\1/p')

# ---------------------------------------------------------------------------------------------
# Targets. Each target is "KIND|IMAGE_LABEL|RAW_VIEW|HOST_IMAGE|SERVER_PID" ("-" for none).

TARGETS=()

start_qcow2fs() { # LABEL IMAGE
  local label=$1 image=$2 mnt=$MNT_ROOT/qcow2fs-$1 logfile=$LOG_DIR/qcow2fs-$1.log pid stem server_pid launcher=
  stem=$(basename "$image" .qcow2)
  mkdir -p "$mnt"
  MOUNTS+=("$mnt")
  QCOW2FS_MNTS+=("$mnt")
  if [[ $CPU_PROFILE == 1 ]]; then
    # Foreground (-f), so that the profiled process is the server itself.
    mkdir -p "$WORK_DIR/profiles"
    # shellcheck disable=SC2086 # QCOW2FS_OPTS is a list of words on purpose
    node --cpu-prof --cpu-prof-dir="$WORK_DIR/profiles" --cpu-prof-name="qcow2fs-$label.cpuprofile" \
      "$CLI" mount -f $QCOW2FS_OPTS "$image" "$mnt" >"$logfile" 2>&1 &
    pid=$!
    LIVE_PIDS[$pid]=qcow2fs
  else
    # As users run it: `mount` starts a background server and exits once the mount is live.
    # shellcheck disable=SC2086
    node "$CLI" mount $QCOW2FS_OPTS "$image" "$mnt" >"$logfile" 2>&1 &
    pid=$!
    launcher=launcher
  fi
  wait_mounted "$mnt" "$mnt/$stem.raw" "$pid" "$logfile" "qcow2fs mount $image" $launcher
  if [[ $CPU_PROFILE == 1 ]]; then
    server_pid=$pid
  else
    server_pid=$(find_serve_pid "$mnt" 2>>"$logfile") || die "cannot ask the qcow2fs server of $mnt for its pid (see $logfile)"
    LIVE_PIDS[$server_pid]=qcow2fs
  fi
  TARGETS+=("qcow2fs|$label|$mnt/$stem.raw|$image|$server_pid")
  log "qcow2fs: $mnt/$stem.raw"
}

start_qsd() { # LABEL IMAGE
  local label=$1 image=$2 file=$MNT_ROOT/qsd-$1.raw logfile=$LOG_DIR/qsd-$1.log pid
  : >"$file" # the FUSE export mounts over an existing regular file
  MOUNTS+=("$file")
  # Commas in QEMU option values are escaped by doubling them.
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file,filename=${image//,/,,},read-only=on,aio=threads,cache.direct=off" \
    --blockdev "driver=qcow2,node-name=qcow2,file=file,read-only=on" \
    --export "type=fuse,id=exp,node-name=qcow2,mountpoint=${file//,/,,},writable=off" \
    >"$logfile" 2>&1 &
  pid=$!
  LIVE_PIDS[$pid]=qsd
  wait_mounted "$file" "$file" "$pid" "$logfile" "qemu-storage-daemon ($image)"
  TARGETS+=("qsd|$label|$file|$image|$pid")
  log "qsd: $file"
}

start_zero() {
  local mnt=$MNT_ROOT/zero logfile=$LOG_DIR/zero.log pid options=
  mkdir -p "$mnt"
  MOUNTS+=("$mnt")
  if [[ -f $ROOT/dist/lib/fuse/native.js ]]; then
    options=$(qcow2fs_option_string true "$LOG_DIR/zero.log") || {
      log "cannot read qcow2fs's FUSE options from dist/ (see $logfile); zero-fuse uses its defaults"
      options=
    }
  fi
  ZERO_OPTIONS=${options:-zero-fuse defaults}
  node bench/zero-fuse.mjs "$mnt" "$IMAGE_BYTES" ${options:+"$options"} >"$logfile" 2>&1 &
  pid=$!
  LIVE_PIDS[$pid]=zero
  wait_mounted "$mnt" "$mnt/zero.raw" "$pid" "$logfile" "zero-fuse"
  TARGETS+=("zero|none|$mnt/zero.raw|-|$pid")
  log "no-I/O server: $mnt/zero.raw"
}

if wants qsd; then start_qsd allocated "$ALLOCATED"; fi
if wants qcow2fs; then start_qcow2fs allocated "$ALLOCATED"; fi
if wants qsd; then start_qsd compressed "$COMPRESSED"; fi
if wants qcow2fs; then start_qcow2fs compressed "$COMPRESSED"; fi
if wants zero; then start_zero; fi

# ---------------------------------------------------------------------------------------------
# Correctness gate: a fast wrong answer is not a result. Every raw view must equal the data.

for target in "${TARGETS[@]}"; do
  IFS="|" read -r kind label file _ <<<"$target"
  size=$(stat -c %s "$file")
  [[ $size -eq $IMAGE_BYTES ]] || die "$kind/$label: $file is $size bytes, expected $IMAGE_BYTES"
  if [[ $kind == zero ]]; then
    cmp -n "$IMAGE_BYTES" "$file" /dev/zero >/dev/null || die "$kind: $file does not read as zeros"
  else
    cmp "$file" "$DATA_RAW" >/dev/null || die "$kind/$label: $file differs from the source data"
  fi
done
log "all raw views match the source data"

# O_DIRECT on FUSE depends on the server; use it for fio only if every target accepts it.
FIO_CACHE_FLAGS=(--direct=1)
FIO_CACHE_NOTE="O_DIRECT (--direct=1)"
for target in "${TARGETS[@]}"; do
  IFS="|" read -r kind label file _ <<<"$target"
  if ! dd if="$file" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>>"$LOG_DIR/direct-probe.log"; then
    log "$kind/$label rejects O_DIRECT; fio runs buffered with --invalidate=1"
    FIO_CACHE_FLAGS=(--invalidate=1)
    FIO_CACHE_NOTE="buffered, --invalidate=1 after dropping caches (a target rejected O_DIRECT)"
  fi
done

# The qcow2fs engine without FUSE (bench/engine-read.mjs), for splitting the mount's figures
# into engine time and FUSE round trip. Random cases run ENGINE_RANDOM_S seconds.
ENGINE_RANDOM_S=3
if wants engine; then
  TARGETS+=("engine|allocated|-|$ALLOCATED|-" "engine|compressed|-|$COMPRESSED|-")
fi

# ---------------------------------------------------------------------------------------------
# Measurements

CASES=(seq-cold seq-warm rand-qd1 rand-qd16)

prepare_caches() { # CASE HOST_IMAGE
  drop_caches
  if [[ $1 != seq-cold && $2 != - ]]; then
    cat "$2" >/dev/null
  fi
}

measure_dd() { # FILE -> MB/s (10^6 bytes per second)
  local out
  out=$(LC_ALL=C dd if="$1" of=/dev/null bs=1M 2>&1) || die "dd of $1 failed: $out"
  parse_dd_output "$out"
  [[ $DD_BYTES -eq $IMAGE_BYTES ]] || die "dd read $DD_BYTES of $IMAGE_BYTES bytes from $1"
  awk -v bytes="$DD_BYTES" -v secs="$DD_SECS" 'BEGIN { printf "%.1f\n", bytes / secs / 1e6 }'
}

measure_fio() { # FILE ENGINE IODEPTH JSON_OUT -> "IOPS READS"
  local file=$1 engine=$2 depth=$3 json=$4
  fio --name=randread --filename="$file" --readonly --rw=randread --bs=4k \
    --ioengine="$engine" --iodepth="$depth" "${FIO_CACHE_FLAGS[@]}" \
    --runtime="$FIO_RUNTIME_S" --time_based --norandommap --randrepeat=0 \
    --output-format=json --output="$json" >/dev/null 2>"$json.stderr" ||
    die "fio on $file failed: $(cat "$json.stderr" "$json" 2>/dev/null | tail -n 5)"
  node -e '
    const fs = require("node:fs")
    const report = JSON.parse(fs.readFileSync(process.argv[1], "utf8"))
    const job = report.jobs[0]
    if (!job || job.error !== 0 || !(job.read.total_ios > 0)) {
      console.error("fio job failed: " + JSON.stringify(job && { error: job.error, ios: job.read.total_ios }))
      process.exit(1)
    }
    console.log(job.read.iops.toFixed(1), job.read.total_ios)' "$json" || die "bad fio result in $json"
}

measure_engine() { # MODE IMAGE -> "MB/s-or-IOPS CPU-per-unit"
  node bench/engine-read.mjs "$1" "$2" "$ENGINE_RANDOM_S" 2>>"$LOG_DIR/engine.log" ||
    die "engine-read $1 $2 failed (see $LOG_DIR/engine.log)"
}

check_busy_before
# Samples: the figure, and the CPU time the server process used for it: seconds per GiB for
# the sequential cases, microseconds per read for the random ones (less sensitive to other
# work on the machine than the throughput is).
printf 'rep\tcase\tkind\timage\tvalue\tcpu\n' >"$SAMPLES"
log "measuring: ${#TARGETS[@]} targets (engine ones without FUSE) x ${#CASES[@]} cases x $REPS reps (fio ${FIO_RUNTIME_S}s each)"
for rep in $(seq "$REPS"); do
  rep_order "$rep"
  for case_name in "${CASES[@]}"; do
    for target in "${ORDER[@]}"; do
      IFS="|" read -r kind label file host_image server_pid <<<"$target"
      prepare_caches "$case_name" "$host_image"
      json=$LOG_DIR/fio-$case_name-$kind-$label-$rep.json
      if [[ $kind == engine ]]; then
        mode=seq
        [[ $case_name == rand-* ]] && mode=$case_name
        read -r value cpu < <(measure_engine "$mode" "$host_image")
      else
        ticks_before=$(cpu_ticks "$server_pid")
        case $case_name in
          seq-*) value=$(measure_dd "$file") ;;
          rand-qd1) read -r value reads < <(measure_fio "$file" psync 1 "$json") ;;
          rand-qd16) read -r value reads < <(measure_fio "$file" libaio 16 "$json") ;;
        esac
        ticks=$(($(cpu_ticks "$server_pid") - ticks_before))
        if [[ $case_name == seq-* ]]; then
          cpu=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v mib="$IMAGE_MIB" 'BEGIN { printf "%.3f", t / hz * 1024 / mib }')
        else
          cpu=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$reads" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
        fi
      fi
      [[ -n $value && -n $cpu ]] || die "no result for $case_name on $kind/$label"
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$case_name" "$kind" "$label" "$value" "$cpu" >>"$SAMPLES"
      log "rep $rep/$REPS $case_name $kind/$label: $value (server CPU $cpu)"
    done
  done
done

BUSY_AFTER=$(cpu_busy_pct)

# Every raw view must still be mounted (a server that crashed mid-run invalidates the run).
for target in "${TARGETS[@]}"; do
  IFS="|" read -r kind label file _ <<<"$target"
  [[ $kind == engine || -e $file ]] || die "$kind/$label: $file vanished during the run"
done

# ---------------------------------------------------------------------------------------------
# Report

{
  machine_meta "$BUSY_BEFORE" "$BUSY_AFTER"
  printf 'image_mib=%s\n' "$IMAGE_MIB"
  printf 'allocated_bytes=%s\n' "$(stat -c %s "$ALLOCATED")"
  printf 'compressed_bytes=%s\n' "$(stat -c %s "$COMPRESSED")"
  printf 'compressed_pct=%s\n' "$compressed_pct"
  printf 'reps=%s\n' "$REPS"
  printf 'fio_runtime=%s\n' "$FIO_RUNTIME_S"
  printf 'engine_random_s=%s\n' "$ENGINE_RANDOM_S"
  printf 'fio_cache=%s\n' "$FIO_CACHE_NOTE"
  printf 'qcow2fs_opts=%s\n' "$QCOW2FS_OPTS"
  printf 'zero_options=%s\n' "${ZERO_OPTIONS:-}"
  printf 'cpu_profile=%s\n' "$CPU_PROFILE"
} >"$META"

report_args=(--samples "$SAMPLES" --meta "$META" --out "$RESULTS_DIR/latest.md")
if [[ $UPDATE_DOC == 1 ]]; then report_args+=(--doc "$ROOT/docs/PERFORMANCE.md"); fi
node bench/report.mjs "${report_args[@]}"
finish_results latest
