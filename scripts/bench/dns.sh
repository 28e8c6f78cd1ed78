#!/usr/bin/env bash
# DNS round trip through the agent's DNS proxy against the same queries straight to the
# resolver (dnsmasq on a loopback address), p50/p99 over COUNT queries on one connected UDP
# socket (tests/e2e/dns_rtt.py). Root; uses its own cgroup root, pins and sockets, and removes
# them. Usage: scripts/bench/dns.sh [AGENT_BINARY] [COUNT]
set -euo pipefail
AGENT=${1:-target/release/egress-agent}
COUNT=${2:-20000}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
RTT=$HERE/tests/e2e/dns_rtt.py
NS=127.53.200.1
NAME=egress-dnsbench-$$
CG=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)/$NAME
PINS=/sys/fs/bpf/$NAME
TMP=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
cat > "$TMP/policy.yaml" <<YAML
kind: MeshConfig
metadata: {name: egress}
spec:
  traffic: {enableEgress: false}
  proxy: {port: $((PORT + 1))}
  dns: {enabled: true, port: $PORT}
---
kind: Workload
metadata: {name: web}
---
kind: Egress
metadata: {name: resolver}
spec:
  sources: [{name: web}]
  ipAddresses: [$NS/32]
  ports: [{number: 53, protocol: udp}]
---
kind: Egress
metadata: {name: db}
spec:
  sources: [{name: web}]
  hosts: [db.bench.example]
  ports: [{number: 5432}]
YAML
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address=$NS --port=53 --user=root --group=root --pid-file= --local-ttl=300 \
  --host-record=db.bench.example,127.64.0.1 --log-facility=/dev/null &
DNSMASQ=$!
"$AGENT" --admin-socket "$TMP/admin.sock" run --config "$TMP/policy.yaml" --cgroup-root "$CG" \
  --pin-dir "$PINS" --state-file "$TMP/state.yaml" --metrics-addr 127.0.0.1:$((PORT + 2)) \
  2> "$TMP/agent.log" &
AGENTPID=$!
cleanup() {
  kill "$AGENTPID" 2>/dev/null || true
  wait "$AGENTPID" 2>/dev/null || true
  "$AGENT" uninstall --pin-dir "$PINS" --cgroup-root "$CG" --state-file "$TMP/state.yaml" >/dev/null 2>&1 || true
  kill "$DNSMASQ" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
for _ in $(seq 100); do grep -q ' ready ' "$TMP/agent.log" && break; sleep 0.1; done
grep -q ' ready ' "$TMP/agent.log" || { cat "$TMP/agent.log"; exit 1; }
for round in 1 2 3; do
  direct=$(python3 "$RTT" $NS db.bench.example "$COUNT")
  through=$("$AGENT" exec --workload web --cgroup-root "$CG" -- python3 "$RTT" $NS db.bench.example "$COUNT")
  echo "round $round: direct $direct | through the agent $through"
done
