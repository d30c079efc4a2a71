//! `watch --resume-file`: the `seq` of the last event shown, kept in a file
//! so that a restarted watcher asks for what came after it (`since`) and
//! loses nothing. The file holds the number and a newline.
//!
//! The one rule: the file never names an event that was not printed (and
//! flushed to stdout) yet, so a restart never skips one. It is written after
//! each event is printed, and after the `watch` reply (its `data.seq`), so
//! that a watcher that saw no event still resumes from where it started.
//!
//! Each write is a temporary file in the same directory renamed over the old
//! one: whoever reads the file sees a whole number, never half of one. The
//! writes are not each synced to disk: an fsync costs milliseconds on many
//! disks, and paying it per event would cap a watcher at a few hundred
//! events a second. The renamed file is synced at most [`SYNC_EVERY`] after
//! the first write that is not yet on disk, and when the watcher ends. So:
//! - a watcher that is killed (even with SIGKILL) leaves the file naming the
//!   last event it recorded; the restarted one repeats at most the event
//!   that was being printed when it was killed;
//! - a machine that loses power may come back with the file up to
//!   [`SYNC_EVERY`] older: the restarted watcher repeats the events of that
//!   last second, never skips one. On a file system that can commit a rename
//!   before the renamed file's data (ext4 by default does not, for a rename
//!   over an existing file), the file may come back empty: that is refused
//!   at start, naming the file, rather than taken as "from now on".

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::failure::{Failure, describe};

/// The longest a recorded `seq` may stay only in the page cache.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// A resume file in use.
#[derive(Debug)]
pub struct ResumeFile {
    path: PathBuf,
    /// The `seq` the file holds (as last written by this run).
    written: Option<i64>,
    /// When the first write not yet synced to disk was made.
    unsynced_since: Option<Instant>,
}

impl ResumeFile {
    /// Opens the resume file at `path` and returns the `seq` it holds:
    /// `None` when there is no file yet. A file that holds anything else is
    /// refused: taking it for "from now on" could skip events.
    pub fn open(path: PathBuf) -> Result<(ResumeFile, Option<i64>), Failure> {
        let seq = match std::fs::read_to_string(&path) {
            Ok(text) => Some(parse(&text).ok_or_else(|| {
                Failure::Usage(format!(
                    "the resume file {} does not hold a seq ({:?}): remove it to watch from \
                     now on, or pass --since SEQ",
                    path.display(),
                    text.chars().take(40).collect::<String>()
                ))
            })?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                return Err(Failure::Usage(format!(
                    "cannot read the resume file {}: {}",
                    path.display(),
                    describe(&err)
                )));
            }
        };
        let file = ResumeFile {
            path,
            written: seq,
            unsynced_since: None,
        };
        Ok((file, seq))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `seq`, the last event printed (or where the watch starts).
    /// Only call it once that event has been printed.
    pub fn record(&mut self, seq: i64) -> Result<(), Failure> {
        if self.written == Some(seq) {
            return Ok(());
        }
        write_renamed(&self.path, seq).map_err(|err| self.cannot("write", &err))?;
        self.written = Some(seq);
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// When the last write is due to be synced; `None` when it is.
    pub fn sync_at(&self) -> Option<Instant> {
        self.unsynced_since.map(|since| since + SYNC_EVERY)
    }

    /// Syncs the file and its directory (the rename) to disk, if a write
    /// is not synced yet.
    pub fn sync(&mut self) -> Result<(), Failure> {
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        std::fs::File::open(&self.path)
            .and_then(|file| file.sync_all())
            .map_err(|err| self.cannot("sync", &err))?;
        // A directory that cannot be opened or synced (some file systems)
        // leaves the rename to the kernel's own writeback.
        if let Ok(dir) = std::fs::File::open(crate::replace::dir_of(&self.path)) {
            let _ = dir.sync_all();
        }
        self.unsynced_since = None;
        Ok(())
    }

    fn cannot(&self, what: &str, err: &io::Error) -> Failure {
        Failure::Usage(format!(
            "cannot {what} the resume file {}: {}",
            self.path.display(),
            describe(err)
        ))
    }
}

/// The `seq` in a resume file's text: a number, 0 or more.
fn parse(text: &str) -> Option<i64> {
    text.trim().parse().ok().filter(|seq| *seq >= 0)
}

/// Writes `seq` to a temporary file next to `path` and renames it over
/// `path` (not synced: see the module's doc).
fn write_renamed(path: &Path, seq: i64) -> io::Result<()> {
    crate::replace::replace(path, format!("{seq}\n").as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-resume-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("watch.seq")
    }

    #[test]
    fn a_recorded_seq_is_what_the_next_run_resumes_from() {
        let path = temp_path("roundtrip");
        let (mut file, seq) = ResumeFile::open(path.clone()).unwrap();
        assert_eq!(seq, None);
        assert_eq!(file.sync_at(), None);
        file.record(41).unwrap();
        file.record(43).unwrap();
        assert!(file.sync_at().is_some());
        file.sync().unwrap();
        assert_eq!(file.sync_at(), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "43\n");
        let (_, seq) = ResumeFile::open(path.clone()).unwrap();
        assert_eq!(seq, Some(43));
        // No temporary file is left behind.
        let entries = std::fs::read_dir(crate::replace::dir_of(&path))
            .unwrap()
            .count();
        assert_eq!(entries, 1);
        let _ = std::fs::remove_dir_all(crate::replace::dir_of(&path));
    }

    #[test]
    fn a_file_without_a_seq_is_refused_and_named() {
        let path = temp_path("garbage");
        for text in ["", "\n", "soon\n", "-1\n", "12 13\n"] {
            std::fs::write(&path, text).unwrap();
            let err = ResumeFile::open(path.clone()).err().map(|f| f.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains(&path.display().to_string()), "{text:?}: {err}");
            assert!(err.contains("remove it"), "{text:?}: {err}");
        }
        std::fs::write(&path, " 7 \n").unwrap();
        assert_eq!(ResumeFile::open(path.clone()).unwrap().1, Some(7));
        let _ = std::fs::remove_dir_all(crate::replace::dir_of(&path));
    }
}
