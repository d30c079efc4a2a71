//! `vmm-client` against a TLS server: `--ca-cert` gets through, plaintext
//! does not (exit 3), and mutual TLS needs `--client-cert`/`--client-key`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::process::Command;
use vmm_tests::{PATIENCE, TestServer};

/// Writes a CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate (both signed by that CA) under `dir`.
fn generate(dir: &Path) -> [PathBuf; 5] {
    std::fs::create_dir_all(dir).expect("certificate directory");
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    };
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let ca = write("ca.pem", ca_cert.pem());
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, usage, name: &str| {
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        (
            write(&format!("{name}.pem"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let (server_cert, server_key) = leaf(names, ExtendedKeyUsagePurpose::ServerAuth, "server");
    let (client_cert, client_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, "client");
    [ca, server_cert, server_key, client_cert, client_key]
}

/// Runs `vmm-client --addr ADDR ARGS...`; the exit code and stderr.
async fn run(addr: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-client"))
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("VMM_TLS")
        .env_remove("VMM_CA_CERT")
        .env_remove("VMM_CLIENT_CERT")
        .env_remove("VMM_CLIENT_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PATIENCE, out)
        .await
        .expect("vmm-client finishes")
        .expect("run vmm-client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_client_binary_speaks_tls_with_ca_cert_and_fails_without_tls() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-tls-{}", std::process::id()));
    let [ca, server_cert, server_key, client_cert, client_key] = generate(&dir);
    let ca = ca.to_str().expect("UTF-8 path");
    let tls = vmm_core::tls::server_config(&server_cert, &server_key, None).expect("server TLS");
    let server = TestServer::start_with(|c| c.tls = Some(tls)).await;
    let addr = server.addr.to_string();

    let (code, stderr) = run(&addr, &["--ca-cert", ca, "ping"]).await;
    assert_eq!(code, 0, "ping with --ca-cert: {stderr}");
    let by_name = format!("localhost:{}", server.addr.port());
    let (code, stderr) = run(&by_name, &["--ca-cert", ca, "ping"]).await;
    assert_eq!(code, 0, "ping by name with --ca-cert: {stderr}");

    let (code, stderr) = run(&addr, &["ping"]).await;
    assert_eq!(
        code, 3,
        "a plaintext ping fails as a connection failure: {stderr}"
    );
    let (code, stderr) = run(
        &addr,
        &[
            "--ca-cert",
            ca,
            "--tls-server-name",
            "vmm.example.com",
            "ping",
        ],
    )
    .await;
    assert_eq!(code, 3, "a name the certificate lacks: {stderr}");

    // Mutual TLS: the client certificate is what gets a client in.
    let client_ca = Path::new(ca);
    let mutual = vmm_core::tls::server_config(&server_cert, &server_key, Some(client_ca))
        .expect("mutual TLS server");
    let strict = server.start_beside(|c| c.tls = Some(mutual)).await;
    let strict_addr = strict.addr.to_string();
    let (client_cert, client_key) = (
        client_cert.to_str().expect("UTF-8 path"),
        client_key.to_str().expect("UTF-8 path"),
    );
    let (code, stderr) = run(&strict_addr, &["--ca-cert", ca, "ping"]).await;
    assert_eq!(code, 3, "no client certificate: {stderr}");
    let args = [
        "--ca-cert",
        ca,
        "--client-cert",
        client_cert,
        "--client-key",
        client_key,
        "ping",
    ];
    let (code, stderr) = run(&strict_addr, &args).await;
    assert_eq!(code, 0, "with the client certificate: {stderr}");

    let _ = std::fs::remove_dir_all(&dir);
}
