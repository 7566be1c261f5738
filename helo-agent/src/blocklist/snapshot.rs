//! Bans and offence history saved to a file and restored at start-up, so they survive a reboot
//! (the pinned maps survive only agent restarts).
//!
//! Times are stored as wall-clock Unix seconds: the boot clock the kernel measures bans on starts
//! again at zero after a reboot. On restore each ban gets its remaining time on the new boot
//! clock; expired ones are dropped; a ban already in the map that lasts longer is kept. Writes go
//! to a temporary file that is synced and renamed over the old one, so a crash leaves either the
//! old snapshot or the new one. A file that does not parse is renamed aside and reported, never
//! fatal and never silently ignored.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use helo_common::NEVER_EXPIRES;
use serde::{Deserialize, Serialize};

use super::{BanStore, Blocklist, StoreError};
use crate::addr::BanTarget;
use crate::clock::Now;
/// How a pregreet pass is saved: the pass cache's own (the snapshot carries it).
pub use crate::passes::SavedPass;

/// Bumped when the format changes incompatibly; other versions are set aside like corrupt files.
pub const VERSION: u32 = 1;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    /// When it was written, Unix seconds.
    pub saved_unix: u64,
    pub bans: Vec<SavedBan>,
    pub offences: Vec<SavedOffence>,
    /// Clients that passed the proxy's pregreet test, and until when (see
    /// `crate::passes`). Missing from snapshots written before the test existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<SavedPass>,
    /// The steering door's passes (see `crate::blocklist::passes`), and until when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steer_passes: Vec<crate::blocklist::passes::SavedSteerPass>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBan {
    pub target: String,
    /// Unix seconds; `None` never expires.
    pub expires_unix: Option<u64>,
    pub reason: String,
    pub hits: u64,
    /// The gateway that made it, when another did (a fleet's ban); `None`: made here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedOffence {
    pub target: String,
    pub count: u32,
    pub last_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "cannot write the ban snapshot {path}: {source} (check that the directory exists and belongs to agent.user)"
    )]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read the ban snapshot {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`load`] found.
#[derive(Debug)]
pub enum Loaded {
    Absent,
    Good(Snapshot),
    /// Unreadable as a snapshot; the file was renamed to `aside` (when that worked).
    Corrupt {
        reason: String,
        aside: Option<PathBuf>,
    },
}

/// Reads the snapshot at `path`. A corrupt file is renamed to `<path>.corrupt-<unix seconds>`.
pub fn load(path: &Path, now: Now) -> Result<Loaded, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Absent),
        Err(source) => return Err(SnapshotError::Read { path: path.to_owned(), source }),
    };
    let reason = match serde_json::from_slice::<Snapshot>(&bytes) {
        Ok(snapshot) if snapshot.version == VERSION => return Ok(Loaded::Good(snapshot)),
        Ok(snapshot) => format!("format version {} (this agent reads {VERSION})", snapshot.version),
        Err(error) => error.to_string(),
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{}", now.unix_ns / 1_000_000_000));
    let aside = PathBuf::from(aside);
    let aside = std::fs::rename(path, &aside).ok().map(|()| aside);
    Ok(Loaded::Corrupt { reason, aside })
}

/// Writes `snapshot` to `path` atomically: a temporary file beside it, synced, renamed over.
pub fn save(path: &Path, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    let err = |source| SnapshotError::Write { path: path.to_owned(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    let mut out = std::io::BufWriter::new(&mut file);
    serde_json::to_writer(&mut out, snapshot).map_err(|e| err(e.into()))?;
    out.write_all(b"\n").map_err(err)?;
    out.flush().map_err(err)?;
    drop(out);
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Removes `target`'s ban and offence history from the snapshot at `path`, for an unban made
/// while no agent runs (the next start would otherwise restore the ban). Returns whether the
/// snapshot held either. An absent or unreadable snapshot holds nothing to forget.
pub fn forget(path: &Path, target: &str) -> Result<bool, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(SnapshotError::Read { path: path.to_owned(), source }),
    };
    let Ok(mut snapshot) = serde_json::from_slice::<Snapshot>(&bytes) else { return Ok(false) };
    if snapshot.version != VERSION {
        return Ok(false);
    }
    let before = (snapshot.bans.len(), snapshot.offences.len());
    snapshot.bans.retain(|b| b.target != target);
    snapshot.offences.retain(|o| o.target != target);
    if (snapshot.bans.len(), snapshot.offences.len()) == before {
        return Ok(false);
    }
    save(path, &snapshot)?;
    Ok(true)
}

/// Removes the steering passes inside `net` from the snapshot at `path`, for a removal made
/// while no agent runs. Returns how many went.
pub fn forget_steer_passes(path: &Path, net: &ipnet::IpNet) -> Result<usize, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(SnapshotError::Read { path: path.to_owned(), source }),
    };
    let Ok(mut snapshot) = serde_json::from_slice::<Snapshot>(&bytes) else { return Ok(0) };
    if snapshot.version != VERSION {
        return Ok(0);
    }
    let before = snapshot.steer_passes.len();
    snapshot
        .steer_passes
        .retain(|p| p.client.parse::<std::net::IpAddr>().is_ok_and(|ip| !net.contains(&ip)));
    let removed = before - snapshot.steer_passes.len();
    if removed > 0 {
        save(path, &snapshot)?;
    }
    Ok(removed)
}

/// The bans in force among `entries` (as `list`'s store listed them) and the offence history,
/// as a snapshot taken at `now`.
pub fn capture<S: BanStore>(
    list: &Blocklist<S>,
    entries: &[(BanTarget, helo_common::BanValue)],
    offences: Vec<SavedOffence>,
    origin: &dyn Fn(&BanTarget) -> Option<String>,
    now: Now,
) -> Result<Snapshot, StoreError> {
    let mut bans = Vec::new();
    for &(target, value) in entries {
        if !value.active_at(now.boot_ns) {
            continue;
        }
        let expires_unix = (value.expires_ns != NEVER_EXPIRES)
            .then(|| boot_to_unix(value.expires_ns, now).div_ceil(1_000_000_000));
        bans.push(SavedBan {
            target: target.to_string(),
            expires_unix,
            reason: list.reason_of(value.reason)?,
            hits: value.hits,
            origin: origin(&target),
        });
    }
    Ok(Snapshot {
        version: VERSION,
        saved_unix: now.unix_ns / 1_000_000_000,
        bans,
        offences,
        passes: Vec::new(),
        steer_passes: Vec::new(),
    })
}

/// What [`restore`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub restored: usize,
    pub expired: usize,
    /// Already in the map with a later expiry (the pinned maps outlived the agent).
    pub kept: usize,
    /// Entries that did not parse (reported, skipped).
    pub invalid: usize,
    /// The gateways that made the restored bans made elsewhere.
    pub origins: Vec<(BanTarget, String)>,
}

/// Puts the snapshot's bans still in force at `now` into `list`.
pub fn restore<S: BanStore>(
    list: &mut Blocklist<S>,
    snapshot: &Snapshot,
    now: Now,
) -> Result<Restored, StoreError> {
    let mut done = Restored::default();
    let mut reasons = HashSet::new();
    for ban in &snapshot.bans {
        let Ok(target) = ban.target.parse::<BanTarget>() else {
            tracing::warn!(target = ban.target, "snapshot: not an address, skipped");
            done.invalid += 1;
            continue;
        };
        let expires_ns = match ban.expires_unix {
            None => NEVER_EXPIRES,
            Some(secs) => {
                let unix_ns = secs.saturating_mul(1_000_000_000);
                if unix_ns <= now.unix_ns {
                    done.expired += 1;
                    continue;
                }
                unix_to_boot(unix_ns, now)
            }
        };
        // Where it came from, whether the pinned ban or the saved one is kept.
        if let Some(node) = &ban.origin {
            done.origins.push((target, node.clone()));
        }
        if let Some(old) = list.store().get(&target)?
            && (old.expires_ns >= expires_ns && old.active_at(now.boot_ns))
        {
            done.kept += 1;
            continue;
        }
        list.put_ban(&target, expires_ns, &ban.reason, ban.hits, &mut reasons)?;
        done.restored += 1;
    }
    Ok(done)
}

/// The offences of `snapshot` still within `forget_ns` of `now`, with their last time on the
/// boot clock (saturating at 0 for offences from before this boot).
pub fn offences_in_force(
    snapshot: &Snapshot,
    forget_ns: u64,
    now: Now,
) -> Vec<(BanTarget, u32, u64)> {
    snapshot
        .offences
        .iter()
        .filter_map(|o| {
            let target = o.target.parse().ok()?;
            let last_unix_ns = o.last_unix.saturating_mul(1_000_000_000);
            let age = now.unix_ns.saturating_sub(last_unix_ns);
            (age < forget_ns).then(|| (target, o.count, now.boot_ns.saturating_sub(age)))
        })
        .collect()
}

/// A future Unix instant (ns) on the boot clock, short of [`NEVER_EXPIRES`]; a past one is
/// `now`.
pub fn unix_to_boot(unix_ns: u64, now: Now) -> u64 {
    now.boot_ns.saturating_add(unix_ns.saturating_sub(now.unix_ns)).min(NEVER_EXPIRES - 1)
}

/// A boot-clock instant as Unix nanoseconds.
pub fn boot_to_unix(boot_ns: u64, now: Now) -> u64 {
    if boot_ns >= now.boot_ns {
        now.unix_ns.saturating_add(boot_ns - now.boot_ns)
    } else {
        now.unix_ns.saturating_sub(now.boot_ns - boot_ns)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Ttl;
    use super::super::fake::FakeStore;
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn now(boot_s: u64, unix_s: u64) -> Now {
        Now { boot_ns: boot_s * SEC, unix_ns: unix_s * SEC }
    }

    fn banned(list: &Blocklist<FakeStore>, ip: &str, at: u64) -> bool {
        use super::super::BanCheck as _;
        list.store().banned(ip.parse().unwrap(), at)
    }

    #[test]
    fn bans_survive_a_reboot_with_their_remaining_time() {
        // Before: boot clock at 1000 s, wall clock at 1_700_000_000.
        let before = now(1000, 1_700_000_000);
        let mut old = Blocklist::new(FakeStore::default());
        let ttl = |s| Ttl::For(Duration::from_secs(s));
        old.ban(&"192.0.2.1".parse().unwrap(), ttl(600), "forged_identity: mx", before.boot_ns)
            .unwrap();
        old.ban(&"192.0.2.2".parse().unwrap(), ttl(60), "short", before.boot_ns).unwrap();
        old.ban(&"2001:db8::/64".parse().unwrap(), Ttl::Forever, "manual", before.boot_ns).unwrap();
        let offences =
            vec![SavedOffence { target: "192.0.2.1".into(), count: 3, last_unix: 1_700_000_000 }];
        let entries = old.store().entries().unwrap();
        // The /64 ban came from another gateway of the fleet.
        let origin = |t: &BanTarget| (t.to_string() == "2001:db8::/64").then(|| "mx2".to_owned());
        let snapshot = capture(&old, &entries, offences, &origin, before).unwrap();
        let text = serde_json::to_string(&snapshot).unwrap();
        let snapshot: Snapshot = serde_json::from_str(&text).unwrap();

        // After a reboot 120 s later: the boot clock restarted, at 30 s now.
        let after = now(30, 1_700_000_120);
        let mut new = Blocklist::new(FakeStore::default());
        let done = restore(&mut new, &snapshot, after).unwrap();
        let origins = vec![("2001:db8::/64".parse().unwrap(), "mx2".to_owned())];
        assert_eq!(done, Restored { restored: 2, expired: 1, kept: 0, invalid: 0, origins });
        // 600 s ban, 120 s gone: 480 s left from boot 30 s.
        assert!(banned(&new, "192.0.2.1", (30 + 479) * SEC));
        assert!(!banned(&new, "192.0.2.1", (30 + 481) * SEC));
        assert!(!banned(&new, "192.0.2.2", 30 * SEC), "expired during the reboot");
        assert!(banned(&new, "2001:db8::5", u64::MAX - 1), "forever stays forever");
        let listed = new.list(after.boot_ns).unwrap();
        assert!(listed.iter().any(|e| e.reason == "forged_identity: mx"));

        let history = offences_in_force(&snapshot, 3600 * SEC, after);
        assert_eq!(history, vec![("192.0.2.1".parse().unwrap(), 3, 0)]);
        assert!(offences_in_force(&snapshot, 60 * SEC, after).is_empty(), "forgotten");
    }

    #[test]
    fn a_longer_ban_already_in_the_map_is_kept() {
        let at = now(100, 1_700_000_000);
        let mut list = Blocklist::new(FakeStore::default());
        let target = "192.0.2.1".parse().unwrap();
        list.ban(&target, Ttl::For(Duration::from_secs(7200)), "newer", at.boot_ns).unwrap();
        let snapshot = Snapshot {
            version: VERSION,
            saved_unix: 0,
            bans: vec![SavedBan {
                target: "192.0.2.1".into(),
                expires_unix: Some(1_700_000_060),
                reason: "older".into(),
                hits: 0,
                origin: Some("mx2".into()),
            }],
            offences: vec![],
            passes: vec![],
            steer_passes: vec![],
        };
        let done = restore(&mut list, &snapshot, at).unwrap();
        assert_eq!(done.kept, 1);
        assert_eq!(list.list(at.boot_ns).unwrap()[0].reason, "newer");
        // A fleet's ban kept from the pinned maps at a restart lost its origin: `list` said
        // `here`, and a Redis that lost its data got it back under this gateway's name.
        assert_eq!(done.origins, [(target, "mx2".to_owned())]);
    }

    #[test]
    fn garbage_entries_are_skipped_not_fatal() {
        let snapshot = Snapshot {
            version: VERSION,
            saved_unix: 0,
            bans: vec![SavedBan {
                target: "not-an-ip".into(),
                expires_unix: None,
                reason: String::new(),
                hits: 0,
                origin: None,
            }],
            offences: vec![],
            passes: vec![],
            steer_passes: vec![],
        };
        let mut list = Blocklist::new(FakeStore::default());
        assert_eq!(restore(&mut list, &snapshot, now(1, 1)).unwrap().invalid, 1);
    }

    #[test]
    fn save_then_load_round_trips_and_corrupt_files_are_set_aside() {
        let dir = std::env::temp_dir().join(format!("helo-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bans.json");
        let at = now(5, 1_700_000_000);
        assert!(matches!(load(&path, at).unwrap(), Loaded::Absent));

        let snapshot = Snapshot { version: VERSION, saved_unix: 7, ..Snapshot::default() };
        save(&path, &snapshot).unwrap();
        match load(&path, at).unwrap() {
            Loaded::Good(read) => assert_eq!(read, snapshot),
            other => panic!("{other:?}"),
        }
        assert!(!dir.join("bans.json.tmp").exists(), "the temporary file is renamed away");

        std::fs::write(&path, b"{\"version\": 1, \"bans\": [tru").unwrap();
        match load(&path, at).unwrap() {
            Loaded::Corrupt { aside: Some(aside), reason } => {
                assert!(reason.contains("EOF") || reason.contains("expected"), "{reason}");
                assert!(aside.exists() && !path.exists(), "set aside as {}", aside.display());
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(
            &path,
            b"{\"version\": 99, \"saved_unix\": 0, \"bans\": [], \"offences\": []}",
        )
        .unwrap();
        assert!(matches!(load(&path, at).unwrap(), Loaded::Corrupt { .. }), "unknown version");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Snapshots from before the pregreet test have no `passes`: they load, with none.
    #[test]
    fn a_snapshot_without_passes_loads_and_one_with_passes_round_trips() {
        let dir = std::env::temp_dir().join(format!("helo-snap-passes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bans.json");
        let at = now(5, 1_700_000_000);
        std::fs::write(
            &path,
            b"{\"version\": 1, \"saved_unix\": 0, \"bans\": [], \"offences\": []}",
        )
        .unwrap();
        let Loaded::Good(old) = load(&path, at).unwrap() else { panic!("an older snapshot loads") };
        assert!(old.passes.is_empty());
        save(&path, &old).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("passes"), "none: not written, for older agents: {text}");

        let passes = vec![SavedPass { client: "192.0.2.1".into(), until_unix: 1_700_086_400 }];
        let snapshot = Snapshot { version: VERSION, passes, ..Snapshot::default() };
        save(&path, &snapshot).unwrap();
        let Loaded::Good(read) = load(&path, at).unwrap() else { panic!("readable") };
        assert_eq!(read, snapshot);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Regression (issue 11 follow-up): `unban` with no agent running removed the pinned ban
    /// but left it in the snapshot, so the next start restored it.
    #[test]
    fn an_unban_while_stopped_is_forgotten_by_the_snapshot_too() {
        let dir = std::env::temp_dir().join(format!("helo-snap-forget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bans.json");
        assert!(!forget(&path, "203.0.113.9").unwrap(), "no snapshot: nothing to forget");
        let ban = |target: &str| SavedBan {
            target: target.into(),
            expires_unix: None,
            reason: "r".into(),
            hits: 0,
            origin: None,
        };
        let offence = |target: &str| SavedOffence { target: target.into(), count: 2, last_unix: 1 };
        let snapshot = Snapshot {
            version: VERSION,
            saved_unix: 1,
            bans: vec![ban("203.0.113.9"), ban("203.0.113.10")],
            offences: vec![offence("203.0.113.9"), offence("203.0.113.10")],
            passes: vec![],
            steer_passes: vec![],
        };
        save(&path, &snapshot).unwrap();
        assert!(forget(&path, "203.0.113.9").unwrap());
        let Loaded::Good(left) = load(&path, now(1, 2)).unwrap() else { panic!("readable") };
        assert_eq!(left.bans, [ban("203.0.113.10")]);
        assert_eq!(left.offences, [offence("203.0.113.10")]);
        assert!(!forget(&path, "203.0.113.9").unwrap(), "nothing left of it");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
