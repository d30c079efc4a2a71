//! `vmm-client watch`: authenticate, send `watch`, then print each change
//! event as it arrives (see [`crate::events`] for the format) until SIGINT or
//! SIGTERM (exit 0) or until the connection is lost (exit 3).
//!
//! A server run with `--idle-timeout` (or a balancer with an idle limit)
//! closes a connection that sends nothing for that long, and receiving
//! events does not count: so while it waits, `watch` sends a
//! `ping` whenever the connection has sent nothing for `--keepalive`, and
//! prints the events that arrive before the ping's reply, in order.
//!
//! `--since SEQ` starts after that event, from the server's event log;
//! `--resume-file` keeps the `seq` of the last event printed (see
//! [`crate::resume`]) and starts after it. A lost connection still ends the
//! run (exit 3) rather than reconnecting here: whatever restarts the watcher
//! (systemd, a supervisor, a shell loop) restarts it with the resume file,
//! and it misses nothing. A `since` the server no longer keeps is `gone`:
//! the run fails (exit 1) and says what to do, never skipping events
//! silently.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmm_core::{ErrorCode, Reply};

use crate::conn::{Conn, sleep_until};
use crate::failure::Failure;
use crate::op::Op;
use crate::password;
use crate::resume::ResumeFile;
use crate::signals::Signals;

/// Who watches, and what.
#[derive(Debug)]
pub struct Watch {
    /// Who to authenticate as: a VM (and how to get its password), or the
    /// operator with this admin token.
    pub who: Who,
    /// Topic names; none: every topic.
    pub topics: Vec<String>,
    /// Start after this `seq` (it wins over the resume file's).
    pub since: Option<i64>,
    /// Where the last `seq` printed is kept, and the watch resumes from.
    pub resume_file: Option<PathBuf>,
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
    // Before the password and the connection: a bad file costs neither.
    let (mut resume, resumed) = match watch.resume_file {
        Some(path) => {
            let (file, seq) = ResumeFile::open(path)?;
            (Some(file), seq)
        }
        None => (None, None),
    };
    let since = watch.since.or(resumed);
    // The file to name if its `seq` turns out to be gone.
    let gone_file = match (&resume, watch.since) {
        (Some(file), None) if resumed.is_some() => Some(file.path().to_owned()),
        _ => None,
    };
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
    let op = Op::Watch {
        topics: watch.topics,
        since,
    };
    let start = async {
        let mut conn = Conn::connect(addr, json).await?;
        conn.authenticate(&login).await?;
        let reply = match conn.try_run(&op).await? {
            Ok(reply) => reply,
            Err(refusal) => return Err(refused(&refusal, since, gone_file.as_deref())),
        };
        Ok::<(Conn, Reply), Failure>((conn, reply))
    };
    let (mut conn, reply) = tokio::select! {
        biased;
        _ = signals.recv() => return Ok(()),
        started = start => started?,
    };
    if let Some(file) = &mut resume {
        let Some(seq) = reply.data.get("seq").and_then(Value::as_i64) else {
            return Err(Failure::Usage(format!(
                "the server at {addr} does not number its events (no `seq` in the watch \
                 reply): --resume-file needs a newer server"
            )));
        };
        file.record(seq)?;
    }
    let ended = follow(&mut conn, keepalive, &mut signals, resume.as_mut()).await;
    // Whatever ended it (a signal may have come between printing the events
    // a ping brought and recording them), what was printed is recorded, and
    // on disk.
    let Some(file) = &mut resume else {
        return ended;
    };
    let recorded = conn.last_seq().map_or(Ok(()), |seq| file.record(seq));
    ended.and(recorded).and(file.sync())
}

/// Prints events until a signal (`Ok`) or a failure, recording each one's
/// `seq` in `resume` once it is printed.
async fn follow(
    conn: &mut Conn,
    keepalive: Option<Duration>,
    signals: &mut Signals,
    mut resume: Option<&mut ResumeFile>,
) -> Result<(), Failure> {
    loop {
        let ping_at = keepalive.map(|idle| conn.idle_until(idle));
        let sync_at = resume.as_deref().and_then(ResumeFile::sync_at);
        tokio::select! {
            biased;
            _ = signals.recv() => return Ok(()),
            () = sleep_until(sync_at) => {
                if let Some(file) = resume.as_deref_mut() {
                    file.sync()?;
                }
            }
            () = sleep_until(ping_at) => {
                tokio::select! {
                    biased;
                    _ = signals.recv() => return Ok(()),
                    pinged = conn.keepalive() => pinged?,
                }
            }
            event = conn.show_next_event() => event?,
        }
        // The events a ping's reply brought along are printed too.
        if let (Some(file), Some(seq)) = (resume.as_deref_mut(), conn.last_seq()) {
            file.record(seq)?;
        }
    }
}

/// The failure a refused `watch` stands for: a `gone` one says what the
/// server still keeps and what to do about it.
/// `file`: the resume file `since` came from.
fn refused(refusal: &Reply, since: Option<i64>, file: Option<&Path>) -> Failure {
    let (Some(ErrorCode::Gone), Some(since)) = (refusal.code, since) else {
        return Failure::from_reply(refusal);
    };
    let seq = |key: &str| refusal.data.get(key).and_then(Value::as_i64);
    let latest = seq("latest").map_or_else(|| "unknown".to_owned(), |seq| seq.to_string());
    let what = match (seq("oldest"), seq("latest")) {
        (_, Some(latest)) if since > latest => format!(
            "the server never issued seq {since} (its latest is {latest}: another database, \
             or one restored from a backup?)"
        ),
        (Some(oldest), _) => format!(
            "the server no longer keeps the events after seq {since} (it keeps {oldest} to \
             {latest}): those in between are lost"
        ),
        (None, _) => format!(
            "the server no longer keeps the events after seq {since} (it keeps none; the \
             latest is {latest}): those in between are lost"
        ),
    };
    let todo = match file {
        Some(file) => format!(
            "remove the resume file {} to watch from now on (or pass --since with a seq the \
             server keeps), and list to see the current state",
            file.display()
        ),
        None => "watch without --since to start from now on, and list to see the current state"
            .to_owned(),
    };
    Failure::Server {
        message: format!("cannot resume: {what}; {todo}"),
        code: Some(ErrorCode::Gone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gone(oldest: Value, latest: i64) -> Reply {
        let mut reply = Reply::error(ErrorCode::Gone, "the events after 7 are no longer kept");
        reply.data.insert("oldest".into(), oldest);
        reply.data.insert("latest".into(), json!(latest));
        reply
    }

    #[test]
    fn a_gone_since_says_what_the_server_keeps_and_what_to_do() {
        let file = Path::new("/var/lib/w.seq");
        let pruned = refused(&gone(json!(120), 4711), Some(7), Some(file)).to_string();
        for said in [
            "after seq 7",
            "it keeps 120 to 4711",
            "are lost",
            "/var/lib/w.seq",
        ] {
            assert!(pruned.contains(said), "{said:?}: {pruned}");
        }
        let failure = refused(&gone(Value::Null, 9), Some(7), None);
        assert_eq!(failure.exit_code(), 1);
        let none = failure.to_string();
        for said in ["keeps none", "latest is 9", "without --since", "(gone)"] {
            assert!(none.contains(said), "{said:?}: {none}");
        }
        let ahead = refused(&gone(json!(1), 9), Some(70), None).to_string();
        assert!(ahead.contains("never issued seq 70"), "{ahead}");
        // Any other refusal is the server's own.
        let other = Reply::error(ErrorCode::InvalidParams, "no");
        assert_eq!(
            refused(&other, Some(7), None).to_string(),
            "no (invalid_params)"
        );
    }
}
