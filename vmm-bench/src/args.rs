//! The command line: a workload (or a scenario) and the options shared by
//! all of them.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Load benchmark for a vmm server: request rates, latencies, bytes per
/// reply and the server's resident memory.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmm-bench", version, about, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub workload: Option<Workload>,
    #[command(flatten)]
    pub options: Options,
}

const EXAMPLES: &str = "Examples:
  vmm-bench ping --conns 16 --secs 5
  vmm-bench ping --conns 16 --pipeline 16
  vmm-bench ping --conns 16 --split-cpus
  vmm-bench all_vms --conns 8 --ping-beside --seed 100000 --direct-db postgres://postgres@127.0.0.1:5432/vmm_bench
  vmm-bench register --count 1000 --conns 8
  vmm-bench idle --conns 10000
  vmm-bench scenario issue8 --direct-db postgres://postgres@127.0.0.1:5432/vmm_bench";

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Workload {
    /// `ping` on --conns connections, each with --pipeline requests in
    /// flight; run against the built-in limit server first (unless
    /// --no-limit), and the rate shown as a fraction of it.
    Ping,
    /// Registers new VMs (bench-<run>-<n>): --count of them (1,000 unless
    /// --secs is given), with the server's RSS before, right after and
    /// once it settles.
    Register,
    /// Password logins, in turn, as the bench's seeded VMs.
    Authenticate,
    /// `update` (RAM back and forth) from sessions authenticated as seeded VMs.
    Update,
    /// Full `list active_vms` in a loop on every connection.
    #[command(name = "active_vms", alias = "active-vms")]
    ActiveVms,
    /// Full `list authenticated_vms` in a loop on every connection.
    #[command(name = "authenticated_vms", alias = "authenticated-vms")]
    AuthenticatedVms,
    /// Full `list all_vms` in a loop on every connection.
    #[command(name = "all_vms", alias = "all-vms")]
    AllVms,
    /// Full `list all_disks` in a loop on every connection.
    #[command(name = "all_disks", alias = "all-disks")]
    AllDisks,
    /// The lists of --lists at once: connection n loops the n-th of them
    /// (round robin).
    Lists,
    /// Every page of each of --lists in turn, `limit` --page-size, on one
    /// connection; fails unless each entry comes exactly once and the pages
    /// hold as many as one full list. The fleet must not change meanwhile.
    Pages,
    /// Opens --conns connections that ping once and stay idle: the
    /// server's RSS per connection.
    Idle,
    /// A sequence of workloads (same as --scenario).
    Scenario {
        #[arg(value_enum)]
        name: Scenario,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// The figures the project tracks: ping at 1, 16 and 64 connections and
    /// pipelined 16x16 (with ratios to the limit); 1,000 registrations;
    /// 10,000 idle connections; then with --seed VMs (100,000 by default)
    /// one full all_vms, every page of all_vms and all_disks (--page-size),
    /// and 8 connections looping all_vms and all_disks with a ping beside.
    Issue8,
    /// issue8, then authenticate, update, active_vms and authenticated_vms.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum ListKind {
    #[value(name = "active_vms")]
    ActiveVms,
    #[value(name = "authenticated_vms")]
    AuthenticatedVms,
    #[value(name = "all_vms")]
    AllVms,
    #[value(name = "all_disks")]
    AllDisks,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::ActiveVms => "active_vms",
            ListKind::AuthenticatedVms => "authenticated_vms",
            ListKind::AllVms => "all_vms",
            ListKind::AllDisks => "all_disks",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct Options {
    /// The vmm server (host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:8888")]
    pub addr: String,

    /// Run a scenario instead of one workload.
    #[arg(long, global = true, value_enum)]
    pub scenario: Option<Scenario>,

    /// Connections [default: 1; register, authenticate and update 4; idle 1000].
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub conns: Option<u32>,

    /// Requests in flight per connection (ping): write P, read P replies, repeat.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub pipeline: u32,

    /// Seconds each timed workload runs [default: 5].
    #[arg(long, global = true)]
    pub secs: Option<f64>,

    /// Requests to make in all (register: VMs to register, default 1,000
    /// unless --secs is given); with --secs, whichever comes first.
    #[arg(long, global = true)]
    pub count: Option<u64>,

    /// Make sure this many bench VMs (bench-seed-<n>) exist before the
    /// workload: through `register` (one argon2 hash each on the server),
    /// or straight into the tables with --direct-db.
    #[arg(long, global = true)]
    pub seed: Option<usize>,

    /// PostgreSQL URL of the server's database, to seed with COPY instead
    /// of the protocol.
    #[arg(long, global = true, value_name = "URL")]
    pub direct_db: Option<String>,

    /// Disks of each seeded or registered VM.
    #[arg(long, global = true, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=64))]
    pub disks_per_vm: u8,

    /// The server's operator token, for the lists (else the bench registers
    /// a VM and reads as it). Prefer the environment variable: command
    /// lines are visible to every user.
    #[arg(long, global = true, env = "VMM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// The server's enrollment secret, when it requires one to register.
    #[arg(
        long,
        global = true,
        env = "VMM_REGISTRATION_SECRET",
        hide_env_values = true
    )]
    pub registration_secret: Option<String>,

    /// The lists that `lists` loops.
    #[arg(
        long,
        global = true,
        value_enum,
        value_delimiter = ',',
        default_value = "all_vms,all_disks"
    )]
    pub lists: Vec<ListKind>,

    /// Entries a page (`pages`): the `limit` of each `list` request.
    #[arg(long, global = true, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub page_size: u32,

    /// While the lists run, one more connection pings sequentially; its
    /// latency is reported.
    #[arg(long, global = true)]
    pub ping_beside: bool,

    /// Skip the limit server (no ratios).
    #[arg(long, global = true)]
    pub no_limit: bool,

    /// Ping workloads: measure the limit server and then the server this
    /// many times in turn, each for the workload's time, and give the
    /// median of the rounds' ratios. On a machine whose speed drifts (a
    /// virtual machine, other load), one round's ratio moves by ±10
    /// points; the median of several, each of two runs side by side in
    /// time, moves far less.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,

    /// Print one JSON document instead of the table.
    #[arg(long, global = true)]
    pub json: bool,

    /// The server's process id, for its RSS [default: the process that
    /// listens on --addr's port, when it runs on this machine].
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,

    /// The bench's client on the first half of the CPUs this process may
    /// use, the servers it measures on the other half: the limit server's
    /// threads, and the real server's (all of them, when it runs on this
    /// machine; their affinity is given back at the end). The ratios then
    /// say whether the server keeps up with what the client can drive,
    /// rather than how its CPU per request compares with the limit's.
    #[arg(long, global = true)]
    pub split_cpus: bool,

    /// Seconds any single connect, read or write may wait before the bench
    /// gives up on it.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub timeout: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_go_before_or_after_the_workload() {
        let cli =
            Cli::try_parse_from(["vmm-bench", "ping", "--conns", "16", "--secs", "5"]).unwrap();
        assert_eq!(cli.workload, Some(Workload::Ping));
        assert_eq!(cli.options.conns, Some(16));
        let cli = Cli::try_parse_from(["vmm-bench", "--pipeline", "8", "all-vms", "--ping-beside"])
            .unwrap();
        assert_eq!(cli.workload, Some(Workload::AllVms));
        assert!(cli.options.ping_beside);
        assert_eq!(cli.options.pipeline, 8);
        assert_eq!(cli.options.lists, [ListKind::AllVms, ListKind::AllDisks]);
        let cli = Cli::try_parse_from(["vmm-bench", "scenario", "issue8"]).unwrap();
        assert_eq!(
            cli.workload,
            Some(Workload::Scenario {
                name: Scenario::Issue8
            })
        );
        let cli = Cli::try_parse_from(["vmm-bench", "--scenario", "all"]).unwrap();
        assert_eq!(cli.options.scenario, Some(Scenario::All));
        assert!(!cli.options.split_cpus);
        let cli = Cli::try_parse_from(["vmm-bench", "--split-cpus", "scenario", "issue8"]).unwrap();
        assert!(cli.options.split_cpus);
        assert_eq!(
            cli.workload,
            Some(Workload::Scenario {
                name: Scenario::Issue8
            })
        );
        let cli = Cli::try_parse_from(["vmm-bench", "ping", "--split-cpus"]).unwrap();
        assert!(cli.options.split_cpus);
        assert!(Cli::try_parse_from(["vmm-bench", "ping", "--pipeline", "0"]).is_err());
    }
}
