#!/usr/bin/env bash
# packaging/startup-time.sh BIN: median of 11 runs of `BIN --version` and of `BIN server` until /healthz answers.
BIN=$1
ver=(); srv=()
for i in $(seq 1 11); do
  s=$(date +%s%N); $BIN --version >/dev/null; e=$(date +%s%N); ver+=($(( (e-s)/1000 )))
  d=$(mktemp -d); port=$((20000 + RANDOM % 20000))
  s=$(date +%s%N)
  $BIN server --insecure-http --listen 127.0.0.1:$port --dns-listen "" --data-dir $d/data --token-file $d/token >$d/log 2>&1 &
  pid=$!
  for j in $(seq 1 2000); do curl -sf -o /dev/null http://127.0.0.1:$port/healthz && break; sleep 0.002; done
  e=$(date +%s%N); srv+=($(( (e-s)/1000 )))
  kill $pid; wait $pid 2>/dev/null; rm -rf $d
done
med() { printf "%s\n" "$@" | sort -n | sed -n 6p; }
echo "version_us_median $(med "${ver[@]}") server_healthz_us_median $(med "${srv[@]}")"
echo "version_us ${ver[*]}"
echo "server_us ${srv[*]}"
