#!/bin/sh
# make bench-dns: dnsperf against skiff-dns and dnsmasq answering the same 1,000 names, same run.
# Two phases per server: saturation (queries/s), then a fixed RATE (default 10,000 q/s) where each
# answer's latency is recorded (dnsperf -v) and p50/p99/max are computed from them.
set -eu
N=${N:-1000}; SECS=${SECS:-10}; RATE=${RATE:-10000}
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
for t in "dnsmasq 15353" "skiff-dns 15354"; do
  set -- $t
  echo "== $1 at $RATE queries/s"
  dnsperf -s 127.0.0.1 -p "$2" -d "$dir/queries" -l "$SECS" -c 4 -Q "$RATE" -v 2>&1 \
    | awk '/^> / { if ($2 != "NOERROR") bad++; print $NF } END { print bad + 0 > "/dev/stderr" }' \
    2> "$dir/bad" | sort -n > "$dir/lat"
  n=$(wc -l < "$dir/lat")
  [ "$n" -gt 0 ] || { echo "  no answers"; exit 1; }
  pct() { sed -n "$(( ($n * $1) / 100 + 1 ))p" "$dir/lat"; }
  awk -v n="$n" -v bad="$(cat "$dir/bad")" -v p50="$(pct 50)" -v p99="$(pct 99)" -v max="$(tail -1 "$dir/lat")" \
    'BEGIN { printf "  answers %d (not NOERROR: %d)  p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", n, bad, p50 * 1000, p99 * 1000, max * 1000 }'
done
