//! Test support: a real PostgreSQL for every test, servers on port 0, raw
//! sockets, and polling with a deadline instead of sleeping.
//!
//! Where the PostgreSQL server comes from, in order:
//! 1. `VMM_TEST_DATABASE_URL`, a URL of a server where the user may create
//!    databases (for example `postgres://postgres@127.0.0.1:5432/postgres`);
//! 2. the PostgreSQL server binaries (`initdb`, `pg_ctl`), if installed: a
//!    private cluster under `target/vmm-test-postgres`, listening only on a
//!    Unix socket, started on first use and left running for later runs
//!    (`pg_ctl -D target/vmm-test-postgres stop` stops it);
//! 3. Docker: a `postgres:16` container named `vmm-test-postgres`.
//!
//! If none is available the tests fail with a message that says how to get
//! one. Every test gets a fresh database, dropped when the test ends, so tests
//! run in parallel and repeat cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vmm_core::{Config, Context};

/// How long any wait in a test may take before the test fails. Generous: it
/// only bounds a hang, it is not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub mod race;

/// splitmix64: small and seedable, for tests that choose at random but
/// must replay a failing run from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.between(0, n - 1)
    }
}

/// Log output captured in memory, for a test binary that installs its own
/// subscriber: `tracing_subscriber::fmt().with_writer(move || logs.clone())`.
#[derive(Clone, Default)]
pub struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The lines logged so far that are JSON (a JSON subscriber's entries).
    pub fn entries(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

fn fail(message: String) -> ! {
    panic!("\n\n{message}\n\n")
}

/// The URL of a PostgreSQL server that tests may create databases on.
pub fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match provision() {
        Ok(url) => url,
        Err(why) => fail(format!(
            "vmm's tests need a PostgreSQL server, and none could be had: {why}\n\
             Get one in any of these ways:\n\
             - point VMM_TEST_DATABASE_URL at a server where the user may CREATE DATABASE, e.g.\n\
               VMM_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test --workspace\n\
             - install the PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql;\n\
               macOS: brew install postgresql) so that the tests can start a private one;\n\
             - or start Docker, so that the tests can run a postgres:16 container."
        )),
    })
}

fn provision() -> Result<String, String> {
    if let Ok(url) = std::env::var("VMM_TEST_DATABASE_URL") {
        return Ok(url);
    }
    if let Some(bindir) = postgres_bindir() {
        return local_cluster(&bindir);
    }
    if Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|out| out.status.success())
    {
        return docker_container();
    }
    Err("VMM_TEST_DATABASE_URL is not set, no PostgreSQL server binaries (initdb, pg_ctl) were found, \
         and no Docker engine answers"
        .into())
}

fn postgres_bindir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return Some(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|dir| has_tools(dir))
    {
        return Some(dir);
    }
    // Debian keeps the server binaries off PATH.
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|dir| has_tools(dir))
        .collect();
    versions.sort();
    versions.pop()
}

/// `target/` of this build, from the test executable's path.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A private cluster under `target/`. PostgreSQL refuses to run as root, so
/// as root it runs as the `postgres` user.
fn local_cluster(bindir: &Path) -> Result<String, String> {
    let dir = target_dir().join("vmm-test-postgres");
    std::fs::create_dir_all(&dir).map_err(|err| format!("cannot create {dir:?}: {err}"))?;
    let lock = std::fs::File::create(dir.with_extension("lock"))
        .map_err(|err| format!("cannot create the cluster lock: {err}"))?;
    lock.lock()
        .map_err(|err| format!("cannot lock the cluster: {err}"))?;

    let as_root = run(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0");
    let tool = |name: &str| {
        let mut command;
        if as_root {
            command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(bindir.join(name));
        } else {
            command = Command::new(bindir.join(name));
        }
        command
    };
    if !dir.join("PG_VERSION").exists() {
        if as_root {
            run(Command::new("chown").arg("postgres:").arg(&dir))?;
        }
        run(tool("initdb").arg("-D").arg(&dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]))?;
    }
    let running = tool("pg_ctl").arg("status").arg("-D").arg(&dir).output();
    if !running.is_ok_and(|out| out.status.success()) {
        let options = format!(
            "-c listen_addresses='' -k {} -p 5432 -c max_connections=500 -c fsync=off",
            dir.display()
        );
        run(tool("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-D")
            .arg(&dir)
            .arg("-l")
            .arg(dir.join("server.log"))
            .arg("-o")
            .arg(options))?;
    }
    Ok(format!(
        "host={} port=5432 user=postgres dbname=postgres",
        dir.display()
    ))
}

fn docker_container() -> Result<String, String> {
    let name = "vmm-test-postgres";
    let running = run(Command::new("docker").args(["port", name, "5432/tcp"]));
    if running.is_err() {
        run(Command::new("docker").args([
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "-e",
            "POSTGRES_HOST_AUTH_METHOD=trust",
            "-p",
            "127.0.0.1::5432",
            "postgres:16",
            "-c",
            "max_connections=500",
        ]))?;
    }
    let port = run(Command::new("docker").args(["port", name, "5432/tcp"]))?;
    let port = port
        .lines()
        .next()
        .and_then(|line| line.rsplit(':').next())
        .ok_or("docker port printed nothing")?
        .trim()
        .to_owned();
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// `url` with its database replaced by `dbname`.
/// `url` (a URL or key=value connection string) as user `user`.
/// A listener on a port of its own on 127.0.0.1, and its address.
pub async fn bind_local() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| fail(format!("cannot bind 127.0.0.1:0: {err}")));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|err| fail(err.to_string()));
    (listener, addr)
}

pub fn with_user(url: &str, user: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let host_and_more = rest.split_once('@').map_or(rest, |(_, after)| after);
            return format!("postgres://{user}@{host_and_more}");
        }
    }
    format!("{url} user={user}")
}

/// `url` (a URL or key=value connection string) on database `dbname`.
pub fn with_database(url: &str, dbname: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let (authority, query) = match rest.split_once('?') {
            Some((before, query)) => (before, format!("?{query}")),
            None => (rest, String::new()),
        };
        let host = authority.split('/').next().unwrap_or(authority);
        format!("postgres://{host}/{dbname}{query}")
    } else {
        format!("{url} dbname={dbname}")
    }
}

async fn admin() -> tokio_postgres::Client {
    let url = server_url().to_owned();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(err) if Instant::now() > deadline => fail(format!(
                "cannot connect to the test PostgreSQL server: {err}"
            )),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A TCP proxy between servers and PostgreSQL that a test can cut and
/// restore, to play a database outage.
pub struct DbProxy {
    /// `db`'s URL, through the proxy.
    pub url: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    _accept: JoinHandle<()>,
}

enum Upstream {
    Tcp(String),
    Unix(PathBuf),
}

impl DbProxy {
    pub async fn start(db: &TestDb) -> DbProxy {
        let config: tokio_postgres::Config = db
            .url
            .parse()
            .unwrap_or_else(|err| fail(format!("unparsable database URL: {err}")));
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => {
                Upstream::Tcp(format!("{host}:{port}"))
            }
            Some(tokio_postgres::config::Host::Unix(dir)) => {
                Upstream::Unix(dir.join(format!(".s.PGSQL.{port}")))
            }
            None => Upstream::Tcp(format!("127.0.0.1:{port}")),
        };
        let upstream = Arc::new(upstream);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let (listener, addr) = bind_local().await;
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = {
            let (cut, links) = (Arc::clone(&cut), Arc::clone(&links));
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let upstream = Arc::clone(&upstream);
                    let link = tokio::spawn(async move {
                        let _ = match &*upstream {
                            Upstream::Tcp(addr) => match TcpStream::connect(addr).await {
                                Ok(mut server) => {
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await
                                }
                                Err(err) => Err(err),
                            },
                            Upstream::Unix(path) => match tokio::net::UnixStream::connect(path)
                                .await
                            {
                                Ok(mut server) => {
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await
                                }
                                Err(err) => Err(err),
                            },
                        };
                    });
                    if let Ok(mut links) = links.lock() {
                        links.retain(|l: &tokio::task::AbortHandle| !l.is_finished());
                        links.push(link.abort_handle());
                    }
                }
            })
        };
        DbProxy {
            url: format!(
                "host=127.0.0.1 port={} user={user} dbname={}",
                addr.port(),
                db.name
            ),
            cut,
            links,
            _accept: accept,
        }
    }

    /// Breaks every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Ok(mut links) = self.links.lock() {
            for link in links.drain(..) {
                link.abort();
            }
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A database of a test's own, dropped when the test ends.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// Dropped with this value; false for a second handle on the same one.
    owned: bool,
}

impl TestDb {
    pub async fn create() -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let name = format!(
            "vmm_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|err| fail(format!("cannot create a test database: {err}")));
        TestDb {
            url: with_database(server_url(), &name),
            name,
            owned: true,
        }
    }

    /// Another handle on the same database, which does not drop it.
    pub fn share(&self) -> TestDb {
        TestDb {
            name: self.name.clone(),
            url: self.url.clone(),
            owned: false,
        }
    }

    /// A direct connection, for checking what is stored.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| fail(format!("cannot connect to {}: {err}", self.name)));
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on itself.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let _ = admin()
                        .await
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                });
            }
        });
        let _ = dropped.join();
    }
}

/// Log lines go to the test's captured output (`RUST_LOG` to change the level).
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A server inside the test process, on its own database and port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub context: Arc<Context>,
    pub db: TestDb,
    config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), vmm_core::SetupError>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        init_logging();
        TestServer::start_on(TestDb::create().await, configure).await
    }

    /// Another instance on this server's database, as a second process
    /// behind a load balancer would be.
    pub async fn start_beside(&self, configure: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_on(self.db.share(), configure).await
    }

    /// Another instance on this server's database that reaches it through
    /// `proxy`.
    pub async fn start_through(
        &self,
        proxy: &DbProxy,
        configure: impl FnOnce(&mut Config),
    ) -> TestServer {
        let url = proxy.url.clone();
        TestServer::start_on(self.db.share(), move |config| {
            config.database_url = url;
            configure(config);
        })
        .await
    }

    async fn start_on(db: TestDb, configure: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            database_url: db.url.clone(),
            db_pool_size: 8,
            database_wait: PATIENCE,
            ..Config::default()
        };
        configure(&mut config);
        let (listener, addr) = bind_local().await;
        if config.instance_name.is_empty() {
            config.instance_name = addr.to_string();
        }
        let (context, stop, task) = serve(listener, config.clone()).await;
        TestServer {
            addr,
            context,
            db,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> vmm_core::Client {
        vmm_core::Client::connect(self.addr)
            .await
            .unwrap_or_else(|err| fail(format!("cannot connect to the test server: {err}")))
    }

    /// A client connected as a newly registered VM `vm_id` (with no disks),
    /// authenticated: an observer for the lists.
    pub async fn session_as(&self, vm_id: &str) -> vmm_core::Client {
        let mut client = self.client().await;
        client
            .register(&registration(vm_id, 64, Vec::new()))
            .await
            .unwrap_or_else(|err| fail(format!("cannot register {vm_id}: {err}")));
        client
            .authenticate(vm_id, &password_for(vm_id))
            .await
            .unwrap_or_else(|err| fail(format!("cannot authenticate {vm_id}: {err}")));
        client
    }

    /// A client that registered `vm_id` (with no disks) and logged in with
    /// its password, and the session token it was given.
    pub async fn owner(&self, vm_id: &str) -> (vmm_core::Client, String) {
        let mut client = self.client().await;
        client
            .register(&registration(vm_id, 64, Vec::new()))
            .await
            .unwrap_or_else(|err| fail(format!("cannot register {vm_id}: {err}")));
        let (_, token) = client
            .login(vm_id, &password_for(vm_id))
            .await
            .unwrap_or_else(|err| fail(format!("cannot log in as {vm_id}: {err}")));
        (client, token)
    }

    /// Serves this server's `/metrics`, `/healthz` and `/readyz` on a port
    /// of their own until the test ends, as `--metrics-listen` does.
    pub async fn metrics_listener(&self) -> SocketAddr {
        let (listener, addr) = bind_local().await;
        tokio::spawn(vmm_core::health::serve(
            listener,
            Arc::clone(&self.context),
            std::future::pending(),
        ));
        addr
    }

    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.addr).await
    }

    /// A client connecting from machine `n`'s own address (see [`machine`]).
    pub async fn client_from(&self, n: usize) -> vmm_core::Client {
        client_from(n, self.addr).await
    }

    /// Stops the server the way a SIGKILL would: its tasks are aborted and
    /// nothing is cleaned up, in memory or in the database.
    pub fn crash(&mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn shutdown(mut self) {
        self.stop_serving().await;
    }

    async fn stop_serving(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(PATIENCE, task).await;
            assert!(
                matches!(result, Ok(Ok(Ok(())))),
                "the server did not stop cleanly: {result:?}"
            );
        }
    }

    /// Stops the server gracefully, then runs `between` while nothing
    /// listens, then starts a new server (a new context, as a new process
    /// would have) on the same address and database.
    pub async fn restart<F: Future<Output = ()>>(&mut self, between: F) {
        self.stop_serving().await;
        between.await;
        let listener = eventually("the port to be free again", || async {
            tokio::net::TcpListener::bind(self.addr).await.ok()
        })
        .await;
        let (context, stop, task) = serve(listener, self.config.clone()).await;
        self.context = context;
        self.stop = Some(stop);
        self.task = Some(task);
    }
}

type ServeTask = JoinHandle<Result<(), vmm_core::SetupError>>;

async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
) -> (Arc<Context>, oneshot::Sender<()>, ServeTask) {
    let context = Context::connect(config)
        .await
        .unwrap_or_else(|err| fail(format!("cannot start the server: {err}")));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(vmm_core::serve(listener, Arc::clone(&context), async {
        let _ = stopped.await;
    }));
    (context, stop, task)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A plain socket for framing tests: write any bytes, read reply lines.
pub struct RawConn {
    pub reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

/// The loopback address of simulated machine `n` (127.1.x.y, never
/// 127.0.0.1): clients of different machines are throttled and capped
/// apart, as the VMs of a fleet are.
pub fn machine(n: usize) -> std::net::IpAddr {
    let [_, _, x, y] = u32::try_from(n % 65_000 + 1)
        .unwrap_or_default()
        .to_be_bytes();
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 1, x, y))
}

/// A TCP connection to `addr` from machine `n`'s address.
pub async fn connect_from(n: usize, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4()
        .unwrap_or_else(|err| fail(format!("cannot make a socket: {err}")));
    socket
        .bind(SocketAddr::new(machine(n), 0))
        .unwrap_or_else(|err| fail(format!("cannot bind to {}: {err}", machine(n))));
    socket
        .connect(addr)
        .await
        .unwrap_or_else(|err| fail(format!("cannot connect: {err}")))
}

/// A client of `addr` from machine `n`'s address.
pub async fn client_from(n: usize, addr: SocketAddr) -> vmm_core::Client {
    vmm_core::Client::from_stream(connect_from(n, addr).await)
        .unwrap_or_else(|err| fail(format!("cannot set up a client: {err}")))
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|err| fail(format!("cannot connect: {err}")));
        RawConn::over(stream)
    }

    /// A raw connection from machine `n`'s address (see [`machine`]).
    pub async fn connect_from(n: usize, addr: SocketAddr) -> RawConn {
        RawConn::over(connect_from(n, addr).await)
    }

    fn over(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).unwrap_or_default();
        let (reader, writer) = stream.into_split();
        RawConn {
            reader: BufReader::new(reader),
            writer,
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer
            .write_all(bytes.as_ref())
            .await
            .unwrap_or_else(|err| fail(format!("write failed: {err}")));
    }

    /// The next reply line exactly as it came, newline included.
    pub async fn line(&mut self) -> String {
        let mut line = String::new();
        let read = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
            .await
            .unwrap_or_else(|_| fail("no reply in time".into()));
        match read {
            Ok(n) if n > 0 => line,
            _ => fail("the server closed the connection".into()),
        }
    }

    /// The next reply line as JSON; `None` when the server closed.
    pub async fn try_reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        let read = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
            .await
            .unwrap_or_else(|_| fail("no reply in time".into()));
        match read {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                assert!(
                    line.ends_with('\n'),
                    "a reply line ends with a newline: {line:?}"
                );
                Some(
                    serde_json::from_str(&line).unwrap_or_else(|err| {
                        fail(format!("a reply is not JSON ({err}): {line:?}"))
                    }),
                )
            }
        }
    }

    pub async fn reply(&mut self) -> Value {
        self.try_reply()
            .await
            .unwrap_or_else(|| fail("the server closed the connection".into()))
    }

    /// Sends one request (as a compact line) and returns its reply.
    pub async fn call(&mut self, request: Value) -> Value {
        self.send(format!("{request}\n")).await;
        self.reply().await
    }

    /// True once the server has closed the connection (reading to the end).
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_end(&mut self.reader, &mut rest),
        )
        .await;
        matches!(read, Ok(Ok(_)) | Ok(Err(_)))
    }
}

/// Asserts a reply is a success and returns its `data`.
#[track_caller]
pub fn ok(reply: &Value) -> &Value {
    assert_eq!(reply["status"], "success", "expected success, got {reply}");
    assert!(
        reply.get("code").is_none(),
        "a success has no code: {reply}"
    );
    &reply["data"]
}

/// Asserts a reply is an error with `code`.
#[track_caller]
pub fn err(reply: &Value, code: &str) {
    assert_eq!(reply["status"], "error", "expected an error, got {reply}");
    assert_eq!(reply["code"], code, "wrong code in {reply}");
    assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(reply["data"], serde_json::json!({}));
}

/// A polling deadline for loops whose check needs `&mut` access:
/// `loop { if done { break } deadline.tick().await }`.
pub struct Deadline {
    what: &'static str,
    until: Instant,
}

impl Deadline {
    pub fn new(what: &'static str) -> Deadline {
        Deadline::within(what, PATIENCE)
    }

    pub fn within(what: &'static str, limit: Duration) -> Deadline {
        Deadline {
            what,
            until: Instant::now() + limit,
        }
    }

    /// Waits a moment before the next check; fails once the deadline passed.
    pub async fn tick(&self) {
        if Instant::now() > self.until {
            fail(format!("timed out waiting for: {}", self.what));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` until it returns `Some`, failing after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            fail(format!("timed out waiting for: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The path of one of vmm-core's examples, which `cargo test --workspace`
/// builds before running any test. (The binaries' own tests live in their
/// crates, where cargo provides `CARGO_BIN_EXE_*`.)
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("examples").join(name))
        .unwrap_or_default();
    if !path.is_file() {
        fail(format!(
            "{} is not built; run the tests with `cargo test --workspace`, which builds it",
            path.display()
        ));
    }
    path
}

/// A registration with a valid password derived from the VM's name.
pub fn registration(vm_id: &str, ram: u32, disks: Vec<u32>) -> vmm_core::client::Registration {
    vmm_core::client::Registration {
        vm_id: vm_id.into(),
        ram,
        cpu: 1,
        password: password_for(vm_id),
        disks,
        registration_secret: None,
    }
}

/// A `vmm-server` process on a test database, listening on a port of its
/// own choosing (read from its JSON log).
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    log: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl ServerProcess {
    pub async fn spawn(binary: &str, db: &TestDb, args: &[&str]) -> ServerProcess {
        ServerProcess::spawn_command(Command::new(binary), db, args).await
    }

    /// Like [`ServerProcess::spawn`], through `command`, which runs the
    /// server with the arguments added to it (e.g. `sh -c '... exec "$0" "$@"'
    /// vmm-server`).
    pub async fn spawn_command(mut command: Command, db: &TestDb, args: &[&str]) -> ServerProcess {
        use std::io::BufRead;
        let binary = format!("{:?}", command.get_program());
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| fail(format!("cannot start {binary}: {err}")));
        // The server logs to stderr.
        let stderr = child
            .stderr
            .take()
            .unwrap_or_else(|| fail("no stderr".into()));
        let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&log);
        // Read the log until "listening", then keep draining it.
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "listening" {
                    let addr = entry["fields"]["address"]
                        .as_str()
                        .and_then(|a| a.parse().ok());
                    if let (Some(tx), Some(addr)) = (addr_tx.take(), addr) {
                        let _ = tx.send(addr);
                    }
                }
                if let Ok(mut log) = kept.lock() {
                    log.push(entry);
                }
            }
        });
        let addr = tokio::time::timeout(PATIENCE, addr_rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| fail(format!("{binary} did not log its address")));
        ServerProcess { child, addr, log }
    }

    /// The log lines (JSON) read so far.
    pub fn log(&self) -> Vec<Value> {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| fail("cannot wait for the server".into()))
    }
}

/// A test that fails does not leave its server running.
impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Nothing is signalled once the child has been waited for.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A password that is valid for the protocol, unique per VM name.
pub fn password_for(vm_id: &str) -> String {
    format!("pw-{vm_id}-secret")
}

/// What a client got for its `ping` from a server short of connections or
/// descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Pong,
    Busy,
}

/// Sends `ping` over `stream` and reads the reply line, which must be `PONG`
/// or `server_busy`: anything else, or none, fails the test. A refused client
/// may be closed before its request arrives, so a failed write is no failure.
/// Gives the connection back, for the caller to close.
pub async fn ping_or_busy(stream: TcpStream) -> (Answer, TcpStream) {
    let mut stream = BufReader::new(stream);
    let _ = stream.write_all(b"{\"command\":\"ping\"}\n").await;
    let mut line = String::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_line(&mut line)).await;
    let reply: Value = match read {
        Ok(Ok(n)) if n > 0 => serde_json::from_str(&line)
            .unwrap_or_else(|err| fail(format!("a reply is not JSON ({err}): {line:?}"))),
        Ok(Ok(_)) => fail("closed without a reply".into()),
        Ok(Err(err)) => fail(format!("no reply: {err}")),
        Err(_) => fail("no reply in time: the client was left hanging".into()),
    };
    let answer = if reply["status"] == "success" && reply["message"] == "PONG" {
        Answer::Pong
    } else if reply["code"] == "server_busy" {
        Answer::Busy
    } else {
        fail(format!("neither PONG nor server_busy: {reply}"))
    };
    (answer, stream.into_inner())
}

/// The entries of a JSON log that mention `marker` (case aside), after
/// asserting that no two fall in the same second.
#[track_caller]
pub fn at_most_one_a_second<'a>(log: &'a [Value], marker: &str) -> Vec<&'a Value> {
    let marker = marker.to_lowercase();
    let lines: Vec<&Value> = log
        .iter()
        .filter(|entry| entry.to_string().to_lowercase().contains(&marker))
        .collect();
    let mut seconds = std::collections::BTreeMap::<&str, usize>::new();
    for line in &lines {
        // RFC 3339: "2026-01-02T03:04:05.678901Z", to the second.
        let second = line["timestamp"].as_str().and_then(|t| t.get(..19));
        let second = second.unwrap_or_else(|| fail(format!("no timestamp in {line}")));
        *seconds.entry(second).or_default() += 1;
    }
    let crowded: Vec<_> = seconds.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        crowded.is_empty(),
        "more than one {marker:?} line a second: {crowded:?}"
    );
    lines
}

/// Writes `vms` VMs (`fleet-000001`, ...) with `disks` disks each straight
/// into the tables, in one transaction, as a fleet that registered long
/// ago. Their password hash is not a valid one: they are for lists. The
/// schema must exist (a server has started on `db`).
pub async fn seed_fleet(db: &TestDb, vms: usize, disks: usize) {
    let client = db.connect().await;
    let (vms, disks) = (vms as i64, disks as i64);
    client
        .batch_execute(&format!(
            "BEGIN; \
             INSERT INTO vms (vm_id, ram, cpu, password_hash) \
               SELECT 'fleet-' || lpad(g::text, 6, '0'), 1024, 2, '$argon2id$seeded' \
               FROM generate_series(1, {vms}) g; \
             INSERT INTO disks (vm_id, disk_size) \
               SELECT 'fleet-' || lpad(g::text, 6, '0'), 10 + d \
               FROM generate_series(1, {vms}) g, generate_series(1, {disks}) d; \
             COMMIT; ANALYZE vms; ANALYZE disks;"
        ))
        .await
        .unwrap_or_else(|err| fail(format!("cannot seed the fleet: {err}")));
}

/// A field of `/proc/PID/status`, in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| fail(format!("cannot read the status of {pid}: {err}")));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| fail(format!("no {field} in the status of {pid}")))
}
