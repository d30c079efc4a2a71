//! Dead clients: a connection that sends nothing for the idle timeout is
//! closed; one that keeps pinging is not.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::{TestServer, ok};

#[tokio::test]
async fn idle_connections_are_closed_and_pinging_ones_are_not() {
    let timeout = Duration::from_secs(1);
    let server = TestServer::start_with(|config| config.idle_timeout = Some(timeout)).await;
    let mut idle = server.raw().await;
    let mut busy = server.raw().await;
    ok(&idle.call(json!({"command": "ping"})).await);

    // Keep `busy` talking for three timeouts; `idle` says nothing.
    let started = Instant::now();
    while started.elapsed() < timeout * 3 {
        ok(&busy.call(json!({"command": "ping"})).await);
        tokio::time::sleep(timeout / 5).await;
    }
    assert!(idle.closed().await, "the idle connection was closed");
    ok(&busy.call(json!({"command": "ping"})).await);
    assert_eq!(
        server.context.sessions.len(),
        1,
        "only the busy session is left"
    );
}
