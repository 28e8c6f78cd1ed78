#!/usr/bin/env bash
# The pods part of the demo: usage  scripts/demo-pods.sh AGENT_BINARY
#
# A Kubernetes node in miniature, all in network namespaces this script creates (no packet
# leaves the machine):
#   node  (egress-demo-PID-node)  where the agent runs, like a DaemonSet pod with hostNetwork
#   out   (egress-demo-PID-out)   "the internet": 192.0.2.10 (api), .20 (partner), .30 (blocked)
#   pod   (egress-demo-PID-default-web)  created by the agent: eth0 10.200.0.2, fd00:200::2
# The agent enforces deploy/examples/demo-pods.yaml on the pod "web": api allowed directly,
# partner through the proxy listener the agent opens inside the pod, blocked refused. Then a
# raw socket in the pod, to send a TCP SYN past the socket hooks, is refused at socket(); with
# raw sockets allowed by the operator, the per-packet program drops the SYN itself.
#
# Everything gets a unique name and is removed on exit, whatever happens. Exit status 0 when
# every check passed. Needs root.
# shellcheck disable=SC2317 # cleanup and the checks run indirectly (trap, check)
set -euo pipefail

die() {
  printf 'demo-pods: %s\n' "$*" >&2
  exit 1
}
header() { printf '\n=== %s ===\n' "$*"; }

[ $# -eq 1 ] || die "usage: $0 AGENT_BINARY"
[ "$(id -u)" -eq 0 ] || die "must run as root"
for tool in curl python3 ip nsenter; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh)"
done
AGENT=$(realpath "$1")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PACKETS=$PWD/tests/e2e/packets.py

MOUNT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$MOUNT" ] || die "no cgroup v2 filesystem is mounted"
ID=egress-demo-$$
CG=$MOUNT/$ID
PIN=/sys/fs/bpf/$ID
NODE=$ID-node
OUT=$ID-out
POD=$ID-default-web
UP=ed$$u
EXT=ed$$o
WORK=$(mktemp -d /tmp/egress-demo-pods.XXXXXX)
LOG=$WORK/agent.log
CONFIG=$WORK/policy.yaml
sed "s/netnsPrefix: egress-demo-/netnsPrefix: $ID-/" deploy/examples/demo-pods.yaml >"$CONFIG"
AGENT_PID=
SERVER_PIDS=()

in_node() { nsenter --net="/run/netns/$NODE" "$@"; }
in_web() { "$AGENT" exec --workload web --cgroup-root "$CG" -- "$@"; }

cleanup() {
  local rc=$? pid left=0 path
  set +e
  header "cleanup"
  if [ -n "$AGENT_PID" ]; then
    kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID"
    echo "stopped the agent (pid $AGENT_PID)"
  fi
  for pid in "${SERVER_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  "$AGENT" uninstall --pin-dir "$PIN" --cgroup-root "$CG" --state-file "$WORK/state.yaml" 2>&1 | sed 's/^/  | /'
  ip netns del "$POD" 2>/dev/null
  ip netns del "$NODE" 2>/dev/null
  ip netns del "$OUT" 2>/dev/null
  rm -rf "$WORK"
  for path in "$CG" "$PIN" "$WORK" "/run/netns/$NODE" "/run/netns/$OUT" "/run/netns/$POD"; do
    if [ -e "$path" ]; then
      echo "LEFT BEHIND: $path"
      left=1
    fi
  done
  [ "$left" -eq 0 ] && echo "nothing left behind"
  [ "$left" -eq 0 ] || rc=1
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

header "a node and the outside world, as network namespaces"
ip netns add "$NODE"
ip netns add "$OUT"
ip link add "$UP" netns "$NODE" type veth peer name "$EXT" netns "$OUT"
ip -n "$NODE" -batch - <<EOF
link set lo up
link set $UP up
addr add 10.99.0.1/24 dev $UP
route add default via 10.99.0.2
EOF
ip -n "$OUT" -batch - <<EOF
link set lo up
link set $EXT up
addr add 10.99.0.2/24 dev $EXT
route add 10.200.0.0/24 via 10.99.0.1
addr add 192.0.2.10/32 dev lo
addr add 192.0.2.20/32 dev lo
addr add 192.0.2.30/32 dev lo
EOF
in_node sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
echo "node: 10.99.0.1, outside: 10.99.0.2 with 192.0.2.10 (api), .20 (partner), .30 (blocked)"
for host in api:192.0.2.10 partner:192.0.2.20 blocked:192.0.2.30; do
  name=${host%%:*} addr=${host#*:}
  mkdir -p "$WORK/$name"
  echo "hello from $name at $addr" >"$WORK/$name/index.html"
  # nsenter execs the command: $! is the server's own PID.
  nsenter --net="/run/netns/$OUT" python3 -m http.server 80 --bind "$addr" --directory "$WORK/$name" >/dev/null 2>&1 &
  SERVER_PIDS+=($!)
done

header "the agent, in the node's namespace"
nsenter --net="/run/netns/$NODE" "$AGENT" --admin-socket "$WORK/admin.sock" run --config "$CONFIG" --cgroup-root "$CG" \
  --pin-dir "$PIN" --state-file "$WORK/state.yaml" --metrics-addr 127.0.0.1:15090 >"$LOG" 2>&1 &
AGENT_PID=$!
for ((i = 0; i < 600; i++)); do
  grep -qw ready "$LOG" && break
  kill -0 "$AGENT_PID" 2>/dev/null || { cat "$LOG" >&2; AGENT_PID=; die "the agent exited"; }
  sleep 0.1
done
grep -E "tc backstop|proxy listening inside" "$LOG" | sed 's/^.*INFO //; s/^/  | /'
echo "\$ egress-agent exec --workload web -- ip -br addr"
in_web ip -br addr | sed 's/^/  | /'

RESULTS=()
check() { # NAME CONDITION...
  local name=$1
  shift
  if "$@"; then RESULTS+=("PASS  $name"); else RESULTS+=("FAIL  $name"); fi
}
curl_in_web() { # URL -> "<http code> <exit status>"
  local rc=0 code
  code=$(in_web curl -s -o /dev/null -m 5 -w '%{http_code}' "$1") || rc=$?
  echo "$code $rc"
}

header "a) pod web -> api 192.0.2.10: allowed directly"
a=$(curl_in_web http://192.0.2.10/)
echo "curl: HTTP ${a% *}, exit ${a#* }"
check "pod allowed:    web reaches the api" test "$a" = "200 0"

header "b) pod web -> partner 192.0.2.20: through the proxy inside the pod"
b=$(curl_in_web http://192.0.2.20/)
echo "curl: HTTP ${b% *}, exit ${b#* }"
check "pod redirected: web reaches the partner through the in-pod proxy" test "$b" = "200 0"

header "c) pod web -> blocked 192.0.2.30: refused at connect()"
c=$(curl_in_web http://192.0.2.30/)
echo "curl: exit ${c#* } (7: could not connect)"
check "pod refused:    curl exits 7" test "${c#* }" = "7"

metric() { in_node curl -s 127.0.0.1:15090/metrics | awk -v m="^$1" '$0 ~ m { s += $NF } END { print s + 0 }'; }
raw_syn() { # -> "sent" or the error, and the packets the outside saw
  nsenter --net="/run/netns/$OUT" python3 "$PACKETS" sniff "$EXT" 192.0.2.30 2 >"$WORK/sniff.out" &
  local sniffer=$! out
  sleep 0.5
  if out=$(in_web python3 "$PACKETS" syn 192.0.2.30 80 2>&1); then out=sent; else out=$(echo "$out" | tail -n 1); fi
  wait "$sniffer"
  echo "$out; the outside saw $(tail -n 1 "$WORK/sniff.out") packets"
}

header "d) a raw socket in the pod, to send a SYN past the socket hooks: refused at socket()"
before=$(metric egress_sockets_refused_total)
d=$(raw_syn)
after=$(metric egress_sockets_refused_total)
echo "python3 raw SYN: $d; egress_sockets_refused_total: $before -> $after"
check "socket kinds:   the raw socket is refused (EPERM)" grep -q "Operation not permitted" <<<"$d"
check "socket kinds:   the outside sees nothing" grep -q "saw 0 packets" <<<"$d"
check "socket kinds:   the refusal is counted" test "$after" -gt "$before"

header "e) the operator allows raw sockets; the per-packet program drops the SYN itself"
sed 's/^  proxy: {port: 15001}$/  proxy: {port: 15001}\n  sockets: {raw: allow}/' "$CONFIG" >"$WORK/raw-allowed.yaml"
echo "\$ egress-agent policy apply -f raw-allowed.yaml   # MeshConfig spec.sockets: {raw: allow}"
in_node "$AGENT" --admin-socket "$WORK/admin.sock" policy apply -f "$WORK/raw-allowed.yaml" | sed 's/^/  | /'
before=$(metric egress_packet_dropped_total)
e=$(raw_syn)
after=$(metric egress_packet_dropped_total)
echo "python3 raw SYN: $e; egress_packet_dropped_total: $before -> $after"
check "per packet:     the raw SYN never reaches the outside" grep -q "saw 0 packets" <<<"$e"
check "per packet:     the drop counter moved" test "$after" -gt "$before"

header "summary"
printf '%s\n' "${RESULTS[@]}"
if printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'; then
  sed 's/^/  | /' "$LOG"
  exit 1
fi
echo "pods: allowed, redirected, refused, raw sockets refused and raw packets dropped as expected"
