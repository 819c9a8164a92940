//! The kernel memory of maps, as the kernel accounts it: the `memlock`
//! line of a map fd's `/proc/self/fdinfo` entry. Since 6.4 that is what
//! the map uses (`bpf_map_memory_usage`): a preallocated map (LRU hashes,
//! arrays) its whole size from creation, a hash map created with
//! `BPF_F_NO_PREALLOC` its bucket array plus the elements present. Older
//! kernels report an estimate from the map's size alone.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsRawFd, BorrowedFd},
    sync::Mutex,
};

use dataplane_common::{map_names, map_shapes};

/// One map and its kernel memory in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMemory {
    /// The map's name: the kernel's (at most 15 bytes), completed to the
    /// datapath's full name where it is a truncated one.
    pub map: String,
    pub bytes: u64,
}

/// The `map_id` and `memlock` fields of one fdinfo text; `None` for an fd
/// that is not a map.
pub fn parse_fdinfo(text: &str) -> Option<(u32, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    let id = u32::try_from(field("map_id:")?).ok()?;
    Some((id, field("memlock:")?))
}

/// The kernel memory of the map behind `fd`, one of this process's fds.
pub fn of_fd(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = fs::read_to_string(&path)?;
    parse_fdinfo(&text)
        .map(|(_, bytes)| bytes)
        .ok_or_else(|| io::Error::other(format!("{path} has no map_id/memlock line: not a map")))
}

/// The datapath's full map name for a kernel name: names longer than the
/// kernel's 15 bytes come back truncated.
fn full_name(kernel: &str) -> String {
    const OTHERS: [&str; 4] = [
        map_names::SCRATCH,
        map_names::CT_SYN,
        map_names::GUARD,
        map_names::IFACES,
    ];
    let known = map_shapes::ALL.iter().map(|s| s.name).chain(OTHERS);
    for name in known {
        if name == kernel || (kernel.len() == 15 && name.len() > 15 && name.starts_with(kernel)) {
            return name.to_string();
        }
    }
    kernel.to_string()
}

/// Every map this process holds an fd of (each map once, however many fds
/// it has), by name, with its kernel memory: for the agent, all the maps of
/// its programs, pinned or not. Maps whose name cannot be read (closed
/// meanwhile) are left out; two maps of one name are summed.
pub fn of_process() -> io::Result<Vec<MapMemory>> {
    let mut by_id = BTreeMap::new();
    for entry in fs::read_dir("/proc/self/fdinfo")? {
        let Ok(entry) = entry else { continue };
        // An fd closed since the listing is no error.
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some((id, bytes)) = parse_fdinfo(&text) {
            by_id.insert(id, bytes);
        }
    }
    // Names by map id, kept from one call to the next: ids are not
    // reused while the map lives, and the metrics call this on a timer.
    static NAMES: Mutex<BTreeMap<u32, String>> = Mutex::new(BTreeMap::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    names.retain(|id, _| by_id.contains_key(id));
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for (id, bytes) in by_id {
        let name = match names.get(&id) {
            Some(n) => n.clone(),
            None => {
                let Ok(info) = aya::maps::MapInfo::from_id(id) else {
                    continue;
                };
                let name = full_name(info.name_as_str().unwrap_or(""));
                let name = if name.is_empty() { format!("map {id}") } else { name };
                names.insert(id, name.clone());
                name
            }
        };
        *by_name.entry(name).or_default() += bytes;
    }
    Ok(by_name
        .into_iter()
        .map(|(map, bytes)| MapMemory { map, bytes })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_map_fields_of_fdinfo() {
        // As a 6.x kernel prints a map fd's fdinfo.
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t9\nkey_size:\t40\n\
                   value_size:\t64\nmax_entries:\t262144\nmap_flags:\t0x0\nmap_extra:\t0x0\n\
                   memlock:\t44040192\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(parse_fdinfo(map), Some((42, 44_040_192)));
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t6\nprog_jited:\t1\nmemlock:\t4096\nprog_id:\t7\n";
        assert_eq!(parse_fdinfo(prog), None);
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn truncated_kernel_names_get_their_full_name() {
        assert_eq!(full_name("DP_BACKEND_FILT"), map_names::BACKEND_FILTER);
        assert_eq!(full_name(map_names::CONNTRACK), map_names::CONNTRACK);
        assert_eq!(full_name(map_names::CT_SYN), map_names::CT_SYN);
        assert_eq!(full_name(".rodata"), ".rodata");
    }
}
