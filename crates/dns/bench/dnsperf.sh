#!/bin/sh
# make bench-dns: dnsperf against skiff-dns and dnsmasq answering the same 1,000 names, same run.
set -eu
N=${N:-1000}; SECS=${SECS:-10}
BIN=${BIN:-target/release/examples/bench_server}
dir=$(mktemp -d); trap 'kill $D $S 2>/dev/null || true; rm -rf "$dir"' EXIT
i=0; while [ $i -lt $N ]; do
  ip="10.43.$((i / 250)).$((i % 250 + 1))"
  echo "$ip svc$i.bench.svc.cluster.local" >> "$dir/hosts"
  echo "svc$i.bench.svc.cluster.local A" >> "$dir/queries"
  i=$((i + 1)); done
dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$dir/hosts" --bind-interfaces \
  --listen-address=127.0.0.1 --port=15353 --local-ttl=5 --cache-size=10000 --user=root --pid-file= & D=$!
"$BIN" 127.0.0.1:15354 "$N" & S=$!
sleep 1
for t in "dnsmasq 15353" "skiff-dns 15354"; do
  set -- $t
  echo "== $1"
  dnsperf -s 127.0.0.1 -p "$2" -d "$dir/queries" -l "$SECS" -c 4 -Q 200000 2>&1 \
    | grep -E "Queries per second|Average Latency|Latency StdDev|Queries lost|Queries completed"
done
