//! A randomized, stateful test against a model: 50 clients on two instances
//! do random registers, authentications, resumes, updates, logouts,
//! operator revocations and lists for 10 s, and every reply must be one the
//! model allows. At the end the database is checked against what was
//! acknowledged:
//! - no VM has more than 64 disks, and nothing is orphaned;
//! - every acknowledged update is visible: each VM is as its last
//!   acknowledged change left it, and holds exactly the disks some reply
//!   showed, each at least as large as shown;
//! - no session of a revoked token survives: a client that can still act
//!   holds a live token.
//!
//! `VMM_MODEL_SEED=<u64>` replays a run's choices (timing still varies);
//! `VMM_MODEL_SECONDS` changes its length. A failure prints the seed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use vmm_core::client::{Client, Update};
use vmm_core::password::HashCost;
use vmm_core::protocol::{ErrorCode, Reply, VmView};
use vmm_tests::race::{Pair, race};
use vmm_tests::{Rng, client_from, machine, password_for};

const CLIENTS: usize = 50;
const VMS: usize = 10;
const ADMIN: &str = "the-model-operator";

/// What the clients were told, shared by all of them.
#[derive(Default)]
struct Model {
    /// Every VM view a successful register or update returned.
    acked: HashMap<String, Vec<VmView>>,
    /// VMs whose registration was acknowledged.
    registered: HashSet<String>,
    /// Every token issued, for resumes.
    tokens: Vec<(String, String)>,
}

/// Who a client believes its session is.
#[derive(Clone, Debug, PartialEq)]
enum Role {
    Nobody,
    Vm { vm_id: String, token: String },
    Operator,
}

struct Actor {
    client: Client,
    role: Role,
    rng: Rng,
    model: Arc<Mutex<Model>>,
    /// The last view of this client's VM, for disks to grow.
    view: Option<VmView>,
}

#[track_caller]
fn allow(op: &str, reply: &Reply, allowed: &[ErrorCode]) {
    if let Some(code) = reply.code {
        assert!(
            allowed.contains(&code),
            "{op}: {code} is not an answer the model allows ({})",
            reply.message
        );
    }
}

fn vm_of(reply: &Reply) -> VmView {
    serde_json::from_value(reply.data["vm"].clone()).expect("a VmView")
}

impl Actor {
    fn vm(&mut self) -> String {
        format!("m{}", self.rng.below(VMS))
    }

    fn record(&self, view: &VmView) {
        let mut model = self.model.lock().unwrap();
        model
            .acked
            .entry(view.vm_id.clone())
            .or_default()
            .push(view.clone());
    }

    async fn call(&mut self, command: &str, data: Value) -> Reply {
        self.client
            .call(command, data)
            .await
            .unwrap_or_else(|err| panic!("{command}: no reply: {err}"))
    }

    /// A revocation by another client may end this session at any time.
    fn maybe_revoked(&mut self, reply: &Reply) {
        if reply.code == Some(ErrorCode::NotAuthenticated) {
            assert!(
                matches!(self.role, Role::Vm { .. }),
                "not_authenticated while {:?}",
                self.role
            );
            self.role = Role::Nobody;
        }
    }

    async fn step(&mut self) {
        match self.rng.below(10) {
            0 => self.register().await,
            1 | 2 => self.authenticate().await,
            3 => self.resume().await,
            4..=6 => self.update().await,
            7 => self.logout().await,
            8 => self.revoke().await,
            _ => self.list().await,
        }
    }

    async fn register(&mut self) {
        let vm_id = self.vm();
        let disks: Vec<Value> = (0..self.rng.below(3))
            .map(|_| json!({"disk_size": 1 + self.rng.below(10)}))
            .collect();
        let reply = self
            .call(
                "register",
                json!({"vm_id": vm_id, "ram": 64, "cpu": 1, "password": password_for(&vm_id),
                       "disks": disks}),
            )
            .await;
        allow("register", &reply, &[ErrorCode::AlreadyExists]);
        if reply.is_success() {
            self.record(&vm_of(&reply));
            self.model.lock().unwrap().registered.insert(vm_id);
        }
    }

    async fn authenticate(&mut self) {
        let vm_id = self.vm();
        let known = self.model.lock().unwrap().registered.contains(&vm_id);
        let reply = self
            .call(
                "authenticate",
                json!({"vm_id": vm_id, "password": password_for(&vm_id)}),
            )
            .await;
        let mut allowed = vec![ErrorCode::TooManyAttempts];
        if !known {
            allowed.push(ErrorCode::InvalidCredentials);
        }
        allow("authenticate", &reply, &allowed);
        if reply.is_success() {
            let token = reply.data["token"].as_str().expect("a token").to_owned();
            self.model
                .lock()
                .unwrap()
                .tokens
                .push((vm_id.clone(), token.clone()));
            self.view = Some(vm_of(&reply));
            self.role = Role::Vm { vm_id, token };
        }
    }

    async fn resume(&mut self) {
        let picked = {
            let model = self.model.lock().unwrap();
            (!model.tokens.is_empty())
                .then(|| model.tokens[self.rng.below(model.tokens.len())].clone())
        };
        let Some((vm_id, token)) = picked else {
            return;
        };
        let reply = self
            .call("authenticate", json!({"vm_id": vm_id, "token": token}))
            .await;
        allow("resume", &reply, &[ErrorCode::NotAuthenticated]);
        if reply.is_success() {
            self.view = Some(vm_of(&reply));
            self.role = Role::Vm { vm_id, token };
        }
    }

    async fn update(&mut self) {
        let mut update = Update::default();
        match self.rng.below(4) {
            0 => update.ram = Some(64 + self.rng.below(4096) as u32),
            1 => update.cpu = Some(1 + self.rng.below(64) as u32),
            2 => update.attach = vec![1 + self.rng.below(5) as u32; 1 + self.rng.below(8)],
            _ => {
                let disks = self
                    .view
                    .as_ref()
                    .map(|v| v.disks.clone())
                    .unwrap_or_default();
                if disks.is_empty() {
                    update.ram = Some(100);
                } else {
                    let disk = &disks[self.rng.below(disks.len())];
                    update.resize = vec![(disk.id, disk.disk_size + 1)];
                }
            }
        }
        let reply = self.call("update", update.to_data()).await;
        match &self.role {
            Role::Nobody => allow("update", &reply, &[ErrorCode::NotAuthenticated]),
            Role::Operator => allow("update", &reply, &[ErrorCode::Forbidden]),
            Role::Vm { vm_id, .. } => {
                let vm_id = vm_id.clone();
                allow(
                    "update",
                    &reply,
                    &[ErrorCode::NotAuthenticated, ErrorCode::InvalidParams],
                );
                if reply.code == Some(ErrorCode::InvalidParams) {
                    // The disk limit, or a disk this client saw grown since
                    // by another session of the VM.
                    let stale = !update.resize.is_empty() && reply.message.contains("shrink");
                    assert!(reply.message.contains("64") || stale, "{}", reply.message);
                }
                if reply.is_success() {
                    let view = vm_of(&reply);
                    assert_eq!(view.vm_id, vm_id, "an update changes the session's own VM");
                    self.record(&view);
                    self.view = Some(view);
                }
                self.maybe_revoked(&reply);
            }
        }
        if reply.is_success() {
            assert!(matches!(self.role, Role::Vm { .. }));
        }
    }

    async fn logout(&mut self) {
        let reply = self.call("logout", json!({})).await;
        match self.role {
            Role::Nobody => allow("logout", &reply, &[ErrorCode::NotAuthenticated]),
            Role::Operator => allow("logout", &reply, &[]),
            Role::Vm { .. } => {
                allow("logout", &reply, &[ErrorCode::NotAuthenticated]);
                self.maybe_revoked(&reply);
            }
        }
        self.role = Role::Nobody;
    }

    async fn revoke(&mut self) {
        let reply = self
            .call("authenticate", json!({"admin_token": ADMIN}))
            .await;
        allow(
            "authenticate as operator",
            &reply,
            &[ErrorCode::TooManyAttempts],
        );
        if !reply.is_success() {
            return;
        }
        self.role = Role::Operator;
        let vm_id = self.vm();
        let known = self.model.lock().unwrap().registered.contains(&vm_id);
        let reply = self.call("revoke", json!({"vm_id": vm_id})).await;
        allow(
            "revoke",
            &reply,
            if known { &[] } else { &[ErrorCode::NotFound] },
        );
    }

    async fn list(&mut self) {
        let list_type =
            ["active_vms", "authenticated_vms", "all_vms", "all_disks"][self.rng.below(4)];
        let reply = self.call("list", json!({"list_type": list_type})).await;
        match self.role {
            Role::Nobody => allow("list", &reply, &[ErrorCode::NotAuthenticated]),
            Role::Operator => allow("list", &reply, &[]),
            Role::Vm { .. } => {
                allow("list", &reply, &[ErrorCode::NotAuthenticated]);
                self.maybe_revoked(&reply);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_clients_on_two_instances_agree_with_the_model() {
    let seed = std::env::var("VMM_MODEL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
        });
    let seconds = std::env::var("VMM_MODEL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("model seed {seed} ({seconds} s); replay with VMM_MODEL_SEED={seed}");
    let pair = Pair::start(|config| {
        config.hash_cost = HashCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        config.admin_token = Some(ADMIN.into());
    })
    .await;
    let model = Arc::new(Mutex::new(Model::default()));
    let actors = race(CLIENTS, |i, gate| {
        let (addr, model) = (pair.addr(i), Arc::clone(&model));
        async move {
            let mut actor = Actor {
                client: client_from(i, addr).await,
                role: Role::Nobody,
                rng: Rng(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)),
                model,
                view: None,
            };
            gate.open().await;
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut steps = 0u64;
            while Instant::now() < until {
                actor.step().await;
                steps += 1;
            }
            (actor, steps)
        }
    })
    .await;
    let steps: u64 = actors.iter().map(|(_, steps)| steps).sum();
    eprintln!("{steps} operations by {CLIENTS} clients");

    let db = pair.a.db.connect().await;
    let scalar = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    // At most 64 disks, nothing orphaned.
    assert_eq!(
        scalar(
            "SELECT count(*) FROM (SELECT vm_id FROM disks GROUP BY vm_id HAVING count(*) > 64) x"
        )
        .await,
        0
    );
    assert_eq!(
        scalar("SELECT count(*) FROM disks d WHERE NOT EXISTS (SELECT 1 FROM vms v WHERE v.vm_id = d.vm_id)").await,
        0
    );
    assert_eq!(
        scalar("SELECT count(*) FROM tokens t WHERE NOT EXISTS (SELECT 1 FROM vms v WHERE v.vm_id = t.vm_id)").await,
        0
    );
    assert_eq!(
        scalar("SELECT count(*) FROM sessions s WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = s.instance_id)").await,
        0
    );

    // Every acknowledged change is visible.
    let model = std::mem::take(&mut *model.lock().unwrap());
    let rows = db
        .query("SELECT vm_id, ram, cpu FROM vms", &[])
        .await
        .unwrap();
    let stored: BTreeMap<String, (i32, i32)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(
        stored.keys().cloned().collect::<HashSet<_>>(),
        model.registered,
        "exactly the acknowledged registrations"
    );
    let disk_rows = db
        .query("SELECT id, vm_id, disk_size FROM disks", &[])
        .await
        .unwrap();
    let disks: HashMap<i64, (String, i32)> = disk_rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut shown: HashSet<i64> = HashSet::new();
    for (vm_id, views) in &model.acked {
        let last = views.iter().max_by_key(|v| v.updated_at).expect("a view");
        let (ram, cpu) = stored[vm_id];
        assert_eq!(
            (ram as u32, cpu as u32),
            (last.ram, last.cpu),
            "{vm_id} is as its last acknowledged change left it"
        );
        for view in views {
            for disk in &view.disks {
                shown.insert(disk.id);
                let (owner, size) = disks.get(&disk.id).unwrap_or_else(|| {
                    panic!("disk {} of {vm_id} was acknowledged and is gone", disk.id)
                });
                assert_eq!(owner, vm_id);
                assert!(*size as u32 >= disk.disk_size, "disk {} shrank", disk.id);
            }
        }
    }
    let unshown: Vec<&i64> = disks.keys().filter(|id| !shown.contains(id)).collect();
    assert!(
        unshown.is_empty(),
        "disks no reply ever showed: {unshown:?}"
    );
    drop(model);

    // No session of a revoked token survives: whoever can still act as a
    // VM holds a live token.
    let mut actors: Vec<Actor> = actors.into_iter().map(|(actor, _)| actor).collect();
    let deadline = vmm_tests::Deadline::new("sessions of revoked tokens to end");
    loop {
        let mut survivors = Vec::new();
        for (i, actor) in actors.iter_mut().enumerate() {
            let Role::Vm { token, .. } = actor.role.clone() else {
                continue;
            };
            let reply = actor.call("list", json!({"list_type": "all_disks"})).await;
            if !reply.is_success() {
                actor.maybe_revoked(&reply);
                continue;
            }
            let digest = vmm_core::secrets::digest(&token);
            let live: bool = db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM tokens WHERE token_hash = $1 AND expires_at > now())",
                    &[&digest.as_slice()],
                )
                .await
                .unwrap()
                .get(0);
            if !live {
                survivors.push((i, machine(i)));
            }
        }
        if survivors.is_empty() {
            break;
        }
        eprintln!("still acting with a revoked token: {survivors:?}");
        deadline.tick().await;
    }
    eprintln!("seed {seed}: the database agrees with the model");
}
