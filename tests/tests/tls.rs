//! TLS: a client without TLS cannot talk to a TLS server; with the right CA
//! it can; with mutual TLS, a client without a (trusted) certificate is
//! refused. Every certificate is generated here, at test time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm_core::tls::{self, ClientConfig};
use vmm_tests::{Deadline, PATIENCE, TestServer, password_for, registration};

/// A directory of PEM files for one test.
struct Pki {
    dir: PathBuf,
}

/// A CA: its certificate and what signs with it.
struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(test: &str) -> Pki {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "tls-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        Pki { dir }
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    }

    /// A self-signed CA, written to `<name>.pem`.
    fn ca(&self, name: &str) -> (Ca, PathBuf) {
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let path = self.write(&format!("{name}.pem"), &cert.pem());
        let ca = Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        };
        (ca, path)
    }

    /// A leaf certificate signed by `ca`, written to `<name>.pem` and
    /// `<name>.key`: a server's for `localhost` and 127.0.0.1, or a client's.
    fn leaf(&self, ca: &Ca, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let names = if server {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &ca.issuer).expect("sign the leaf");
        // The chain: the leaf, then its CA (harmless, and what a real
        // deployment often ships).
        let chain = format!("{}{}", cert.pem(), ca.cert_pem);
        let cert_path = self.write(&format!("{name}.pem"), &chain);
        let key_path = self.write(&format!("{name}.key"), &key.serialize_pem());
        (cert_path, key_path)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server CA with a server certificate, and a TLS server using them.
async fn tls_server(pki: &Pki, client_ca: Option<&Path>) -> (TestServer, PathBuf) {
    let (ca, ca_path) = pki.ca("server-ca");
    let (cert, key) = pki.leaf(&ca, "server", true);
    let config = tls::server_config(&cert, &key, client_ca).expect("server TLS config");
    let server = TestServer::start_with(|c| c.tls = Some(config)).await;
    (server, ca_path)
}

fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    tls::client_config(Some(ca), identity).expect("client TLS config")
}

/// Connects over TLS and pings; `Err` when the handshake or the ping fails.
async fn tls_ping(server: &TestServer, config: Arc<ClientConfig>) -> Result<(), String> {
    let attempt = async {
        let mut client = vmm_core::Client::connect_tls(server.addr, config, "localhost")
            .await
            .map_err(|err| format!("handshake: {err}"))?;
        client.ping().await.map_err(|err| format!("ping: {err}"))
    };
    tokio::time::timeout(PATIENCE, attempt)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

#[tokio::test]
async fn a_plaintext_client_gets_no_reply_from_a_tls_server() {
    let pki = Pki::new("plaintext");
    let (server, ca_path) = tls_server(&pki, None).await;

    // A raw socket: the ping gets no JSON back, and the server closes.
    let mut raw = server.raw().await;
    raw.send("{\"command\":\"ping\"}\n").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, raw.reader.read_to_end(&mut rest))
        .await
        .expect("the server closes the plaintext connection in time");
    assert!(
        read.is_err() || !String::from_utf8_lossy(&rest).contains("status"),
        "no reply to a plaintext request: {rest:?}"
    );

    // The library's plaintext client fails too.
    let mut client = server.client().await;
    let ping = tokio::time::timeout(PATIENCE, client.ping())
        .await
        .expect("the ping ends in time");
    assert!(ping.is_err(), "a plaintext ping must fail: {ping:?}");

    // Both are counted as refused at the handshake.
    let refused = &server.context.metrics.refused_tls;
    let deadline = Deadline::new("both failed handshakes are counted");
    while refused.get() < 2 {
        deadline.tick().await;
    }

    // The same server serves a TLS client, which is not counted.
    tls_ping(&server, client_config(&ca_path, None))
        .await
        .expect("a TLS client is served");
    assert_eq!(refused.get(), 2);
}

#[tokio::test]
async fn a_tls_client_with_the_right_ca_is_served_and_one_with_another_ca_is_not() {
    let pki = Pki::new("ca");
    let (server, ca_path) = tls_server(&pki, None).await;
    let config = client_config(&ca_path, None);

    let mut client = vmm_core::Client::connect_tls(server.addr, Arc::clone(&config), "localhost")
        .await
        .expect("TLS handshake with the right CA");
    client.ping().await.expect("ping over TLS");
    client
        .register(&registration("tls-vm", 256, vec![1]))
        .await
        .expect("register over TLS");
    let vm = client
        .authenticate("tls-vm", &password_for("tls-vm"))
        .await
        .expect("authenticate over TLS");
    assert_eq!(vm.vm_id, "tls-vm");

    // The certificate also names 127.0.0.1.
    let mut by_ip = vmm_core::Client::connect_tls(server.addr, Arc::clone(&config), "127.0.0.1")
        .await
        .expect("TLS handshake by IP address");
    by_ip.ping().await.expect("ping over TLS by IP address");

    // A name the certificate does not carry is refused.
    let wrong_name =
        vmm_core::Client::connect_tls(server.addr, Arc::clone(&config), "vmm.example.com").await;
    assert!(wrong_name.is_err(), "a name the certificate lacks");

    // A CA that did not sign the server's certificate.
    let (_, other_ca) = pki.ca("other-ca");
    let refused =
        vmm_core::Client::connect_tls(server.addr, client_config(&other_ca, None), "localhost")
            .await;
    let err = refused.expect_err("the handshake fails with the wrong CA");
    assert!(
        err.to_string().contains("certificate"),
        "the error says why: {err}"
    );
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let pki = Pki::new("mutual");
    let (client_ca, client_ca_path) = pki.ca("client-ca");
    let (cert, key) = pki.leaf(&client_ca, "client", false);
    let (server, ca_path) = tls_server(&pki, Some(&client_ca_path)).await;

    // No client certificate: refused before any reply.
    let anonymous = tls_ping(&server, client_config(&ca_path, None)).await;
    assert!(anonymous.is_err(), "a client without a certificate");

    // A certificate from a CA the server does not trust: refused too.
    let (stranger_ca, _) = pki.ca("stranger-ca");
    let (bad_cert, bad_key) = pki.leaf(&stranger_ca, "stranger", false);
    let stranger = tls_ping(
        &server,
        client_config(&ca_path, Some((&bad_cert, &bad_key))),
    )
    .await;
    assert!(stranger.is_err(), "a client with an untrusted certificate");

    // The right certificate: served, register and authenticate included.
    let config = client_config(&ca_path, Some((&cert, &key)));
    tls_ping(&server, Arc::clone(&config))
        .await
        .expect("a client with a trusted certificate");
    let mut client = vmm_core::Client::connect_tls(server.addr, config, "localhost")
        .await
        .expect("mutual TLS handshake");
    client
        .register(&registration("mtls-vm", 128, Vec::new()))
        .await
        .expect("register over mutual TLS");
    client
        .authenticate("mtls-vm", &password_for("mtls-vm"))
        .await
        .expect("authenticate over mutual TLS");
}

#[tokio::test]
async fn a_silent_plaintext_connection_is_dropped_at_the_handshake_timeout() {
    let pki = Pki::new("silent");
    let (ca, _) = pki.ca("server-ca");
    let (cert, key) = pki.leaf(&ca, "server", true);
    let config = tls::server_config(&cert, &key, None).expect("server TLS config");
    let server = TestServer::start_with(|c| {
        c.tls = Some(config);
        c.request_timeout = Some(Duration::from_millis(500));
    })
    .await;
    let mut raw = server.raw().await;
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, raw.reader.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(rest.is_empty(), "nothing was sent: {rest:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after the handshake timeout, took {:?}",
        started.elapsed()
    );
    let _ = raw.writer.shutdown().await;
}

/// Behind a balancer that speaks the PROXY protocol, its header comes
/// before the TLS handshake and names the client; a TLS client that sends
/// no header is refused as one without a header.
#[tokio::test]
async fn a_proxy_header_comes_before_the_tls_handshake() {
    use proxy_header::{ProxiedAddress, ProxyHeader};
    let pki = Pki::new("proxy");
    let (ca, ca_path) = pki.ca("server-ca");
    let (cert, key) = pki.leaf(&ca, "server", true);
    let config = tls::server_config(&cert, &key, None).expect("server TLS config");
    let server = TestServer::start_with(|c| {
        c.tls = Some(config);
        c.proxy_protocol = Some(vmm_core::proxy_protocol::ProxyProtocol {
            trusted: vec!["127.0.0.1".parse().unwrap()],
        });
    })
    .await;
    let client_config = client_config(&ca_path, None);

    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut header = Vec::new();
    let client = "127.10.20.70:7000".parse().unwrap();
    ProxyHeader::with_address(ProxiedAddress::stream(client, server.addr))
        .encode_v2(&mut header)
        .unwrap();
    stream.write_all(&header).await.unwrap();
    let mut client =
        vmm_core::Client::tls_from_stream(stream, Arc::clone(&client_config), "localhost")
            .await
            .expect("TLS handshake after the PROXY header");
    client
        .register(&registration("behind-lb", 128, Vec::new()))
        .await
        .expect("register through the balancer");
    client
        .authenticate("behind-lb", &password_for("behind-lb"))
        .await
        .expect("authenticate through the balancer");
    let active = client.list_active().await.expect("list over TLS");
    let entry = active
        .iter()
        .find(|session| session.vm_id.as_deref() == Some("behind-lb"))
        .expect("the session is listed");
    assert_eq!(entry.peer, "127.10.20.70:7000");

    let headerless = vmm_core::Client::connect_tls(server.addr, client_config, "localhost").await;
    assert!(
        headerless.is_err(),
        "no reply to a TLS client without a header"
    );
    assert_eq!(server.context.metrics.refused_proxy.get(), 1);
    assert_eq!(server.context.metrics.refused_tls.get(), 0);
}
