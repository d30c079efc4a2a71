//! What the agent wants the server's record of its VM to say: the flags
//! where given, else what the machine has.
//!
//! Flags outside the protocol's limits are refused by clap (a usage error,
//! exit 2): the operator asked for something the server cannot hold.
//! Fingerprinted values outside them are clamped into them, with a warning:
//! the machine is what it is, and an agent that refused to run on a machine
//! with 5 TiB of RAM or 70 disks would keep no record true at all. Disks past
//! the 64th (by device name) are left out.

use std::fmt;

use vmm_core::protocol::limits;

use super::fingerprint::Found;

/// The state-file key of the disk given as the `index`-th `--disk` (from 0).
pub fn flag_key(index: usize) -> String {
    format!("flag:{index}")
}

/// One disk as the agent wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedDisk {
    /// A device name (`vda`) or a `--disk` position (`flag:0`).
    pub key: String,
    /// GiB.
    pub size: u32,
}

/// The VM as the agent wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub ram: u32,
    pub cpu: u32,
    pub disks: Vec<WantedDisk>,
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ram {} MiB, cpu {}, disks [", self.ram, self.cpu)?;
        for (i, disk) in self.disks.iter().enumerate() {
            let comma = if i == 0 { "" } else { ", " };
            write!(f, "{comma}{} {} GiB", disk.key, disk.size)?;
        }
        f.write_str("]")
    }
}

/// The `--ram`, `--cpu` and `--disk` flags (already within the limits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    pub ram: Option<u32>,
    pub cpu: Option<u32>,
    /// Empty: fingerprint the disks.
    pub disks: Vec<u32>,
}

/// The flags over what was found; the warnings say what had to be clamped
/// or left out. `found` must hold every field the flags do not give.
pub fn wanted(flags: &Flags, found: &Found) -> Result<(Wanted, Vec<String>), String> {
    let mut warnings = Vec::new();
    let ram = match flags.ram {
        Some(ram) => ram,
        None => {
            let mib = found.ram_mib.ok_or("RAM was not fingerprinted")?;
            clamp("RAM", "MiB", mib, &limits::RAM, &mut warnings)
        }
    };
    let cpu = match flags.cpu {
        Some(cpu) => cpu,
        None => {
            let cpus = found.cpus.ok_or("CPUs were not fingerprinted")?;
            clamp("CPU count", "", cpus, &limits::CPU, &mut warnings)
        }
    };
    let disks = if flags.disks.is_empty() {
        let found = found.disks.as_ref().ok_or("disks were not fingerprinted")?;
        if found.len() > limits::MAX_DISKS {
            let left_out: Vec<&str> = found[limits::MAX_DISKS..]
                .iter()
                .map(|disk| disk.name.as_str())
                .collect();
            warnings.push(format!(
                "warning: a VM has at most {} disks; left out: {}",
                limits::MAX_DISKS,
                left_out.join(", ")
            ));
        }
        found
            .iter()
            .take(limits::MAX_DISKS)
            .map(|disk| WantedDisk {
                key: disk.name.clone(),
                size: clamp(
                    &format!("disk {}", disk.name),
                    "GiB",
                    disk.gib,
                    &limits::DISK_SIZE,
                    &mut warnings,
                ),
            })
            .collect()
    } else {
        flags
            .disks
            .iter()
            .enumerate()
            .map(|(i, size)| WantedDisk {
                key: flag_key(i),
                size: *size,
            })
            .collect()
    };
    Ok((Wanted { ram, cpu, disks }, warnings))
}

/// `value` within `range`, with a warning when it was not.
fn clamp(
    what: &str,
    unit: &str,
    value: u64,
    range: &std::ops::RangeInclusive<i64>,
    warnings: &mut Vec<String>,
) -> u32 {
    let (low, high) = (
        u64::try_from(*range.start()).unwrap_or(0),
        u64::try_from(*range.end()).unwrap_or(0),
    );
    let clamped = value.clamp(low, high);
    if clamped != value {
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        warnings.push(format!(
            "warning: the {what} found, {value}{unit}, is outside the protocol's limits \
             ({low} to {high}); reporting {clamped}{unit}"
        ));
    }
    u32::try_from(clamped).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fingerprint::FoundDisk;

    fn found() -> Found {
        Found {
            ram_mib: Some(2048),
            cpus: Some(4),
            disks: Some(vec![
                FoundDisk {
                    name: "vda".into(),
                    gib: 20,
                },
                FoundDisk {
                    name: "vdb".into(),
                    gib: 5,
                },
            ]),
        }
    }

    fn disk(key: &str, size: u32) -> WantedDisk {
        WantedDisk {
            key: key.into(),
            size,
        }
    }

    #[test]
    fn each_flag_overrides_its_own_field() {
        let (all_found, warnings) = wanted(&Flags::default(), &found()).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            all_found,
            Wanted {
                ram: 2048,
                cpu: 4,
                disks: vec![disk("vda", 20), disk("vdb", 5)]
            }
        );
        let ram = Flags {
            ram: Some(512),
            ..Flags::default()
        };
        assert_eq!(wanted(&ram, &found()).unwrap().0.ram, 512);
        assert_eq!(wanted(&ram, &found()).unwrap().0.cpu, 4);
        let cpu = Flags {
            cpu: Some(1),
            ..Flags::default()
        };
        assert_eq!(wanted(&cpu, &found()).unwrap().0.cpu, 1);
        let disks = Flags {
            disks: vec![7, 8],
            ..Flags::default()
        };
        let (with_disks, _) = wanted(&disks, &found()).unwrap();
        assert_eq!(with_disks.disks, [disk("flag:0", 7), disk("flag:1", 8)]);
        assert_eq!(with_disks.ram, 2048);
        assert!(wanted(&Flags::default(), &Found::default()).is_err());
    }

    #[test]
    fn values_outside_the_limits_are_clamped_with_a_warning() {
        let mut huge = found();
        huge.ram_mib = Some(10 << 20);
        huge.cpus = Some(5000);
        huge.disks = Some(
            (0..70)
                .map(|i| FoundDisk {
                    name: format!("vd{i:02}"),
                    gib: if i == 0 { 2 << 20 } else { 1 },
                })
                .collect(),
        );
        let (clamped, warnings) = wanted(&Flags::default(), &huge).unwrap();
        assert_eq!(clamped.ram, 4_194_304);
        assert_eq!(clamped.cpu, 1024);
        assert_eq!(clamped.disks.len(), 64);
        assert_eq!(clamped.disks[0].size, 1_048_576);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("left out: vd64")));
        let mut tiny = found();
        tiny.ram_mib = Some(0);
        let (clamped, warnings) = wanted(&Flags::default(), &tiny).unwrap();
        assert_eq!(clamped.ram, 1);
        assert_eq!(warnings.len(), 1);
    }
}
