//! `--split-cpus`: the bench's client on one half of the CPUs, the servers
//! it measures (the limit server, then the real one) on the other.
//!
//! Without it, on a small machine the client and the server take turns on
//! the same cores, and a server's rate over the limit's mostly compares
//! their CPU cost per request. Split, each side has its own cores, so the
//! figures say whether a server keeps up with what the client can drive.
//!
//! Threads inherit their creator's affinity: pinning the thread that builds
//! a runtime before building it places every thread of that runtime, and a
//! server whose threads are all pinned keeps new ones where they are.

use std::collections::HashMap;

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use serde::Serialize;

use crate::error::{BenchError, Result};
use crate::report::cpus_named;

/// Which CPUs each side of a split run gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Split {
    /// The bench's own threads, the client.
    pub client: Vec<usize>,
    /// The limit server's threads, and the real server's while it is
    /// measured.
    pub server: Vec<usize>,
}

impl Split {
    /// The CPUs the process had before the split: what a server started
    /// on this machine sizes its runtime by.
    pub fn all(&self) -> usize {
        self.client.len() + self.server.len()
    }
}

/// Splits `cpus` (the CPUs this process may use) in two: the client gets
/// the first half, the servers the rest. With an odd count the client gets
/// the extra one, so that it is the servers, not the client, that run out
/// of CPU first.
pub fn split(cpus: &[usize]) -> Result<Split> {
    let mut cpus = cpus.to_vec();
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.len() < 2 {
        return Err(BenchError::new(format!(
            "--split-cpus needs at least 2 CPUs, and this process may use only {}: \
             run without --split-cpus, or give it more CPUs (taskset, the container's cpuset)",
            if cpus.is_empty() {
                "none".to_owned()
            } else {
                cpus_named(&cpus)
            }
        )));
    }
    let server = cpus.split_off(cpus.len().div_ceil(2));
    Ok(Split {
        client: cpus,
        server,
    })
}

/// The CPUs the calling thread may run on (at the start of `main`: the
/// process's).
pub fn allowed() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(|err| {
        BenchError::new(format!("cannot read this process's CPU affinity: {err}"))
    })?;
    Ok(members(&set))
}

/// Restricts the calling thread to `cpus`; threads it starts afterwards
/// inherit them.
pub fn pin_this_thread(cpus: &[usize]) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &set_of(cpus)?).map_err(|err| {
        BenchError::new(format!(
            "cannot pin the bench's threads to {}: {err}",
            cpus_named(cpus)
        ))
    })
}

/// The CPUs of thread (or process) `tid`.
pub fn affinity_of(tid: u32) -> Result<Vec<usize>> {
    let set = sched_getaffinity(pid(tid)?)
        .map_err(|err| BenchError::new(format!("cannot read the CPU affinity of {tid}: {err}")))?;
    Ok(members(&set))
}

/// CPU numbers as Linux prints them: `0-3,6`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if j == i {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Passes over /proc/PID/task: a thread started by a thread not yet pinned
/// is caught by the next pass; once every thread is pinned, new ones are
/// born pinned.
const PIN_PASSES: usize = 10;

/// Another process's threads, pinned until [`Pinned::restore`] (or drop),
/// which gives each its affinity back.
#[derive(Debug)]
pub struct Pinned {
    pid: u32,
    /// Each pinned thread's affinity before.
    saved: HashMap<i32, CpuSet>,
    /// For threads born pinned during the run: the process's main thread's
    /// affinity before, which they would otherwise have inherited.
    before: CpuSet,
    restored: bool,
}

impl Pinned {
    /// Threads pinned (those that existed when the run began).
    pub fn threads(&self) -> usize {
        self.saved.len()
    }

    /// Gives every thread of the process its affinity from before; the
    /// threads that could not be given it back, if any, in the error.
    pub fn restore(mut self) -> Result<()> {
        self.restore_all()
    }

    fn restore_all(&mut self) -> Result<()> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        let tids = match threads(self.pid) {
            Ok(tids) => tids,
            // The server has exited: nothing to give back.
            Err(_) if !std::path::Path::new(&format!("/proc/{}", self.pid)).exists() => {
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let mut failed = Vec::new();
        for tid in tids {
            let set = self.saved.get(&tid).unwrap_or(&self.before);
            match sched_setaffinity(Pid::from_raw(tid), set) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(err) => failed.push(format!("thread {tid}: {err}")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BenchError::new(format!(
                "could not give the server (pid {}) its CPU affinity back ({}): \
                 `taskset -a -p -c CPUS {}` does it by hand",
                self.pid,
                failed.join(", "),
                self.pid
            )))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // An error here has no one to go to: restore() is the path that
        // reports one.
        let _ = self.restore_all();
    }
}

/// Pins every thread of process `pid` to `cpus`, keeping each one's
/// affinity to give back. An error leaves the process as it was.
pub fn pin_process(pid: u32, cpus: &[usize]) -> Result<Pinned> {
    let target = set_of(cpus)?;
    let cannot = |err: Errno| {
        let hint = match err {
            Errno::EPERM => {
                ": run vmm-bench as the server's user (or root), or without --split-cpus"
            }
            Errno::ESRCH => ": the process is gone",
            _ => "",
        };
        BenchError::new(format!(
            "cannot pin the server (pid {pid}) to {}: {err}{hint}",
            cpus_named(cpus)
        ))
    };
    let before = sched_getaffinity(self::pid(pid)?).map_err(cannot)?;
    let mut pinned = Pinned {
        pid,
        saved: HashMap::new(),
        before,
        restored: false,
    };
    for _ in 0..PIN_PASSES {
        let fresh: Vec<i32> = threads(pid)?
            .into_iter()
            .filter(|tid| !pinned.saved.contains_key(tid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for tid in fresh {
            let thread = Pid::from_raw(tid);
            let was = match sched_getaffinity(thread) {
                Ok(set) => set,
                // Ended since the listing.
                Err(Errno::ESRCH) => continue,
                Err(err) => return Err(cannot(err)),
            };
            match sched_setaffinity(thread, &target) {
                Ok(()) => {
                    pinned.saved.insert(tid, was);
                }
                Err(Errno::ESRCH) => {}
                Err(err) => return Err(cannot(err)),
            }
        }
    }
    Ok(pinned)
}

/// The thread ids of process `pid`.
fn threads(pid: u32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|err| {
        BenchError::new(format!("cannot list the server's threads in {dir}: {err}"))
    })?;
    Ok(entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect())
}

fn pid(pid: u32) -> Result<Pid> {
    i32::try_from(pid)
        .map(Pid::from_raw)
        .map_err(|_| BenchError::new(format!("{pid} is not a process id")))
}

fn set_of(cpus: &[usize]) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(|_| {
            BenchError::new(format!(
                "CPU {cpu} is beyond the {} CPUs an affinity mask holds",
                CpuSet::count()
            ))
        })?;
    }
    Ok(set)
}

fn members(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_gets_the_first_half_and_the_servers_the_rest() {
        let two = split(&[0, 1]).unwrap();
        assert_eq!((two.client, two.server), (vec![0], vec![1]));
        let four = split(&[3, 1, 0, 2]).unwrap();
        assert_eq!((four.client, four.server), (vec![0, 1], vec![2, 3]));
        // An odd count: the client gets the extra CPU.
        let three = split(&[4, 6, 9]).unwrap();
        assert_eq!((three.client, three.server), (vec![4, 6], vec![9]));
        let many: Vec<usize> = (0..64).collect();
        let halves = split(&many).unwrap();
        assert_eq!(halves.client, (0..32).collect::<Vec<_>>());
        assert_eq!(halves.server, (32..64).collect::<Vec<_>>());
        assert_eq!(halves.all(), 64);
        // The same CPU twice is one CPU.
        let err = split(&[5, 5]).unwrap_err();
        assert!(
            err.0.contains("at least 2 CPUs") && err.0.contains("CPU 5"),
            "{err}"
        );
        let err = split(&[]).unwrap_err();
        assert!(err.0.contains("only none"), "{err}");
    }

    #[test]
    fn cpu_lists_read_as_linux_prints_them() {
        assert_eq!(cpu_list(&[0]), "0");
        assert_eq!(cpu_list(&[0, 1]), "0-1");
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&[]), "");
    }

    /// A process of its own (`sleep`): pinned to one CPU, then given its
    /// affinity back.
    #[test]
    fn another_process_is_pinned_and_given_its_affinity_back() {
        let allowed = allowed().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let before = affinity_of(child.id()).unwrap();
        assert_eq!(before, allowed);
        let one = [*allowed.last().unwrap()];
        let pinned = pin_process(child.id(), &one).unwrap();
        assert_eq!(pinned.threads(), 1);
        assert_eq!(affinity_of(child.id()).unwrap(), one);
        pinned.restore().unwrap();
        assert_eq!(affinity_of(child.id()).unwrap(), before);

        // Dropped without restore(): given back too.
        let pinned = pin_process(child.id(), &one).unwrap();
        assert_eq!(affinity_of(child.id()).unwrap(), one);
        drop(pinned);
        assert_eq!(affinity_of(child.id()).unwrap(), before);

        // Gone before the end: nothing to give back, and no error.
        let pinned = pin_process(child.id(), &one).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        pinned.restore().unwrap();
        let err = pin_process(child.id(), &one).unwrap_err();
        assert!(err.0.contains(&format!("pid {}", child.id())), "{err}");
    }
}
