#!/usr/bin/env bash
# Checks systemd/ the way systemd itself would, without installing
# anything on this machine (`make systemd-check`; CI runs it from .ci/run):
#
#  1. systemd-analyze verify on keyd.service and keyd.socket, with freshly
#     built keyd and keyctl at their ExecStart/ExecReload paths (a temp
#     copy of the units points them into a temp prefix). Any message fails.
#  2. systemd-sysusers --dry-run on keyd.sysusers, in an empty temp root.
#  3. systemd-analyze security --offline=true on keyd.service: the overall
#     exposure must be MAX_EXPOSURE (2.0) or less.
#  4. When strace is there: keyd, with ExecStart='s flags, and keyctl run a
#     short session under strace (start, lease, report, status as root and
#     as nobody, usage, an edit picked up by the watcher, keyctl reload,
#     SIGHUP, SIGTERM; sd_notify to a stand-in NOTIFY_SOCKET), and every
#     system call they made must pass the unit's SystemCallFilter=, every
#     socket must be of a family in RestrictAddressFamilies=, and no
#     mapping may be writable and executable (MemoryDenyWriteExecute=).
#     PID 1 is not systemd here, so this is the closest check there is
#     that the sandbox fits keyd. (It found that --socket-group's chown is
#     refused by ~@privileged.) Paths and users of the sandbox are not
#     exercised: ProtectSystem=, User=keyd, the directories.
#
# Without systemd-analyze the check is skipped with a message, unless
# SYSTEMD_CHECK_REQUIRED=1 (CI sets it), when it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}

say() { echo "systemd-check: $*"; }
fail() { say "FAIL: $*" >&2; exit 1; }
skip() {
	if [ "${SYSTEMD_CHECK_REQUIRED:-}" = 1 ]; then fail "$* (SYSTEMD_CHECK_REQUIRED=1)"; fi
	say "SKIP: $*"
	exit 0
}

command -v systemd-analyze >/dev/null || skip "systemd-analyze not found: install the systemd package (apt-get install systemd)"
command -v systemd-sysusers >/dev/null || skip "systemd-sysusers not found: install the systemd package"
version=$(systemd-analyze --version)
version=${version%%$'\n'*}
grep -q -- '--offline=' <<<"$(systemd-analyze --help)" ||
	skip "this systemd-analyze ($version) has no --offline: security needs systemd 250 or later"
say "$version"

tmp=$(mktemp -d)
keyd_pid= sockdir=
cleanup() {
	if [ -n "$keyd_pid" ]; then kill "$keyd_pid" 2>/dev/null || true; fi
	if [ -n "${notify_pid:-}" ]; then kill "$notify_pid" 2>/dev/null || true; fi
	rm -rf "$tmp" ${sockdir:+"$sockdir"}
}
trap cleanup EXIT

# The binaries, built as the README installs them.
$GO build -o "$tmp/bin/" ./cmd/keyd ./cmd/keyctl
mkdir "$tmp/units"
for u in keyd.service keyd.socket; do
	sed "s#/usr/local/bin/#$tmp/bin/#g" "systemd/$u" >"$tmp/units/$u"
done
grep -q "^ExecStart=$tmp/bin/keyd " "$tmp/units/keyd.service" || fail "keyd.service: ExecStart= is not /usr/local/bin/keyd"
grep -q "^ExecReload=$tmp/bin/keyctl " "$tmp/units/keyd.service" || fail "keyd.service: ExecReload= is not /usr/local/bin/keyctl"

# 1. verify: silent and successful, or it failed.
if ! out=$(systemd-analyze verify "$tmp/units/keyd.service" "$tmp/units/keyd.socket" 2>&1) || [ -n "$out" ]; then
	fail "systemd-analyze verify:"$'\n'"${out//$tmp\/units\//systemd/}"
fi
say "verify keyd.service keyd.socket: ok"

# 2. sysusers, in an empty root: nothing is written with --dry-run.
mkdir -p "$tmp/root/usr/lib/sysusers.d"
cp systemd/keyd.sysusers "$tmp/root/usr/lib/sysusers.d/keyd.conf"
if ! out=$(systemd-sysusers --dry-run --root="$tmp/root" 2>&1); then
	fail "systemd-sysusers --dry-run keyd.sysusers:"$'\n'"$out"
fi
grep -q "Creating user 'keyd'" <<<"$out" || fail "keyd.sysusers creates no user keyd:"$'\n'"$out"
say "sysusers keyd.sysusers: ok"

# 3. security. --threshold counts tenths: 2.0 is 20.
threshold=$(awk -v m="$MAX_EXPOSURE" 'BEGIN { printf "%d", m * 10 + 0.5 }')
rc=0
out=$(systemd-analyze security --offline=true --threshold="$threshold" "$tmp/units/keyd.service" 2>&1) || rc=$?
exposure=$(sed -n 's/.*Overall exposure level for keyd\.service: \([0-9.]*\).*/\1/p' <<<"$out")
[ -n "$exposure" ] || fail "systemd-analyze security printed no overall exposure (exit $rc):"$'\n'"$out"
open=$( (grep '✗' <<<"$out" || true) | sed -E 's/^✗ ([^ ]+) +.* ([0-9.]+)$/\1 (\2)/' | paste -sd, - | sed 's/,/, /g')
if [ "$rc" -ne 0 ] || awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e > m) }'; then
	fail "keyd.service's exposure is $exposure, over $MAX_EXPOSURE; the open items: $open"
fi
say "security keyd.service: exposure $exposure (at most $MAX_EXPOSURE); open: $open"

# 4. The sandbox against what keyd really does.
if ! command -v strace >/dev/null; then
	say "SKIP syscall audit: strace not found (apt-get install strace)"
	exit 0
fi
if ! strace -f -qq -o /dev/null true 2>/dev/null; then
	say "SKIP syscall audit: strace cannot trace here (no ptrace?)"
	exit 0
fi

# expand @GROUP|NAME...: the system call names, groups expanded.
expand() {
	local x
	for x in "$@"; do
		case "$x" in
		@*) expand $(systemd-analyze syscall-filter "$x" 2>/dev/null | sed -n '2,$p' | grep -v '^ *#' | sed 's/^ *//;/^$/d') ;;
		*) echo "$x" ;;
		esac
	done
}
# The unit's filter: what its allow lists allow, less what its ~ lists deny.
allow=() deny=()
while IFS= read -r v; do
	case "$v" in
	~*) read -ra w <<<"${v#\~}" && deny+=("${w[@]}") ;;
	*) read -ra w <<<"$v" && allow+=("${w[@]}") ;;
	esac
done < <(sed -n 's/^SystemCallFilter=//p' systemd/keyd.service)
[ ${#allow[@]} -gt 0 ] || fail "keyd.service has no SystemCallFilter= allow list"
expand "${allow[@]}" | sort -u >"$tmp/allow"
expand "${deny[@]}" | sort -u >"$tmp/deny"
comm -23 "$tmp/allow" "$tmp/deny" >"$tmp/allowed"
families=$(sed -n 's/^RestrictAddressFamilies=//p' systemd/keyd.service | tr ' ' '\n' | sort -u)

run="$tmp/run"
mkdir -p "$run/state"
sockdir=$(mktemp -d /tmp/ksd.XXXXXX) # short: a socket path has at most 107 bytes
sock="$sockdir/keyd.sock"
cat >"$run/keys.json" <<'EOF'
{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100000}]}
EOF
echo 'GEMINI_KEY_a=AIzaFAKE-systemd-check' >"$run/.env"
kc() { strace -f -qq -e signal=none -o "$tmp/trace.keyctl.$1" "$tmp/bin/keyctl" --socket "$sock" "${@:2}"; }
# keyd runs with ExecStart='s flags: its --config is ours, a --socket-group
# is the group of nobody (keyd's group need not exist here).
nobody_gid=$(id -g nobody 2>/dev/null || echo 65534)
read -ra exec_start <<<"$(sed -n 's/^ExecStart=//p' systemd/keyd.service)"
keyd_args=()
for ((i = 1; i < ${#exec_start[@]}; i++)); do
	case "${exec_start[i]}" in
	--config) keyd_args+=(--config "$run/keys.json") && i=$((i + 1)) ;;
	--socket-group) keyd_args+=(--socket-group "$nobody_gid") && i=$((i + 1)) ;;
	--config=* | --socket-group=* | --socket | --socket=* | --state-dir | --state-dir=*)
		fail "check.sh does not know how to run ExecStart='s ${exec_start[i]}: teach it" ;;
	*) keyd_args+=("${exec_start[i]}") ;;
	esac
done
# A peer other than root and keyd's uid makes keyd look up its groups in
# the user database (cgo, NSS): keyctl runs as nobody once too.
as_nobody=
if id nobody >/dev/null 2>&1 && command -v setpriv >/dev/null; then
	as_nobody=1
	chmod 0755 "$sockdir"
	cp "$tmp/bin/keyctl" "$sockdir/keyctl"
fi
# Type=notify: a stand-in for systemd's NOTIFY_SOCKET records what keyd says.
notify_env=() notify_pid= notified=
if command -v python3 >/dev/null; then
	python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
open(sys.argv[1] + ".ready", "w").close()
with open(sys.argv[2], "a") as out:
    while True:
        out.write(s.recv(4096).decode() + "\n---\n")
        out.flush()
' "$sockdir/notify" "$run/notify" &
	notify_pid=$!
	for _ in $(seq 50); do [ -e "$sockdir/notify.ready" ] && break; sleep 0.1; done
	notify_env=(NOTIFY_SOCKET="$sockdir/notify")
fi
# Otherwise a clean environment, as systemd gives.
env -i PATH=/usr/bin:/bin HOME=/nonexistent "${notify_env[@]}" strace -f -qq -e signal=none -o "$tmp/trace.keyd" \
	"$tmp/bin/keyd" "${keyd_args[@]}" --socket "$sock" --state-dir "$run/state" 2>"$run/log" &
keyd_pid=$!
kc wait wait --timeout 20s >/dev/null || fail "keyd did not start under strace:"$'\n'"$(cat "$run/log")"
lease=$(kc lease lease --model m --json | sed -n 's/.*"lease_id": *"\([^"]*\)".*/\1/p')
[ -n "$lease" ] || fail "keyctl lease gave no lease_id:"$'\n'"$(cat "$run/log")"
kc report report "$lease" --status 200 --prompt-tokens 5 >/dev/null
kc status status >/dev/null
if [ -n "$as_nobody" ]; then
	chmod 0666 "$sock" # by the script, not keyd: untraced
	setpriv --reuid="$(id -u nobody)" --regid="$nobody_gid" --clear-groups \
		"$sockdir/keyctl" --socket "$sock" status >/dev/null ||
		fail "keyctl status as nobody failed:"$'\n'"$(cat "$run/log")"
fi
kc usage usage >/dev/null
echo '{"keys": [{"key_id": "a", "model_name": "m", "rpm": 11, "tpm": 100000}]}' >"$run/keys.json.new"
mv "$run/keys.json.new" "$run/keys.json"
sleep 0.5 # the watcher's 100 ms debounce, then its reload
echo '{"keys": [{"key_id": "a", "model_name": "m", "rpm": 12, "tpm": 100000}]}' >"$run/keys.json"
kc reload reload >/dev/null
pid=$(sed -n 's/.*msg="keyd serving".* pid=\([0-9]*\).*/\1/p' "$run/log")
[ -n "$pid" ] || fail "no pid in keyd's log:"$'\n'"$(cat "$run/log")"
kill -HUP "$pid"
sleep 0.2
kill -TERM "$pid"
wait "$keyd_pid" || fail "keyd exited with $? after SIGTERM under strace:"$'\n'"$(cat "$run/log")"
keyd_pid=
grep -q 'msg="config reloaded"' "$run/log" || fail "keyd never reloaded in the audit session:"$'\n'"$(cat "$run/log")"
grep -q 'msg="keyd stopped"' "$run/log" || fail "keyd did not stop cleanly:"$'\n'"$(cat "$run/log")"
if [ -n "$notify_pid" ]; then
	kill "$notify_pid" 2>/dev/null || true
	notify_pid=
	for m in READY=1 RELOADING=1 STOPPING=1; do
		grep -q "^$m\$" "$run/notify" || fail "keyd never sent $m to NOTIFY_SOCKET; it sent:"$'\n'"$(cat "$run/notify" 2>/dev/null)"
	done
	notified=" (sd_notify: READY=1, RELOADING=1, STOPPING=1 sent)"
fi

cat "$tmp"/trace.* >"$tmp/trace"
sed -nE 's/^[0-9]+ +([a-z0-9_]+)\(.*/\1/p' "$tmp/trace" | sort -u >"$tmp/used"
denied=$(comm -23 "$tmp/used" "$tmp/allowed" | paste -sd' ' -)
[ -z "$denied" ] || fail "keyd or keyctl made system calls that SystemCallFilter= denies (they would get EPERM): $denied"
bad_af=$(grep -oE '\bsocket(pair)?\(AF_[A-Z0-9]+' "$tmp/trace" | sed 's/.*(//' | sort -u | grep -vxF "$families" || true)
[ -z "$bad_af" ] || fail "sockets of families RestrictAddressFamilies= denies: $bad_af"
wx=$(grep -E '\b(mmap|mprotect|pkey_mprotect)\(' "$tmp/trace" | grep -E 'PROT_EXEC' | grep -E 'PROT_WRITE|mprotect' || true)
[ -z "$wx" ] || fail "mappings MemoryDenyWriteExecute= refuses:"$'\n'"$wx"
say "syscall audit$notified: keyd and keyctl made $(wc -l <"$tmp/used") distinct system calls, all allowed; sockets: $(echo $families); no writable+executable mapping"
