//! Load samples read straight from a container's cgroup files instead of the engine's
//! stats API.
//!
//! Why: a one-shot `docker stats` makes the engine take two samples a second apart, so
//! sampling every container every second kept one engine request in flight per
//! container all the time. With 333 containers per host (`flotilla-bench steady
//! --instances 1000 --engines 3`) that held the load average at 70–110 on 2 cores and
//! pushed the containers' own health probes past their timeouts. Two small file reads
//! per container cost microseconds. The engine's API stays the fall-back where the
//! cgroup cannot be read (an agent in a container of its own, another cgroup layout).
//!
//! Both layouts are read: cgroup v1 (`cpuacct.usage`, `memory.usage_in_bytes`,
//! `memory.limit_in_bytes`) and the unified v2 hierarchy (`cpu.stat`'s `usage_usec`,
//! `memory.current`, `memory.max`), the same counters the engine's stats report.
//! Parsing is pure (text in); only [`CgroupReader`] touches the file system.

use std::path::{Path, PathBuf};

/// Where the controllers this module reads are mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The v1 hierarchy holding `cpuacct`.
    pub cpuacct: Option<PathBuf>,
    /// The v1 hierarchy holding `memory`.
    pub memory: Option<PathBuf>,
    /// The unified (v2) hierarchy.
    pub unified: Option<PathBuf>,
}

/// Reads the cgroup mounts out of `/proc/self/mountinfo`'s text. Only mounts of a
/// hierarchy's root (`/`) count: a mount of a sub-tree (inside a container) would need
/// paths rewritten, and the engine's API serves that case.
pub fn parse_mounts(mountinfo: &str) -> Mounts {
    let mut m = Mounts::default();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        if *root != "/" {
            continue;
        }
        let point = PathBuf::from(point);
        match *fstype {
            "cgroup2" => m.unified = m.unified.or(Some(point)),
            "cgroup" => {
                let opts = right.get(2).copied().unwrap_or("");
                for opt in opts.split(',') {
                    match opt {
                        "cpuacct" if m.cpuacct.is_none() => m.cpuacct = Some(point.clone()),
                        "memory" if m.memory.is_none() => m.memory = Some(point.clone()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    m
}

/// The cgroup files of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Files {
    /// cgroup v1: the container's `cpuacct` and `memory` directories.
    V1 {
        /// Holds `cpuacct.usage`.
        cpuacct: PathBuf,
        /// Holds `memory.usage_in_bytes` and `memory.limit_in_bytes`.
        memory: PathBuf,
    },
    /// cgroup v2: the container's directory in the unified hierarchy.
    V2(PathBuf),
}

/// Finds a process's cgroup files from `/proc/PID/cgroup`'s text: the v1 `cpuacct` and
/// `memory` controllers when both are mounted (the engine accounts there on a v1 or
/// hybrid host), else the v2 path when the unified hierarchy has the memory controller.
pub fn files_of(proc_cgroup: &str, mounts: &Mounts, unified_has_memory: bool) -> Option<Files> {
    let (mut cpuacct, mut memory, mut unified) = (None, None, None);
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            continue;
        }
        if controllers.is_empty() {
            unified = Some(rel);
        }
        for c in controllers.split(',') {
            match c {
                "cpuacct" => cpuacct = Some(rel),
                "memory" => memory = Some(rel),
                _ => {}
            }
        }
    }
    if let (Some(c), Some(m), Some(cm), Some(mm)) = (
        cpuacct,
        memory,
        mounts.cpuacct.as_ref(),
        mounts.memory.as_ref(),
    ) {
        return Some(Files::V1 {
            cpuacct: cm.join(c),
            memory: mm.join(m),
        });
    }
    match (unified, &mounts.unified) {
        (Some(u), Some(root)) if unified_has_memory => Some(Files::V2(root.join(u))),
        _ => None,
    }
}

/// `usage_usec` of a v2 `cpu.stat`, in ns.
fn cpu_stat_ns(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|us| us.saturating_mul(1000))
}

/// A memory limit file's value; `None` for "no limit" (v2 `max`, or v1's near-2⁶³ page
/// count), so the caller can count the host's memory instead, as the engine does.
fn limit(text: &str, host_memory: u64) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let v = t.parse::<u64>().ok()?;
    (v < host_memory).then_some(v)
}

/// The host's memory, bytes, from `/proc/meminfo`'s text.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Reads load samples from cgroup files.
#[derive(Debug, Clone)]
pub struct CgroupReader {
    mounts: Mounts,
    unified_has_memory: bool,
    host_memory: u64,
    cpus: f64,
}

impl CgroupReader {
    /// Reads the mounts and the host's memory once; `None` when no layout this module
    /// knows is mounted.
    pub fn from_host() -> Option<Self> {
        let mounts = parse_mounts(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
        let unified_has_memory = mounts.unified.as_ref().is_some_and(|u| {
            std::fs::read_to_string(u.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
        });
        if mounts.cpuacct.is_none() && !unified_has_memory {
            return None;
        }
        Some(CgroupReader {
            mounts,
            unified_has_memory,
            host_memory: mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)?,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as f64)
                .unwrap_or(1.0),
        })
    }

    /// The cgroup files of the process `pid` (a container's first process).
    pub fn files_of_pid(&self, pid: u32) -> Option<Files> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        files_of(&text, &self.mounts, self.unified_has_memory)
    }

    /// One sample: cumulative CPU, memory in use and its limit (the host's memory when
    /// unlimited), and `quota` (else the host's CPUs) as the CPU limit.
    pub fn sample(
        &self,
        files: &Files,
        quota: Option<f64>,
    ) -> std::io::Result<crate::load::Sample> {
        let read = |p: &Path| std::fs::read_to_string(p);
        let bad = |what: &Path| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unreadable {}", what.display()),
            )
        };
        let (cpu_ns, usage, limit_text) = match files {
            Files::V1 { cpuacct, memory } => {
                let cpu = cpuacct.join("cpuacct.usage");
                let usage = memory.join("memory.usage_in_bytes");
                (
                    read(&cpu)?.trim().parse::<u64>().map_err(|_| bad(&cpu))?,
                    read(&usage)?
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| bad(&usage))?,
                    read(&memory.join("memory.limit_in_bytes"))?,
                )
            }
            Files::V2(dir) => {
                let cpu = dir.join("cpu.stat");
                let usage = dir.join("memory.current");
                (
                    cpu_stat_ns(&read(&cpu)?).ok_or_else(|| bad(&cpu))?,
                    read(&usage)?
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| bad(&usage))?,
                    read(&dir.join("memory.max"))?,
                )
            }
        };
        Ok(crate::load::Sample {
            cpu_total_ns: cpu_ns,
            memory_usage: usage,
            memory_limit: limit(&limit_text, self.host_memory).unwrap_or(self.host_memory),
            cpu_limit: quota.unwrap_or(self.cpus),
            at: std::time::Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 /docker/abc /mnt/sub rw - cgroup cgroup rw,memory";

    #[test]
    fn mounts_are_found_by_controller_and_sub_tree_mounts_ignored() {
        let m = parse_mounts(HYBRID);
        assert_eq!(m.cpuacct, Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(m.memory, Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(m.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v2 = parse_mounts("29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate");
        assert_eq!(v2.unified, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(v2.cpuacct, None);
        assert_eq!(parse_mounts("garbage\n\n"), Mounts::default());
    }

    #[test]
    fn a_v1_container_reads_its_cpuacct_and_memory_directories() {
        let proc =
            "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/system.slice/docker.service\n";
        assert_eq!(
            files_of(proc, &parse_mounts(HYBRID), false),
            Some(Files::V1 {
                cpuacct: "/sys/fs/cgroup/cpu,cpuacct/docker/abc".into(),
                memory: "/sys/fs/cgroup/memory/docker/abc".into(),
            })
        );
    }

    #[test]
    fn a_v2_container_reads_its_unified_directory_only_with_the_memory_controller() {
        let mounts = parse_mounts("29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw");
        let proc = "0::/system.slice/docker-abc.scope\n";
        assert_eq!(
            files_of(proc, &mounts, true),
            Some(Files::V2(
                "/sys/fs/cgroup/system.slice/docker-abc.scope".into()
            ))
        );
        assert_eq!(files_of(proc, &mounts, false), None);
        // A path climbing out of the hierarchy is not followed.
        assert_eq!(files_of("0::/../../etc\n", &mounts, true), None);
    }

    #[test]
    fn counters_and_limits_parse_as_the_engine_reports_them() {
        assert_eq!(
            cpu_stat_ns("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),
            Some(1_500_000)
        );
        assert_eq!(cpu_stat_ns("user_usec 1\n"), None);
        let host = 24 << 30;
        assert_eq!(limit("max\n", host), None);
        assert_eq!(limit("9223372036854771712\n", host), None, "v1's unlimited");
        assert_eq!(limit("268435456\n", host), Some(268_435_456));
        assert_eq!(limit("junk", host), None);
        assert_eq!(
            mem_total("MemTotal:       24569876 kB\nMemFree: 1 kB\n"),
            Some(24_569_876 * 1024)
        );
    }
}
