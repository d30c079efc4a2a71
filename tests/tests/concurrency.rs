//! Done-when 6: concurrent registrations of one id, and many connections
//! doing everything at once.

use std::sync::Arc;

use vmm_core::ErrorCode;
use vmm_core::client::{Registration, Update};
use vmm_tests::{TestServer, password_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_registrations_of_one_id_one_wins() {
    let server = Arc::new(TestServer::start().await);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(server.client().await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let registration = Registration {
                    vm_id: "contested".into(),
                    ram: 512,
                    cpu: 1,
                    password: password_for("contested"),
                    disks: vec![10; i % 4 + 1],
                    registration_secret: None,
                };
                barrier.wait().await;
                client.register(&registration).await.map(|vm| (i, vm))
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut taken = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(winner) => winners.push(winner),
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::AlreadyExists), "{err}");
                taken += 1;
            }
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(taken, 19);
    let (i, vm) = &winners[0];

    let db = server.db.connect().await;
    let vms: i64 = db
        .query_one("SELECT count(*) FROM vms", &[])
        .await
        .unwrap()
        .get(0);
    let disks: i64 = db
        .query_one("SELECT count(*) FROM disks WHERE vm_id = 'contested'", &[])
        .await
        .unwrap()
        .get(0);
    let orphans: i64 = db
        .query_one("SELECT count(*) FROM disks WHERE vm_id <> 'contested'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(vms, 1);
    assert_eq!(
        disks as usize,
        i % 4 + 1,
        "the winner's disks, and only those"
    );
    assert_eq!(vm.disks.len(), i % 4 + 1);
    assert_eq!(orphans, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_connections_do_everything_at_once() {
    let server = Arc::new(TestServer::start().await);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                let vm_id = format!("vm-{i:03}");
                // A hundred VMs are a hundred machines: at most 5 password
                // checks may run at once for one address.
                let mut client = server.client_from(i as usize).await;
                let registered = client
                    .register(&Registration {
                        vm_id: vm_id.clone(),
                        ram: 256,
                        cpu: 1,
                        password: password_for(&vm_id),
                        disks: vec![8, 16],
                        registration_secret: None,
                    })
                    .await
                    .expect("register");
                client
                    .authenticate(&vm_id, &password_for(&vm_id))
                    .await
                    .expect("authenticate");
                let updated = client
                    .update(&Update {
                        ram: Some(512 + i),
                        resize: vec![(registered.disks[0].id, 9)],
                        attach: vec![32],
                        ..Update::default()
                    })
                    .await
                    .expect("update");
                assert_eq!(updated.ram, 512 + i);
                assert_eq!(updated.disks.len(), 3);
                let active = client.list_active().await.expect("list");
                assert!(
                    active
                        .iter()
                        .any(|s| s.vm_id.as_deref() == Some(vm_id.as_str()))
                );
                client.logout().await.expect("logout");
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let db = server.db.connect().await;
    let row = db
        .query_one("SELECT (SELECT count(*) FROM vms), (SELECT count(*) FROM disks), (SELECT sum(ram) FROM vms)", &[])
        .await
        .unwrap();
    let (vms, disks, ram): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((vms, disks), (100, 300));
    assert_eq!(ram, (0..100).map(|i| 512 + i).sum::<i64>());
}
