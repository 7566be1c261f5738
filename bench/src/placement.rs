//! Pinned and unpinned rounds: how a benchmark's processes share the machine's cores. Pinned,
//! the side measured runs alone on one CPU and its load on another; unpinned, everything goes
//! where the scheduler puts it.

use rustix::thread::CpuSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Each process on the CPU its round gives it.
    Pinned,
    /// Every process wherever the scheduler puts it.
    Unpinned,
}

impl Placement {
    pub const ALL: [Placement; 2] = [Placement::Pinned, Placement::Unpinned];

    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Unpinned => "unpinned",
        }
    }

    /// The CPUs of a process placed on `cpu`: that one pinned, every one unpinned.
    pub fn cpus(self, cpu: usize) -> CpuSet {
        let mut set = CpuSet::new();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for c in 0..cores {
            if self == Placement::Unpinned || c == cpu {
                set.set(c);
            }
        }
        set
    }

    /// The command prefix that runs a process on `cpu` (nothing unpinned).
    pub fn prefix(self, cpu: usize) -> Vec<String> {
        match self {
            Placement::Pinned => vec!["taskset".into(), "-c".into(), cpu.to_string()],
            Placement::Unpinned => Vec::new(),
        }
    }

    /// Places the calling thread on `cpu`.
    pub fn place_thread(self, cpu: usize) {
        let _ = rustix::thread::sched_setaffinity(None, &self.cpus(cpu));
    }

    /// Places every thread of process `pid` on `cpu` (the processes it starts later inherit it).
    pub fn place_process(self, pid: u32, cpu: usize) {
        let set = self.cpus(cpu);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
        for task in tasks.flatten() {
            let tid = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok());
            if let Some(tid) = tid.and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::thread::sched_setaffinity(Some(tid), &set);
            }
        }
    }
}
