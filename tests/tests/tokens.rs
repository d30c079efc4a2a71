//! Session tokens: resuming after a reconnect without the password, and
//! revoked or expired tokens. (No token in a log line: see `secrets.rs`.)

use std::time::Duration;

use serde_json::json;
use vmm_core::ErrorCode;
use vmm_tests::{Deadline, TestServer, err, ok, password_for, registration};

#[tokio::test]
async fn a_token_resumes_a_session_after_a_reconnect_without_hashing() {
    let server = TestServer::start().await;
    let mut first = server.client().await;
    first
        .register(&registration("agent", 64, vec![1]))
        .await
        .unwrap();
    let (_, token) = first.login("agent", &password_for("agent")).await.unwrap();
    assert!(token.len() >= 22, "at least 128 bits: {token}");
    drop(first);

    let hashes = server.context.passwords.hashes_run();
    let mut second = server.client().await;
    let vm = second.resume("agent", &token).await.unwrap();
    assert_eq!(vm.vm_id, "agent");
    assert_eq!(
        server.context.passwords.hashes_run(),
        hashes,
        "no hash to resume"
    );
    assert_eq!(second.list_authenticated().await.unwrap().len(), 1);

    // The token is stored only as a digest.
    let db = server.db.connect().await;
    let stored: Vec<Vec<u8>> = db
        .query("SELECT token_hash FROM tokens", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].len(), 32);
    assert!(!String::from_utf8_lossy(&stored[0]).contains(&token));

    // Another VM's name with this token does not work.
    second
        .register(&registration("other", 64, vec![]))
        .await
        .unwrap();
    let refused = second.resume("other", &token).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotAuthenticated));
}

#[tokio::test]
async fn commands_check_a_token_they_are_given_and_logout_revokes_it() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .register(&registration("vm", 64, vec![]))
        .await
        .unwrap();
    let (_, token) = client.login("vm", &password_for("vm")).await.unwrap();
    let mut raw = server.raw().await;
    ok(&raw
        .call(json!({"command": "authenticate", "data": {"vm_id": "vm", "token": token}}))
        .await);
    ok(&raw
        .call(json!({"command": "list", "data": {"list_type": "all_vms", "token": token}}))
        .await);
    ok(&raw
        .call(json!({"command": "update", "data": {"ram": 128, "token": token}}))
        .await);
    for request in [
        json!({"command": "list", "data": {"list_type": "all_vms", "token": "forged-token"}}),
        json!({"command": "update", "data": {"ram": 256, "token": "forged-token"}}),
        json!({"command": "logout", "data": {"token": "forged-token"}}),
    ] {
        let reply = raw.call(request).await;
        err(&reply, "not_authenticated");
        // The session is authenticated: what is wrong is the token, and the
        // message says that, not "authenticate first".
        assert_eq!(
            reply["message"], "the `token` given is not this session's token",
            "{reply}"
        );
    }
    ok(&raw
        .call(json!({"command": "logout", "data": {"token": token}}))
        .await);
    // Revoked: it no longer resumes anything, on any connection.
    let reply = raw
        .call(json!({"command": "authenticate", "data": {"vm_id": "vm", "token": token}}))
        .await;
    err(&reply, "not_authenticated");
    let refused = server
        .client()
        .await
        .resume("vm", &token)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotAuthenticated));
    // Neither both nor none of password and token.
    err(
        &raw.call(json!({"command": "authenticate", "data": {"vm_id": "vm"}}))
            .await,
        "invalid_params",
    );
    err(
        &raw.call(json!({"command": "authenticate", "data": {"vm_id": "vm", "token": token, "password": password_for("vm")}})).await,
        "invalid_params",
    );
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let server = TestServer::start_with(|config| config.token_ttl = Duration::from_secs(1)).await;
    let mut client = server.client().await;
    client
        .register(&registration("brief", 64, vec![]))
        .await
        .unwrap();
    let (_, token) = client.login("brief", &password_for("brief")).await.unwrap();
    let mut other = server.client().await;
    other.resume("brief", &token).await.unwrap();
    let deadline = Deadline::new("the token expires");
    loop {
        match other.resume("brief", &token).await {
            Ok(_) => deadline.tick().await,
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::NotAuthenticated));
                break;
            }
        }
    }
    // The session's own token is expired too: a command carrying it is refused.
    let reply = client
        .call("list", json!({"list_type": "all_vms", "token": token}))
        .await
        .unwrap();
    assert_eq!(reply.code, Some(ErrorCode::NotAuthenticated));
}

/// A client that reconnected and sends its old token on the new connection
/// is told that the token does not carry over, and how to resume; a session
/// whose token was revoked under it is told that, not "authenticate first".
#[tokio::test]
async fn not_authenticated_says_why() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .register(&registration("why", 64, vec![]))
        .await
        .unwrap();
    let (_, token) = client.login("why", &password_for("why")).await.unwrap();

    let mut fresh = server.raw().await;
    for request in [
        json!({"command": "list", "data": {"list_type": "all_vms", "token": token}}),
        json!({"command": "update", "data": {"ram": 256, "token": token}}),
        json!({"command": "logout", "data": {"token": token}}),
    ] {
        let reply = fresh.call(request).await;
        err(&reply, "not_authenticated");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains("`token` from another connection") && message.contains("authenticate"),
            "{reply}"
        );
        assert!(
            !message.contains(&token),
            "the token is never echoed: {reply}"
        );
    }
    // Without a token, the plain message.
    let reply = fresh
        .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
        .await;
    err(&reply, "not_authenticated");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("run `authenticate` first"),
        "{reply}"
    );

    // Revoked by a logout on another connection of the same token family.
    let mut resumed = server.raw().await;
    ok(&resumed
        .call(json!({"command": "authenticate", "data": {"vm_id": "why", "token": token}}))
        .await);
    let logout = client
        .call("logout", json!({"token": token}))
        .await
        .unwrap();
    assert_eq!(logout.code, None, "{logout:?}");
    let deadline = Deadline::new("the revocation reaches the other session");
    loop {
        let reply = resumed
            .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
            .await;
        if reply["status"] == "success" {
            deadline.tick().await;
            continue;
        }
        err(&reply, "not_authenticated");
        assert_eq!(
            reply["message"], "this session's token was revoked: authenticate again",
            "{reply}"
        );
        break;
    }
}
