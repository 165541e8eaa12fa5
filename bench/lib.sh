# Helpers shared by the benchmark scripts (bench/run.sh, bench/write.sh, bench/compress.sh).
# Sourced, not run. The script sets before sourcing it:
#   ROOT     the repository (the scripts cd there)
#   LOG_TAG  the prefix of its log lines (bench, bench-write, ...)
# and, before anything here runs that needs them: TARGET_KINDS, MOUNT_TIMEOUT_S, UPDATE_DOC,
# REPS, and TARGETS (the targets in run order) for rep_order. set_work_dir sets the paths of
# the work dir (LOG_DIR, IMAGE_DIR, ...).
# shellcheck shell=bash disable=SC2034 # variables set here are read by the scripts

CLI=$ROOT/dist/cli/main.js
RESULTS_DIR=$ROOT/bench/results

log() { printf '[%s %s] %s\n' "${LOG_TAG:-bench}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Cleanup: every process started and every mount made is registered here and undone on exit,
# whatever the exit path (install_cleanup sets the traps).

declare -A LIVE_PIDS=() # server processes running now (pid -> what)
MOUNTS=()               # mountpoints (directories or, for qsd, regular files) that may be mounted
QCOW2FS_MNTS=()         # mountpoints to unmount with `qcow2fs unmount` first

is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

stop_pid() {
  local pid=$1 _
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "process $pid ignored SIGTERM; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? mnt pid
  trap - EXIT INT TERM
  set +e
  for mnt in "${QCOW2FS_MNTS[@]}"; do
    if is_mounted "$mnt"; then
      timeout 20 node "$CLI" unmount "$mnt" >>"$LOG_DIR/unmount.log" 2>&1 ||
        log "qcow2fs unmount $mnt failed (see $LOG_DIR/unmount.log); forcing"
    fi
  done
  for pid in "${!LIVE_PIDS[@]}"; do stop_pid "$pid"; done
  for mnt in "${MOUNTS[@]}"; do
    if is_mounted "$mnt"; then
      log "forcing unmount of $mnt"
      fusermount -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
  done
  exit "$rc"
}

install_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# ---------------------------------------------------------------------------------------------
# Preconditions

require_root() {
  [[ $(id -u) -eq 0 ]] || die "run as root: the benchmark drops the page cache and mounts FUSE filesystems"
}

require_tools() { # TOOL...
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool is not installed (qemu-utils, qemu-system-common, fio, fuse)"
  done
  [[ -e /dev/fuse ]] || die "/dev/fuse is missing"
}

require_positive_int() { # NAME VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer"
}

# A previous run that was killed hard may have left mounts behind.
clear_stale_mounts() { # MNT_ROOT
  local stale
  for stale in "$1"/*; do
    [[ -e $stale ]] || continue
    if is_mounted "$stale"; then
      log "removing stale mount $stale"
      fusermount -uz "$stale" 2>/dev/null || umount -l "$stale" || true
    fi
  done
}

# A partial or profiling run: the results section of docs/PERFORMANCE.md stays as it is.
leave_doc_alone() { # REASON
  log "$1: docs/PERFORMANCE.md is left alone"
  UPDATE_DOC=0
}

# Every WORD must be one of the words of KNOWN, the values KNOB may have.
require_known() { # KNOB WHAT KNOWN WORD...
  local knob=$1 what=$2 known=$3 word
  shift 3
  for word in "$@"; do
    [[ " $known " == *" $word "* ]] || die "unknown $what in $knob: $word (known: $known)"
  done
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# TARGET_KINDS is " kind kind ... " (spaces around).
wants() { [[ $TARGET_KINDS == *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------------
# Work dir

# Sets WORK_DIR (BENCH_WORK_DIR, or DEFAULT; made absolute) and the paths in it: IMAGE_DIR (the
# inputs cached between runs, and the images of this run, run-*), MNT_ROOT, LOG_DIR, SAMPLES,
# META, DATA_RAW (the test data).
set_work_dir() { # DEFAULT
  WORK_DIR=${BENCH_WORK_DIR:-$1}
  mkdir -p "$WORK_DIR"
  WORK_DIR=$(cd -- "$WORK_DIR" && pwd)
  IMAGE_DIR=$WORK_DIR/images
  MNT_ROOT=$WORK_DIR/mnt
  LOG_DIR=$WORK_DIR/logs
  SAMPLES=$WORK_DIR/samples.tsv
  META=$WORK_DIR/meta.env
  DATA_RAW=$IMAGE_DIR/data.raw
}

# Creates the directories, unmounts what a killed run left mounted, and removes the
# mountpoints, logs and images the last run left.
prepare_work_dir() {
  mkdir -p "$IMAGE_DIR" "$MNT_ROOT" "$LOG_DIR" "$RESULTS_DIR"
  clear_stale_mounts "$MNT_ROOT"
  rm -rf "${MNT_ROOT:?}"/* "${LOG_DIR:?}"/* "${IMAGE_DIR:?}"/run-*
}

# True when the inputs in IMAGE_DIR were made by RECIPE (IMAGE_DIR/recipe says so) and every
# FILE exists. Otherwise removes them all and fails: the script makes them again (generate_data
# first), then calls inputs_made RECIPE.
inputs_cached() { # RECIPE FILE...
  local recipe=$1 file
  shift
  if [[ -f $IMAGE_DIR/recipe && $(cat "$IMAGE_DIR/recipe") == "$recipe" ]]; then
    for file in "$@"; do [[ -f $file ]] || break; done
    [[ -f $file ]] && return 0
  fi
  rm -f "$IMAGE_DIR/recipe" "$@"
  return 1
}

inputs_made() { echo "$1" >"$IMAGE_DIR/recipe"; } # RECIPE

# Writes MIB MiB of test data (bench/make-data.mjs) to DATA_RAW, once IMAGE_DIR has NEED_KIB
# free for it and what the script makes from it.
generate_data() { # MIB NEED_KIB
  local avail_kib
  avail_kib=$(df -Pk "$IMAGE_DIR" | awk 'NR==2 {print $4}')
  ((avail_kib >= $2)) || die "$IMAGE_DIR needs $(($2 / 1024)) MiB free, has $((avail_kib / 1024)) MiB (set BENCH_WORK_DIR)"
  log "generating $1 MiB of test data"
  node bench/make-data.mjs "$DATA_RAW" "$1"
}

# ---------------------------------------------------------------------------------------------
# Build

# Rebuilds dist/ with tsc when a source is newer than the CLI, then insists the CLI exists.
build_if_stale() {
  if [[ ! -f $CLI ]] || [[ -n $(find lib cli tsconfig.json -newer "$CLI" \( -name '*.ts' -o -name tsconfig.json \) 2>/dev/null | head -n 1) ]]; then
    log "building (npx tsc -p tsconfig.json)"
    npx tsc -p tsconfig.json
  fi
  [[ -f $CLI ]] || die "build did not produce $CLI"
}

# Guest extents of IMAGE that are unallocated, zero, or in a backing file (qemu-img map): the
# benchmark images must have none.
count_unallocated_extents() { # IMAGE
  qemu-img map --output=json "$1" | node -e '
    let text = ""
    process.stdin.on("data", (chunk) => (text += chunk)).on("end", () => {
      const extents = JSON.parse(text)
      console.log(extents.filter((e) => !e.data || e.zero || e.depth !== 0).length)
    })'
}

# ---------------------------------------------------------------------------------------------
# Servers

# Runs the `qcow2fs mount` in CMD for IMAGE at MNT as users run it: it starts a background
# server, prints the raw file and exits once the mount is live. Its output goes to OUTFILE, its
# errors to LOGFILE: the server must not hold a pipe of ours. Sets RAW (the raw file) and
# SERVER_PID (the server, registered for cleanup).
run_qcow2fs_mount() { # IMAGE MNT LOGFILE OUTFILE
  local image=$1 mnt=$2 logfile=$3 out=$4 rc=0
  timeout $((MOUNT_TIMEOUT_S + 20)) "${CMD[@]}" >"$out" 2>>"$logfile" || rc=$?
  ((rc == 0)) || { tail -n 5 "$logfile" >&2; die "qcow2fs mount $image failed with status $rc (see $logfile)"; }
  RAW=$(tail -n 1 "$out")
  if ! is_mounted "$mnt" || [[ ! -f $RAW ]]; then die "qcow2fs mount printed '$RAW', which is not a file on a live mount"; fi
  SERVER_PID=$(find_serve_pid "$mnt" 2>>"$logfile") || die "cannot ask the qcow2fs server of $mnt for its pid (see $logfile)"
  LIVE_PIDS[$SERVER_PID]=qcow2fs
}

# Waits until MOUNTPOINT is mounted and FILE exists. PID is the process that mounts it: the
# server itself, or with "launcher" a `qcow2fs mount` that exits 0 once the mount is live.
wait_mounted() { # MOUNTPOINT FILE PID LOGFILE WHAT [launcher]
  local mountpoint=$1 file=$2 pid=$3 logfile=$4 what=$5 launcher=${6:-} rc exited=0
  local deadline=$((SECONDS + MOUNT_TIMEOUT_S))
  until is_mounted "$mountpoint" && [[ -e $file ]]; do
    if ((!exited)) && ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      exited=1
      unset "LIVE_PIDS[$pid]"
      if [[ $launcher != launcher ]] || ((rc != 0)); then
        cat "$logfile" >&2 || true
        die "$what exited with status $rc before mounting"
      fi
    fi
    ((SECONDS < deadline)) || { cat "$logfile" >&2 || true; die "$what did not mount $file within ${MOUNT_TIMEOUT_S}s"; }
    sleep 0.1
  done
}

# The pid of the background server that `qcow2fs mount` started for MOUNTPOINT, asked over
# its control socket (lib/fuse/control.ts, op "status"). Not found by scanning /proc: reading
# another process's command line blocks while that process is stuck on a hung FUSE mount.
find_serve_pid() { # MOUNTPOINT
  timeout 20 node --input-type=module -e '
    const control = await import(process.argv[1] + "/dist/lib/fuse/control.js")
    const { realpathSync } = await import("node:fs")
    const answer = await control.sendControlRequest(control.controlSocketPath(realpathSync(process.argv[2])), { op: "status" }, 10000)
    answer.hangUp()
    if (!answer.reply.ok || !Number.isInteger(answer.reply.pid)) throw new Error(JSON.stringify(answer.reply))
    console.log(answer.reply.pid)
  ' "$ROOT" "$1"
}

# The kernel options qcow2fs mounts with (its default tuning), so that the no-I/O server
# differs from qcow2fs only in what happens inside a request.
qcow2fs_option_string() { # READ_ONLY(true|false) LOGFILE
  node --input-type=module -e '
    const { buildOptionString } = await import(process.argv[1] + "/dist/lib/fuse/native.js")
    const { DEFAULT_KERNEL_TUNING } = await import(process.argv[1] + "/dist/lib/fuse/adapter.js")
    console.log(buildOptionString({ ...DEFAULT_KERNEL_TUNING, name: "zero-fuse", readOnly: process.argv[2] === "true", allowOther: false }))
  ' "$ROOT" "$1" 2>>"$2"
}

# ---------------------------------------------------------------------------------------------
# Measuring

# True while process PID runs: it exists and is not a zombie. A qcow2fs server runs detached,
# so once its launcher is gone the machine's init is its parent, and its zombie lasts until
# init reaps it (seconds, on some machines); the server has exited by then, which is what the
# timings want.
process_running() { # PID
  local stat
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# CPU time (user + system, all threads) a process has used so far, in clock ticks.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # PID
  local stat fields
  read -r stat <"/proc/$1/stat" || die "server process $1 is gone"
  # Fields after "pid (comm) ": state is the first, utime the 12th, stime the 13th.
  read -r -a fields <<<"${stat##*) }"
  echo $((fields[11] + fields[12]))
}

# Parses the last line of dd's report ("N bytes ... copied, S s, ...") into DD_BYTES, DD_SECS.
parse_dd_output() { # OUTPUT
  local line
  line=$(tail -n 1 <<<"$1")
  [[ $line =~ ^([0-9]+)\ bytes.*copied,\ ([0-9.e+-]+)\ s ]] || die "cannot parse dd output: $line"
  DD_BYTES=${BASH_REMATCH[1]}
  DD_SECS=${BASH_REMATCH[2]}
}

# Share of CPU time the machine spent busy over 3 s while the benchmark itself was idle: other
# work running now skews the figures. (The load average is no help here: it also counts
# processes blocked on I/O, such as anything stuck on a hung FUSE mount.)
cpu_busy_pct() {
  local a b
  a=$(head -n 1 /proc/stat)
  sleep 3
  b=$(head -n 1 /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN {
    na = split(a, x); split(b, y); total = 0; idle = 0
    for (i = 2; i <= na; i++) total += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6])
    printf "%.0f\n", (total > 0 ? 100 * (total - idle) / total : 0)
  }'
}

# Sets BUSY_BEFORE to cpu_busy_pct, with a warning when other work keeps the CPUs busy.
check_busy_before() {
  BUSY_BEFORE=$(cpu_busy_pct)
  if ((BUSY_BEFORE > 25)); then
    log "warning: the CPUs are ${BUSY_BEFORE}% busy with other work: the figures will be skewed"
  fi
}

# Sets ORDER to TARGETS, reversed on even repetitions, so that drift does not favour one target.
rep_order() { # REP
  local i
  ORDER=("${TARGETS[@]}")
  if (($1 % 2 == 0)); then
    ORDER=()
    for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do ORDER+=("${TARGETS[i]}"); done
  fi
}

# ---------------------------------------------------------------------------------------------
# Report

# The commit, and whether the code measured has changes not committed yet.
git_rev_text() {
  local rev
  rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n $(git status --porcelain -- lib cli bench 2>/dev/null) ]]; then rev="$rev + uncommitted changes"; fi
  printf '%s\n' "$rev"
}

# The lines of the meta file that describe the run and the machine (key=value).
machine_meta() { # BUSY_BEFORE BUSY_AFTER
  printf 'date=%s\n' "$(date -u +'%Y-%m-%d %H:%M UTC')"
  printf 'git=%s\n' "$(git_rev_text)"
  printf 'cpu=%s\n' "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
  printf 'nproc=%s\n' "$(nproc)"
  printf 'load=%s\n' "CPUs ${1}% busy with other work just before the measurements, ${2}% just after"
  printf 'memory=%s\n' "$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  printf 'kernel=%s\n' "$(uname -sr)"
  printf 'node=%s\n' "$(node --version)"
  printf 'qemu=%s\n' "$(qemu-storage-daemon --version | head -n 1)"
  printf 'fio=%s\n' "$(if command -v fio >/dev/null; then fio --version; else echo 'fio not installed'; fi)"
  printf 'fuse_native=%s\n' "$(node -p 'require("./node_modules/fuse-native/package.json").version')"
}

# CMD (an array) as one line, with the paths inside the repository relative to it.
command_text() {
  local IFS=' '
  CMD=("${CMD[@]//"$ROOT"\//}")
  printf '%s\n' "${CMD[*]}"
}

meta_command() { printf '%s=%s\n' "$1" "$(command_text)"; } # KEY: the meta line KEY=command_text

# Keeps this run's samples next to its report, bench/results/STEM.md, and says where the
# results are.
finish_results() { # STEM
  cp "$SAMPLES" "$RESULTS_DIR/$1-samples.tsv"
  log "results: bench/results/$1.md$([[ $UPDATE_DOC == 1 ]] && echo ', docs/PERFORMANCE.md')"
}

# The report of bench/write.sh (NAME write) and bench/compress.sh (NAME compress): a node
# program, the script's part read from stdin between a common head and tail. The head reads
# META into `meta` and gives readSamples, median, fmt, code, fail and `out`, the report's
# markdown lines, which the script's part fills. The tail writes bench/results/NAME-latest.md
# (titled TITLE), prints the report and, with UPDATE_DOC=1, puts it between the
# bench-NAME-results markers of docs/PERFORMANCE.md in place of what was there.
write_report() { # NAME TITLE < SCRIPT'S PART
  local args=("$1" "$2" "$SAMPLES" "$META" "$RESULTS_DIR/$1-latest.md")
  if [[ $UPDATE_DOC == 1 ]]; then args+=("$ROOT/docs/PERFORMANCE.md"); fi
  { report_head; cat; report_tail; } | node - "${args[@]}" || die "the $1 report failed"
  finish_results "$1-latest"
}

report_head() {
  cat <<'HEAD'
const { readFileSync, writeFileSync } = require('node:fs')
const [name, title, samplesPath, metaPath, outPath, docPath] = process.argv.slice(2)
const fail = (message) => {
  process.stderr.write(`${name} report: ${message}\n`)
  process.exit(1)
}

const meta = {}
for (const line of readFileSync(metaPath, 'utf8').split('\n')) {
  const eq = line.indexOf('=')
  if (eq > 0) meta[line.slice(0, eq)] = line.slice(eq + 1)
}
// The samples: a line of tab-separated field names, then a line per sample. The fields from
// the fourth on are numbers ('-': none); the POSITIVE ones must be above 0.
const readSamples = (positive) => {
  const lines = readFileSync(samplesPath, 'utf8').trim().split('\n')
  const header = lines.shift().split('\t')
  return lines.map((line) => {
    const fields = line.split('\t')
    if (fields.length !== header.length) fail(`bad sample line: ${line}`)
    const row = Object.fromEntries(header.map((field, i) => [field, fields[i]]))
    for (const field of header.slice(3)) row[field] = row[field] === '-' ? undefined : Number(row[field])
    if (positive.some((field) => !(row[field] > 0)) || header.slice(3).some((field) => Number.isNaN(row[field]))) fail(`bad sample line: ${line}`)
    return row
  })
}

const median = (values) => {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b)
  if (sorted.length === 0) return undefined
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}
const fmt = (value, digits = 0) => (value === undefined ? 'n/a' : value.toFixed(digits))
const code = (text) => '`' + text + '`'
const out = []
HEAD
}

report_tail() {
  cat <<'TAIL'
const report = out.join('\n') + '\n'
writeFileSync(outPath, `# ${title}\n\n${report}`)
process.stdout.write(`\n${report}\n`)
if (docPath) {
  const BEGIN_MARKER = `<!-- bench-${name}-results:begin -->`
  const END_MARKER = `<!-- bench-${name}-results:end -->`
  const doc = readFileSync(docPath, 'utf8')
  const begin = doc.indexOf(BEGIN_MARKER)
  const end = doc.indexOf(END_MARKER)
  if (begin < 0 || end < begin) fail(`${docPath} lacks the ${BEGIN_MARKER} ... ${END_MARKER} markers`)
  writeFileSync(docPath, doc.slice(0, begin + BEGIN_MARKER.length) + '\n' + report + doc.slice(end))
}
TAIL
}
