//! `vmm-server`: parses its flags, sets up logging, and runs
//! [`vmm_core::serve`] until SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

/// jemalloc gives freed memory back to the OS (dirty pages within about 10 s,
/// blocks over 8 MiB at once), so a burst of work does not leave the process
/// holding its peak for good, as glibc's malloc did. Why this one and not
/// mimalloc: the README, under Memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The vmm server: virtual machines connect over TCP and speak JSON.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on: HOST:PORT, where HOST is an IP address or a
    /// name (`localhost:8888`, `0.0.0.0:8888`, `[::]:8888`).
    #[arg(long, env = "VMM_LISTEN", default_value = "127.0.0.1:8888", value_parser = listen_address)]
    listen: String,

    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = vmm_core::context::DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,

    /// Database connections in the pool.
    #[arg(long, env = "VMM_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    db_pool_size: u16,

    /// Open connections allowed; one more is answered `server_busy` and closed.
    /// Lowered, with a warning, to what fits under the open-file limit.
    #[arg(long, env = "VMM_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,

    /// Largest request in bytes; a larger one is answered `request_too_large` and the connection closed.
    #[arg(long, env = "VMM_MAX_REQUEST_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(64..))]
    max_request_bytes: u32,

    /// Close a connection that sends nothing for this many seconds (0, the
    /// default: never, as the original server did; TCP keepalive still drops
    /// clients that vanished).
    #[arg(long, env = "VMM_IDLE_TIMEOUT", default_value_t = 0)]
    idle_timeout: u64,

    /// This instance's name among the instances sharing the database: unique,
    /// and stable across restarts [default: HOSTNAME:PORT].
    #[arg(long, env = "VMM_INSTANCE_NAME")]
    instance_name: Option<String>,

    /// Seconds this instance counts as alive after its last lease renewal
    /// (renewed every fifth of that, at most every 2 s).
    #[arg(long, env = "VMM_INSTANCE_LEASE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    instance_lease: u64,

    /// Seconds change events stay in the event log, from which watchers
    /// resume (`watch` with `since`); the default is a day.
    #[arg(long, env = "VMM_EVENT_RETENTION", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    event_retention: u64,

    /// Enrollment secret: `register` must carry it as `registration_secret`.
    /// Prefer the environment variable: command lines are visible to every
    /// user of the machine.
    #[arg(long, env = "VMM_REGISTRATION_SECRET", hide_env_values = true)]
    registration_secret: Option<String>,

    /// argon2id memory cost of new password hashes, in KiB.
    #[arg(long, env = "VMM_ARGON2_MEMORY_KIB", default_value_t = 19_456)]
    argon2_memory_kib: u32,

    /// argon2id iterations of new password hashes.
    #[arg(long, env = "VMM_ARGON2_ITERATIONS", default_value_t = 2)]
    argon2_iterations: u32,

    /// argon2id lanes of new password hashes.
    #[arg(long, env = "VMM_ARGON2_PARALLELISM", default_value_t = 1)]
    argon2_parallelism: u32,

    /// Seconds a session token from `authenticate` stays valid.
    #[arg(long, env = "VMM_TOKEN_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    token_ttl: u64,

    /// Seconds a request may take to arrive once it has started; a slower
    /// one closes the connection (0: no limit).
    #[arg(long, env = "VMM_REQUEST_TIMEOUT", default_value_t = 10)]
    request_timeout: u64,

    /// Open connections allowed from one client address; one more is
    /// answered `server_busy` and closed.
    #[arg(long, env = "VMM_MAX_CONNECTIONS_PER_IP", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_ip: u32,

    /// File whose first line is the operator token (else $VMM_ADMIN_TOKEN):
    /// `authenticate {"admin_token"}` with it opens an operator session.
    #[arg(long, env = "VMM_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<std::path::PathBuf>,

    /// TLS certificate chain (PEM, leaf first). With --tls-key, every
    /// connection must speak TLS; plaintext ones are closed.
    #[arg(long, env = "VMM_TLS_CERT", value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// TLS private key (PEM) of --tls-cert.
    #[arg(long, env = "VMM_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// CA certificates (PEM) for mutual TLS: a client must present a
    /// certificate signed by one of them. Requires --tls-cert and --tls-key.
    #[arg(long, env = "VMM_TLS_CLIENT_CA", value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    tls_client_ca: Option<std::path::PathBuf>,

    /// Every connection starts with a PROXY protocol header (v2 or v1) from
    /// a balancer (HAProxy's `send-proxy-v2`), and the client address in it
    /// is the connection's peer: in the lists, the audit trail, login
    /// throttling and --max-connections-per-ip. A connection without a valid
    /// header is closed without a reply. Needs --proxy-protocol-from.
    #[arg(long, env = "VMM_PROXY_PROTOCOL", value_parser = clap::builder::BoolishValueParser::new())]
    proxy_protocol: bool,

    /// The balancers that may send PROXY headers, as address blocks or
    /// addresses, comma-separated (`172.16.0.0/12,10.0.0.5,fd00::/8`): a
    /// connection from any other peer is closed, since its header could
    /// name any address.
    #[arg(
        long,
        env = "VMM_PROXY_PROTOCOL_FROM",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    proxy_protocol_from: Vec<String>,

    /// Serve Prometheus metrics (`/metrics`), liveness (`/healthz`) and
    /// readiness (`/readyz`) over HTTP on this HOST:PORT [default: off].
    #[arg(long, env = "VMM_METRICS_LISTEN", value_parser = listen_address)]
    metrics_listen: Option<String>,

    /// Log format.
    #[arg(long, env = "VMM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The filter for `RUST_LOG`'s directives, or the default ones when it is
/// unset or invalid: refinery logs each migration it applies, as does
/// `Store::migrate` (with the version's name), and one line each is enough.
///
/// Directives of targets and levels only (all but span and field filters)
/// become a [`Targets`] filter. [`EnvFilter`] takes a lock that all threads
/// share each time a span is entered and left, and each connection's task
/// enters its span every time it runs: for a fleet that pings, two
/// acquisitions of one lock, from every core, per request. Span and field
/// filters still work, through [`EnvFilter`].
fn log_filter(directives: Option<&str>) -> (Option<Targets>, Option<EnvFilter>) {
    const DEFAULT: &str = "info,refinery_core=warn";
    let directives = directives.filter(|given| !given.trim().is_empty());
    let directives = match directives {
        Some(given) if EnvFilter::try_new(given).is_ok() => given,
        _ => DEFAULT,
    };
    // Span and field filters are written in brackets, which no target has
    // (and which `Targets` would take for part of a target's name).
    let targets = (!directives.contains('['))
        .then(|| directives.parse::<Targets>().ok())
        .flatten();
    match targets {
        Some(targets) => (Some(targets), None),
        None => (None, EnvFilter::try_new(directives).ok()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (targets, dynamic) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    // Logs are diagnostics: stderr, as services are expected to write them,
    // with colour only for a person at a terminal who has not opted out.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::registry().with(targets).with(dynamic);
    let text = fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
    match args.log_format {
        LogFormat::Text => logs.with(text).init(),
        LogFormat::Json => logs.with(text.json()).init(),
    }
    let proxy_protocol = proxy_protocol(&args);
    // Before anything is opened: every connection is a descriptor, and
    // `serve` fits --max-connections under the soft limit it finds.
    match vmm_core::descriptors::raise_limit() {
        Ok(limit) if limit.now > limit.before => tracing::info!(
            from = limit.before,
            to = limit.now,
            "raised the open-file limit (RLIMIT_NOFILE) to the hard limit"
        ),
        Ok(limit) => tracing::info!(limit = limit.now, "open-file limit (RLIMIT_NOFILE)"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }

    let config = vmm_core::Config {
        database_url: args.database_url,
        db_pool_size: usize::from(args.db_pool_size),
        max_connections: args.max_connections as usize,
        max_request_bytes: args.max_request_bytes as usize,
        shutdown_grace: Duration::from_secs(5),
        idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
        instance_lease: Duration::from_secs(args.instance_lease),
        event_retention: Duration::from_secs(args.event_retention),
        registration_secret: args.registration_secret.filter(|secret| !secret.is_empty()),
        token_ttl: Duration::from_secs(args.token_ttl),
        request_timeout: (args.request_timeout > 0)
            .then(|| Duration::from_secs(args.request_timeout)),
        max_connections_per_ip: args.max_connections_per_ip as usize,
        hash_cost: vmm_core::password::HashCost {
            memory_kib: args.argon2_memory_kib,
            iterations: args.argon2_iterations,
            parallelism: args.argon2_parallelism,
        },
        presence_interval: (Duration::from_secs(args.instance_lease) / 5)
            .min(Duration::from_secs(2)),
        ..vmm_core::Config::default()
    };
    let admin_token = match admin_token(args.admin_token_file.as_deref()) {
        Ok(token) => token,
        Err(err) => {
            tracing::error!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let config = vmm_core::Config {
        admin_token,
        ..config
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let client_ca = args.tls_client_ca.as_deref();
            match vmm_core::tls::server_config(cert, key, client_ca) {
                Ok(tls) => {
                    tracing::info!(
                        mutual = client_ca.is_some(),
                        "TLS on: plaintext connections are refused"
                    );
                    Some(tls)
                }
                Err(err) => {
                    tracing::error!("{err}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => {
            tracing::info!("TLS off: connections are plaintext");
            None
        }
    };
    if let Some(proxy) = &proxy_protocol {
        let trusted: Vec<String> = proxy.trusted.iter().map(ToString::to_string).collect();
        tracing::info!(
            from = trusted.join(","),
            "PROXY protocol on: every connection must start with a header from these peers"
        );
    }
    let config = vmm_core::Config {
        tls,
        proxy_protocol,
        ..config
    };
    match run(args.listen, args.metrics_listen, args.instance_name, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    listen: String,
    metrics_listen: Option<String>,
    instance_name: Option<String>,
    mut config: vmm_core::Config,
) -> Result<(), Box<dyn std::error::Error>> {
    // Bind first: the instance is named after the port it really got.
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
    let address = listener.local_addr()?;
    let metrics_listener = match &metrics_listen {
        Some(metrics_listen) => Some(
            tokio::net::TcpListener::bind(metrics_listen)
                .await
                .map_err(|err| format!("cannot listen on {metrics_listen} for metrics: {err}"))?,
        ),
        None => None,
    };
    config.instance_name =
        instance_name.unwrap_or_else(|| format!("{}:{}", hostname(), address.port()));
    let context = vmm_core::Context::connect(config).await?;
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = match metrics_listener {
        Some(metrics_listener) => {
            let metrics_address = metrics_listener.local_addr()?;
            tracing::info!(address = %metrics_address, "serving metrics and health checks");
            Some(tokio::spawn(vmm_core::health::serve(
                metrics_listener,
                std::sync::Arc::clone(&context),
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };
    tracing::info!(%address, "listening");
    vmm_core::serve(listener, context, shutdown_signal()).await?;
    drop(stop_metrics);
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The PROXY protocol's settings, or a usage error. There is no default
/// for the trusted peers: any default (private ranges, say) would include
/// the VMs themselves on many networks, and a VM that reaches the server
/// around the balancer could then name any address. The trusted peers
/// without the protocol are only a warning, so that a deployment can keep
/// them in its settings and switch the protocol alone.
fn proxy_protocol(args: &Args) -> Option<vmm_core::proxy_protocol::ProxyProtocol> {
    use clap::CommandFactory;
    let usage = |kind, message: &str| -> ! { Args::command().error(kind, message).exit() };
    // Empty entries are none, so that an empty VMM_PROXY_PROTOCOL_FROM
    // (`${VAR:-}` in a compose file) is the flag not given.
    let trusted = args
        .proxy_protocol_from
        .iter()
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| entry.parse::<vmm_core::proxy_protocol::Cidr>())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|err| {
            usage(
                clap::error::ErrorKind::ValueValidation,
                &format!("invalid value for --proxy-protocol-from: {err}"),
            )
        });
    match (args.proxy_protocol, trusted.is_empty()) {
        (false, true) => None,
        (true, false) => Some(vmm_core::proxy_protocol::ProxyProtocol { trusted }),
        (true, true) => usage(
            clap::error::ErrorKind::MissingRequiredArgument,
            "--proxy-protocol needs --proxy-protocol-from (VMM_PROXY_PROTOCOL_FROM): the \
             addresses of the balancers, such as 172.16.0.0/12 for a Docker network",
        ),
        (false, false) => {
            tracing::warn!(
                "--proxy-protocol-from is ignored: the PROXY protocol is off \
                 (--proxy-protocol, VMM_PROXY_PROTOCOL=true turns it on)"
            );
            None
        }
    }
}

/// HOST:PORT with a port that is a number: a name is resolved when the
/// server binds, so that `localhost:8888` works as well as an address.
fn listen_address(text: &str) -> Result<String, String> {
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(text.to_owned());
    }
    match text.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok() =>
        {
            Ok(text.to_owned())
        }
        _ => Err("expected HOST:PORT, such as 127.0.0.1:8888, localhost:8888 or [::]:8888".into()),
    }
}

/// The operator token, from the file's first line or `VMM_ADMIN_TOKEN`.
fn admin_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the admin token file {}: {err}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        None => std::env::var("VMM_ADMIN_TOKEN").unwrap_or_default(),
    };
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() < 16 {
        return Err("the admin token must be at least 16 characters".into());
    }
    Ok(Some(token))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_filter;

    #[test]
    fn targets_and_levels_are_filtered_without_env_filter() {
        let (targets, dynamic) = log_filter(Some("vmm_core=debug,warn"));
        let targets = targets.expect("plain directives make a Targets filter");
        assert!(dynamic.is_none());
        assert!(targets.would_enable("vmm_core::server", &Level::DEBUG));
        assert!(!targets.would_enable("vmm_core::server", &Level::TRACE));
        assert!(targets.would_enable("tokio_postgres", &Level::WARN));
        assert!(!targets.would_enable("tokio_postgres", &Level::INFO));
    }

    #[test]
    fn span_and_field_filters_still_work_through_env_filter() {
        for directives in [
            "[connection]=debug",
            "info,[connection{peer=\"10.0.0.1:5000\"}]=trace",
        ] {
            let (targets, dynamic) = log_filter(Some(directives));
            assert!(targets.is_none(), "{directives}");
            assert!(dynamic.is_some(), "{directives}");
        }
    }

    #[test]
    fn unset_empty_or_invalid_directives_log_info_without_refinery() {
        for directives in [None, Some(""), Some("  "), Some("vmm_core=loud")] {
            let (targets, dynamic) = log_filter(directives);
            let targets = targets.expect("the default is a Targets filter");
            assert!(dynamic.is_none());
            assert!(
                targets.would_enable("vmm_core", &Level::INFO),
                "{directives:?}"
            );
            assert!(
                !targets.would_enable("vmm_core", &Level::DEBUG),
                "{directives:?}"
            );
            assert!(
                !targets.would_enable("refinery_core::runner", &Level::INFO),
                "{directives:?}"
            );
            assert!(
                targets.would_enable("refinery_core::runner", &Level::WARN),
                "{directives:?}"
            );
        }
    }
}
