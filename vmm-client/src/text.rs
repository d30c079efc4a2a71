//! Small text forms that modules on different branches of the crate share:
//! a VM's disks as `ID:SIZEG`, in tables ([`crate::render`]) and in event
//! lines ([`crate::events`]). They live here, depending on nothing in the
//! crate, so that sharing them ties those modules to neither.

use vmm_core::protocol::DiskView;

/// The disks as `ID:SIZEG` joined by `separator`, or `-` for none.
pub fn disks_joined(disks: &[DiskView], separator: &str) -> String {
    if disks.is_empty() {
        return "-".to_owned();
    }
    disks
        .iter()
        .map(|disk| format!("{}:{}G", disk.id, disk.disk_size))
        .collect::<Vec<_>>()
        .join(separator)
}
