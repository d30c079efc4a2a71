#!/usr/bin/env bash
# End-to-end check of docker-compose.yml: builds the image, starts the stack
# (first the default profile, then the cluster profile), talks to it through
# every published port, asks each server's /readyz (and /healthz, /metrics)
# on its metrics port, sees HAProxy take both servers out of the rotation
# while the database is paused and back after, registers a VM through one
# server and finds it through the other, restarts the stack to see that the
# data stayed, and tears it all down (volumes included). Exits 0 when everything worked, else 1 with a
# message saying which step failed, followed by the containers' recent logs.
#
# Usage: deploy/smoke.sh
#   COMPOSE=/usr/bin/docker-compose  the compose command (default; v1), or
#                                    COMPOSE="docker compose" for v2
#   VMM_PORT=8888 VMM_LB_PORT=8880   ports published on this machine; they
#                                    must be free
#   VMM_SMOKE_PROJECT=vmm-smoke      compose project name: the smoke stack
#                                    and its volume are separate from the one
#                                    `docker compose up` makes, which it
#                                    never touches
#   VMM_SMOKE_KEEP=1                 leave the stack running after a failure
#
# Needs python3 on this machine (to speak the protocol to the published
# ports); inside the containers it uses the image's own vmm-client, and
# bash's /dev/tcp for HTTP (the images have no curl, and need none).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

read -r -a COMPOSE_CMD <<< "${COMPOSE:-/usr/bin/docker-compose}"
PROJECT=${VMM_SMOKE_PROJECT:-vmm-smoke}
export VMM_PORT=${VMM_PORT:-8888}
export VMM_LB_PORT=${VMM_LB_PORT:-8880}
# The operator token the servers get (docker-compose.yml passes
# $VMM_ADMIN_TOKEN through), and the VMs' password: random, never printed.
VMM_ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
export VMM_ADMIN_TOKEN
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
# Generous: the first start waits for PostgreSQL's initdb and the migrations.
READY_SECONDS=${VMM_SMOKE_READY_SECONDS:-180}

STEP="setup"
STARTED=0
step() {
    STEP=$*
    printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"
}
fail() {
    printf '\nsmoke: FAILED at "%s": %s\n' "$STEP" "$*" >&2
    exit 1
}

compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
cluster() { compose --profile cluster "$@"; }

on_exit() {
    local status=$?
    if [ "$status" -ne 0 ] && [ "$STARTED" = 1 ]; then
        printf '\nsmoke: exit status %s; containers and their last log lines:\n' "$status" >&2
        cluster ps >&2 || true
        cluster logs --no-color --tail=40 >&2 || true
        if [ "${VMM_SMOKE_KEEP:-0}" = 1 ]; then
            printf 'smoke: stack left running (project %s)\n' "$PROJECT" >&2
            return
        fi
        printf 'smoke: tearing down\n' >&2
        cluster down -v --remove-orphans >&2 || true
    fi
}
trap on_exit EXIT

# A minimal client of the JSON line protocol, for this machine's side of the
# published ports. `call HOST PORT` sends each line of stdin as a request on
# one connection and prints each reply line (waiting at most 30 s for each:
# longer than the balancer's connect timeout and retries); exit 1 on an error reply (its
# code and message on stderr, never the request), 2 when it cannot connect
# or the connection ends early. `pair HOST PORT` opens two connections at
# once, pings on both, then closes both (to see the balancer use both
# servers).
PY_CLIENT='
import json, socket, sys

def connect(host, port):
    try:
        return socket.create_connection((host, int(port)), timeout=30)
    except OSError as err:
        print(f"cannot connect to {host}:{port}: {err}", file=sys.stderr)
        sys.exit(2)

def exchange(conn, stream, request):
    conn.sendall(request.encode() + b"\n")
    try:
        line = stream.readline()
    except OSError as err:
        print(f"no reply: {err}", file=sys.stderr)
        sys.exit(2)
    if not line:
        print("the connection was closed before a reply", file=sys.stderr)
        sys.exit(2)
    reply = json.loads(line)
    if reply.get("status") != "success":
        command = json.loads(request).get("command")
        code, message = reply.get("code"), reply.get("message")
        print(f"{command}: {code}: {message}", file=sys.stderr)
        sys.exit(1)
    return line.decode()

mode, host, port = sys.argv[1:4]
if mode == "call":
    conn = connect(host, port)
    stream = conn.makefile("rb")
    for request in sys.stdin:
        if request.strip():
            sys.stdout.write(exchange(conn, stream, request.strip()))
elif mode == "pair":
    conns = [connect(host, port) for _ in range(2)]
    for conn in conns:
        exchange(conn, conn.makefile("rb"), "{\"command\":\"ping\"}")
    for conn in conns:
        conn.close()
'
call() { python3 -c "$PY_CLIENT" call 127.0.0.1 "$1"; }
pair() { python3 -c "$PY_CLIENT" pair 127.0.0.1 "$1"; }

# The request lines; the password goes only into python's stdin.
register_line() {
    printf '{"command":"register","data":{"vm_id":"%s","ram":%s,"cpu":%s,"disks":[{"disk_size":%s}],"password":"%s"}}\n' \
        "$1" "$2" "$3" "$4" "$PASSWORD"
}
authenticate_line() { printf '{"command":"authenticate","data":{"vm_id":"%s","password":"%s"}}\n' "$1" "$PASSWORD"; }
list_line() { printf '{"command":"list","data":{"list_type":"%s"}}\n' "$1"; }

# wait_for DESCRIPTION COMMAND...: runs COMMAND until it succeeds, for at
# most READY_SECONDS, then fails with DESCRIPTION and COMMAND's last stderr.
wait_for() {
    local what=$1 deadline=$((SECONDS + READY_SECONDS)) err
    shift
    err=$(mktemp)
    until "$@" >/dev/null 2>"$err"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail "$what: not within ${READY_SECONDS} s (last error: $(tr '\n' ' ' < "$err"))"
        fi
        sleep 1
    done
    rm -f "$err"
    echo "ok: $what"
}

ping_port() { echo '{"command":"ping"}' | call "$1" | grep -q '"message":"PONG"'; }
ping_in() { compose exec -T "$1" vmm-client ping | grep -q PONG; }

# expect_vms WHERE OUTPUT VM...: OUTPUT (reply lines) lists every VM.
expect_vms() {
    local where=$1 output=$2 vm
    shift 2
    for vm in "$@"; do
        grep -q "\"vm_id\":\"$vm\"" <<< "$output" || fail "$vm is not in all_vms as listed $where"
    done
    echo "ok: $* listed $where"
}
# all_vms through a port of this machine, authenticated as VM $2.
list_via_port() { { authenticate_line "$2"; list_line all_vms; } | call "$1" | tail -n 1; }
# all_vms from inside a server container, as the operator.
list_in() { compose exec -T "$1" vmm-client --admin --json list all; }

# http_in SERVICE PORT PATH: GET PATH from PORT on the container's own
# loopback, over HTTP/1.0 (the server closes after the reply); prints the
# status line, the headers and the body, without carriage returns.
http_in() {
    compose exec -T "$1" timeout 10 bash -c \
        'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$2" >&3 && cat <&3' \
        _ "$2" "$3" | tr -d '\r'
}
# readyz SERVICE: status line and body of the server's /readyz (port 9100,
# VMM_METRICS_LISTEN in docker-compose.yml).
readyz() { http_in "$1" 9100 /readyz | sed -n '1p;$p'; }
# ready_in SERVICE: its /readyz is 200 `ready`; not_ready_in: 503 with the
# database named in the reason.
ready_in() {
    local reply
    reply=$(readyz "$1") || return 1
    grep -Eq '^HTTP/1\.[01] 200 ' <<< "$reply" && [ "$(tail -n 1 <<< "$reply")" = ready ]
}
not_ready_in() {
    local reply
    reply=$(readyz "$1") || return 1
    grep -Eq '^HTTP/1\.[01] 503 ' <<< "$reply" && tail -n 1 <<< "$reply" | grep -q database
}
# healthz, and the metrics the alerts of deploy/alerts.yml use.
# (Replies are read whole before grep -q, which stops at the first match:
# a writer cut short by it would fail the pipeline under pipefail.)
health_in() {
    local reply
    reply=$(http_in "$1" 9100 /healthz) || return 1
    grep -Eq '^HTTP/1\.[01] 200 ' <<< "$reply"
}
metrics_in() {
    local text metric
    text=$(http_in "$1" 9100 /metrics) || return 1
    grep -Eq '^HTTP/1\.[01] 200 ' <<< "$text" || return 1
    for metric in vmm_build_info vmm_lease_age_seconds vmm_db_pool_waiting vmm_db_pool_connections vmm_commands_total; do
        grep -q "^$metric[{ ]" <<< "$text" || { echo "no $metric" >&2; return 1; }
    done
}
# lb_servers: each server of the balancer's backend with its state and its
# last check (`a UP L7OK`), from HAProxy's stats socket (deploy/haproxy.cfg).
lb_servers() {
    cluster exec -T lb timeout 10 bash -c \
        'exec 3<>/dev/tcp/127.0.0.1/9999 && echo "show stat" >&3 && cat <&3' \
        | awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
                   $1 == "vmm_servers" && $2 != "BACKEND" {
                       status = $col["status"]; gsub(/ /, "_", status)  # "UP 1/2": going down
                       print $2, status, $col["check_status"] }'
}
# lb_both STATE: both servers are in STATE (UP or DOWN) for the balancer.
lb_both() { [ "$(lb_servers | awk -v s="$1" '$2 == s' | wc -l)" = 2 ]; }

port_free() { ! python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)' "$1" 2>/dev/null; }

# ---------------------------------------------------------------------------
step "checking the tools and the ports"
"${COMPOSE_CMD[@]}" version >/dev/null 2>&1 || fail "'${COMPOSE_CMD[*]}' does not run (set COMPOSE)"
"${COMPOSE_CMD[@]}" version 2>&1 | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail
for port in "$VMM_PORT" "$VMM_LB_PORT"; do
    port_free "$port" || fail "something on this machine already answers on port $port; stop it or set VMM_PORT / VMM_LB_PORT"
done
echo "ok: ports $VMM_PORT and $VMM_LB_PORT are free; project $PROJECT"
# Left over from an interrupted run.
cluster down -v --remove-orphans >/dev/null 2>&1 || true
STARTED=1

step "default profile: build the image and start db and server"
compose up -d --build
wait_for "server answers ping on port $VMM_PORT" ping_port "$VMM_PORT"
wait_for "server's /readyz is 200 (port 9100 inside its container)" ready_in server
readyz server | sed 's/^/  server \/readyz: /'
health_in server || fail "server's /healthz is not 200"
metrics_in server || fail "server's /metrics lacks a metric the alerts use"
echo "ok: server's /healthz is 200 and /metrics has the alerts' metrics"
# (with the profile on: `ps` leaves out the services of profiles not named)
running=$(cluster ps --services --filter status=running) || fail "compose ps"
if grep -qx 'server-2\|lb' <<< "$running"; then fail "the default profile started a cluster service: $running"; fi

step "default profile: register smoke-a through port $VMM_PORT, list it"
register_line smoke-a 512 2 10 | call "$VMM_PORT" >/dev/null || fail "register smoke-a through port $VMM_PORT"
out=$(list_via_port "$VMM_PORT" smoke-a) || fail "list all_vms through port $VMM_PORT"
expect_vms "through port $VMM_PORT (as smoke-a)" "$out" smoke-a

step "cluster profile: add server-2 and the balancer"
cluster up -d
wait_for "server-2 answers ping (vmm-client inside its container)" ping_in server-2
wait_for "the balancer answers ping on port $VMM_LB_PORT" ping_port "$VMM_LB_PORT"
# Two connections at once go to the two servers (leastconn) once both have
# passed their health checks; HAProxy logs each connection's server on close.
lb_used_both() {
    pair "$VMM_LB_PORT" || return 1
    local log
    log=$(cluster logs --no-color lb)
    grep -q 'vmm_servers/a ' <<< "$log" && grep -q 'vmm_servers/b ' <<< "$log"
}
wait_for "the balancer sends connections to both servers" lb_used_both
for service in server server-2; do
    wait_for "$service's /readyz is 200" ready_in "$service"
    readyz "$service" | sed "s/^/  $service \/readyz: /"
done
wait_for "the balancer's health checks (/readyz) mark both servers UP" lb_both UP
lb_servers | sed 's/^/  lb: /'

step "database paused: both servers leave the rotation, and come back"
# Both servers share the database: pausing it makes both /readyz answer
# 503 (the database check has a one-second limit), and HAProxy marks them
# DOWN after two failed checks, while /healthz stays 200.
cluster pause db
for service in server server-2; do
    wait_for "$service's /readyz is 503, naming the database" not_ready_in "$service"
    readyz "$service" | sed "s/^/  $service \/readyz: /"
    health_in "$service" || fail "$service's /healthz is not 200 without the database"
done
echo "ok: both /healthz stay 200"
wait_for "the balancer marks both servers DOWN" lb_both DOWN
lb_servers | sed 's/^/  lb: /'
cluster unpause db
for service in server server-2; do
    wait_for "$service's /readyz is 200 again" ready_in "$service"
done
wait_for "the balancer marks both servers UP again" lb_both UP
lb_servers | sed 's/^/  lb: /'
wait_for "the balancer answers ping on port $VMM_LB_PORT" ping_port "$VMM_LB_PORT"

step "cluster profile: one server sees what the other registered"
out=$(list_in server-2) || fail "list all_vms in server-2"
expect_vms "by server-2 (registered through server)" "$out" smoke-a
# smoke-b registered by server-2's own client, the password on its stdin.
printf '%s\n' "$PASSWORD" \
    | compose exec -T server-2 vmm-client --json register --vm-id smoke-b --ram 1024 --cpu 4 --disk 20 --password-stdin >/dev/null \
    || fail "register smoke-b in server-2"
out=$(list_via_port "$VMM_PORT" smoke-b) || fail "list all_vms through port $VMM_PORT as smoke-b"
expect_vms "by server, port $VMM_PORT (registered through server-2)" "$out" smoke-a smoke-b
out=$(list_via_port "$VMM_LB_PORT" smoke-a) || fail "list all_vms through the balancer"
expect_vms "through the balancer, port $VMM_LB_PORT" "$out" smoke-a smoke-b

step "failover: server-2 stops, the balancer still answers"
cluster stop server-2
# Connections sent to server-2 before the health checks mark it down fail
# to connect and are redispatched to server (option redispatch).
for i in 1 2 3 4 5 6; do
    ping_port "$VMM_LB_PORT" || fail "ping $i through the balancer with server-2 stopped"
done
echo "ok: 6 pings through the balancer with server-2 stopped"
out=$(list_via_port "$VMM_LB_PORT" smoke-b) || fail "list all_vms through the balancer with server-2 stopped"
expect_vms "through the balancer with server-2 stopped" "$out" smoke-a smoke-b
cluster start server-2
wait_for "server-2 answers ping again" ping_in server-2

step "down and up again: the data stays"
cluster down
cluster up -d
wait_for "server answers ping on port $VMM_PORT" ping_port "$VMM_PORT"
wait_for "server-2 answers ping" ping_in server-2
wait_for "the balancer answers ping on port $VMM_LB_PORT" ping_port "$VMM_LB_PORT"
wait_for "server's /readyz is 200" ready_in server
wait_for "server-2's /readyz is 200" ready_in server-2
out=$(list_in server) || fail "list all_vms in server"
expect_vms "by server after the restart" "$out" smoke-a smoke-b
out=$(list_in server-2) || fail "list all_vms in server-2"
expect_vms "by server-2 after the restart" "$out" smoke-a smoke-b
# The password hashes stayed too: smoke-b authenticates through the balancer.
out=$(list_via_port "$VMM_LB_PORT" smoke-b) || fail "authenticate smoke-b and list through the balancer after the restart"
expect_vms "through the balancer after the restart (as smoke-b)" "$out" smoke-a smoke-b

step "tear down (volumes included)"
cluster down -v --remove-orphans
if [ -n "$(cluster ps -q 2>/dev/null)" ]; then fail "containers left after down"; fi
if docker volume inspect "${PROJECT}_db-data" >/dev/null 2>&1; then fail "volume ${PROJECT}_db-data left after down -v"; fi
echo "ok: no containers, no volume"

printf '\nsmoke: PASSED\n'
