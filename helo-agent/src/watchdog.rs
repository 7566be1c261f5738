//! Proof of life, for systemd and for the kernel front door: a hung agent (alive, but its
//! session threads no longer turning) must not hold port 25 hostage.
//!
//! Every session thread, and the runtime of the control socket and the ban queue, beats a
//! [`Heartbeats`] slot once a second from a task of its own: a slot beats only while its event
//! loop turns. A watchdog thread (a plain OS thread, so it runs whatever the runtimes do)
//! reads the slots every half second:
//! - under systemd with `WatchdogSec=` (`WATCHDOG_USEC` in the environment), it sends
//!   `WATCHDOG=1` to `NOTIFY_SOCKET` every half interval while every slot beat within the
//!   interval, and stops when one did not: systemd then kills the agent (SIGABRT), and the
//!   kernel removes its listening sockets from the steering map as they close, so the MTA
//!   takes every connection;
//! - with steering on, whether systemd watches or not, a slot silent for the whole limit
//!   (`WATCHDOG_USEC`, else [`DEFAULT_LIMIT`]) makes it empty the agent's slots in the
//!   steering map itself (the MTA takes every connection from then on), log why, and abort
//!   the process, so a supervisor restarts it (`Restart=on-failure`).
//!
//! [`notify`] speaks systemd's notification protocol directly: one datagram of `KEY=value`
//! lines on the unix socket `NOTIFY_SOCKET` names (a path, or an abstract name after `@`).
//! Without `NOTIFY_SOCKET` (no systemd, or a unit of `Type=exec`) it sends nothing.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a silent slot is tolerated without systemd's `WATCHDOG_USEC`.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(30);

/// How often each runtime beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// One slot per event loop that must keep turning; each holds the last beat, in ms since
/// `origin`.
pub struct Heartbeats {
    origin: Instant,
    beats: Vec<AtomicU64>,
    names: Vec<String>,
}

impl Heartbeats {
    pub fn new(names: Vec<String>) -> Arc<Self> {
        let beats = names.iter().map(|_| AtomicU64::new(0)).collect();
        Arc::new(Heartbeats { origin: Instant::now(), beats, names })
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// Slot `slot` is alive now.
    pub fn beat(&self, slot: usize) {
        self.beats[slot].store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// The slot silent longest at `now`, and for how long.
    pub fn stalest(&self, now: Instant) -> Option<(&str, Duration)> {
        let now = self.ms(now);
        self.beats
            .iter()
            .zip(&self.names)
            .map(|(beat, name)| {
                (
                    name.as_str(),
                    Duration::from_millis(now.saturating_sub(beat.load(Ordering::Relaxed))),
                )
            })
            .max_by_key(|(_, silent)| *silent)
    }

    /// Beats `slot` every [`BEAT_EVERY`] for as long as the calling runtime turns.
    pub async fn keep_beating(self: Arc<Self>, slot: usize) {
        loop {
            self.beat(slot);
            tokio::time::sleep(BEAT_EVERY).await;
        }
    }
}

/// Sends `state` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=...`, one per line) to the
/// socket `NOTIFY_SOCKET` names. `Ok(false)`: no `NOTIFY_SOCKET`, nothing sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    send_to(&target, state)?;
    Ok(true)
}

fn send_to(target: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(target)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

/// systemd's watchdog interval for this process: `WATCHDOG_USEC`, when `WATCHDOG_PID` is
/// unset or names this process.
pub fn systemd_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec = std::env::var("WATCHDOG_USEC").ok()?.trim().parse::<u64>().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// What the watchdog thread does when a slot stays silent past the limit: empty the steering
/// map's agent slots (the MTA takes every connection) before the process goes.
pub type FailOpen = Box<dyn FnOnce() + Send>;

/// The watchdog thread; see the module doc. Stops when `stop` is set (the agent is shutting
/// down: its threads stop beating as they end).
pub fn start(
    beats: Arc<Heartbeats>,
    systemd: Option<Duration>,
    fail_open: Option<FailOpen>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let limit = systemd.unwrap_or(DEFAULT_LIMIT);
    let notify_every = systemd.map(|interval| interval / 2);
    std::thread::Builder::new().name("helo-watchdog".into()).spawn(move || {
        let mut fail_open = fail_open;
        let mut last_notify: Option<Instant> = None;
        let mut stalled = false;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let (slot, silent) = beats.stalest(now).unwrap_or(("", Duration::ZERO));
            if silent < limit {
                stalled = false;
                if let Some(every) = notify_every
                    && last_notify.is_none_or(|at| now.duration_since(at) >= every)
                {
                    if let Err(error) = notify("WATCHDOG=1") {
                        tracing::warn!(%error, "cannot send WATCHDOG=1 to systemd");
                    }
                    last_notify = Some(now);
                }
            } else if !stalled {
                stalled = true;
                let limit_s = limit.as_secs_f64();
                match fail_open.take() {
                    Some(fail_open) => {
                        tracing::error!(thread = slot, silent_s = silent.as_secs_f64(), limit_s, "WATCHDOG: a thread of the agent stopped turning; the agent's sockets leave the steering map (the MTA takes every connection) and the agent aborts, for its supervisor to restart it");
                        fail_open();
                        let _ = notify("STATUS=hung: aborting");
                        std::process::abort();
                    }
                    None => {
                        tracing::error!(thread = slot, silent_s = silent.as_secs_f64(), limit_s, "WATCHDOG: a thread of the agent stopped turning; no more keep-alives to systemd, which kills the agent");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stalest_slot_is_the_one_that_stopped_beating() {
        let beats = Heartbeats::new(vec!["helo-proxy-0".into(), "helo-proxy-1".into()]);
        let start = Instant::now();
        beats.beat(0);
        beats.beat(1);
        std::thread::sleep(Duration::from_millis(30));
        beats.beat(1);
        let (slot, silent) = beats.stalest(Instant::now()).unwrap();
        assert_eq!(slot, "helo-proxy-0");
        assert!(
            silent >= Duration::from_millis(30)
                && silent < start.elapsed() + Duration::from_millis(5)
        );
    }

    /// The protocol as systemd reads it: one datagram per state, on the socket NOTIFY_SOCKET
    /// names, a path or an abstract name.
    #[test]
    fn notifications_arrive_as_datagrams_on_a_path_or_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let dir = std::env::temp_dir().join(format!("helo-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let by_path = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = by_path.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("helo-notify-test-{}", std::process::id());
        let abstract_socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send_to(std::ffi::OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let n = abstract_socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        assert!(send_to(std::ffi::OsStr::new("relative"), "READY=1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
