//! SIGKILL in the middle of a register and update load: every VM is left
//! with exactly the disks of its last successful reply (or, for the one
//! request whose reply the kill swallowed, of that request's result), and no
//! disk is left without a VM. Runs the real `vmm-server` binary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vmm_core::client::Update;
use vmm_core::protocol::VmView;
use vmm_tests::{ServerProcess, TestDb, password_for, registration};

/// Disks as `(id, size)`, the id `None` for a disk still being attached.
type Disks = Vec<(Option<i64>, u32)>;

fn disks_of(vm: &VmView) -> Disks {
    vm.disks.iter().map(|d| (Some(d.id), d.disk_size)).collect()
}

/// What one VM's worker knows when the server dies.
#[derive(Debug, Default, Clone)]
struct Known {
    /// The disks of the last successful reply (`None`: not registered yet).
    acked: Option<Disks>,
    /// The disks the request in flight would leave, if one was.
    pending: Option<Disks>,
}

fn same(stored: &[(i64, u32)], expected: &Disks) -> bool {
    stored.len() == expected.len()
        && stored
            .iter()
            .zip(expected)
            .all(|((id, size), (want_id, want_size))| {
                size == want_size && want_id.is_none_or(|want| want == *id)
            })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_leaves_every_vm_as_last_acknowledged() {
    vmm_tests::init_logging();
    let db = TestDb::create().await;
    let server = ServerProcess::spawn(env!("CARGO_BIN_EXE_vmm-server"), &db, &[]).await;
    let addr = server.addr;
    let acks = Arc::new(AtomicUsize::new(0));

    let workers: Vec<_> = (0..8)
        .map(|w| {
            let acks = Arc::clone(&acks);
            tokio::spawn(async move {
                let vm_id = format!("load-{w}");
                let mut known = Known::default();
                let Ok(mut client) = vmm_core::Client::connect(addr).await else {
                    return (vm_id, known);
                };
                let registration = registration(&vm_id, 64, vec![10, 20]);
                known.pending = Some(vec![(None, 10), (None, 20)]);
                match client.register(&registration).await {
                    Ok(vm) => {
                        known = Known {
                            acked: Some(disks_of(&vm)),
                            pending: None,
                        }
                    }
                    Err(_) => return (vm_id, known),
                }
                if client
                    .authenticate(&vm_id, &password_for(&vm_id))
                    .await
                    .is_err()
                {
                    return (vm_id, known);
                }
                for step in 0u32.. {
                    let acked = known.acked.clone().unwrap_or_default();
                    // Grow every disk by one and attach one more, in one update.
                    let update = Update {
                        resize: acked
                            .iter()
                            .filter_map(|(id, size)| Some(((*id)?, size + 1)))
                            .collect(),
                        attach: if acked.len() < 60 {
                            vec![step % 50 + 1]
                        } else {
                            Vec::new()
                        },
                        ..Update::default()
                    };
                    let mut pending: Disks =
                        acked.iter().map(|(id, size)| (*id, size + 1)).collect();
                    pending.extend(update.attach.iter().map(|size| (None, *size)));
                    known.pending = Some(pending);
                    match client.update(&update).await {
                        Ok(vm) => {
                            known = Known {
                                acked: Some(disks_of(&vm)),
                                pending: None,
                            };
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => return (vm_id, known),
                    }
                }
                (vm_id, known)
            })
        })
        .collect();

    // Let the load run, then kill the server without warning.
    vmm_tests::eventually("some updates are acknowledged", || async {
        (acks.load(Ordering::Relaxed) >= 200).then_some(())
    })
    .await;
    server.signal("KILL");
    let status = server.wait().await;
    assert!(!status.success(), "killed, not exited: {status}");

    let mut outcome = BTreeMap::new();
    for worker in workers {
        let (vm_id, known) = worker.await.unwrap();
        outcome.insert(vm_id, known);
    }

    let check = db.connect().await;
    let orphans: i64 = check
        .query_one("SELECT count(*) FROM disks d WHERE NOT EXISTS (SELECT 1 FROM vms v WHERE v.vm_id = d.vm_id)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "no disk without a VM");
    for (vm_id, known) in outcome {
        let rows = check
            .query(
                "SELECT id, disk_size FROM disks WHERE vm_id = $1 ORDER BY id",
                &[&vm_id],
            )
            .await
            .unwrap();
        let exists: bool = check
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM vms WHERE vm_id = $1)",
                &[&vm_id],
            )
            .await
            .unwrap()
            .get(0);
        let stored: Vec<(i64, u32)> = rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    u32::try_from(r.get::<_, i32>(1)).unwrap(),
                )
            })
            .collect();
        let as_acked = match &known.acked {
            Some(acked) => exists && same(&stored, acked),
            None => !exists,
        };
        let as_pending = known
            .pending
            .as_ref()
            .is_some_and(|p| exists && same(&stored, p));
        assert!(
            as_acked || as_pending,
            "{vm_id}: stored {stored:?}, acknowledged {:?}, in flight {:?}",
            known.acked,
            known.pending
        );
    }
}
