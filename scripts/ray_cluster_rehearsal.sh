#!/usr/bin/env bash
# A production rehearsal of `make run` on a Ray cluster that the run did not start, whose worker nodes do not
# share the driver's disk, with the photos and the store in S3 (a local moto server):
#   - a head with no CPU (so every task and actor runs on a worker node) and two worker nodes (2 CPUs and
#     1 CPU), each started in its own mount namespace with empty tmpfs over the driver's homes, the photos'
#     folder and the checkout's data/ folder: the workers can only read what is in the store;
#   - token authentication on (RAY_AUTH_MODE=token, a private token), and the runs joining through Ray's
#     client (RAY_ADDRESS=ray://...), as the Kubernetes deployment does (deploy/k8s);
#   - `make run` with LINEUP_ENGINE=ray, RAY_ADDRESS, LINEUP_INPUT=s3://... and LINEUP_STORE=s3://..., and
#     the second worker node killed with -9 (every process of its namespace) KILL_AFTER seconds in;
#   - the same input in-process into another store prefix, and every stored file compared by sha256
#     (commit records aside: they hold times and process ids);
#   - the mistake a cluster user makes first: the local photos' folder as LINEUP_INPUT on that cluster, which
#     must fail at once naming the node and the path (pipeline.ray_engine.WorkersCannotRead), not publish
#     empty datasets.
# Needs root (unshare, mount) and `make install`. Exit 0 when all three hold.
#
#   sudo scripts/ray_cluster_rehearsal.sh [PHOTOS_DIR] [KILL_AFTER_SECONDS]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PHOTOS=$(cd "${1:-$REPO/../shared/data/faces}" && pwd)
KILL_AFTER=${2:-20}
PY=$REPO/.venv/bin/python
RAY=$REPO/.venv/bin/ray
[ "$(id -u)" = 0 ] || { echo "run as root: the worker nodes are started in their own mount namespaces" >&2; exit 2; }
command -v unshare >/dev/null || { echo "unshare (util-linux) is needed" >&2; exit 2; }
[ -x "$RAY" ] || { echo "no $RAY: run make install first" >&2; exit 2; }

W=$(mktemp -d /tmp/lrr.XXXX)  # short: Ray's socket paths must fit 107 bytes
mkdir -p "$W/homes" "$W/ray" "$REPO/data"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
S3_PORT=$(free_port)
GCS_PORT=$(free_port)
CLIENT_PORT=$(free_port)
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
unset RAY_ADDRESS LINEUP_STORE LINEUP_HOME LINEUP_INPUT LINEUP_ENGINE
# Ray 2.5x+ `ray start --head` turns token authentication on: every node and every driver needs the token
# (on a real cluster, a secret mounted on each pod); here a private one for this rehearsal
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$W/auth_token
"$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH"

# this rehearsal's processes only (a plain `ray stop` would stop every Ray cluster on the machine): those
# whose command line names its temp folder, everything in its worker nodes' namespaces, and their children
cleanup() {
  "$PY" - "$W" <<'EOF' || true
import os, signal, sys
w = sys.argv[1]
namespaces = set(open(f"{w}/namespaces").read().split()) if os.path.exists(f"{w}/namespaces") else set()
procs = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
            cmd += open(f"/proc/{d}/environ", "rb").read().decode(errors="replace")  # RAY_TMPDIR
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            ns = os.readlink(f"/proc/{d}/ns/mnt")
        except OSError:
            continue
        procs[int(d)] = (cmd, ppid, ns)
mine = {p for p, (cmd, _, ns) in procs.items() if w in cmd or ns in namespaces}
grown = True
while grown:
    more = {p for p, (_, ppid, _) in procs.items() if ppid in mine} - mine
    grown = bool(more)
    mine |= more
mine.discard(os.getpid())
for p in mine:
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
EOF
  [ -f "$W/moto.pid" ] && kill "$(cat "$W/moto.pid")" 2>/dev/null || true
}
trap cleanup EXIT

echo "== rehearsal folder $W; photos $PHOTOS"
"$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$W/moto.log" 2>&1 &
echo $! > "$W/moto.pid"
disown
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break; sleep 0.2; done
"$PY" - "$PHOTOS" <<'EOF'
import pathlib, sys
import fsspec
fs = fsspec.filesystem("s3", skip_instance_cache=True)
fs.mkdir("lineup")
root, n = pathlib.Path(sys.argv[1]), 0
for p in sorted(root.rglob("*")):
    if p.is_file():
        fs.pipe_file(f"lineup/in/{p.relative_to(root).as_posix()}", p.read_bytes())
        n += 1
fs.pipe_file("lineup/in/broken/truncated.jpg", b"\xff\xd8\xff\xe0 truncated")
print(f"== {n} files uploaded to s3://lineup/in, and one truncated JPEG")
EOF

RAY_TMPDIR=$W/ray "$RAY" start --head --num-cpus 0 --port "$GCS_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --temp-dir "$W/ray" --include-dashboard false --disable-usage-stats > "$W/head.log" 2>&1
# $1 CPUs; its own mount namespace, the driver's folders hidden, no store credentials of its own (the
# driver's reach its workers through the job's runtime_env); records its namespace
worker_node() {
  unshare -m --propagation private bash -c "
    for d in '$W/homes' '$PHOTOS' '$REPO/data'; do mount -t tmpfs none \"\$d\"; done
    test -z \"\$(ls -A '$PHOTOS')\" || exit 3
    readlink /proc/self/ns/mnt >> '$W/namespaces'
    env -u AWS_ENDPOINT_URL -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_DEFAULT_REGION RAY_TMPDIR='$W/ray' \
      '$RAY' start --address 127.0.0.1:$GCS_PORT --num-cpus $1 --disable-usage-stats" >> "$W/workers.log" 2>&1
}
worker_node 2
worker_node 1
NODE_B=$(tail -1 "$W/namespaces")
for _ in $(seq 60); do
  nodes=$("$PY" -c "import ray; ray.init(address='127.0.0.1:$GCS_PORT', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
  [ "$nodes" = 3 ] && break
  sleep 1
done
echo "== cluster at 127.0.0.1:$GCS_PORT: $nodes nodes (a head with no CPU, worker nodes of 2 and 1 CPUs that cannot see $PHOTOS)"
# the runs join as the Kubernetes deployment does, through Ray's client (deploy/k8s/lineup.env), with the token
ADDRESS=ray://127.0.0.1:$CLIENT_PORT

cd "$REPO"
t0=$(date +%s)
( sleep "$KILL_AFTER"; n=0
  for d in /proc/[0-9]*; do
    [ "$(readlink "$d/ns/mnt" 2>/dev/null)" = "$NODE_B" ] && kill -9 "${d#/proc/}" 2>/dev/null && n=$((n + 1))
  done
  echo "== killed the 1-CPU worker node ($n processes) ${KILL_AFTER} s into the Ray run" ) &
killer=$!
set +e
LINEUP_ENGINE=ray RAY_ADDRESS=$ADDRESS LINEUP_HOME=$W/homes/ray LINEUP_INPUT=s3://lineup/in \
  LINEUP_STORE=s3://lineup/store-ray make --no-print-directory run > "$W/run-ray.log" 2>&1
ray_rc=$?
echo "== Ray run: rc $ray_rc, $(( $(date +%s) - t0 )) s (log $W/run-ray.log)"
wait $killer
t0=$(date +%s)
LINEUP_HOME=$W/homes/local LINEUP_INPUT=s3://lineup/in LINEUP_STORE=s3://lineup/store-local \
  make --no-print-directory run > "$W/run-local.log" 2>&1
local_rc=$?
echo "== in-process run: rc $local_rc, $(( $(date +%s) - t0 )) s (log $W/run-local.log)"
LINEUP_ENGINE=ray RAY_ADDRESS=$ADDRESS LINEUP_HOME=$W/homes/disk LINEUP_INPUT=$PHOTOS \
  make --no-print-directory run > "$W/run-disk.log" 2>&1
disk_rc=$?
set -e

"$PY" - "$ray_rc" "$local_rc" "$disk_rc" "$W/run-disk.log" <<'EOF'
import hashlib, sys
import fsspec
ray_rc, local_rc, disk_rc, disk_log = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fs = fsspec.filesystem("s3", skip_instance_cache=True)

def stored(prefix):
    out = {}
    for p in fs.find(f"lineup/{prefix}"):
        rel = p[len(f"lineup/{prefix}/"):]
        if not rel.startswith("tables/_commits/"):  # times and process ids
            out[rel] = hashlib.sha256(fs.cat_file(p)).hexdigest()
    return out

ray, local = stored("store-ray"), stored("store-local")
differ = sorted(k for k in set(ray) | set(local) if ray.get(k) != local.get(k))
datasets = sum(k.startswith("datasets/") for k in local)
print(f"== stored files: {len(local)} in-process ({datasets} under datasets/), {len(ray)} from Ray; differing: {len(differ)}")
for k in differ[:10]:
    print("   differs:", k)
said = open(disk_log).read()
named = "WorkersCannotRead" in said
print(f"== local folder as input on the cluster: rc {disk_rc}, {'fails naming the node and the path' if named else 'NO WorkersCannotRead in its log'}")
ok = ray_rc == 0 and local_rc == 0 and not differ and datasets > 0 and disk_rc != 0 and named
print("== rehearsal", "passed" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
