#!/usr/bin/env bash
# A standalone demo of egress on this machine, no cluster: usage  scripts/demo.sh AGENT_BINARY
#
# Three small HTTP servers on loopback addresses stand in for external hosts; the agent enforces
# deploy/examples/demo.yaml on workload "web"; real clients run inside it via `egress-agent exec`:
#   127.10.0.1:8080 "api"      allowed directly
#   127.20.0.1:8080 "partner"  redirected through the agent's transparent proxy
#   127.30.0.1:8080 "blocked"  matches no rule: refused at connect() with EPERM
# and a process outside every workload still reaches all three.
#
# Everything gets a unique name (cgroup root <cgroup2 mount>/egress-demo-PID, pins
# /sys/fs/bpf/egress-demo-PID, a temp dir) and is removed on exit, whatever happens.
# Exit status: 0 when every check passed, 1 otherwise. Needs root.
# shellcheck disable=SC2317 # cleanup and the checks run indirectly (trap, check)
set -euo pipefail

die() {
  printf 'demo: %s\n' "$*" >&2
  exit 1
}
header() { printf '\n=== %s ===\n' "$*"; }

[ $# -eq 1 ] || die "usage: $0 AGENT_BINARY"
[ "$(id -u)" -eq 0 ] || die "must run as root (it loads eBPF programs and creates cgroups)"
[ -x "$1" ] || die "$1 is not an executable (build it: cargo build --release -p egress-agent)"
for tool in curl python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh)"
done
AGENT=$(realpath "$1")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG=$PWD/deploy/examples/demo.yaml
[ -f "$CONFIG" ] || die "$CONFIG is missing"

MOUNT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$MOUNT" ] || die "no cgroup v2 filesystem is mounted (see /proc/mounts)"
CG=$MOUNT/egress-demo-$$
PIN=/sys/fs/bpf/egress-demo-$$
WORK=$(mktemp -d /tmp/egress-demo.XXXXXX)
LOG=$WORK/agent.log
TOKEN=egress-demo-$$ # in every page, so we know we reached our own server

AGENT_PID=
SERVER_PIDS=()

# Stops what this script started (by PID only), removes what the agent may have left, and
# shows that nothing is left. Keeps the script's exit status unless something is left.
cleanup() {
  local rc=$? pid i
  set +e
  trap - INT TERM
  header "cleanup"
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
    echo "stopping the agent (pid $AGENT_PID, SIGTERM)"
    kill -TERM "$AGENT_PID"
    for ((i = 0; i < 100; i++)); do
      kill -0 "$AGENT_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$AGENT_PID" 2>/dev/null; then
      echo "the agent did not stop within 10 s: SIGKILL"
      kill -KILL "$AGENT_PID"
    fi
    wait "$AGENT_PID"
    echo "agent exited with status $?; its last lines:"
    tail -n 3 "$LOG" | sed 's/^/  | /'
  elif [ -n "$AGENT_PID" ]; then
    wait "$AGENT_PID"
    echo "the agent (pid $AGENT_PID) had already exited, status $?"
  fi
  for pid in "${SERVER_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  [ ${#SERVER_PIDS[@]} -eq 0 ] || echo "stopped the HTTP servers (pids ${SERVER_PIDS[*]})"
  # The programs outlive the agent (enforcement does not stop with it): uninstall removes
  # the pins (detaching the programs), the saved live policy and the cgroups.
  echo "\$ egress-agent uninstall --pin-dir $PIN --cgroup-root $CG"
  "$AGENT" uninstall --pin-dir "$PIN" --cgroup-root "$CG" 2>&1 | sed 's/^/  | /'
  rm -rf "$WORK"
  local left=0
  for path in "$CG" "$PIN" "$WORK"; do
    if [ -e "$path" ]; then
      echo "LEFT BEHIND: $path"
      left=1
    else
      echo "gone: $path"
    fi
  done
  if [ "$left" -ne 0 ]; then
    rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the servers ------------------------------------------------------------------------
header "starting three HTTP servers (stand-ins for external hosts)"
start_server() { # NAME ADDR
  local name=$1 addr=$2 dir=$WORK/$1 pid i
  mkdir -p "$dir"
  printf 'hello from %s at %s:8080 (%s)\n' "$name" "$addr" "$TOKEN" >"$dir/index.html"
  python3 -m http.server 8080 --bind "$addr" --directory "$dir" >"$WORK/$name.log" 2>&1 &
  pid=$!
  SERVER_PIDS+=("$pid")
  for ((i = 0; i < 100; i++)); do
    if curl -s --max-time 1 "http://$addr:8080/" 2>/dev/null | grep -qF "$TOKEN"; then
      printf '%-8s http://%s:8080/  (pid %s)\n' "$name" "$addr" "$pid"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$WORK/$name.log" >&2
      die "the $name server on $addr:8080 exited (is the port in use?)"
    fi
    sleep 0.1
  done
  die "the $name server on $addr:8080 did not answer within 10 s"
}
start_server api 127.10.0.1
start_server partner 127.20.0.1
start_server blocked 127.30.0.1

# --- the agent --------------------------------------------------------------------------
header "starting the agent"
echo "policy:      $CONFIG"
echo "cgroup root: $CG"
echo "pin dir:     $PIN"
SOCK=$WORK/admin.sock
"$AGENT" --admin-socket "$SOCK" run --config "$CONFIG" --cgroup-root "$CG" --pin-dir "$PIN" >"$LOG" 2>&1 &
AGENT_PID=$!
for ((i = 0; ; i++)); do
  grep -qw ready "$LOG" && break
  if ! kill -0 "$AGENT_PID" 2>/dev/null; then
    wait "$AGENT_PID" || echo "agent exit status: $?"
    AGENT_PID=
    sed 's/^/  | /' "$LOG" >&2
    die "the agent exited before it was ready (its log is above)"
  fi
  if [ "$i" -ge 600 ]; then
    sed 's/^/  | /' "$LOG" >&2
    die "the agent was not ready within 60 s (its log is above)"
  fi
  sleep 0.1
done
echo "agent ready (pid $AGENT_PID):"
grep -w ready "$LOG" | sed 's/^/  | /'

in_web() { "$AGENT" exec --workload web --cgroup-root "$CG" -- "$@"; }

# Prints the agent's flow log line matching both patterns, waiting up to 5 s for it.
flow_line() { # PATTERN1 PATTERN2
  local i
  for ((i = 0; i < 50; i++)); do
    if grep -F "$1" "$LOG" | grep -F "$2"; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

RESULTS=()
check() { # NAME CONDITION...  records PASS/FAIL without stopping the demo
  local name=$1
  shift
  if "$@"; then
    RESULTS+=("PASS  $name")
  else
    RESULTS+=("FAIL  $name")
  fi
}
contains() { grep -qF -- "$2" <<<"$1"; }

# --- a) allowed directly ----------------------------------------------------------------
header "a) web -> 127.10.0.1:8080 (api): allowed directly by Egress allow-api"
echo "\$ egress-agent exec --workload web -- curl -sS http://127.10.0.1:8080/"
a_rc=0
a_out=$(in_web curl -sS --max-time 5 http://127.10.0.1:8080/ 2>&1) || a_rc=$?
echo "$a_out"
echo "curl exit status: $a_rc"
a_ok() { [ "$a_rc" -eq 0 ] && contains "$a_out" "hello from api at 127.10.0.1:8080 ($TOKEN)"; }
check "allowed:    web reaches the api directly" a_ok

# --- b) redirected through the proxy ----------------------------------------------------
header "b) web -> 127.20.0.1:8080 (partner): redirected through the agent's proxy (Egress partner-via-proxy)"
echo "\$ egress-agent exec --workload web -- curl -sS -w ... http://127.20.0.1:8080/"
b_rc=0
b_out=$(in_web curl -sS --max-time 5 \
  -w 'curl: HTTP %{http_code}, connected to %{remote_ip}:%{remote_port}\n' \
  http://127.20.0.1:8080/ 2>&1) || b_rc=$?
echo "$b_out"
echo "curl exit status: $b_rc"
echo
echo "the application still sees the address it dialled (python3 inside web):"
b_py_rc=0
b_py=$(in_web python3 -c '
import socket
s = socket.create_connection(("127.20.0.1", 8080), timeout=5)
print("getpeername():", s.getpeername())
s.sendall(b"GET / HTTP/1.0\r\nHost: 127.20.0.1:8080\r\n\r\n")
print("first response line:", s.makefile("rb").readline().decode().strip())
' 2>&1) || b_py_rc=$?
echo "$b_py"
echo
echo "the agent's flow log:"
b_flow=$(flow_line 'verdict="proxy"' '127.20.0.1:8080') || b_flow=
echo "${b_flow:-(no flow line with verdict=\"proxy\" for 127.20.0.1:8080)}"
b_curl_ok() {
  [ "$b_rc" -eq 0 ] && contains "$b_out" "hello from partner at 127.20.0.1:8080 ($TOKEN)" &&
    contains "$b_out" "curl: HTTP 200"
}
b_peer_ok() {
  [ "$b_py_rc" -eq 0 ] && contains "$b_py" "getpeername(): ('127.20.0.1', 8080)" &&
    contains "$b_py" "first response line: HTTP/1.0 200"
}
check "redirected: web reaches the partner through the proxy" b_curl_ok
check "redirected: getpeername() is 127.20.0.1:8080, not the proxy" b_peer_ok
check "redirected: the flow log says verdict=\"proxy\"" test -n "$b_flow"

# --- c) refused at connect --------------------------------------------------------------
header "c) web -> 127.30.0.1:8080 (blocked): no rule matches, enableEgress false: refused"
echo "\$ egress-agent exec --workload web -- curl -sS http://127.30.0.1:8080/"
c_rc=0
c_out=$(in_web curl -sS --max-time 5 http://127.30.0.1:8080/ 2>&1) || c_rc=$?
echo "$c_out"
echo "curl exit status: $c_rc (7: could not connect)"
echo
echo "the errno connect() gets (python3 inside web):"
c_py_rc=0
c_py=$(in_web python3 -c '
import errno, socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.30.0.1", 8080))
    print("connected (unexpected)")
except OSError as e:
    print("connect():", errno.errorcode.get(e.errno, e.errno), "-", e.strerror)
' 2>&1) || c_py_rc=$?
echo "$c_py"
echo
echo "the agent's flow log:"
c_flow=$(flow_line 'verdict="deny-default"' '127.30.0.1:8080') || c_flow=
echo "${c_flow:-(no flow line with verdict=\"deny-default\" for 127.30.0.1:8080)}"
c_curl_ok() { [ "$c_rc" -eq 7 ] && ! contains "$c_out" "hello from"; }
c_errno_ok() { [ "$c_py_rc" -eq 0 ] && contains "$c_py" "connect(): EPERM"; }
check "refused:    curl in web exits 7" c_curl_ok
check "refused:    connect() in web fails with EPERM" c_errno_ok
check "refused:    the flow log says verdict=\"deny-default\"" test -n "$c_flow"

# --- d) outside every workload ----------------------------------------------------------
header "d) a process outside every workload -> 127.30.0.1:8080: untouched"
echo "\$ curl -sS http://127.30.0.1:8080/"
d_rc=0
d_out=$(curl -sS --max-time 5 http://127.30.0.1:8080/ 2>&1) || d_rc=$?
echo "$d_out"
echo "curl exit status: $d_rc"
d_ok() { [ "$d_rc" -eq 0 ] && contains "$d_out" "hello from blocked at 127.30.0.1:8080 ($TOKEN)"; }
check "untouched:  a process outside the workloads reaches the blocked host" d_ok

# --- e) the operator toggles egress -----------------------------------------------------
header "e) the operator toggles egress mesh-wide with the CLI (OSM/FSM enableEgress)"
ctl() { "$AGENT" --admin-socket "$SOCK" "$@"; }
echo "\$ egress-agent egress status"
ctl egress status 2>&1 | sed 's/^/  | /'
echo "\$ egress-agent egress enable"
ctl egress enable 2>&1 | sed 's/^/  | /'
e_on_rc=0
e_on=$(in_web curl -sS --max-time 5 http://127.30.0.1:8080/ 2>&1) || e_on_rc=$?
echo "web -> blocked host now: ${e_on:-curl exit $e_on_rc}"
echo "\$ egress-agent egress disable"
ctl egress disable 2>&1 | sed 's/^/  | /'
e_off_rc=0
in_web curl -sS --max-time 5 http://127.30.0.1:8080/ >/dev/null 2>&1 || e_off_rc=$?
echo "web -> blocked host again: curl exit $e_off_rc"
echo "\$ egress-agent policy check --workload web 127.20.0.1:8080"
ctl policy check --workload web 127.20.0.1:8080 2>&1 | sed 's/^/  | /'
e_ok() { [ "$e_on_rc" -eq 0 ] && contains "$e_on" "hello from blocked" && [ "$e_off_rc" -eq 7 ]; }
check "toggled:    egress enable lets it through, disable refuses it again" e_ok

# --- summary ----------------------------------------------------------------------------
header "summary"
printf '%s\n' "${RESULTS[@]}"
if printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'; then
  echo "some checks FAILED; the agent's log:"
  sed 's/^/  | /' "$LOG"
  exit 1
fi
echo "allowed, redirected and refused all as expected"
exit 0
