//! What the machine the agent runs on has: its RAM, the CPUs the agent may
//! use, and its whole block devices. The reading sits behind [`Machine`], so
//! that tests (and `--machine-root`) can feed it a fake `/proc` and `/sys`.

use std::io;
use std::path::{Path, PathBuf};

/// Bytes in a sector as `/sys/block/DEV/size` counts them: always 512,
/// whatever the device's own sector size.
const SECTOR: u64 = 512;

/// Sectors in one GiB.
const SECTORS_PER_GIB: u64 = (1 << 30) / SECTOR;

/// Block devices that are not disks of the VM: loop devices, RAM disks,
/// device-mapper and software RAID volumes (built on disks that are listed
/// themselves), optical drives and network block devices.
const NOT_DISKS: &[&str] = &["loop", "ram", "zram", "dm-", "sr", "md", "nbd"];

/// A whole block device as `/sys/block` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub name: String,
    /// In 512-byte sectors.
    pub sectors: u64,
}

/// Where the agent reads the machine from.
pub trait Machine {
    /// The text of `/proc/meminfo`.
    fn meminfo(&self) -> io::Result<String>;
    /// The entries of `/sys/block`, with their sizes, in no particular order.
    fn block_devices(&self) -> io::Result<Vec<BlockDevice>>;
    /// How many CPUs this process may run on.
    fn cpus(&self) -> io::Result<u64>;
}

/// A machine read from files under a root: `/` for the real one.
#[derive(Debug, Clone)]
pub struct Rooted {
    root: PathBuf,
}

impl Rooted {
    /// The machine the agent runs on.
    pub fn host() -> Rooted {
        Rooted { root: "/".into() }
    }

    /// A fake machine: `ROOT/proc/meminfo`, `ROOT/sys/block/DEV/size` and
    /// `ROOT/sys/devices/system/cpu/online`.
    pub fn at(root: impl Into<PathBuf>) -> Rooted {
        Rooted { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn is_host(&self) -> bool {
        self.root == Path::new("/")
    }
}

impl Machine for Rooted {
    fn meminfo(&self) -> io::Result<String> {
        std::fs::read_to_string(self.root.join("proc/meminfo"))
    }

    fn block_devices(&self) -> io::Result<Vec<BlockDevice>> {
        let mut devices = Vec::new();
        for entry in std::fs::read_dir(self.root.join("sys/block"))? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let size = std::fs::read_to_string(entry.path().join("size"))?;
            let sectors = size.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("/sys/block/{name}/size is not a number: {:?}", size.trim()),
                )
            })?;
            devices.push(BlockDevice { name, sectors });
        }
        Ok(devices)
    }

    /// On the host, `sched_getaffinity` by way of the standard library
    /// (which also honours a cgroup CPU quota, as a scheduler would); a fake
    /// root cannot be asked for an affinity, so its `online` CPU list stands
    /// in for it.
    fn cpus(&self) -> io::Result<u64> {
        if self.is_host() {
            return std::thread::available_parallelism().map(|n| n.get() as u64);
        }
        let path = self.root.join("sys/devices/system/cpu/online");
        let text = std::fs::read_to_string(&path)?;
        cpu_list_len(text.trim()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a CPU list: {:?}", path.display(), text.trim()),
            )
        })
    }
}

/// `MemTotal` of `/proc/meminfo`, in MiB, rounded down.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?;
    let mut words = line.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    // The kernel writes `kB` and means KiB.
    match words.next() {
        Some("kB") | None => Some(value / 1024),
        Some(_) => None,
    }
}

/// Whether a `/sys/block` entry is a disk of the VM (see [`NOT_DISKS`]).
pub fn is_disk(device: &BlockDevice) -> bool {
    device.sectors > 0
        && !NOT_DISKS
            .iter()
            .any(|prefix| device.name.starts_with(prefix))
}

/// A size in 512-byte sectors, in GiB rounded up: a disk of 10 GiB and one
/// sector does not fit in 10 GiB.
pub fn sectors_to_gib(sectors: u64) -> u64 {
    sectors.div_ceil(SECTORS_PER_GIB)
}

/// How many CPUs a kernel CPU list names (`0-3,6` is 5).
fn cpu_list_len(list: &str) -> Option<u64> {
    let mut count = 0u64;
    for part in list.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (first.parse::<u64>().ok()?, last.parse::<u64>().ok()?),
            None => {
                let cpu = part.parse::<u64>().ok()?;
                (cpu, cpu)
            }
        };
        count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
    }
    Some(count)
}

/// A disk found on the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDisk {
    /// The device's name in `/sys/block`, e.g. `vda`.
    pub name: String,
    pub gib: u64,
}

/// What was read from the machine; `None` for what was not asked for
/// (given as a flag instead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub ram_mib: Option<u64>,
    pub cpus: Option<u64>,
    /// Sorted by name.
    pub disks: Option<Vec<FoundDisk>>,
}

/// Which fields to read.
#[derive(Debug, Clone, Copy)]
pub struct Needed {
    pub ram: bool,
    pub cpu: bool,
    pub disks: bool,
}

/// Reads what is needed from `machine`; the error says what could not be
/// read, and from where.
pub fn read(machine: &dyn Machine, needed: Needed) -> Result<Found, String> {
    let mut found = Found::default();
    if needed.ram {
        let meminfo = machine
            .meminfo()
            .map_err(|err| format!("cannot read /proc/meminfo: {err}"))?;
        let mib = mem_total_mib(&meminfo).ok_or("no MemTotal in kB in /proc/meminfo")?;
        found.ram_mib = Some(mib);
    }
    if needed.cpu {
        let cpus = machine
            .cpus()
            .map_err(|err| format!("cannot count the CPUs: {err}"))?;
        found.cpus = Some(cpus);
    }
    if needed.disks {
        let devices = machine
            .block_devices()
            .map_err(|err| format!("cannot read /sys/block: {err}"))?;
        let mut disks: Vec<FoundDisk> = devices
            .iter()
            .filter(|device| is_disk(device))
            .map(|device| FoundDisk {
                name: device.name.clone(),
                gib: sectors_to_gib(device.sectors),
            })
            .collect();
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        found.disks = Some(disks);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "\
MemTotal:        8142352 kB
MemFree:          512000 kB
MemAvailable:    4000000 kB
";

    #[test]
    fn mem_total_is_in_mib_rounded_down() {
        // 8142352 KiB is 7951.5 MiB.
        assert_eq!(mem_total_mib(MEMINFO), Some(7951));
        assert_eq!(mem_total_mib("MemTotal: 1048576 kB\n"), Some(1024));
        assert_eq!(mem_total_mib("MemTotal: 1023 kB\n"), Some(0));
        assert_eq!(mem_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: 5 MB\n"), None);
        assert_eq!(mem_total_mib(""), None);
    }

    #[test]
    fn only_whole_disks_with_a_size_count() {
        let device = |name: &str, sectors: u64| BlockDevice {
            name: name.into(),
            sectors,
        };
        for disk in ["sda", "vda", "nvme0n1", "xvdb", "mmcblk0"] {
            assert!(is_disk(&device(disk, 1)), "{disk}");
        }
        for other in [
            "loop0", "ram0", "zram0", "dm-0", "sr0", "md0", "md127", "nbd0",
        ] {
            assert!(!is_disk(&device(other, 1_000_000)), "{other}");
        }
        assert!(!is_disk(&device("vdb", 0)));
    }

    #[test]
    fn sectors_round_up_to_whole_gib() {
        assert_eq!(sectors_to_gib(0), 0);
        assert_eq!(sectors_to_gib(1), 1);
        assert_eq!(sectors_to_gib(SECTORS_PER_GIB), 1);
        assert_eq!(sectors_to_gib(SECTORS_PER_GIB + 1), 2);
        // A 500 GB (decimal) disk.
        assert_eq!(sectors_to_gib(976_773_168), 466);
        assert_eq!(sectors_to_gib(u64::MAX), u64::MAX / SECTORS_PER_GIB + 1);
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpu_list_len("0"), Some(1));
        assert_eq!(cpu_list_len("0-3"), Some(4));
        assert_eq!(cpu_list_len("0-3,6,8-9"), Some(7));
        assert_eq!(cpu_list_len("3-1"), None);
        assert_eq!(cpu_list_len(""), None);
        assert_eq!(cpu_list_len("a-b"), None);
    }

    /// A machine in memory.
    struct Fake {
        meminfo: &'static str,
        devices: Vec<BlockDevice>,
        cpus: u64,
    }

    impl Machine for Fake {
        fn meminfo(&self) -> io::Result<String> {
            Ok(self.meminfo.into())
        }
        fn block_devices(&self) -> io::Result<Vec<BlockDevice>> {
            Ok(self.devices.clone())
        }
        fn cpus(&self) -> io::Result<u64> {
            Ok(self.cpus)
        }
    }

    #[test]
    fn only_what_is_needed_is_read_and_disks_come_sorted() {
        let fake = Fake {
            meminfo: MEMINFO,
            devices: vec![
                BlockDevice {
                    name: "vdb".into(),
                    sectors: 3 * SECTORS_PER_GIB,
                },
                BlockDevice {
                    name: "loop0".into(),
                    sectors: 100,
                },
                BlockDevice {
                    name: "vda".into(),
                    sectors: 20 * SECTORS_PER_GIB - 7,
                },
            ],
            cpus: 6,
        };
        let all = Needed {
            ram: true,
            cpu: true,
            disks: true,
        };
        let found = read(&fake, all);
        let disk = |name: &str, gib| FoundDisk {
            name: name.into(),
            gib,
        };
        assert_eq!(
            found,
            Ok(Found {
                ram_mib: Some(7951),
                cpus: Some(6),
                disks: Some(vec![disk("vda", 20), disk("vdb", 3)]),
            })
        );
        let none = Needed {
            ram: false,
            cpu: false,
            disks: false,
        };
        assert_eq!(read(&fake, none), Ok(Found::default()));
    }

    #[test]
    fn a_fake_root_is_read_like_the_real_one() {
        let root = std::env::temp_dir().join(format!("vmm-fingerprint-{}", std::process::id()));
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("proc/meminfo", MEMINFO);
        write("sys/block/vda/size", "41943040\n");
        write("sys/block/sr0/size", "2048\n");
        write("sys/devices/system/cpu/online", "0-2\n");
        let machine = Rooted::at(&root);
        let all = Needed {
            ram: true,
            cpu: true,
            disks: true,
        };
        let found = read(&machine, all);
        let _ = std::fs::remove_dir_all(&root);
        let found = found.unwrap();
        assert_eq!(found.ram_mib, Some(7951));
        assert_eq!(found.cpus, Some(3));
        assert_eq!(
            found.disks,
            Some(vec![FoundDisk {
                name: "vda".into(),
                gib: 20
            }])
        );
        assert!(read(&Rooted::at("/nonexistent/vmm"), all).is_err());
    }
}
