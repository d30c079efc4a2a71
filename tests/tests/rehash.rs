//! New argon2 parameters apply to existing passwords at their next login.

use vmm_core::password::HashCost;
use vmm_tests::{TestServer, password_for, registration};

async fn stored_hash(server: &TestServer) -> String {
    let db = server.db.connect().await;
    db.query_one("SELECT password_hash FROM vms WHERE vm_id = 'old'", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_login_with_outdated_parameters_rehashes_the_password() {
    let before = TestServer::start().await;
    before
        .client()
        .await
        .register(&registration("old", 64, vec![]))
        .await
        .unwrap();
    let old_hash = stored_hash(&before).await;
    assert!(
        old_hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{old_hash}"
    );

    let cost = HashCost {
        memory_kib: 8192,
        iterations: 3,
        parallelism: 1,
    };
    let after = before.start_beside(|config| config.hash_cost = cost).await;
    let mut client = after.client().await;
    assert!(client.authenticate("old", "wrong-password").await.is_err());
    assert_eq!(
        stored_hash(&after).await,
        old_hash,
        "a failed login changes nothing"
    );
    client
        .authenticate("old", &password_for("old"))
        .await
        .unwrap();
    let new_hash = stored_hash(&after).await;
    assert!(
        new_hash.starts_with("$argon2id$v=19$m=8192,t=3,p=1$"),
        "{new_hash}"
    );
    // The new hash works, and is left alone from now on.
    client
        .authenticate("old", &password_for("old"))
        .await
        .unwrap();
    assert_eq!(stored_hash(&after).await, new_hash);
}
