//! Proof of life, for systemd and for the kernel front door: a hung agent (alive, but its
//! session threads no longer turning) must not hold port 25 hostage.
//!
//! Every session thread, and the runtime of the control socket and the ban queue, beats a
//! [`Heartbeats`] slot from a task of its own (every eighth of the limit, at most every
//! second): a slot beats only while its event loop turns. A watchdog thread (a plain OS
//! thread, so it runs whatever the runtimes do) reads the slots a few times per beat. The
//! limit is systemd's `WatchdogSec=` (`WATCHDOG_USEC` in the environment), else
//! [`DEFAULT_LIMIT`]; a slot silent for half of it is a stall:
//! - under systemd, it sends `WATCHDOG=1` to `NOTIFY_SOCKET` every quarter of the limit
//!   while no slot stalls, and stops when one does: systemd kills the agent (SIGABRT) within
//!   the limit, and the kernel removes its listening sockets from the steering map as they
//!   close, so the MTA takes every connection;
//! - with steering on, whether systemd watches or not, a stall makes it empty the agent's
//!   slots in the steering map itself (the MTA takes every connection from then on), log
//!   why, and abort the process, so a supervisor restarts it (`Restart=on-failure`).
//!
//! It stops watching when the agent starts to stop (the sockets are out of the map then, and
//! a stop that hangs is `TimeoutStopSec`'s).
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

/// How often each runtime beats, at most.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// The watchdog's limit: systemd's interval, else [`DEFAULT_LIMIT`].
pub fn limit() -> Duration {
    systemd_interval().unwrap_or(DEFAULT_LIMIT)
}

/// How often each runtime beats under `limit`: often enough that a live one never looks
/// stalled.
pub fn beat_every(limit: Duration) -> Duration {
    (limit / 8).min(BEAT_EVERY)
}

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

    /// Beats `slot` every [`beat_every`] for as long as the calling runtime turns.
    pub async fn keep_beating(self: Arc<Self>, slot: usize) {
        let every = beat_every(limit());
        loop {
            self.beat(slot);
            tokio::time::sleep(every).await;
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

/// What the watchdog thread does at a stall, once: the agent empties the steering map's agent
/// slots (the MTA takes every connection) and aborts.
pub type OnStall = Box<dyn FnOnce() + Send>;

/// The watchdog thread; see the module doc. Stops when `stop` is set (the agent is shutting
/// down: its threads stop beating as they end).
pub fn start(
    beats: Arc<Heartbeats>,
    systemd: Option<Duration>,
    limit: Duration,
    on_stall: Option<OnStall>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let stall = limit / 2;
    let notify_every = systemd.map(|interval| interval / 4);
    let look_every = beat_every(limit) / 2;
    std::thread::Builder::new().name("helo-watchdog".into()).spawn(move || {
        let mut on_stall = on_stall;
        let mut last_notify: Option<Instant> = None;
        let mut stalled = false;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let (slot, silent) = beats.stalest(now).unwrap_or(("", Duration::ZERO));
            if silent < stall {
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
                match on_stall.take() {
                    Some(on_stall) => {
                        tracing::error!(thread = slot, silent_s = silent.as_secs_f64(), limit_s, "WATCHDOG: a thread of the agent stopped turning; the agent's sockets leave the steering map (the MTA takes every connection) and the agent aborts, for its supervisor to restart it");
                        on_stall();
                    }
                    None => {
                        tracing::error!(thread = slot, silent_s = silent.as_secs_f64(), limit_s, "WATCHDOG: a thread of the agent stopped turning; no more keep-alives to systemd, which kills the agent");
                    }
                }
            }
            std::thread::sleep(look_every);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot that stops beating is a stall once half the limit went by: the watchdog acts
    /// once (the agent's action empties the steering map and aborts), and never while every
    /// slot beats.
    #[test]
    fn a_thread_that_stops_turning_is_a_stall_and_the_watchdog_acts_once() {
        use std::sync::atomic::AtomicUsize;
        let beats = Heartbeats::new(vec!["helo-proxy-0".into(), "main".into()]);
        let limit = Duration::from_millis(400);
        let acted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let on_stall: OnStall = {
            let acted = acted.clone();
            Box::new(move || {
                acted.fetch_add(1, Ordering::Relaxed);
            })
        };
        let watchdog = start(beats.clone(), None, limit, Some(on_stall), stop.clone()).unwrap();
        let turning = Instant::now();
        while turning.elapsed() < Duration::from_millis(600) {
            beats.beat(0);
            beats.beat(1);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(acted.load(Ordering::Relaxed), 0, "both turn: no stall");
        let hung = Instant::now();
        while hung.elapsed() < Duration::from_millis(600) {
            beats.beat(1); // main turns, helo-proxy-0 is stuck
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(acted.load(Ordering::Relaxed), 1, "one stall, acted on once");
        stop.store(true, Ordering::Relaxed);
        watchdog.join().unwrap();
    }

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
