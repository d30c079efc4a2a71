//! The difference between what the agent wants and the server's record of
//! its VM, as one `update`; pure, so that every case is a unit test.
//!
//! The rules:
//! - ram and cpu are set when anything differs;
//! - a disk whose key (device or `flag:N`) maps to a disk id of the VM grows
//!   in place; one that would shrink is not sent ([`Notice::Shrink`]);
//! - a wanted disk with no disk id is attached, and its new id recorded, so
//!   it is attached once;
//! - a mapped disk whose device is gone is left attached
//!   ([`Notice::Missing`]); `update` leaves disks it does not name alone, so
//!   nothing is ever detached;
//! - the VM's disks that no key maps to are left alone, except when the
//!   mapping knows none of the VM's disks at all (a first run for a VM that
//!   exists, or a lost state file): then the wanted disks take the VM's
//!   disks in id order, as `register` created them from the same list,
//!   instead of attaching every disk a second time.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use vmm_core::client::Update;
use vmm_core::protocol::{VmView, limits};

use super::wanted::Wanted;

/// Something the agent does not send, and says so.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Notice {
    /// The device is smaller than the server's record of its disk.
    Shrink {
        key: String,
        id: i64,
        from: u32,
        to: u32,
    },
    /// A mapped device is gone.
    Missing { key: String, id: i64 },
    /// The state file maps the device to a disk the VM does not have (a
    /// state file from another server's database): it is attached anew.
    Stale { key: String, id: i64 },
    /// Attaching these would exceed the disk limit.
    TooMany { keys: Vec<String> },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Shrink { key, id, from, to } => write!(
                f,
                "warning: {key} is {to} GiB, smaller than disk {id}'s {from} GiB; \
                 a disk does not shrink, so it is not sent"
            ),
            Notice::Missing { key, id } => write!(
                f,
                "warning: {key} (disk {id}) is missing; the disk stays attached"
            ),
            Notice::Stale { key, id } => write!(
                f,
                "warning: the state file maps {key} to disk {id}, which the VM does not have; \
                 attaching {key} as a new disk"
            ),
            Notice::TooMany { keys } => write!(
                f,
                "warning: a VM has at most {} disks; not attaching {}",
                limits::MAX_DISKS,
                keys.join(", ")
            ),
        }
    }
}

/// What to do about one difference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The one `update` to send; `None` when the record is true already.
    pub update: Option<Update>,
    /// The keys of `update.attach`, in the same order.
    pub attach_keys: Vec<String>,
    /// The mapping after the update (before the attached disks' ids, which
    /// only the reply tells).
    pub mapping: BTreeMap<String, i64>,
    pub notices: Vec<Notice>,
}

/// Plans the update that makes `server` what `wanted` says, given the
/// state file's `mapping`.
pub fn plan(wanted: &Wanted, server: &VmView, mapping: &BTreeMap<String, i64>) -> Plan {
    let sizes: BTreeMap<i64, u32> = server
        .disks
        .iter()
        .map(|disk| (disk.id, disk.disk_size))
        .collect();
    let mut notices = Vec::new();
    let mut known = BTreeMap::new();
    for (key, id) in mapping {
        if sizes.contains_key(id) {
            known.insert(key.clone(), *id);
        } else if wanted.disks.iter().any(|disk| &disk.key == key) {
            notices.push(Notice::Stale {
                key: key.clone(),
                id: *id,
            });
        }
    }

    if known.is_empty() {
        // Adopt the VM's disks in id order (see the module's doc).
        let mut unmapped = sizes.keys();
        for disk in &wanted.disks {
            match unmapped.next() {
                Some(id) => known.insert(disk.key.clone(), *id),
                None => break,
            };
        }
    }

    let mut update = Update::default();
    let mut attach_keys = Vec::new();
    let mut too_many = Vec::new();
    let room = limits::MAX_DISKS.saturating_sub(server.disks.len());
    for disk in &wanted.disks {
        match known
            .get(&disk.key)
            .and_then(|id| Some((*id, *sizes.get(id)?)))
        {
            Some((id, size)) if disk.size > size => update.resize.push((id, disk.size)),
            Some((id, size)) if disk.size < size => notices.push(Notice::Shrink {
                key: disk.key.clone(),
                id,
                from: size,
                to: disk.size,
            }),
            Some(_) => {}
            None if attach_keys.len() < room => {
                update.attach.push(disk.size);
                attach_keys.push(disk.key.clone());
            }
            None => too_many.push(disk.key.clone()),
        }
    }
    if !too_many.is_empty() {
        notices.push(Notice::TooMany { keys: too_many });
    }
    let wanted_keys: HashSet<&str> = wanted.disks.iter().map(|disk| disk.key.as_str()).collect();
    for (key, id) in &known {
        if !wanted_keys.contains(key.as_str()) {
            notices.push(Notice::Missing {
                key: key.clone(),
                id: *id,
            });
        }
    }

    let differs = wanted.ram != server.ram
        || wanted.cpu != server.cpu
        || !update.resize.is_empty()
        || !update.attach.is_empty();
    let update = differs.then_some(Update {
        ram: Some(wanted.ram),
        cpu: Some(wanted.cpu),
        ..update
    });
    Plan {
        update,
        attach_keys,
        mapping: known,
        notices,
    }
}

/// The ids of the `count` disks an update attached: the newest ids of the
/// VM after it that it did not have before. The server inserts them in the
/// order given, under the VM's row lock, so they are the last ones and come
/// in that order. `None` when the reply does not show that many new disks.
pub fn attached_ids(before: &VmView, after: &VmView, count: usize) -> Option<Vec<i64>> {
    let old: HashSet<i64> = before.disks.iter().map(|disk| disk.id).collect();
    let mut new: Vec<i64> = after
        .disks
        .iter()
        .map(|disk| disk.id)
        .filter(|id| !old.contains(id))
        .collect();
    new.sort_unstable();
    let skip = new.len().checked_sub(count)?;
    Some(new.split_off(skip))
}

/// Notices logged once per change: a notice is logged when it first
/// appears, and again only after it went away and came back, or changed
/// (a disk that shrank further).
#[derive(Debug, Default)]
pub struct Once {
    last: HashSet<String>,
}

impl Once {
    /// The notices of this round that were not logged in the last one.
    pub fn fresh(&mut self, current: impl IntoIterator<Item = String>) -> Vec<String> {
        let current: Vec<String> = current.into_iter().collect();
        let fresh = current
            .iter()
            .filter(|notice| !self.last.contains(*notice))
            .cloned()
            .collect();
        self.last = current.into_iter().collect();
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::wanted::WantedDisk;
    use vmm_core::protocol::{DiskView, Timestamp};

    fn vm(ram: u32, cpu: u32, disks: &[(i64, u32)]) -> VmView {
        VmView {
            vm_id: "stalin".into(),
            ram,
            cpu,
            disks: disks
                .iter()
                .map(|(id, disk_size)| DiskView {
                    id: *id,
                    disk_size: *disk_size,
                })
                .collect(),
            created_at: Timestamp(std::time::SystemTime::UNIX_EPOCH),
            updated_at: Timestamp(std::time::SystemTime::UNIX_EPOCH),
        }
    }

    fn wanted(ram: u32, cpu: u32, disks: &[(&str, u32)]) -> Wanted {
        Wanted {
            ram,
            cpu,
            disks: disks
                .iter()
                .map(|(key, size)| WantedDisk {
                    key: (*key).into(),
                    size: *size,
                })
                .collect(),
        }
    }

    fn mapping(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, id)| ((*k).to_owned(), *id)).collect()
    }

    #[test]
    fn a_true_record_needs_no_update() {
        let plan = plan(
            &wanted(512, 2, &[("vda", 10)]),
            &vm(512, 2, &[(7, 10)]),
            &mapping(&[("vda", 7)]),
        );
        assert_eq!(plan.update, None);
        assert!(plan.notices.is_empty());
        assert_eq!(plan.mapping, mapping(&[("vda", 7)]));
    }

    #[test]
    fn ram_cpu_growth_and_new_disks_go_in_one_update() {
        let plan = plan(
            &wanted(1024, 4, &[("vda", 20), ("vdb", 5), ("vdc", 3)]),
            &vm(512, 2, &[(7, 10), (8, 5)]),
            &mapping(&[("vda", 7), ("vdb", 8)]),
        );
        assert_eq!(
            plan.update,
            Some(Update {
                ram: Some(1024),
                cpu: Some(4),
                resize: vec![(7, 20)],
                attach: vec![3],
            })
        );
        assert_eq!(plan.attach_keys, ["vdc"]);
        assert!(plan.notices.is_empty());
    }

    #[test]
    fn ram_alone_still_sends_cpu_and_no_disks() {
        let plan = plan(
            &wanted(1024, 2, &[("vda", 10)]),
            &vm(512, 2, &[(7, 10)]),
            &mapping(&[("vda", 7)]),
        );
        assert_eq!(
            plan.update,
            Some(Update {
                ram: Some(1024),
                cpu: Some(2),
                ..Update::default()
            })
        );
    }

    #[test]
    fn a_smaller_disk_is_not_sent_and_a_missing_one_not_detached() {
        let plan = plan(
            &wanted(512, 2, &[("vda", 5)]),
            &vm(512, 2, &[(7, 10), (8, 5)]),
            &mapping(&[("vda", 7), ("vdb", 8)]),
        );
        assert_eq!(plan.update, None);
        assert_eq!(
            plan.notices,
            [
                Notice::Shrink {
                    key: "vda".into(),
                    id: 7,
                    from: 10,
                    to: 5
                },
                Notice::Missing {
                    key: "vdb".into(),
                    id: 8
                },
            ]
        );
        assert!(plan.notices[0].to_string().contains("shrink"));
        assert!(plan.notices[1].to_string().contains("missing"));
        // The missing device keeps its id, should it come back.
        assert_eq!(plan.mapping, mapping(&[("vda", 7), ("vdb", 8)]));
    }

    #[test]
    fn unknown_server_disks_are_left_alone() {
        let plan = plan(
            &wanted(512, 2, &[("vda", 10), ("vdb", 4)]),
            &vm(512, 2, &[(7, 10), (8, 50)]),
            &mapping(&[("vda", 7)]),
        );
        let update = plan.update.unwrap();
        assert_eq!(update.resize, []);
        assert_eq!(update.attach, [4]);
        assert_eq!(plan.attach_keys, ["vdb"]);
    }

    #[test]
    fn with_no_known_disk_the_vms_disks_are_adopted_in_id_order() {
        let plan = plan(
            &wanted(512, 2, &[("vda", 12), ("vdb", 5), ("vdc", 1)]),
            &vm(512, 2, &[(9, 5), (3, 10)]),
            &BTreeMap::new(),
        );
        assert_eq!(plan.mapping, mapping(&[("vda", 3), ("vdb", 9)]));
        let update = plan.update.unwrap();
        assert_eq!(update.resize, [(3, 12)]);
        assert_eq!(update.attach, [1]);
        assert_eq!(plan.attach_keys, ["vdc"]);
    }

    #[test]
    fn a_mapping_to_a_disk_the_vm_lacks_attaches_anew() {
        let plan = plan(
            &wanted(512, 2, &[("vda", 10), ("vdb", 5)]),
            &vm(512, 2, &[(7, 10)]),
            &mapping(&[("vda", 7), ("vdb", 99)]),
        );
        assert_eq!(plan.update.unwrap().attach, [5]);
        assert_eq!(
            plan.notices,
            [Notice::Stale {
                key: "vdb".into(),
                id: 99
            }]
        );
    }

    #[test]
    fn attaching_stops_at_the_disk_limit() {
        let full: Vec<(i64, u32)> = (1..=63).map(|id| (id, 1)).collect();
        let mut map: Vec<(String, i64)> = (1..=63).map(|id| (format!("d{id}"), id)).collect();
        map.sort();
        let known: BTreeMap<String, i64> = map.into_iter().collect();
        let mut disks: Vec<(String, u32)> = (1..=63).map(|id| (format!("d{id}"), 1)).collect();
        disks.push(("new1".into(), 2));
        disks.push(("new2".into(), 3));
        let disks: Vec<(&str, u32)> = disks.iter().map(|(k, s)| (k.as_str(), *s)).collect();
        let plan = plan(&wanted(512, 2, &disks), &vm(512, 2, &full), &known);
        assert_eq!(plan.update.unwrap().attach, [2]);
        assert_eq!(
            plan.notices,
            [Notice::TooMany {
                keys: vec!["new2".into()]
            }]
        );
    }

    #[test]
    fn attached_ids_are_the_newest_new_ones() {
        let before = vm(512, 2, &[(3, 1)]);
        let after = vm(512, 2, &[(3, 1), (10, 2), (11, 3)]);
        assert_eq!(attached_ids(&before, &after, 2), Some(vec![10, 11]));
        assert_eq!(attached_ids(&before, &after, 1), Some(vec![11]));
        assert_eq!(attached_ids(&before, &after, 0), Some(vec![]));
        assert_eq!(attached_ids(&before, &after, 3), None);
    }

    #[test]
    fn a_notice_is_logged_once_per_change() {
        let mut once = Once::default();
        let shrink = |to: u32| format!("vda shrink to {to}");
        assert_eq!(once.fresh([shrink(5)]), [shrink(5)]);
        assert!(once.fresh([shrink(5)]).is_empty());
        assert_eq!(once.fresh([shrink(4)]), [shrink(4)]);
        assert!(once.fresh([]).is_empty());
        assert_eq!(once.fresh([shrink(4)]), [shrink(4)]);
    }
}
