//! Small text forms that modules on different branches of the crate share:
//! a line without its ending, for whatever reads lines (the one-shot
//! password, the shell's input thread, the agent's password file), and a
//! VM's disks as `ID:SIZEG`, in tables ([`crate::render`]) and in event
//! lines ([`crate::events`]). They live here, depending on nothing in the
//! crate, so that sharing them ties those modules to none of the others.

use vmm_core::protocol::DiskView;

/// A line without its line ending (`\n` or `\r\n`).
pub fn chomp(mut line: String) -> String {
    if line.ends_with('\n') {
        line.pop();
        if line.ends_with('\r') {
            line.pop();
        }
    }
    line
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_line_ending_is_stripped() {
        assert_eq!(chomp("pass word \n".into()), "pass word ");
        assert_eq!(chomp("secret\r\n".into()), "secret");
        assert_eq!(chomp("secret".into()), "secret");
        assert_eq!(chomp("\n".into()), "");
    }
}
