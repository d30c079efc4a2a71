#!/usr/bin/env bash
# End-to-end check of docker-compose.yml: builds the image, starts the stack
# (first the default profile, then the cluster profile: server-2 and
# server-3 behind HAProxy, `server` direct), talks to it through every
# published port, asks each server's /readyz (and /healthz, /metrics) on its
# metrics port, sees the balanced servers take the client's address from
# HAProxy's PROXY header (and a connection without one get nothing), sees
# HAProxy take both servers out of the rotation while the database is
# paused and back after, registers VMs through each server and finds them
# through the others, stops each balanced server in turn, restarts the stack
# to see that the data stayed, and tears it all down (volumes included).
# Exits 0 when everything worked, else 1 with a message saying which step
# failed, followed by the containers' recent logs.
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
#
# server-2 and server-3 take only connections from HAProxy that start with
# its PROXY header (docker-compose.yml), so a vmm-client inside their
# containers cannot reach them: the script reaches them through the
# balancer, from `server`'s container (`--addr lb:8888`) or from this
# machine, and reads their health and metrics on port 9100.
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

# HAProxy's address on the compose network, the only one server-2 and
# server-3 trust to send a PROXY header (lb's ipv4_address and
# VMM_PROXY_PROTOCOL_FROM in docker-compose.yml).
LB_ADDRESS=172.28.0.10

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
# register_in SERVICE VM ARGS...: registers VM with vmm-client inside
# SERVICE's container (ARGS: --addr for another server), the password on
# its stdin.
register_in() {
    local service=$1 vm=$2
    shift 2
    printf '%s\n' "$PASSWORD" \
        | compose exec -T "$service" vmm-client "$@" --json register --vm-id "$vm" --ram 1024 --cpu 4 --disk 20 --password-stdin >/dev/null
}

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
# ping_lb_in SERVICE: pings the balancer from inside SERVICE's container.
ping_lb_in() { compose exec -T "$1" vmm-client --addr lb:8888 ping | grep -q PONG; }

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
# all_vms from inside a server container, as the operator: from its own
# server, or (ARGS: --addr lb:8888) from another.
list_in() {
    local service=$1
    shift
    compose exec -T "$service" vmm-client "$@" --admin --json list all
}
# address_of SERVICE: the container's address on the compose network.
address_of() {
    local id
    id=$(cluster ps -q "$1") && [ -n "$id" ] || return 1
    docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id"
}
# peers_of VM: the peers (HOST:PORT, one a line) of VM's sessions in an
# active_vms reply on stdin.
peers_of() {
    python3 -c '
import json, sys
reply = json.loads(sys.stdin.read())
for entry in reply["data"]["active_vms"]:
    if entry.get("vm_id") == sys.argv[1]:
        print(entry["peer"])
' "$1"
}
# host_of HOST:PORT (IPv4): HOST.
host_of() { printf '%s\n' "${1%:*}"; }

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
# last check (`server-2 UP L7OK`), from HAProxy's stats socket (deploy/haproxy.cfg).
lb_servers() {
    cluster exec -T lb timeout 10 bash -c \
        'exec 3<>/dev/tcp/127.0.0.1/9999 && echo "show stat" >&3 && cat <&3' \
        | awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
                   $1 == "vmm_servers" && $2 != "BACKEND" {
                       status = $col["status"]; gsub(/ /, "_", status)  # "UP 1/2": going down
                       print $2, status, $col["check_status"] }'
}
# lb_both STATE: both servers (server-2, server-3) are in STATE (UP or
# DOWN) for the balancer.
lb_both() { [ "$(lb_servers | awk -v s="$1" '$2 == s' | wc -l)" = 2 ]; }
# refused_proxy_in SERVICE: its count of connections refused for the PROXY
# protocol (no header, or not from the balancer).
refused_proxy_in() {
    http_in "$1" 9100 /metrics | awk '$1 == "vmm_connections_refused_total{reason=\"proxy\"}" { print $2 }'
}

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
if grep -qx 'server-2\|server-3\|lb' <<< "$running"; then fail "the default profile started a cluster service: $running"; fi

step "default profile: register smoke-a through port $VMM_PORT, list it"
register_line smoke-a 512 2 10 | call "$VMM_PORT" >/dev/null || fail "register smoke-a through port $VMM_PORT"
out=$(list_via_port "$VMM_PORT" smoke-a) || fail "list all_vms through port $VMM_PORT"
expect_vms "through port $VMM_PORT (as smoke-a)" "$out" smoke-a

step "cluster profile: add server-2, server-3 and the balancer"
cluster up -d
for service in server-2 server-3; do
    wait_for "$service's /readyz is 200" ready_in "$service"
    readyz "$service" | sed "s/^/  $service \/readyz: /"
done
wait_for "the balancer answers ping on port $VMM_LB_PORT" ping_port "$VMM_LB_PORT"
wait_for "the balancer answers ping from inside server's container (lb:8888)" ping_lb_in server
# Two connections at once go to the two servers (leastconn) once both have
# passed their health checks; HAProxy logs each connection's server on close.
lb_used_both() {
    pair "$VMM_LB_PORT" || return 1
    local log
    log=$(cluster logs --no-color lb)
    grep -q 'vmm_servers/server-2 ' <<< "$log" && grep -q 'vmm_servers/server-3 ' <<< "$log"
}
wait_for "the balancer sends connections to both server-2 and server-3" lb_used_both
wait_for "the balancer's health checks (/readyz, no PROXY header) mark both servers UP" lb_both UP
lb_servers | sed 's/^/  lb: /'
ready_in server || fail "server's /readyz is not 200 in the cluster profile"
echo "ok: server (outside the balancer) is still ready"

step "PROXY protocol: the servers behind the balancer see the client's address"
lb_address=$(address_of lb) || fail "no address for lb"
[ "$lb_address" = "$LB_ADDRESS" ] || fail "lb's address is $lb_address, not $LB_ADDRESS (docker-compose.yml)"
server_address=$(address_of server) || fail "no address for server"
echo "ok: lb is at $lb_address, server's container at $server_address"
# smoke-a logs in through the balancer from server's container and lists
# the open connections on that connection: its own session's peer is
# server's container, as HAProxy's header said, not HAProxy.
out=$(printf '%s\n' "$PASSWORD" \
    | compose exec -T server vmm-client --addr lb:8888 --json list active --vm-id smoke-a --password-stdin) \
    || fail "list active_vms through lb:8888 as smoke-a"
peers=$(peers_of smoke-a <<< "$out") || fail "read the active_vms reply: $out"
[ -n "$peers" ] || fail "smoke-a's own session is not in active_vms: $out"
while read -r peer; do
    echo "  smoke-a's session (through lb:8888 from server's container): peer $peer"
    [ "$(host_of "$peer")" = "$server_address" ] || fail "smoke-a's peer is $peer, not server's container ($server_address)"
done <<< "$peers"
echo "ok: the session's peer is the client's address ($server_address), not the balancer's ($LB_ADDRESS)"
# The audit trail names the same address for that login (newest first).
out=$(compose exec -T server vmm-client --admin --json audit --vm-id smoke-a --limit 1) || fail "audit smoke-a"
python3 -c '
import json, sys
event = json.loads(sys.argv[1])["data"]["events"][0]
print("  audit:", event["action"], event["outcome"], "from", event["peer"])
if event["action"] != "authenticate" or event["peer"].rsplit(":", 1)[0] != sys.argv[2]:
    sys.exit(1)
' "$out" "$server_address" || fail "the audit trail's last event for smoke-a is not its login from $server_address: $out"
echo "ok: the audit trail has smoke-a's login from $server_address"
# From this machine through the published port, Docker's proxy or NAT
# stands between, so the client address may be Docker's gateway; whatever
# it is, it is not the balancer's.
out=$({ authenticate_line smoke-a; list_line active_vms; } | call "$VMM_LB_PORT" | tail -n 1) \
    || fail "list active_vms through port $VMM_LB_PORT as smoke-a"
peers=$(peers_of smoke-a <<< "$out") || fail "read the active_vms reply: $out"
[ -n "$peers" ] || fail "smoke-a's own session is not in active_vms: $out"
while read -r peer; do
    echo "  smoke-a's session (through port $VMM_LB_PORT of this machine): peer $peer"
    [ "$(host_of "$peer")" != "$LB_ADDRESS" ] || fail "smoke-a's peer is the balancer's address: $peer"
done <<< "$peers"
echo "ok: through port $VMM_LB_PORT too, the peer is not the balancer's address"
# Around the balancer, without a header (and not from HAProxy's address),
# server-2's client port closes the connection without a reply.
before=$(refused_proxy_in server-2) || fail "server-2's /metrics"
if reply=$(compose exec -T server timeout 20 vmm-client --addr server-2:8888 ping 2>&1); then
    fail "server-2 answered a connection without a PROXY header: $reply"
fi
grep -q PONG <<< "$reply" && fail "server-2 answered a connection without a PROXY header: $reply"
echo "  vmm-client --addr server-2:8888 ping (from server's container): $(tail -n 1 <<< "$reply")"
refused_more() { [ "$(refused_proxy_in server-2)" -gt "${before:-0}" ]; }
wait_for "server-2 counts the connection in vmm_connections_refused_total{reason=\"proxy\"}" refused_more

step "database paused: the servers leave the rotation, and come back"
# The servers share the database: pausing it makes every /readyz answer
# 503 (the database check has a one-second limit), and HAProxy marks
# server-2 and server-3 DOWN after two failed checks, while /healthz stays
# 200.
cluster pause db
for service in server server-2 server-3; do
    wait_for "$service's /readyz is 503, naming the database" not_ready_in "$service"
    readyz "$service" | sed "s/^/  $service \/readyz: /"
    health_in "$service" || fail "$service's /healthz is not 200 without the database"
done
echo "ok: every /healthz stays 200"
wait_for "the balancer marks both servers DOWN" lb_both DOWN
lb_servers | sed 's/^/  lb: /'
cluster unpause db
for service in server server-2 server-3; do
    wait_for "$service's /readyz is 200 again" ready_in "$service"
done
wait_for "the balancer marks both servers UP again" lb_both UP
lb_servers | sed 's/^/  lb: /'
wait_for "the balancer answers ping on port $VMM_LB_PORT" ping_port "$VMM_LB_PORT"

step "cluster profile: what one server registers, the others see"
# smoke-a was registered through server; the balancer's servers list it.
out=$(list_in server --addr lb:8888) || fail "list all_vms through lb:8888 from server's container"
expect_vms "through the balancer (lb:8888; registered through server)" "$out" smoke-a
# smoke-b through the balancer (to server-2 or server-3); server lists it.
register_in server smoke-b --addr lb:8888 || fail "register smoke-b through lb:8888"
out=$(list_via_port "$VMM_PORT" smoke-b) || fail "list all_vms through port $VMM_PORT as smoke-b"
expect_vms "by server, port $VMM_PORT (registered through the balancer)" "$out" smoke-a smoke-b
out=$(list_via_port "$VMM_LB_PORT" smoke-a) || fail "list all_vms through the balancer"
expect_vms "through the balancer, port $VMM_LB_PORT" "$out" smoke-a smoke-b

# stop_one STOPPED OTHER VM: with STOPPED stopped, the balancer answers
# every connection through OTHER, VM registered through it is listed by
# `server` and through the balancer, then STOPPED starts again.
stop_one() {
    local stopped=$1 other=$2 vm=$3 i out
    cluster stop "$stopped"
    # Connections sent to the stopped server before the health checks mark
    # it down fail to connect and are redispatched (option redispatch).
    for i in 1 2 3 4 5 6; do
        ping_port "$VMM_LB_PORT" || fail "ping $i through the balancer with $stopped stopped"
    done
    echo "ok: 6 pings through the balancer with $stopped stopped"
    register_line "$vm" 256 1 5 | call "$VMM_LB_PORT" >/dev/null \
        || fail "register $vm through the balancer with $stopped stopped"
    echo "ok: $vm registered through the balancer, that is through $other"
    out=$(list_via_port "$VMM_PORT" "$vm") || fail "list all_vms through port $VMM_PORT as $vm"
    expect_vms "by server, port $VMM_PORT (registered through $other)" "$out" smoke-a smoke-b "$vm"
    out=$(list_via_port "$VMM_LB_PORT" smoke-b) || fail "list all_vms through the balancer with $stopped stopped"
    expect_vms "through the balancer with $stopped stopped" "$out" smoke-a smoke-b "$vm"
    cluster start "$stopped"
    wait_for "$stopped's /readyz is 200 again" ready_in "$stopped"
    wait_for "the balancer marks both servers UP again" lb_both UP
}

step "failover: server-2 stops, the balancer still answers (through server-3)"
stop_one server-2 server-3 smoke-c

step "failover: server-3 stops, the balancer still answers (through server-2)"
stop_one server-3 server-2 smoke-d

step "down and up again: the data stays"
cluster down
cluster up -d
wait_for "server answers ping on port $VMM_PORT" ping_port "$VMM_PORT"
for service in server server-2 server-3; do
    wait_for "$service's /readyz is 200" ready_in "$service"
done
wait_for "the balancer answers ping on port $VMM_LB_PORT" ping_port "$VMM_LB_PORT"
wait_for "the balancer marks both servers UP" lb_both UP
out=$(list_in server) || fail "list all_vms in server"
expect_vms "by server after the restart" "$out" smoke-a smoke-b smoke-c smoke-d
out=$(list_in server --addr lb:8888) || fail "list all_vms through lb:8888 from server's container"
expect_vms "through the balancer (lb:8888) after the restart" "$out" smoke-a smoke-b smoke-c smoke-d
# The password hashes stayed too: smoke-b authenticates through the balancer.
out=$(list_via_port "$VMM_LB_PORT" smoke-b) || fail "authenticate smoke-b and list through the balancer after the restart"
expect_vms "through the balancer after the restart (as smoke-b)" "$out" smoke-a smoke-b smoke-c smoke-d

step "tear down (volumes included)"
cluster down -v --remove-orphans
if [ -n "$(cluster ps -q 2>/dev/null)" ]; then fail "containers left after down"; fi
if docker volume inspect "${PROJECT}_db-data" >/dev/null 2>&1; then fail "volume ${PROJECT}_db-data left after down -v"; fi
if docker network inspect "${PROJECT}_vmm" >/dev/null 2>&1; then fail "network ${PROJECT}_vmm left after down"; fi
echo "ok: no containers, no volume, no network"

printf '\nsmoke: PASSED\n'
