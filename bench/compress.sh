#!/usr/bin/env bash
#
# make bench, third part: the compressed copy of realistic data into a fresh qcow2 image, three
# ways, measured in the same run, for zlib and for zstd images:
#
#   qcow2fs   qemu-img create -f qcow2 -o cluster_size=64k[,compression_type=zstd] IMG SIZE;
#             node dist/cli/main.js mount -o compress IMG MNT; cp DATA MNT/STEM.raw;
#             node dist/cli/main.js unmount MNT. Timed from the start of cp until unmount has
#             returned and the server has exited (unmount finishes the image: compresses what
#             waits, writes, syncs); the server's zombie waiting for init to reap it counts as
#             exited (process_running in bench/lib.sh).
#   qemu-img  qemu-img convert -f raw -c -O qcow2 -o cluster_size=64k[,compression_type=zstd]
#             DATA IMG (qemu-img's defaults otherwise), timed as a whole.
#   qsd       qemu-storage-daemon with the block nodes file -> qcow2 -> compress (QEMU's compress
#             filter) and a writable FUSE export of the compress node, over an image made by the
#             same qemu-img create; dd if=DATA of=EXPORT bs=1M conv=fsync,notrunc (whole clusters,
#             each written once: the only writes the filter accepts), then SIGTERM. Timed from
#             the start of dd until the daemon exited.
#
# DATA is BENCH_COMPRESS_MIB MiB written by bench/make-data.mjs (machine code and data from /usr,
# a quarter incompressible), read into the host page cache before every measurement (after the
# caches are dropped), so that reading it is not what is measured. After every measurement
# `qemu-img check` must find no errors and no leaks and `qemu-img compare DATA IMG` must find the
# image identical to DATA, or the run stops. Each measurement runs BENCH_REPS times per target,
# interleaved across targets (order reversed on even repetitions); medians are reported: time,
# MB/s (10^6 bytes of data per second), image size (stat -c %s), compressed clusters, and the CPU
# time of the process doing the work (qemu-img exactly; the servers sampled every 0.1 s until
# they exit).
#
# Environment knobs (defaults in brackets):
#   BENCH_WORK_DIR [.tmp/bench-compress]  data, images, mountpoints, logs (needs ~2.2x
#                                   BENCH_COMPRESS_MIB free)
#   BENCH_REPS [3]                  repetitions of each measurement
#   BENCH_COMPRESS_MIB [1024]       size of the data copied
#   BENCH_COMPRESS_CODECS [zlib zstd]  the compression types measured
#   BENCH_TARGETS [qcow2fs qemu-img qsd]  what to measure
#   BENCH_COMPRESS_COPY [cp]        how data is written onto the qcow2fs mount: cp, or dd
#                                   (dd if=DATA of=MNT/STEM.raw bs=1M conv=notrunc)
#   BENCH_UPDATE_DOC [1]            0: do not rewrite the compressed-copy results section of
#                                   docs/PERFORMANCE.md
# A partial run (BENCH_TARGETS, BENCH_COMPRESS_CODECS or BENCH_COMPRESS_COPY not the default)
# never updates the doc.
#
# Results: bench/results/compress-latest.md (git-ignored) and the section between the
# bench-compress-results markers of docs/PERFORMANCE.md. About 20 minutes with the defaults on a
# 2-CPU machine.
#
# Requires root (drop_caches, FUSE mounts), qemu-img, qemu-storage-daemon, fusermount.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_TAG=bench-compress
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

REPS=${BENCH_REPS:-3}
DATA_MIB=${BENCH_COMPRESS_MIB:-1024}
ALL_CODECS="zlib zstd"
ALL_TARGETS="qcow2fs qemu-img qsd"
read -r -a CODECS <<<"${BENCH_COMPRESS_CODECS:-$ALL_CODECS}"
TARGET_KINDS=" ${BENCH_TARGETS:-$ALL_TARGETS} "
COPY=${BENCH_COMPRESS_COPY:-cp}
UPDATE_DOC=${BENCH_UPDATE_DOC:-1}
MOUNT_TIMEOUT_S=30
STOP_TIMEOUT_S=300

set_work_dir "$ROOT/.tmp/bench-compress"
DATA_BYTES=$((DATA_MIB * 1024 * 1024))
# Bump when make-data.mjs changes, so cached data is rebuilt.
DATA_RECIPE="v1 size=${DATA_MIB}MiB"

install_cleanup

# ---------------------------------------------------------------------------------------------
# Preconditions

require_root
require_tools node npx qemu-img qemu-storage-daemon fusermount findmnt dd cp stat timeout
require_positive_int BENCH_REPS "$REPS"
require_positive_int BENCH_COMPRESS_MIB "$DATA_MIB"
((${#CODECS[@]} > 0)) || die "BENCH_COMPRESS_CODECS is empty"
require_known BENCH_COMPRESS_CODECS codec "$ALL_CODECS" "${CODECS[@]}"
# shellcheck disable=SC2086 # TARGET_KINDS is a list of words
require_known BENCH_TARGETS kind "$ALL_TARGETS" $TARGET_KINDS
[[ $COPY == cp || $COPY == dd ]] || die "BENCH_COMPRESS_COPY must be cp or dd"
if [[ ${CODECS[*]} != "$ALL_CODECS" || $TARGET_KINDS != " $ALL_TARGETS " || $COPY != cp ]]; then
  leave_doc_alone "partial run (BENCH_TARGETS=${BENCH_TARGETS:-}, BENCH_COMPRESS_CODECS=${BENCH_COMPRESS_CODECS:-}, BENCH_COMPRESS_COPY=$COPY)"
fi

prepare_work_dir

# ---------------------------------------------------------------------------------------------
# Build

if wants qcow2fs; then build_if_stale; fi

# ---------------------------------------------------------------------------------------------
# Data (cached in the work dir between runs)

if ! inputs_cached "$DATA_RECIPE" "$DATA_RAW"; then
  generate_data "$DATA_MIB" $((DATA_MIB * 1024 * 11 / 5 + 256 * 1024))
  inputs_made "$DATA_RECIPE"
else
  log "reusing the data in $IMAGE_DIR"
fi
[[ $(stat -c %s "$DATA_RAW") -eq $DATA_BYTES ]] || die "$DATA_RAW is not $DATA_BYTES bytes"

# ---------------------------------------------------------------------------------------------
# Commands. They are kept in arrays (CMD), so that the report shows exactly what ran.

create_options() { # CODEC
  case $1 in
    zlib) printf 'cluster_size=64k\n' ;;
    zstd) printf 'cluster_size=64k,compression_type=zstd\n' ;;
  esac
}
create_command() { CMD=(qemu-img create -q -f qcow2 -o "$(create_options "$1")" "$2" "$DATA_BYTES"); } # CODEC IMAGE
qemu_img_command() { CMD=(qemu-img convert -f raw -c -O qcow2 -o "$(create_options "$1")" "$2" "$3"); } # CODEC DATA IMAGE
qcow2fs_mount_command() { CMD=(node "$CLI" mount -o compress "$1" "$2"); } # IMAGE MNT
qcow2fs_unmount_command() { CMD=(node "$CLI" unmount "$1"); } # MNT
copy_command() { # DATA RAW
  case $COPY in
    cp) CMD=(cp "$1" "$2") ;;
    dd) CMD=(dd "if=$1" "of=$2" bs=1M "conv=notrunc") ;;
  esac
}
qsd_command() { # IMAGE EXPORT_FILE
  # Commas in QEMU option values are escaped by doubling them.
  CMD=(qemu-storage-daemon
    --blockdev "driver=file,node-name=file,filename=${1//,/,,},aio=threads,cache.direct=off"
    --blockdev "driver=qcow2,node-name=qcow2,file=file"
    --blockdev "driver=compress,node-name=compress,file=qcow2"
    --export "type=fuse,id=exp,node-name=compress,mountpoint=${2//,/,,},writable=on")
}
qsd_write_command() { CMD=(dd "if=$1" "of=$2" bs=1M "conv=fsync,notrunc"); } # DATA EXPORT_FILE

create_image() { # CODEC IMAGE
  rm -f "$2"
  create_command "$1" "$2"
  "${CMD[@]}" >>"$LOG_DIR/create.log" 2>&1 || die "${CMD[*]} failed (see $LOG_DIR/create.log)"
}

now_ns() { date +%s%N; }

# The CPU time, in clock ticks, of process PID when it ends, written to FILE by a background
# sampler every 0.1 s; it ends when the process is gone. Once a process is reaped its counters
# are gone (bash reaps its children at once, and a qcow2fs server is not ours), so the last
# sample, at most 0.1 s before the end, is what remains.
start_cpu_sampler() { # PID FILE -> SAMPLER_PID
  (
    trap - EXIT INT TERM
    while read -r stat 2>/dev/null <"/proc/$1/stat"; do
      read -r -a fields <<<"${stat##*) }"
      echo $((fields[11] + fields[12])) >"$2"
      sleep 0.1
    done
  ) &
  SAMPLER_PID=$!
  LIVE_PIDS[$SAMPLER_PID]=sampler
}

sampled_ticks() { # SAMPLER_PID FILE -> SAMPLED_TICKS: waits for the sampler to end, reads the last sample
  wait "$1" || true
  unset "LIVE_PIDS[$1]"
  read -r SAMPLED_TICKS <"$2" || die "no CPU sample in $2"
}

secs_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", (b - a) / 1e9 }'; } # NS0 NS1
ticks_to_secs() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f\n", t / hz }'; }

# ---------------------------------------------------------------------------------------------
# Measurements. Each sets SECS (the timed span) and CPU_S (CPU seconds of the worker process).

QCOW2FS_MNT=$MNT_ROOT/qcow2fs
QSD_FILE=$MNT_ROOT/qsd.raw
mkdir -p "$QCOW2FS_MNT"
: >"$QSD_FILE" # the FUSE export mounts over an existing regular file
MOUNTS+=("$QCOW2FS_MNT" "$QSD_FILE")
QCOW2FS_MNTS+=("$QCOW2FS_MNT")
UNMOUNT_FAILURES=0

run_qcow2fs() { # CODEC IMAGE
  local image=$2 logfile=$LOG_DIR/qcow2fs.log rc=0 raw server_pid
  local t0 t1 ticks0 ticks1 sampler summary
  create_image "$1" "$image"
  prepare_caches
  qcow2fs_mount_command "$image" "$QCOW2FS_MNT"
  run_qcow2fs_mount "$image" "$QCOW2FS_MNT" "$logfile" "$LOG_DIR/qcow2fs-mount.out"
  raw=$RAW
  server_pid=$SERVER_PID
  ticks0=$(cpu_ticks "$server_pid")
  start_cpu_sampler "$server_pid" "$LOG_DIR/qcow2fs.ticks"
  sampler=$SAMPLER_PID

  t0=$(now_ns)
  copy_command "$DATA_RAW" "$raw"
  "${CMD[@]}" 2>>"$logfile" || die "${CMD[*]} failed (see $logfile)"
  qcow2fs_unmount_command "$QCOW2FS_MNT"
  rc=0
  timeout "$STOP_TIMEOUT_S" "${CMD[@]}" >"$LOG_DIR/qcow2fs-unmount.out" 2>>"$logfile" || rc=$?
  if ((rc != 0)); then
    # Counted and reported: the server may still have finished the image and exited.
    UNMOUNT_FAILURES=$((UNMOUNT_FAILURES + 1))
    log "qcow2fs unmount $QCOW2FS_MNT failed with status $rc (see $logfile); waiting for the server"
  fi
  while process_running "$server_pid"; do
    (($(now_ns) - t0 < STOP_TIMEOUT_S * 1000000000)) || die "the qcow2fs server $server_pid is still running after unmount"
    sleep 0.05
  done
  t1=$(now_ns)

  unset "LIVE_PIDS[$server_pid]"
  sampled_ticks "$sampler" "$LOG_DIR/qcow2fs.ticks"
  ticks1=$SAMPLED_TICKS
  ! is_mounted "$QCOW2FS_MNT" || die "$QCOW2FS_MNT is still mounted after its server ended"
  summary=$(grep -m 1 'clusters compressed' "$LOG_DIR/qcow2fs-unmount.out" || true)
  [[ -z $summary ]] || log "unmount: $summary"
  SECS=$(secs_between "$t0" "$t1")
  CPU_S=$(ticks_to_secs $((ticks1 - ticks0)))
}

run_qemu_img() { # CODEC IMAGE
  local image=$2 logfile=$LOG_DIR/qemu-img.log rc=0 times real user sys
  rm -f "$image"
  prepare_caches
  qemu_img_command "$1" "$DATA_RAW" "$image"
  # bash's time: wall clock, and the user and system time of the command (all its threads).
  times=$(
    TIMEFORMAT='%3R %3U %3S'
    { time "${CMD[@]}" >>"$logfile" 2>&1; } 2>&1
  ) || rc=$?
  ((rc == 0)) || die "${CMD[*]} failed with status $rc (see $logfile)"
  read -r real user sys <<<"$times"
  [[ $real =~ ^[0-9.]+$ && $user =~ ^[0-9.]+$ && $sys =~ ^[0-9.]+$ ]] || die "cannot read the time of qemu-img convert: $times"
  SECS=$real
  CPU_S=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f\n", u + s }')
}

run_qsd() { # CODEC IMAGE
  local image=$2 logfile=$LOG_DIR/qsd.log pid t0 t1 ticks0 ticks1 out rc=0 sampler
  create_image "$1" "$image"
  prepare_caches
  qsd_command "$image" "$QSD_FILE"
  "${CMD[@]}" >>"$logfile" 2>&1 &
  pid=$!
  LIVE_PIDS[$pid]=qsd
  wait_mounted "$QSD_FILE" "$QSD_FILE" "$pid" "$logfile" "qemu-storage-daemon ($image)"
  [[ $(stat -c %s "$QSD_FILE") -eq $DATA_BYTES ]] || die "the qsd export $QSD_FILE is not $DATA_BYTES bytes"
  ticks0=$(cpu_ticks "$pid")
  start_cpu_sampler "$pid" "$LOG_DIR/qsd.ticks"
  sampler=$SAMPLER_PID

  t0=$(now_ns)
  qsd_write_command "$DATA_RAW" "$QSD_FILE"
  out=$(LC_ALL=C "${CMD[@]}" 2>&1) || die "${CMD[*]} failed: $(tail -n 3 <<<"$out")"
  kill -TERM "$pid" # qsd flushes and closes the image on SIGTERM
  wait "$pid" || rc=$?
  t1=$(now_ns)

  unset "LIVE_PIDS[$pid]"
  sampled_ticks "$sampler" "$LOG_DIR/qsd.ticks"
  ticks1=$SAMPLED_TICKS
  ((rc == 0)) || die "qemu-storage-daemon exited with status $rc (see $logfile)"
  ! is_mounted "$QSD_FILE" || die "$QSD_FILE is still mounted after qemu-storage-daemon ended"
  parse_dd_output "$out"
  [[ $DD_BYTES -eq $DATA_BYTES ]] || die "dd wrote $DD_BYTES of $DATA_BYTES bytes to the qsd export"
  SECS=$(secs_between "$t0" "$t1")
  CPU_S=$(ticks_to_secs $((ticks1 - ticks0)))
}

prepare_caches() { # everything written back and dropped, then the data read into the page cache
  drop_caches
  cat "$DATA_RAW" >/dev/null
}

# Checks the image a target wrote and appends the sample.
record() { # REP CODEC KIND IMAGE
  local rep=$1 codec=$2 kind=$3 image=$4 rc=0 size clusters mbps
  qemu-img check --output=json "$image" >"$LOG_DIR/check.json" 2>"$LOG_DIR/check.err" || rc=$?
  if ((rc != 0)); then
    cat "$LOG_DIR/check.err" "$LOG_DIR/check.json" >&2
    die "qemu-img check failed (status $rc) for $image, written by $kind ($codec, repetition $rep)"
  fi
  clusters=$(node -e '
    const r = JSON.parse(require("node:fs").readFileSync(process.argv[1], "utf8"))
    if ((r.corruptions ?? 0) !== 0 || (r.leaks ?? 0) !== 0 || (r["check-errors"] ?? 0) !== 0) process.exit(1)
    console.log(r["compressed-clusters"] ?? 0)' "$LOG_DIR/check.json") ||
    die "qemu-img check reports problems in $image (see $LOG_DIR/check.json)"
  qemu-img compare -f raw -F qcow2 "$DATA_RAW" "$image" >"$LOG_DIR/compare.log" 2>&1 || {
    cat "$LOG_DIR/compare.log" >&2
    die "$image, written by $kind ($codec, repetition $rep), differs from the data"
  }
  size=$(stat -c %s "$image")
  mbps=$(awk -v b="$DATA_BYTES" -v s="$SECS" 'BEGIN { printf "%.1f\n", b / s / 1e6 }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$codec" "$kind" "$SECS" "$mbps" "$size" "$clusters" "$CPU_S" >>"$SAMPLES"
  log "rep $rep/$REPS $codec $kind: ${SECS} s, $mbps MB/s, image $size bytes, $clusters compressed clusters, CPU ${CPU_S} s"
  rm -f "$image"
}

measure() { # REP CODEC KIND
  local image=$IMAGE_DIR/run-$2-$3-$1.qcow2
  SECS=
  CPU_S=
  case $3 in
    qcow2fs) run_qcow2fs "$2" "$image" ;;
    qemu-img) run_qemu_img "$2" "$image" ;;
    qsd) run_qsd "$2" "$image" ;;
  esac
  [[ -n $SECS && -n $CPU_S ]] || die "no result for $2 on $3"
  record "$1" "$2" "$3" "$image"
}

TARGETS=()
for kind in $ALL_TARGETS; do
  if wants "$kind"; then TARGETS+=("$kind"); fi
done

check_busy_before
printf 'rep\tcodec\tkind\tsecs\tmbps\timage_bytes\tcompressed_clusters\tcpu_s\n' >"$SAMPLES"
log "measuring: ${TARGETS[*]} x ${CODECS[*]} x $REPS reps, ${DATA_MIB} MiB each"
for rep in $(seq "$REPS"); do
  rep_order "$rep"
  for codec in "${CODECS[@]}"; do
    for kind in "${ORDER[@]}"; do
      measure "$rep" "$codec" "$kind"
    done
  done
done
BUSY_AFTER=$(cpu_busy_pct)

# ---------------------------------------------------------------------------------------------
# Report

{
  machine_meta "$BUSY_BEFORE" "$BUSY_AFTER"
  printf 'qemu_img=%s\n' "$(qemu-img --version | head -n 1)"
  printf 'data_mib=%s\n' "$DATA_MIB"
  printf 'data_bytes=%s\n' "$DATA_BYTES"
  printf 'reps=%s\n' "$REPS"
  printf 'unmount_failures=%s\n' "$UNMOUNT_FAILURES"
  # The knobs that were not the defaults, then the script.
  CMD=()
  [[ $DATA_MIB == 1024 ]] || CMD+=(BENCH_COMPRESS_MIB="$DATA_MIB")
  [[ $REPS == 3 ]] || CMD+=(BENCH_REPS="$REPS")
  [[ ${CODECS[*]} == "$ALL_CODECS" ]] || CMD+=(BENCH_COMPRESS_CODECS="'${CODECS[*]}'")
  [[ $TARGET_KINDS == " $ALL_TARGETS " ]] || CMD+=(BENCH_TARGETS="'${BENCH_TARGETS:-}'")
  [[ $COPY == cp ]] || CMD+=(BENCH_COMPRESS_COPY="$COPY")
  CMD+=(bash bench/compress.sh)
  meta_command cmd_run
  for codec in $ALL_CODECS; do
    create_command "$codec" IMAGE && meta_command "cmd_create_$codec"
    qemu_img_command "$codec" DATA IMAGE && meta_command "cmd_qemu_img_$codec"
  done
  qcow2fs_mount_command IMAGE MNT && meta_command cmd_qcow2fs_mount
  copy_command DATA MNT/STEM.raw && meta_command cmd_qcow2fs_copy
  qcow2fs_unmount_command MNT && meta_command cmd_qcow2fs_unmount
  qsd_command IMAGE EXPORT && meta_command cmd_qsd
  qsd_write_command DATA EXPORT && meta_command cmd_qsd_write
} >"$META"

write_report compress 'qcow2fs compressed-copy benchmark: latest run' <<'REPORT'
// Turns the samples of one bench/compress.sh run into markdown: medians per codec and target,
// the qcow2fs / qemu-img and qcow2fs / qsd ratios with the goals, every sample (the head and
// tail of the program: write_report in bench/lib.sh).
const rows = readSamples(['secs', 'image_bytes'])

const CODECS = ['zlib', 'zstd']
const KINDS = { qcow2fs: 'qcow2fs', 'qemu-img': 'qemu-img convert -c', qsd: 'qsd + compress filter' }
// The goals of the compressed-writes issue, qcow2fs against each of the others, per codec.
const GOALS = {
  zlib: { speedQemuImg: 2.0, speedQsd: 3.0, size: 1.02 },
  zstd: { speedQemuImg: 1.0, size: 1.02 },
}

const of = (codec, kind) => rows.filter((r) => r.codec === codec && r.kind === kind)
const medianOf = (codec, kind, field) => median(of(codec, kind).map((r) => r[field]))
const ratio = (a, b) => (a === undefined || b === undefined || b === 0 ? undefined : a / b)
const ratioText = (r, digits = 2) => (r === undefined ? 'n/a' : `${r.toFixed(digits)}x`)
const goalText = (r, op, goal, digits = 1) => {
  if (goal === undefined) return ''
  const met = r === undefined ? undefined : op === '>=' ? r >= goal : r <= goal
  return `${op} ${goal.toFixed(digits)}x` + (met === undefined ? '' : met ? ': met' : ': **missed**')
}
// MB/s: one decimal below 100, so that slow targets still show their differences.
const fmtRate = (value) => (value === undefined ? 'n/a' : value.toFixed(value < 100 ? 1 : 0))
const mib = (bytes) => (bytes === undefined ? 'n/a' : (bytes / 1048576).toFixed(1))

out.push(`Run of ${meta.date}, commit ${meta.git}, command ${code(meta.cmd_run)} (part of ${code('make bench')}).`)
out.push('')
out.push(
  `Machine: ${meta.cpu}, ${meta.nproc} CPUs, ${meta.memory} RAM, ${meta.kernel}; ` +
    `Node.js ${meta.node}, ${meta.qemu_img}, ${meta.qemu}; ` +
    `${meta.load} (other work on the machine shows here).`,
)
out.push('')
out.push(
  `Data: ${meta.data_mib} MiB (${meta.data_bytes} bytes) from bench/make-data.mjs, in the host page cache ` +
    `before every measurement. Each figure is the median of ${meta.reps} runs, each into a fresh image; ` +
    `MB/s is 10^6 bytes of data per second. After every run ${code('qemu-img check')} found no errors and ` +
    `no leaks and ${code('qemu-img compare')} found the image identical to the data. ` +
    `${code('qcow2fs unmount')} reported a failure ${meta.unmount_failures} times.`,
)
out.push('')
out.push('Commands (DATA: the data file; IMAGE, MNT, EXPORT: per-run paths in the work dir):')
out.push('')
out.push(`- qcow2fs: ${code(meta.cmd_create_zlib)} (zstd: ${code(meta.cmd_create_zstd)}), then ${code(meta.cmd_qcow2fs_mount)}; ` +
  `timed: ${code(meta.cmd_qcow2fs_copy)}, ${code(meta.cmd_qcow2fs_unmount)} (until it returned and the server exited)`)
out.push(`- qemu-img: ${code(meta.cmd_qemu_img_zlib)} (zstd: ${code(meta.cmd_qemu_img_zstd)}); timed as a whole`)
out.push(`- qsd: the same ${code('qemu-img create')}, then ${code(meta.cmd_qsd)}; ` +
  `timed: ${code(meta.cmd_qsd_write)}, SIGTERM, until the daemon exited`)
out.push('')
out.push('| Codec | Figure | qemu-img convert -c | qsd + compress filter | qcow2fs | qcow2fs / qemu-img | Goal | qcow2fs / qsd | Goal |')
out.push('|---|---|---:|---:|---:|---:|---|---:|---|')
for (const codec of CODECS) {
  if (rows.every((r) => r.codec !== codec)) continue
  const goals = GOALS[codec]
  const m = (kind, field) => medianOf(codec, kind, field)
  const speedQi = ratio(m('qcow2fs', 'mbps'), m('qemu-img', 'mbps'))
  const speedQsd = ratio(m('qcow2fs', 'mbps'), m('qsd', 'mbps'))
  out.push(
    `| ${codec} | time (s) | ${fmt(m('qemu-img', 'secs'), 2)} | ${fmt(m('qsd', 'secs'), 2)} | ${fmt(m('qcow2fs', 'secs'), 2)} | | | | |`,
  )
  out.push(
    `| ${codec} | MB/s | ${fmtRate(m('qemu-img', 'mbps'))} | ${fmtRate(m('qsd', 'mbps'))} | ${fmtRate(m('qcow2fs', 'mbps'))} | ` +
      `${ratioText(speedQi)} | ${goalText(speedQi, '>=', goals.speedQemuImg)} | ${ratioText(speedQsd)} | ${goalText(speedQsd, '>=', goals.speedQsd)} |`,
  )
  const sizeQi = ratio(m('qcow2fs', 'image_bytes'), m('qemu-img', 'image_bytes'))
  const sizeQsd = ratio(m('qcow2fs', 'image_bytes'), m('qsd', 'image_bytes'))
  out.push(
    `| ${codec} | image size (bytes) | ${fmt(m('qemu-img', 'image_bytes'))} | ${fmt(m('qsd', 'image_bytes'))} | ${fmt(m('qcow2fs', 'image_bytes'))} | ` +
      `${ratioText(sizeQi, 4)} | ${goalText(sizeQi, '<=', goals.size, 2)} | ${ratioText(sizeQsd, 4)} | |`,
  )
  out.push(
    `| ${codec} | compressed clusters | ${fmt(m('qemu-img', 'compressed_clusters'))} | ${fmt(m('qsd', 'compressed_clusters'))} | ` +
      `${fmt(m('qcow2fs', 'compressed_clusters'))} | | | | |`,
  )
  const cpuQi = ratio(m('qcow2fs', 'cpu_s'), m('qemu-img', 'cpu_s'))
  const cpuQsd = ratio(m('qcow2fs', 'cpu_s'), m('qsd', 'cpu_s'))
  out.push(
    `| ${codec} | CPU time of the worker process (s) | ${fmt(m('qemu-img', 'cpu_s'), 2)} | ${fmt(m('qsd', 'cpu_s'), 2)} | ${fmt(m('qcow2fs', 'cpu_s'), 2)} | ` +
      `${ratioText(cpuQi)} | | ${ratioText(cpuQsd)} | |`,
  )
}
out.push('')
out.push(
  'CPU time: user + system time of all threads of the process doing the work, over the timed span: ' +
    "qemu-img convert (exact); qemu-storage-daemon from the start of dd, qcow2fs's server from the start " +
    'of the copy, until they exited (sampled every 0.1 s: up to 0.1 s before the end may be missing). ' +
    'It does not count the copying process (cp, dd) nor the kernel\'s FUSE and page cache work for it. ' +
    `Image sizes are ${code('stat -c %s')} (in MiB: ` +
    CODECS.filter((codec) => rows.some((r) => r.codec === codec))
      .map((codec) => `${codec} ${Object.keys(KINDS).map((k) => `${KINDS[k]} ${mib(medianOf(codec, k, 'image_bytes'))}`).join(', ')}`)
      .join('; ') +
    ').',
)
out.push('')
out.push('All samples, in run order:')
out.push('')
out.push('| Codec | Target | Time (s) | MB/s | Median MB/s | Image bytes | Compressed clusters | CPU (s) |')
out.push('|---|---|---|---|---:|---|---|---|')
for (const codec of CODECS) {
  for (const kind of Object.keys(KINDS)) {
    const list = of(codec, kind)
    if (list.length === 0) continue
    const join = (field, digits) => list.map((r) => fmt(r[field], digits)).join(', ')
    out.push(
      `| ${codec} | ${KINDS[kind]} | ${join('secs', 2)} | ${list.map((r) => fmtRate(r.mbps)).join(', ')} | ${fmtRate(median(list.map((r) => r.mbps)))} | ` +
        `${join('image_bytes', 0)} | ${join('compressed_clusters', 0)} | ${join('cpu_s', 2)} |`,
    )
  }
  // The targets ran back to back in each repetition: the per-repetition ratio shows how much of
  // a difference is noise of the machine.
  const ours = of(codec, 'qcow2fs')
  for (const other of ['qemu-img', 'qsd']) {
    const theirs = of(codec, other)
    if (ours.length === 0 || ours.length !== theirs.length) continue
    const ratios = ours.map((r, i) => r.mbps / theirs[i].mbps)
    out.push(
      `| ${codec} | qcow2fs / ${KINDS[other]} speed, same repetition | | ${ratios.map((r) => r.toFixed(2) + 'x').join(', ')} | ` +
        `${median(ratios).toFixed(2)}x | | | |`,
    )
  }
}
REPORT
