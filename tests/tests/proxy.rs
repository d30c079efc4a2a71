//! The PROXY protocol (`Config::proxy_protocol`): behind a balancer, the
//! client's address from the header is the connection's peer for the
//! lists, the audit trail, login throttling and the per-address limit; a
//! connection without a valid header, or from a peer that is not a trusted
//! balancer, gets nothing. The test process is the balancer, on 127.0.0.1.

use std::time::Duration;

use proxy_header::{ProxiedAddress, ProxyHeader};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use vmm_core::proxy_protocol::ProxyProtocol;
use vmm_tests::{PATIENCE, RawConn, TestServer, eventually, ok, password_for};

const ADMIN: &str = "operator-token-0123456789";

/// On: only 127.0.0.1, where the tests connect from, may send headers.
fn behind_balancer(config: &mut vmm_core::Config) {
    config.proxy_protocol = Some(ProxyProtocol {
        trusted: vec!["127.0.0.1/32".parse().unwrap()],
    });
    config.admin_token = Some(ADMIN.into());
}

fn addresses(client: &str, server: &TestServer) -> ProxiedAddress {
    ProxiedAddress::stream(client.parse().unwrap(), server.addr)
}

/// A v2 (binary) header naming `client`.
fn v2(client: &str, server: &TestServer) -> Vec<u8> {
    let mut bytes = Vec::new();
    ProxyHeader::with_address(addresses(client, server))
        .encode_v2(&mut bytes)
        .unwrap();
    bytes
}

/// A v1 (text) header naming `client`.
fn v1(client: &str, server: &TestServer) -> Vec<u8> {
    let mut bytes = Vec::new();
    ProxyHeader::with_address(addresses(client, server))
        .encode_v1(&mut bytes)
        .unwrap();
    assert!(bytes.starts_with(b"PROXY TCP4 "), "{bytes:?}");
    bytes
}

/// A v2 `LOCAL` header: the balancer's own connection (a health check).
fn local() -> Vec<u8> {
    let mut bytes = Vec::new();
    ProxyHeader::with_local().encode_v2(&mut bytes).unwrap();
    bytes
}

fn line(request: Value) -> Vec<u8> {
    format!("{request}\n").into_bytes()
}

/// A connection from the balancer that sends `header` and, in the same
/// write, a ping: bytes after the header are the first request.
async fn through(server: &TestServer, header: Vec<u8>) -> RawConn {
    let mut conn = server.raw().await;
    let mut bytes = header;
    bytes.extend(line(json!({"command": "ping"})));
    conn.send(bytes).await;
    assert_eq!(ok(&conn.reply().await), &json!({}), "ping after the header");
    conn
}

/// An operator session through the balancer, with a `LOCAL` header: its
/// peer is the balancer's own address.
async fn operator(server: &TestServer) -> RawConn {
    let mut op = through(server, local()).await;
    ok(&op
        .call(json!({"command": "authenticate", "data": {"admin_token": ADMIN}}))
        .await);
    op
}

fn register(vm_id: &str) -> Value {
    json!({"command": "register", "data": {"vm_id": vm_id, "ram": 256, "cpu": 1,
        "password": password_for(vm_id), "disks": []}})
}

fn login(vm_id: &str, password: &str) -> Value {
    json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": password}})
}

/// The peers in `active_vms` of the sessions bound to `vm_id`.
async fn active_peers(op: &mut RawConn, vm_id: &str) -> Vec<String> {
    let reply = op
        .call(json!({"command": "list", "data": {"list_type": "active_vms"}}))
        .await;
    ok(&reply)["active_vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["vm_id"] == vm_id)
        .map(|entry| entry["peer"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits for an audit event of `action` and `outcome` in the trail that
/// `audit` with `data` reads, and returns it.
async fn audited(op: &mut RawConn, data: Value, action: &str, outcome: &str) -> Value {
    let deadline = vmm_tests::Deadline::new("the audit event is written");
    loop {
        let trail = op.call(json!({"command": "audit", "data": data})).await;
        let found = ok(&trail)["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|event| event["action"] == action && event["outcome"] == outcome)
            .cloned();
        if let Some(event) = found {
            return event;
        }
        deadline.tick().await;
    }
}

/// The server sends nothing and closes (or resets) the connection.
async fn nothing_then_closed(conn: &mut RawConn) {
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, conn.reader.read_to_end(&mut received))
        .await
        .expect("the server closes the connection in time");
    assert!(received.is_empty(), "no reply: {read:?} {received:?}");
}

#[tokio::test]
async fn the_headers_address_is_the_peer_in_lists_audit_and_throttling() {
    let server = TestServer::start_with(behind_balancer).await;
    let mut vm = through(&server, v2("127.10.20.30:4242", &server)).await;
    ok(&vm.call(register("proxied")).await);
    ok(&vm.call(login("proxied", &password_for("proxied"))).await);

    let mut op = operator(&server).await;
    assert_eq!(
        active_peers(&mut op, "proxied").await,
        ["127.10.20.30:4242"]
    );
    // The operator's LOCAL header kept the balancer's address.
    let reply = op
        .call(json!({"command": "list", "data": {"list_type": "active_vms"}}))
        .await;
    let peers: Vec<&str> = ok(&reply)["active_vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["peer"].as_str().unwrap())
        .collect();
    assert_eq!(peers.len(), 2, "{reply}");
    assert!(
        peers.iter().any(|peer| peer.starts_with("127.0.0.1:")),
        "{reply}"
    );
    let event = audited(&mut op, json!({"vm_id": "proxied"}), "register", "success").await;
    assert_eq!(event["peer"], "127.10.20.30:4242", "{event}");
    let event = audited(
        &mut op,
        json!({"vm_id": "proxied"}),
        "authenticate",
        "success",
    )
    .await;
    assert_eq!(event["peer"], "127.10.20.30:4242", "{event}");

    // Wrong passwords from that address (another port, another connection)
    // block the address...
    let mut guesser = through(&server, v2("127.10.20.30:5555", &server)).await;
    for i in 0..5 {
        let reply = guesser
            .call(login(&format!("guess-{i}"), "not-the-password"))
            .await;
        assert_eq!(reply["code"], "invalid_credentials", "{reply}");
    }
    let reply = guesser
        .call(login("proxied", &password_for("proxied")))
        .await;
    assert_eq!(reply["code"], "too_many_attempts", "{reply}");
    assert_eq!(reply["data"]["scope"], "address", "{reply}");
    let event = audited(
        &mut op,
        json!({"vm_id": "guess-0"}),
        "authenticate",
        "failure",
    )
    .await;
    assert_eq!(event["peer"], "127.10.20.30:5555", "{event}");

    // ...and only it: another client behind the same balancer logs in.
    let mut other = through(&server, v2("127.10.20.31:4242", &server)).await;
    ok(&other.call(login("proxied", &password_for("proxied"))).await);
    let db = server.db.connect().await;
    let keys: Vec<String> = db
        .query(
            "SELECT key FROM login_attempts WHERE key LIKE 'ip:%' AND attempts > 0 ORDER BY key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        keys,
        ["ip:127.10.20.30"],
        "counted under the client's address"
    );
}

#[tokio::test]
async fn a_v1_text_header_works_too() {
    let server = TestServer::start_with(behind_balancer).await;
    let mut vm = through(&server, v1("127.10.20.40:4000", &server)).await;
    ok(&vm.call(register("texted")).await);
    ok(&vm.call(login("texted", &password_for("texted"))).await);
    let mut op = operator(&server).await;
    assert_eq!(active_peers(&mut op, "texted").await, ["127.10.20.40:4000"]);

    // A header split over two writes, with the request in the second.
    let mut split = server.raw().await;
    let header = v1("127.10.20.41:4001", &server);
    split.send(&header[..9]).await;
    let mut rest = header[9..].to_vec();
    rest.extend(line(login("texted", &password_for("texted"))));
    split.send(rest).await;
    ok(&split.reply().await);
    let peers = active_peers(&mut op, "texted").await;
    assert!(peers.contains(&"127.10.20.41:4001".to_owned()), "{peers:?}");
    assert_eq!(server.context.metrics.refused_proxy.get(), 0);
}

#[tokio::test]
async fn a_connection_without_a_header_gets_nothing_and_is_counted() {
    let server = TestServer::start_with(behind_balancer).await;
    let mut plain = server.raw().await;
    plain.send(line(json!({"command": "ping"}))).await;
    nothing_then_closed(&mut plain).await;
    // Counted before the connection is dropped.
    assert_eq!(server.context.metrics.refused_proxy.get(), 1);

    // A broken v2 header: the signature, then an unknown version.
    let mut broken = server.raw().await;
    let mut bytes = v2("127.10.20.30:4242", &server);
    bytes[12] = 0x31;
    broken.send(bytes).await;
    nothing_then_closed(&mut broken).await;
    assert_eq!(server.context.metrics.refused_proxy.get(), 2);

    // Nobody was placed: no session, and clients with a header are served.
    let mut op = operator(&server).await;
    let reply = op
        .call(json!({"command": "list", "data": {"list_type": "active_vms"}}))
        .await;
    assert_eq!(ok(&reply)["active_vms"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_header_from_an_untrusted_peer_gets_nothing() {
    let server = TestServer::start_with(behind_balancer).await;
    // From 127.1.0.4, not 127.0.0.1: a client that would pick its address.
    let mut forger = RawConn::connect_from(3, server.addr).await;
    let mut bytes = v2("127.10.20.30:4242", &server);
    bytes.extend(line(json!({"command": "ping"})));
    forger.send(bytes).await;
    nothing_then_closed(&mut forger).await;
    assert_eq!(server.context.metrics.refused_proxy.get(), 1);
    through(&server, v2("127.10.20.30:4242", &server)).await;
}

#[tokio::test]
async fn the_per_address_limit_counts_the_clients_address_not_the_balancers() {
    let server = TestServer::start_with(|config| {
        behind_balancer(config);
        config.max_connections_per_ip = 2;
    })
    .await;
    // Four connections from the balancer, two per client address.
    let _first = through(&server, v2("127.10.20.50:1", &server)).await;
    let _second = through(&server, v2("127.10.20.50:2", &server)).await;
    let _third = through(&server, v2("127.10.20.51:1", &server)).await;
    let _fourth = through(&server, v2("127.10.20.51:2", &server)).await;

    let mut crowded = server.raw().await;
    crowded.send(v2("127.10.20.50:3", &server)).await;
    let reply = crowded.reply().await;
    assert_eq!(reply["code"], "server_busy", "{reply}");
    assert!(crowded.closed().await);
    assert_eq!(server.context.metrics.refused_per_ip.get(), 1);
    assert_eq!(server.context.metrics.refused_proxy.get(), 0);

    let mut op = operator(&server).await;
    let event = audited(&mut op, json!({}), "connect", "refused").await;
    assert_eq!(event["peer"], "127.10.20.50:3", "{event}");
}

#[tokio::test]
async fn a_header_that_never_comes_is_cut_off_after_the_timeout() {
    let server = TestServer::start_with(|config| {
        behind_balancer(config);
        config.request_timeout = Some(Duration::from_secs(1));
    })
    .await;
    // The first 8 of the 16 bytes every v2 header starts with.
    let mut slow = server.raw().await;
    slow.send(&v2("127.10.20.30:4242", &server)[..8]).await;
    // Silent.
    let mut silent = server.raw().await;
    nothing_then_closed(&mut slow).await;
    nothing_then_closed(&mut silent).await;
    eventually("both are counted", || async {
        (server.context.metrics.refused_proxy.get() == 2).then_some(())
    })
    .await;
    through(&server, v2("127.10.20.30:4242", &server)).await;
}

/// Without the PROXY protocol, a header is not one: the connection is a
/// client's like any other, and its bytes a request that is not JSON.
#[tokio::test]
async fn without_the_protocol_a_header_is_just_bad_input() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let mut bytes = v1("127.10.20.30:4242", &server);
    bytes.extend(line(json!({"command": "ping"})));
    conn.send(bytes).await;
    assert_eq!(conn.reply().await["code"], "invalid_json");
    ok(&conn.reply().await);
    assert_eq!(server.context.metrics.refused_proxy.get(), 0);
}
