//! The agent's state file: which of the server's disk ids stands for which
//! device (or `--disk` position). Without it the agent could not tell a
//! grown disk from a new one across restarts.
//!
//! ```json
//! {"vm_id": "stalin", "disks": {"vda": 3, "vdb": 4}}
//! ```
//!
//! It is written atomically (a temporary file in the same directory, synced,
//! then renamed over the old one), so a crash or power loss leaves either the
//! old mapping or the new one, never half of one.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::failure::describe;

/// Where the state file goes when neither `--state-file` nor
/// `$STATE_DIRECTORY` says: systemd's `StateDirectory=vmm-agent`.
pub const DEFAULT_DIR: &str = "/var/lib/vmm-agent";

/// Set by systemd for a unit with `StateDirectory=` (a colon-separated list
/// when it names several; the first is used).
pub const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub vm_id: String,
    /// Device name or `flag:N` → disk id.
    #[serde(default)]
    pub disks: BTreeMap<String, i64>,
}

/// `DIR/VM_ID.json`, DIR from `$STATE_DIRECTORY` (its first entry) or else
/// [`DEFAULT_DIR`]. A VM id that cannot be a file name is an error: the
/// operator must name the file.
pub fn default_path(vm_id: &str, state_directory: Option<&str>) -> Result<PathBuf, String> {
    let safe = !vm_id.is_empty()
        && !vm_id.starts_with('.')
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !safe {
        return Err(format!(
            "the VM id {vm_id:?} cannot name a state file: pass --state-file PATH"
        ));
    }
    let dir = state_directory
        .and_then(|dirs| dirs.split(':').find(|dir| !dir.is_empty()))
        .unwrap_or(DEFAULT_DIR);
    Ok(Path::new(dir).join(format!("{vm_id}.json")))
}

/// The state in `path`: `Ok(None)` when there is no file yet; an error when
/// it cannot be read or is not a state file of `vm_id`.
pub fn load(path: &Path, vm_id: &str) -> Result<Option<State>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(format!(
                "cannot read the state file {}: {}",
                path.display(),
                describe(&err)
            ));
        }
    };
    let state: State = serde_json::from_str(&text)
        .map_err(|err| format!("the state file {} is not valid: {err}", path.display()))?;
    if state.vm_id != vm_id {
        return Err(format!(
            "the state file {} is VM {:?}'s, not {vm_id:?}",
            path.display(),
            state.vm_id
        ));
    }
    Ok(Some(state))
}

/// Writes `state` to `path` atomically, creating its directory if need be.
pub fn save(path: &Path, state: &State) -> Result<(), String> {
    write_atomically(path, state).map_err(|err| {
        format!(
            "cannot write the state file {}: {}",
            path.display(),
            describe(&err)
        )
    })
}

fn write_atomically(path: &Path, state: &State) -> io::Result<()> {
    std::fs::create_dir_all(crate::replace::dir_of(path))?;
    let mut text = serde_json::to_vec(state).map_err(io::Error::other)?;
    text.push(b'\n');
    crate::replace::replace(path, &text, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_path_is_under_the_state_directory() {
        assert_eq!(
            default_path("stalin", None),
            Ok(PathBuf::from("/var/lib/vmm-agent/stalin.json"))
        );
        assert_eq!(
            default_path("stalin", Some("/run/state/vmm:/other")),
            Ok(PathBuf::from("/run/state/vmm/stalin.json"))
        );
        assert_eq!(
            default_path("stalin", Some("")),
            Ok(PathBuf::from("/var/lib/vmm-agent/stalin.json"))
        );
        for unsafe_id in ["", "..", ".hidden", "a/b", "a b"] {
            assert!(default_path(unsafe_id, None).is_err(), "{unsafe_id:?}");
        }
    }

    #[test]
    fn a_saved_state_loads_back_and_names_its_vm() {
        let dir = std::env::temp_dir().join(format!("vmm-agent-state-{}", std::process::id()));
        let path = dir.join("nested/stalin.json");
        assert_eq!(load(&path, "stalin"), Ok(None));
        let state = State {
            vm_id: "stalin".into(),
            disks: [("vda".to_owned(), 3), ("flag:0".to_owned(), 9)].into(),
        };
        let saved = save(&path, &state);
        let loaded = load(&path, "stalin");
        let other = load(&path, "lenin");
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("nested"))
            .map(|entries| entries.flatten().map(|entry| entry.file_name()).collect())
            .unwrap_or_default();
        std::fs::write(&path, "{not json").unwrap();
        let broken = load(&path, "stalin");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(saved, Ok(()));
        assert_eq!(loaded, Ok(Some(state)));
        assert!(other.is_err());
        assert!(broken.is_err());
        assert_eq!(leftovers, ["stalin.json"], "no temporary file is left");
    }

    #[test]
    fn an_unwritable_place_is_an_error_not_a_panic() {
        let state = State::default();
        let saved = save(Path::new("/proc/vmm-agent/x.json"), &state);
        assert!(saved.is_err());
    }
}
