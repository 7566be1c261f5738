//! Bans DNS put off: a client whose HELO would have been banned (`forged_identity`,
//! `impersonation`) but for its reverse name, which DNS could not give, is told 450 and not
//! banned (an honest host of our own zone, its reverse name confirmed, is no forger). A bot
//! told 450 comes back with another HELO: judged on that one alone, it went free, and the ban
//! that DNS had only put off was never made. Seen in the storm bench, where a resolver under
//! thousands of new clients a second times out now and then.
//!
//! So the judge remembers each such client and the HELO it was told 450 for, for
//! [`DEFERRAL_TTL`]. A later session of the client is first judged on that HELO again
//! (`judge::Hearing`), with what DNS says now: banned where the reverse name still does not
//! clear it, 450 again while DNS cannot say, and forgotten where it clears it (the session is
//! then judged on its own HELO). Bounded: the least recently deferred go first.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;

/// How long a deferred ban waits for its client to come back (seconds): an MTA retries a
/// 450 within minutes, a bot at once.
pub const DEFERRAL_TTL: u64 = 3600;

/// How many clients with a deferred ban are remembered at once.
pub const MAX_DEFERRALS: usize = 65_536;

/// The clients told 450 for a HELO that would have been banned, and that HELO.
pub struct Deferrals {
    inner: Mutex<lru::LruCache<IpAddr, (String, u64)>>,
}

impl Default for Deferrals {
    fn default() -> Self {
        let size = NonZeroUsize::new(MAX_DEFERRALS).expect("a size");
        Deferrals { inner: Mutex::new(lru::LruCache::new(size)) }
    }
}

impl Deferrals {
    /// `client` was told 450 for `helo` at `now` (seconds, any monotonic clock). A deferral
    /// held already stays as it was: its first HELO is the one to clear.
    pub fn defer(&self, client: IpAddr, helo: &str, now: u64) {
        let mut inner = self.inner.lock().expect("deferrals lock");
        let live = inner.get(&client).is_some_and(|(_, at)| now.saturating_sub(*at) < DEFERRAL_TTL);
        if !live {
            inner.put(client, (helo.to_owned(), now));
        }
    }

    /// The HELO `client` was told 450 for within [`DEFERRAL_TTL`], if any.
    pub fn recall(&self, client: IpAddr, now: u64) -> Option<String> {
        let mut inner = self.inner.lock().expect("deferrals lock");
        match inner.peek(&client) {
            Some((helo, at)) if now.saturating_sub(*at) < DEFERRAL_TTL => Some(helo.clone()),
            Some(_) => {
                inner.pop(&client);
                None
            }
            None => None,
        }
    }

    /// DNS has cleared `client`, or it was banned: nothing is put off any more.
    pub fn forget(&self, client: IpAddr) {
        self.inner.lock().expect("deferrals lock").pop(&client);
    }

    /// How many clients are remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("deferrals lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferral_is_recalled_until_it_expires_and_keeps_its_first_helo() {
        let deferrals = Deferrals::default();
        let bot: IpAddr = "198.51.100.7".parse().unwrap();
        deferrals.defer(bot, "mx.gw.test", 100);
        deferrals.defer(bot, "gmail.com", 200);
        assert_eq!(deferrals.recall(bot, 100 + DEFERRAL_TTL - 1).as_deref(), Some("mx.gw.test"));
        assert_eq!(deferrals.recall(bot, 100 + DEFERRAL_TTL), None, "expired");
        assert!(deferrals.is_empty(), "an expired one is dropped when met");
        deferrals.defer(bot, "gmail.com", 5000);
        assert_eq!(deferrals.recall(bot, 5001).as_deref(), Some("gmail.com"));
        deferrals.forget(bot);
        assert_eq!(deferrals.recall(bot, 5002), None);
    }
}
