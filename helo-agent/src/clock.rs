//! The one clock bans are measured on: CLOCK_BOOTTIME, which the XDP program reads with
//! `bpf_ktime_get_boot_ns()`. It keeps counting through suspend, unlike CLOCK_MONOTONIC.

use std::time::Duration;

/// Now, in CLOCK_BOOTTIME nanoseconds.
pub fn boot_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now, in CLOCK_REALTIME nanoseconds since the Unix epoch: what snapshots store, since the
/// boot clock restarts at zero after a reboot.
pub fn unix_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Both clocks read together, to convert between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub boot_ns: u64,
    pub unix_ns: u64,
}

impl Now {
    pub fn read() -> Self {
        Now { boot_ns: boot_ns(), unix_ns: unix_ns() }
    }
}

/// The instant `ttl` after `now_ns`, saturating (a huge TTL means "never").
pub fn after(now_ns: u64, ttl: Duration) -> u64 {
    now_ns.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_forward() {
        let a = boot_ns();
        let b = boot_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn after_saturates() {
        assert_eq!(after(10, Duration::from_nanos(5)), 15);
        assert_eq!(after(u64::MAX - 1, Duration::from_secs(10)), u64::MAX);
        assert_eq!(after(1, Duration::MAX), u64::MAX);
    }
}
