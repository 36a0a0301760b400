//! How many worker threads to run by default: one per physical core this process may use. Two SMT
//! threads of a core share its vector units, and the kernels here keep those busy, so a second thread
//! per core adds contention, not throughput (llama.cpp defaults to physical cores for the same reason).
//!
//! On Linux: the CPUs in the process's affinity list (`Cpus_allowed_list` in /proc/self/status), grouped
//! by `(physical_package_id, core_id)` from sysfs; capped by `available_parallelism` (which also counts
//! cgroup CPU quotas). Anywhere that information is missing: `available_parallelism`.

use std::collections::BTreeSet;

/// Physical cores available to this process (at least 1).
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    linux_physical_cores().map_or(logical, |p| p.clamp(1, logical))
}

fn linux_physical_cores() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    let cpus = parse_cpu_list(list.trim())?;
    let read = |cpu: usize, what: &str| -> Option<u32> {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{what}")).ok()?.trim().parse().ok()
    };
    let mut cores = BTreeSet::new();
    for cpu in cpus {
        cores.insert((read(cpu, "physical_package_id")?, read(cpu, "core_id")?));
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// A kernel CPU list such as `0-3,8,10-11`; `None` if malformed.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
    }

    #[test]
    fn physical_cores_within_logical() {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let p = physical_cores();
        println!("physical cores {p}, logical CPUs {logical}, from sysfs: {:?}", linux_physical_cores());
        assert!((1..=logical).contains(&p));
    }
}
