#!/usr/bin/env bash
# Start/stop a local Redis and a 3-node Redis Cluster on loopback for tests and benchmarks.
#
# usage: store/redis-local.sh start|stop|status [single|cluster|all]   (default: all)
#
# environment (defaults in brackets):
#   SCD_REDIS_DIR            working dir for configs, logs, pids [/tmp/sgl_scd-redis-$UID]
#   SCD_REDIS_PORT           single instance port [6380]
#   SCD_REDIS_CLUSTER_PORTS  three cluster node ports; each port+10000 is its bus port
#                            ["7100 7101 7102"]
#   SCD_REDIS_MAXMEMORY      maxmemory per instance [256mb]
#   SCD_REDIS_POLICY         maxmemory-policy [from store/redis.conf: volatile-lru]
#
# Prints the store URLs on start: redis://127.0.0.1:PORT/0 and redis+cluster://127.0.0.1:PORT
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${SCD_REDIS_DIR:-/tmp/sgl_scd-redis-$(id -u)}"
PORT="${SCD_REDIS_PORT:-6380}"
read -r -a CPORTS <<< "${SCD_REDIS_CLUSTER_PORTS:-7100 7101 7102}"
MAXMEM="${SCD_REDIS_MAXMEMORY:-256mb}"
POLICY="${SCD_REDIS_POLICY:-}"

die() { echo "redis-local: $*" >&2; exit 1; }
command -v redis-server >/dev/null || die "redis-server not found on PATH"
command -v redis-cli >/dev/null || die "redis-cli not found on PATH"
[ "${#CPORTS[@]}" -eq 3 ] || die "SCD_REDIS_CLUSTER_PORTS must list 3 ports, got '${CPORTS[*]}'"

ping() { redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; }

wait_for() {  # wait_for PORT: up to 10 s for PONG
  for _ in $(seq 100); do ping "$1" && return 0; sleep 0.1; done
  die "redis on port $1 did not answer within 10 s (log: $DIR/redis-$1.log)"
}

start_instance() {  # start_instance PORT [cluster]
  local port="$1" mode="${2:-}" conf="$DIR/redis-$1.conf"
  if ping "$port"; then echo "redis-local: port $port already answers, leaving it"; return 0; fi
  mkdir -p "$DIR/data-$port"
  {
    echo "include $HERE/redis.conf"
    echo "port $port"
    echo "dir $DIR/data-$port"
    echo "pidfile $DIR/redis-$port.pid"
    echo "logfile $DIR/redis-$port.log"
    echo "daemonize yes"
    echo "maxmemory $MAXMEM"
    [ -n "$POLICY" ] && echo "maxmemory-policy $POLICY"
    if [ "$mode" = cluster ]; then
      echo "cluster-enabled yes"
      echo "cluster-config-file nodes-$port.conf"
      echo "cluster-node-timeout 2000"
      # A cache keeps serving the slots whose node is up when another node is down.
      echo "cluster-require-full-coverage no"
      echo "cluster-allow-reads-when-down yes"
    fi
  } > "$conf"
  rm -f "$DIR/data-$port/nodes-$port.conf"
  redis-server "$conf"
  wait_for "$port"
}

stop_instance() {  # stop_instance PORT
  local port="$1"
  if ping "$port"; then redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true; fi
  for _ in $(seq 50); do ping "$port" || break; sleep 0.1; done
  ping "$port" && die "redis on port $port did not stop"
  rm -rf "$DIR/data-$port" "$DIR/redis-$port.pid"
}

cluster_ok() { redis-cli -h 127.0.0.1 -p "${CPORTS[0]}" cluster info 2>/dev/null | grep -q "cluster_state:ok"; }

start_cluster() {
  for p in "${CPORTS[@]}"; do start_instance "$p" cluster; done
  if ! cluster_ok; then
    redis-cli --cluster create $(printf "127.0.0.1:%s " "${CPORTS[@]}") \
      --cluster-replicas 0 --cluster-yes >"$DIR/cluster-create.log" 2>&1 \
      || die "cluster create failed (log: $DIR/cluster-create.log)"
  fi
  for _ in $(seq 100); do
    local all=1
    for p in "${CPORTS[@]}"; do
      redis-cli -h 127.0.0.1 -p "$p" cluster info 2>/dev/null | grep -q "cluster_state:ok" || all=0
    done
    [ "$all" = 1 ] && return 0
    sleep 0.1
  done
  die "cluster did not reach cluster_state:ok within 10 s"
}

status_instance() {
  if ping "$1"; then echo "port $1: up"; else echo "port $1: down"; fi
}

cmd="${1:-}"; what="${2:-all}"
case "$what" in single|cluster|all) ;; *) die "unknown target '$what' (single|cluster|all)";; esac
case "$cmd" in
  start)
    mkdir -p "$DIR"
    if [ "$what" != cluster ]; then start_instance "$PORT"; echo "redis://127.0.0.1:$PORT/0"; fi
    if [ "$what" != single ]; then start_cluster; echo "redis+cluster://127.0.0.1:${CPORTS[0]}"; fi
    ;;
  stop)
    if [ "$what" != cluster ]; then stop_instance "$PORT"; fi
    if [ "$what" != single ]; then for p in "${CPORTS[@]}"; do stop_instance "$p"; done; fi
    ;;
  status)
    if [ "$what" != cluster ]; then status_instance "$PORT"; fi
    if [ "$what" != single ]; then
      for p in "${CPORTS[@]}"; do status_instance "$p"; done
      if cluster_ok; then echo "cluster: ok"; else echo "cluster: not ok"; fi
    fi
    ;;
  *) sed -n '2,16p' "$0"; exit 2;;
esac
