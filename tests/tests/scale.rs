//! 2,000 open connections on one instance, listed from another. (The
//! latency figures for this load come from the `bench` example, not from
//! here: a timed assertion would only measure the CI machine.)

use std::time::Duration;

use serde_json::json;
use tokio::net::TcpStream;
use vmm_tests::{Deadline, TestServer, eventually, ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_listed_from_another_instance() {
    const CONNECTIONS: usize = 2000;
    let a = TestServer::start_with(|config| {
        config.idle_timeout = Some(Duration::from_secs(600));
        // Every test connection comes from 127.0.0.1.
        config.max_connections_per_ip = 10_000;
    })
    .await;
    let b = a.start_beside(|_| {}).await;
    let mut observer = b.session_as("observer").await;
    let mut pinger = a.raw().await;

    let mut open = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        open.push(TcpStream::connect(a.addr).await.expect("connect"));
        if i % 250 == 0 {
            // The instance keeps answering while the connections pile up.
            ok(&pinger.call(json!({"command": "ping"})).await);
        }
    }
    eventually("every connection is accepted", || async {
        (a.context.sessions.len() == CONNECTIONS + 1).then_some(())
    })
    .await;
    let deadline = Deadline::new("B lists every connection of A");
    let listed = loop {
        let active = observer.list_active().await.unwrap();
        if active.len() == CONNECTIONS + 2 {
            break active;
        }
        deadline.tick().await;
    };
    assert_eq!(
        listed.iter().filter(|s| s.vm_id.is_none()).count(),
        CONNECTIONS + 1
    );
    ok(&pinger.call(json!({"command": "ping"})).await);

    drop(open);
    let deadline = Deadline::new("closed connections leave B's list");
    while observer.list_active().await.unwrap().len() != 2 {
        deadline.tick().await;
    }
}
