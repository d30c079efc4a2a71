//! Replacing a small file whole: the new text goes to a temporary file
//! beside it, which is renamed over it, so that a reader (or the next run,
//! after a crash) finds the old text or the new one, never half of either.
//! The agent's state file and `watch --resume-file` both keep their state
//! this way.

use std::io::{self, Write};
use std::path::Path;

/// The directory `path` is in (`.` for a bare file name).
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Replaces `path`'s content with `text`. With `durable`, the text is
/// synced before the rename and the directory after it, so that the new
/// text survives a power loss once this returns; without, it costs no
/// disk flush (for a caller that syncs on its own schedule).
pub fn replace(path: &Path, text: &[u8], durable: bool) -> io::Result<()> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = dir.join(temp_name);
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text)?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
        return written;
    }
    // The rename is durable once the directory is; a directory that cannot
    // be opened or synced (some file systems) leaves the file written.
    if durable && let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
