#!/usr/bin/env bash
# Foreground 4 KiB random-write IOPS without and during a rebuild, in one run on one cluster:
#   1. `local --servers 4`, a 1 GiB volume in 256 MiB chunks, filled sequentially;
#   2. fio randwrite iodepth 32 for 10 s: healthy (3 replicas on 4 servers), after a first
#      10 s run that is not counted (the fill's writeback);
#   3. SIGKILL server 2; fio again for 10 s while `admin decommission --server 2` rebuilds its
#      three replicas (3 x 256 MiB) on the others at the given rate;
#   4. fio again for 10 s after the rebuild (3 replicas on 3 servers).
# Prints the three IOPS figures and the rebuild rate the admin command measured.
# Usage (from the repository root, after `cargo build --release -p chunkserver`):
#   bash bench/scripts/rebuild.sh [RATE]      RATE: --rebuild-rate, e.g. 64M (default) or 0
set -euo pipefail
rate=${1:-64M}
bin=target/release/chunkserver
dir=$(mktemp -d)
port=31809
uri=nbd://127.0.0.1:$port/vol0
trap 'kill $(cat "$dir"/local.pid) 2>/dev/null; sleep 1; rm -rf "$dir"' EXIT
$bin local --data-dir "$dir/d" --servers 4 --size 1G --chunk-size 256M --port $port \
    --peer-base-port 31101 --metrics-port 0 --rebuild-rate "$rate" >"$dir/local.out" 2>"$dir/local.log" &
echo $! >"$dir/local.pid"
sleep 3
iops() {
    fio --name=fg --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --iodepth=32 --size=1g \
        --time_based --runtime=10 --output-format=json | python3 -c 'import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))'
}
fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=128k --iodepth=8 --size=1g >/dev/null
iops >/dev/null # warm-up: lets the fill's writeback settle
healthy=$(iops)
kill -9 "$(cat "$dir/d/server-2.pid")"
$bin admin --data-dir "$dir/d" decommission --server 2 >"$dir/admin.out" 2>"$dir/admin.err" &
admin=$!
sleep 0.5
during=$(iops)
wait $admin
after=$(iops)
echo "rebuild rate cap: $rate"
echo "foreground 4k randwrite qd32 IOPS: healthy $healthy, during rebuild $during, after rebuild $after"
cat "$dir/admin.out"
