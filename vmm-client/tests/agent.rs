//! `vmm-client agent` against a live server: it registers and authenticates,
//! comes back by itself after the server restarts, logs out and exits 0 on
//! SIGTERM, and gives up (exit 1) on a wrong password. Against a fake `/proc`
//! and `/sys` (`VMM_AGENT_ROOT`), it registers what the machine has, flags
//! override each field, and it keeps the server's record true: growing RAM,
//! CPUs and disks in place, attaching new disks once, never shrinking or
//! detaching one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use vmm_core::Client;
use vmm_core::protocol::{Timestamp, VmView};
use vmm_tests::{TestServer, eventually, password_for, registration};

const AGENT: &str = "agent-vm";

/// The agent's `--backoff-max`.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The agent's stderr so far, and the task that collects it until it ends.
struct Stderr {
    so_far: Arc<std::sync::Mutex<String>>,
    reader: JoinHandle<()>,
    /// The agent's `$STATE_DIRECTORY`, removed with it.
    _state: Option<TempDir>,
}

/// A directory of its own under the system's temporary directory, removed
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vmm-agent-test-{}-{what}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Stderr {
    fn contains(&self, text: &str) -> bool {
        self.so_far
            .lock()
            .map(|so_far| so_far.contains(text))
            .unwrap_or(false)
    }
}

/// The agent with `args` after `agent`, `password` in `VMM_PASSWORD` (none:
/// unset), and nothing else from the environment that it reads.
fn agent_command(addr: &str, args: &[&str], password: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(["--addr", addr, "agent"])
        .args(args)
        .env_remove("VMM_PASSWORD")
        .env_remove("VMM_VM_ID")
        .env_remove("VMM_AGENT_ROOT")
        .env_remove("VMM_REGISTRATION_SECRET")
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(password) = password {
        command.env("VMM_PASSWORD", password);
    }
    command
}

/// Starts the agent as [`agent_command`] says, reading the real machine,
/// with a `$STATE_DIRECTORY` of its own (never the real one's default), and
/// stderr collected until it exits.
fn start_agent(addr: &str, args: &[&str], password: Option<&str>) -> (Child, Stderr) {
    let state = TempDir::new("state");
    let mut command = agent_command(addr, args, password);
    command.env("STATE_DIRECTORY", &state.0);
    let (child, mut stderr) = spawn_agent(command);
    stderr._state = Some(state);
    (child, stderr)
}

/// Starts `command` with stderr collected until it exits.
fn spawn_agent(mut command: Command) -> (Child, Stderr) {
    let mut child = command.spawn().expect("start the agent");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let so_far = Arc::new(std::sync::Mutex::new(String::new()));
    let collected = Arc::clone(&so_far);
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut text) = collected.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    (
        child,
        Stderr {
            so_far,
            reader,
            _state: None,
        },
    )
}

/// Waits (bounded) for the agent to exit; its exit code and stderr.
async fn finished(mut child: Child, stderr: Stderr) -> (Option<i32>, String) {
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the agent exits in time")
        .expect("the agent's exit status");
    tokio::time::timeout(Duration::from_secs(10), stderr.reader)
        .await
        .expect("the agent's stderr ends")
        .expect("the stderr reader");
    let text = stderr.so_far.lock().map(|text| text.clone());
    (status.code(), text.expect("the collected stderr"))
}

/// Sends SIGTERM to the agent.
fn terminate(child: &Child) {
    let pid = child.id().expect("the agent is running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
}

/// A connection authenticated as a VM of its own, to look at the lists.
async fn observer(server: &TestServer) -> Mutex<Client> {
    let mut client = server.client().await;
    client
        .authenticate("observer", &password_for("observer"))
        .await
        .expect("the observer authenticates");
    Mutex::new(client)
}

/// When `vm_id` last authenticated on a connection that still is, if it is.
async fn authenticated_at(observer: &Mutex<Client>, vm_id: &str) -> Option<Timestamp> {
    let sessions = observer
        .lock()
        .await
        .list_authenticated()
        .await
        .expect("list authenticated_vms");
    sessions
        .into_iter()
        .filter(|session| session.vm.vm_id == vm_id)
        .map(|session| session.authenticated_at)
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_restart_and_logs_out_on_sigterm() {
    let mut server = TestServer::start().await;
    let addr = server.addr.to_string();
    server
        .client()
        .await
        .register(&registration("observer", 256, vec![]))
        .await
        .expect("register the observer");
    let password = password_for(AGENT);
    let (child, stderr) = start_agent(
        &addr,
        &[
            "--vm-id",
            AGENT,
            "--ram",
            "512",
            "--cpu",
            "2",
            "--disk",
            "10",
            "--ping-interval",
            "0.2",
            "--backoff-initial",
            "0.1",
            "--backoff-max",
            "1",
        ],
        Some(&password),
    );

    let watch = observer(&server).await;
    let first = eventually("the agent to authenticate", || async {
        authenticated_at(&watch, AGENT).await
    })
    .await;
    drop(watch);

    // Down for 1.5 s, so that the agent's attempts fail and back off.
    server
        .restart(async { tokio::time::sleep(Duration::from_millis(1500)).await })
        .await;
    let back = Instant::now();

    // The observer's connection died with the old server.
    let watch = observer(&server).await;
    eventually("the agent to authenticate again", || async {
        authenticated_at(&watch, AGENT)
            .await
            .filter(|at| *at > first)
    })
    .await;
    let took = back.elapsed();
    // Once the server is back, the agent's next attempt comes within one
    // backoff step, which is at most --backoff-max; the 2 s on top are
    // generous slack for a loaded test machine (authentication hashes the
    // password, the observer reconnects and polls), not a measured latency.
    assert!(
        took < BACKOFF_MAX + Duration::from_secs(2),
        "the agent took {took:?} to come back after the server did"
    );

    terminate(&child);
    let (code, stderr) = finished(child, stderr).await;
    // Shown with --nocapture, or when the test fails.
    println!("the agent's stderr:\n{stderr}");
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    eventually("the agent to be logged out", || async {
        authenticated_at(&watch, AGENT)
            .await
            .is_none()
            .then_some(())
    })
    .await;

    assert!(stderr.contains("registered"), "stderr:\n{stderr}");
    assert!(stderr.contains("retrying in"), "stderr:\n{stderr}");
    let connections = stderr.matches("connected to").count();
    assert!(connections >= 2, "stderr:\n{stderr}");
    assert!(stderr.contains("logged out, exiting"), "stderr:\n{stderr}");
    assert!(
        stderr.contains("resumed the session with its token"),
        "after the restart the agent resumes with its token, without a password hash:\n{stderr}"
    );
    assert!(
        !stderr.contains(&password),
        "the password is logged:\n{stderr}"
    );
    for line in stderr.lines() {
        assert!(
            line.contains(&format!(" agent {AGENT}: ")),
            "not a log line: {line}"
        );
        let stamp = line.split(' ').next().unwrap_or_default();
        assert!(
            humantime::parse_rfc3339(stamp).is_ok(),
            "not an RFC 3339 UTC time: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_gives_up_on_a_wrong_password() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    server
        .client()
        .await
        .register(&registration("taken", 256, vec![]))
        .await
        .expect("register the VM");
    let wrong = "not-the-password";

    // With and without --ram/--cpu (the rest read from this machine): either
    // way `register` answers already_exists, which is fine, and
    // `authenticate` fails.
    let with_registration = ["--vm-id", "taken", "--ram", "512", "--cpu", "1"];
    for args in [&with_registration[..], &["--vm-id", "taken"][..]] {
        let (child, stderr) = start_agent(&addr, args, Some(wrong));
        let (code, stderr) = finished(child, stderr).await;
        assert_eq!(code, Some(1), "{args:?}: stderr:\n{stderr}");
        assert!(stderr.contains("invalid_credentials"), "stderr:\n{stderr}");
        assert!(!stderr.contains(wrong), "the password is logged:\n{stderr}");
    }

    // No password at all: a usage error.
    let (child, stderr) = start_agent(&addr, &["--vm-id", "taken"], None);
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(2), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_disconnected_exits_0() {
    // A port that nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .to_string();
    let args = ["--vm-id", "lonely", "--backoff-initial", "0.1"];
    let (child, stderr) = start_agent(&addr, &args, Some("a-fine-password"));
    // Its signal handlers are installed before it logs anything.
    eventually("the agent to back off", || async {
        stderr.contains("retrying in").then_some(())
    })
    .await;
    terminate(&child);
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("received SIGTERM"), "stderr:\n{stderr}");
}

/// Sectors of 512 bytes in a GiB, as `/sys/block/DEV/size` counts them.
const SECTORS_PER_GIB: u64 = 2 * 1024 * 1024;

/// A fake `/proc` and `/sys` for the agent to read (`VMM_AGENT_ROOT`), and
/// a directory for its state files beside them.
struct FakeMachine {
    dir: TempDir,
}

impl FakeMachine {
    fn new() -> FakeMachine {
        let machine = FakeMachine {
            dir: TempDir::new("machine"),
        };
        std::fs::create_dir_all(machine.root().join("sys/block")).expect("create sys/block");
        machine
    }

    fn root(&self) -> PathBuf {
        self.dir.0.join("root")
    }

    fn state_file(&self, vm_id: &str) -> PathBuf {
        self.dir.0.join("state").join(format!("{vm_id}.json"))
    }

    /// Writes a file under the root whole (a temporary file renamed over
    /// it), so that an agent reading it meanwhile sees the old or the new.
    fn write(&self, path: &str, text: &str) {
        let path = self.root().join(path);
        let dir = path.parent().expect("a parent directory");
        std::fs::create_dir_all(dir).expect("create the directory");
        let temp = dir.join(".writing");
        std::fs::write(&temp, text).expect("write the file");
        std::fs::rename(&temp, &path).expect("rename the file");
    }

    /// MemTotal of `mib` MiB and 1023 KiB, which the agent rounds down.
    fn set_ram(&self, mib: u64) {
        let kib = mib * 1024 + 1023;
        self.write(
            "proc/meminfo",
            &format!("MemTotal:       {kib} kB\nMemFree:          123456 kB\n"),
        );
    }

    fn set_cpus(&self, count: u64) {
        let online = match count {
            1 => "0".to_owned(),
            n => format!("0-{}", n - 1),
        };
        self.write("sys/devices/system/cpu/online", &format!("{online}\n"));
    }

    fn set_sectors(&self, device: &str, sectors: u64) {
        self.write(&format!("sys/block/{device}/size"), &format!("{sectors}\n"));
    }

    /// A disk of `gib` GiB less one sector, which the agent rounds up.
    fn set_disk(&self, device: &str, gib: u64) {
        self.set_sectors(device, gib * SECTORS_PER_GIB - 1);
    }

    fn remove_disk(&self, device: &str) {
        std::fs::remove_dir_all(self.root().join("sys/block").join(device))
            .expect("remove the device");
    }
}

/// Starts the agent for `vm_id` (its password from `password_for`) on
/// `machine`, with `state` for its state file, quick intervals, and
/// `extra` arguments.
fn start_on(
    addr: &str,
    machine: &FakeMachine,
    vm_id: &str,
    state: &Path,
    extra: &[&str],
) -> (Child, Stderr) {
    let state = state.to_string_lossy().into_owned();
    let mut args = vec![
        "--vm-id",
        vm_id,
        "--state-file",
        &state,
        "--ping-interval",
        "0.2",
        "--reconcile-interval",
        "0.2",
        "--backoff-initial",
        "0.1",
        "--backoff-max",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut command = agent_command(addr, &args, Some(&password_for(vm_id)));
    command.env("VMM_AGENT_ROOT", machine.root());
    spawn_agent(command)
}

/// Waits for `text` in the agent's stderr.
async fn logged(stderr: &Stderr, text: &str) {
    eventually(&format!("the agent to log {text:?}"), || async {
        stderr.contains(text).then_some(())
    })
    .await;
}

/// SIGTERM, and the agent's stderr once it exited 0.
async fn stop_agent(child: Child, stderr: Stderr) -> String {
    terminate(&child);
    let (code, stderr) = finished(child, stderr).await;
    println!("the agent's stderr:\n{stderr}");
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    stderr
}

/// The server's record of `vm_id`, if it has one.
async fn record(observer: &Mutex<Client>, vm_id: &str) -> Option<VmView> {
    let vms = observer
        .lock()
        .await
        .list_all()
        .await
        .expect("list all_vms");
    vms.into_iter()
        .map(|status| status.vm)
        .find(|vm| vm.vm_id == vm_id)
}

/// Waits for the server's record of `vm_id` to satisfy `check`.
async fn record_where(
    observer: &Mutex<Client>,
    vm_id: &str,
    what: &str,
    check: impl Fn(&VmView) -> bool,
) -> VmView {
    eventually(&format!("{vm_id}: {what}"), || async {
        record(observer, vm_id).await.filter(|vm| check(vm))
    })
    .await
}

/// `(id, GiB)` of each disk, in id order.
fn disks(vm: &VmView) -> Vec<(i64, u32)> {
    vm.disks.iter().map(|d| (d.id, d.disk_size)).collect()
}

fn sizes(vm: &VmView) -> Vec<u32> {
    vm.disks.iter().map(|d| d.disk_size).collect()
}

/// The device → disk id mapping of a state file.
fn mapping(path: &Path) -> BTreeMap<String, i64> {
    let text = std::fs::read_to_string(path).expect("read the state file");
    let state: serde_json::Value = serde_json::from_str(&text).expect("a JSON state file");
    serde_json::from_value(state["disks"].clone()).expect("a disks object")
}

async fn observed(server: &TestServer) -> Mutex<Client> {
    server
        .client()
        .await
        .register(&registration("observer", 256, vec![]))
        .await
        .expect("register the observer");
    observer(server).await
}

/// A VM, the agent's flags, and the RAM, CPUs and disk sizes it should get.
type Case = (&'static str, &'static [&'static str], u32, u32, Vec<u32>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registers_what_the_machine_has_and_each_flag_overrides_its_field() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let watch = observed(&server).await;
    let machine = FakeMachine::new();
    machine.set_ram(3000);
    machine.set_cpus(3);
    machine.set_disk("vda", 20);
    machine.set_sectors("vdb", 5 * SECTORS_PER_GIB);
    // Not disks of the VM, or empty.
    for other in ["loop0", "ram0", "zram0", "dm-0", "sr0", "md0", "nbd0"] {
        machine.set_sectors(other, 8 * SECTORS_PER_GIB);
    }
    machine.set_sectors("vdc", 0);

    let cases: [Case; 4] = [
        ("fp-all", &[], 3000, 3, vec![20, 5]),
        ("fp-ram", &["--ram", "700"], 700, 3, vec![20, 5]),
        ("fp-cpu", &["--cpu", "7"], 3000, 7, vec![20, 5]),
        (
            "fp-disk",
            &["--disk", "9", "--disk", "4"],
            3000,
            3,
            vec![9, 4],
        ),
    ];
    for (vm_id, flags, ram, cpu, want_disks) in cases {
        // fp-cpu's state file cannot be written: the agent warns and goes on.
        let state = match vm_id {
            "fp-cpu" => PathBuf::from("/proc/vmm-agent-test/fp-cpu.json"),
            _ => machine.state_file(vm_id),
        };
        let (child, stderr) = start_on(&addr, &machine, vm_id, &state, flags);
        logged(&stderr, "authenticated").await;
        let vm = record(&watch, vm_id).await.expect("the VM is registered");
        assert_eq!((vm.ram, vm.cpu, sizes(&vm)), (ram, cpu, want_disks.clone()));
        let stderr = stop_agent(child, stderr).await;
        assert!(stderr.contains("registered"), "stderr:\n{stderr}");
        // What it registered is what it wants: nothing to update.
        assert!(!stderr.contains("updating"), "stderr:\n{stderr}");
        if vm_id == "fp-cpu" {
            assert!(
                stderr.contains("cannot write the state file"),
                "stderr:\n{stderr}"
            );
            continue;
        }
        let keys: Vec<String> = if vm_id == "fp-disk" {
            vec!["flag:0".into(), "flag:1".into()]
        } else {
            vec!["vda".into(), "vdb".into()]
        };
        let ids: Vec<i64> = vm.disks.iter().map(|d| d.id).collect();
        let want: BTreeMap<String, i64> = keys.into_iter().zip(ids).collect();
        assert_eq!(mapping(&state), want, "{vm_id}'s state file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_grows_the_vm_in_place_and_never_shrinks_or_detaches() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let watch = observed(&server).await;
    let machine = FakeMachine::new();
    let vm_id = "grows";
    let state = machine.state_file(vm_id);
    machine.set_ram(1024);
    machine.set_cpus(2);
    machine.set_disk("vda", 10);
    machine.set_disk("vdb", 5);
    machine.set_disk("vdc", 8);

    let (child, stderr) = start_on(&addr, &machine, vm_id, &state, &[]);
    logged(&stderr, "authenticated").await;
    stop_agent(child, stderr).await;
    let first = record(&watch, vm_id).await.expect("registered");
    assert_eq!(
        (first.ram, first.cpu, sizes(&first)),
        (1024, 2, vec![10, 5, 8])
    );
    let [(a, _), (b, _), (c, _)] = disks(&first)[..] else {
        panic!("three disks: {first:?}");
    };

    // More RAM and CPUs, vda grown, vdb smaller, vdc gone, vdd new.
    machine.set_ram(2048);
    machine.set_cpus(4);
    machine.set_disk("vda", 15);
    machine.set_disk("vdb", 3);
    machine.remove_disk("vdc");
    machine.set_disk("vdd", 7);
    let (child, stderr) = start_on(&addr, &machine, vm_id, &state, &[]);
    let second = record_where(&watch, vm_id, "ram 2048", |vm| vm.ram == 2048).await;
    assert_eq!(second.cpu, 4);
    let now = disks(&second);
    assert_eq!(now.len(), 4, "{second:?}");
    assert_eq!(&now[..3], [(a, 15), (b, 5), (c, 8)], "in place, kept, kept");
    let (d, size) = now[3];
    assert!(d > c, "{second:?}");
    assert_eq!(size, 7);
    logged(&stderr, "shrink").await;
    logged(&stderr, "missing").await;

    // Another round with the same shrunk and missing devices (seen through
    // a change that needs one): each warning is still logged once.
    machine.set_ram(2100);
    record_where(&watch, vm_id, "ram 2100", |vm| vm.ram == 2100).await;
    let stderr = stop_agent(child, stderr).await;
    let lines = |word: &str| stderr.lines().filter(|line| line.contains(word)).count();
    assert_eq!(lines("shrink"), 1, "stderr:\n{stderr}");
    assert_eq!(lines("missing"), 1, "stderr:\n{stderr}");
    let shrink = stderr.lines().find(|line| line.contains("shrink"));
    assert!(
        shrink.is_some_and(|line| line.contains("vdb")),
        "{shrink:?}"
    );
    let missing = stderr.lines().find(|line| line.contains("missing"));
    assert!(
        missing.is_some_and(|line| line.contains("vdc")),
        "{missing:?}"
    );
    let want: BTreeMap<String, i64> = [("vda", a), ("vdb", b), ("vdc", c), ("vdd", d)]
        .into_iter()
        .map(|(key, id)| (key.to_owned(), id))
        .collect();
    assert_eq!(mapping(&state), want);

    // A third run attaches nothing again: its one update sets only RAM.
    machine.set_ram(2200);
    let (child, stderr) = start_on(&addr, &machine, vm_id, &state, &[]);
    let third = record_where(&watch, vm_id, "ram 2200", |vm| vm.ram == 2200).await;
    let stderr = stop_agent(child, stderr).await;
    assert_eq!(disks(&third), [(a, 15), (b, 5), (c, 8), (d, 7)]);
    assert!(!stderr.contains("new disk"), "stderr:\n{stderr}");
    let registered = stderr.lines().any(|line| line.ends_with(": registered"));
    assert!(!registered, "known from its state file:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_while_running_is_reconciled_without_a_restart() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let watch = observed(&server).await;
    let machine = FakeMachine::new();
    let vm_id = "live";
    machine.set_ram(1024);
    machine.set_cpus(1);
    machine.set_disk("vda", 10);
    let state = machine.state_file(vm_id);
    let (child, stderr) = start_on(&addr, &machine, vm_id, &state, &[]);
    logged(&stderr, "authenticated").await;
    let first = record(&watch, vm_id).await.expect("registered");
    let [(a, 10)] = disks(&first)[..] else {
        panic!("one disk of 10 GiB: {first:?}");
    };

    machine.set_ram(1536);
    machine.set_disk("vda", 12);
    machine.set_disk("vdb", 2);
    let updated = record_where(&watch, vm_id, "ram 1536 and two disks", |vm| {
        vm.ram == 1536 && vm.disks.len() == 2
    })
    .await;
    assert_eq!(disks(&updated)[0], (a, 12));
    assert_eq!(updated.disks[1].disk_size, 2);
    let stderr = stop_agent(child, stderr).await;
    assert_eq!(
        stderr.matches("connected to").count(),
        1,
        "no restart:\n{stderr}"
    );
    assert!(stderr.contains("updating"), "stderr:\n{stderr}");
    assert_eq!(mapping(&state).get("vdb"), Some(&updated.disks[1].id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_what_it_found_without_a_server() {
    // A port that nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .to_string();
    let machine = FakeMachine::new();
    machine.set_ram(3000);
    machine.set_cpus(3);
    machine.set_disk("vda", 20);
    machine.set_sectors("loop0", SECTORS_PER_GIB);
    let dry_run = |extra: &[&str]| {
        let mut args = vec!["--vm-id", "dry", "--dry-run"];
        args.extend_from_slice(extra);
        let mut command = agent_command(&addr, &args, None);
        command
            .env("VMM_AGENT_ROOT", machine.root())
            .stdout(Stdio::piped());
        command
    };
    let run = |command: Command| async move {
        let mut command = command;
        let out = tokio::time::timeout(vmm_tests::PATIENCE, command.output())
            .await
            .expect("the dry run ends")
            .expect("the dry run's output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };

    let (code, stdout, stderr) = run(dry_run(&[])).await;
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in [
        "found ram: 3000 MiB",
        "found cpu: 3",
        "found disk: vda 20 GiB",
        "wanted: ram 3000 MiB, cpu 3, disks [vda 20 GiB]",
        "ram 3000, cpu 3, disks [20]",
    ] {
        assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("loop0"), "{stdout}");

    let (code, stdout, _) = run(dry_run(&["--ram", "512", "--disk", "4"])).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("found ram: not read: --ram given"),
        "{stdout}"
    );
    assert!(stdout.contains("disks [flag:0 4 GiB]"), "{stdout}");
    assert!(stdout.contains("ram 512, cpu 3"), "{stdout}");

    // A machine that cannot be read: 1, and why.
    let mut broken = dry_run(&[]);
    broken.env("VMM_AGENT_ROOT", "/nonexistent/vmm-agent-root");
    let (code, _, stderr) = run(broken).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("/proc/meminfo"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_enrollment_secret_an_existing_vm_still_authenticates() {
    let secret = "enroll-me-please";
    let server = TestServer::start_with(|c| c.registration_secret = Some(secret.into())).await;
    let addr = server.addr.to_string();
    let mut old = registration("old-vm", 256, vec![]);
    old.registration_secret = Some(secret.into());
    server
        .client()
        .await
        .register(&old)
        .await
        .expect("register the VM");
    let machine = FakeMachine::new();
    machine.set_ram(512);
    machine.set_cpus(1);

    // It exists: `register` is forbidden, and authenticating works.
    let state = machine.state_file("old-vm");
    let (child, stderr) = start_on(&addr, &machine, "old-vm", &state, &[]);
    logged(&stderr, "authenticated").await;
    let stderr = stop_agent(child, stderr).await;
    assert!(stderr.contains("not registered"), "stderr:\n{stderr}");

    // It does not: exit 1, saying what registering it needs.
    let state = machine.state_file("new-vm");
    let (child, stderr) = start_on(&addr, &machine, "new-vm", &state, &[]);
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("enrollment secret"), "stderr:\n{stderr}");
    assert!(!stderr.contains(secret), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_says_the_vm_exists_and_is_named_if_it_does_not() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let machine = FakeMachine::new();
    machine.set_ram(512);
    machine.set_cpus(1);
    // A state file from another server's database: the agent does not
    // register, so authenticating fails, and it says which file to remove.
    let state = machine.state_file("ghost");
    std::fs::create_dir_all(state.parent().expect("its directory")).expect("create it");
    std::fs::write(&state, r#"{"vm_id": "ghost", "disks": {"vda": 5}}"#).expect("write it");
    let (child, stderr) = start_on(&addr, &machine, "ghost", &state, &[]);
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    let registered = stderr.lines().any(|line| line.ends_with(": registered"));
    assert!(!registered, "stderr:\n{stderr}");
    assert!(stderr.contains("invalid_credentials"), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("{}", state.display())) && stderr.contains("remove the file"),
        "stderr:\n{stderr}"
    );
}
