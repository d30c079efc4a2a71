//! `vmm-client watch`: authenticate, send `watch`, then print each change
//! event as it arrives (see [`crate::events`] for the format) until SIGINT or
//! SIGTERM (exit 0) or until the connection is lost (exit 3).
//!
//! A server run with `--idle-timeout` (or a balancer with an idle limit)
//! closes a connection that sends nothing for that long, and receiving
//! events does not count: so while it waits, `watch` sends a
//! `ping` whenever the connection has sent nothing for `--keepalive`, and
//! prints the events that arrive before the ping's reply, in order.

use std::time::Duration;

use crate::conn::{Conn, sleep_until};
use crate::failure::Failure;
use crate::op::Op;
use crate::password;
use crate::signals::Signals;

/// Who watches, and what.
#[derive(Debug)]
pub struct Watch {
    /// Who to authenticate as: a VM (and how to get its password), or the
    /// operator with this admin token.
    pub who: Who,
    /// Topic names; none: every topic.
    pub topics: Vec<String>,
}

#[derive(Debug)]
pub enum Who {
    Vm { vm_id: String, password_stdin: bool },
    Operator { admin_token: String },
}

/// Runs until a signal (`Ok`) or a failure.
pub async fn run(
    addr: &str,
    json: bool,
    keepalive: Option<Duration>,
    watch: Watch,
) -> Result<(), Failure> {
    // Not before: a prompt for the password must stay interruptible.
    let login = match watch.who {
        Who::Vm {
            vm_id,
            password_stdin,
        } => {
            let password = password::obtain_async(password_stdin, &vm_id).await?;
            Op::Authenticate { vm_id, password }
        }
        Who::Operator { admin_token } => Op::Operator { admin_token },
    };
    let mut signals = Signals::install()
        .map_err(|err| Failure::Usage(format!("cannot handle signals: {err}")))?;
    let start = async {
        let mut conn = Conn::connect(addr, json).await?;
        conn.authenticate(&login).await?;
        conn.run(&Op::Watch(watch.topics)).await?;
        Ok::<Conn, Failure>(conn)
    };
    let mut conn = tokio::select! {
        biased;
        _ = signals.recv() => return Ok(()),
        conn = start => conn?,
    };
    loop {
        let ping_at = keepalive.map(|idle| conn.idle_until(idle));
        tokio::select! {
            biased;
            _ = signals.recv() => return Ok(()),
            () = sleep_until(ping_at) => {
                tokio::select! {
                    biased;
                    _ = signals.recv() => return Ok(()),
                    pinged = conn.keepalive() => pinged?,
                }
            }
            event = conn.show_next_event() => event?,
        }
    }
}
