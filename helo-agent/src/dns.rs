//! DNS for the checks that read it: the HELO name's A, AAAA and MX records, and the client's
//! forward-confirmed reverse name (FCrDNS: a PTR name whose A or AAAA records include the
//! address), turned into the pure [`DnsFacts`] the rules read.
//!
//! The client's reverse name is looked up from accept ([`Dns::client`]: its PTR names, then
//! each name's addresses), so it is most often known when the HELO comes; the HELO's records
//! when a check asks for them. Both are independent of each other: a session waits at most for
//! the slower of the two, and only where its verdict rests on them (`judge::Hearing`).
//!
//! One resolver (hickory) for the agent, with its cache (positive and negative answers, each
//! for its TTL, bounded by `dns.cache_size`), at most `dns.max_lookups` lookups in flight, and
//! `dns.timeout` per lookup. Names are looked up as absolute names (a final dot), so a
//! resolv.conf search list never turns a bot's `mail.example` into `mail.example.our.lan`.
//! An answer that cannot be trusted (a timeout, SERVFAIL, REFUSED, no server reachable) is a
//! temporary failure, never "the name does not exist".
//!
//! In front of hickory's cache, the finished facts are cached too: a HELO name's [`HeloDns`]
//! and a client's [`ClientDns`], each until the first of the answers it was made from expires
//! (a negative answer for its SOA's negative TTL), at most `dns.cache_size` of each. A
//! temporary failure is kept for `dns.failure_ttl` (30 s): a resolver that does not answer
//! costs each new name (and each new client) one `dns.timeout`, then answers "try again later"
//! at once, instead of holding every session for the timeout. A sender seen before costs one
//! hash lookup a side, where going through hickory's cache again costs four lookups of a few
//! µs each (bench section `dns`).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::Name;
use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::lookup::{Ipv4Lookup, Ipv6Lookup, MxLookup, ReverseLookup};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use lru::LruCache;
use tokio::sync::Semaphore;

use crate::addr::canonical;
use crate::config::DnsConfig;
use crate::rules::{ClientDns, HeloDns};

/// PTR names kept at most.
const MAX_PTR_NAMES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot set up the resolver from /etc/resolv.conf: {0} (give dns.servers, or fix \
         resolv.conf)"
    )]
    System(#[source] ResolveError),
}

/// The agent's resolver; cheap to share behind an `Arc`.
pub struct Dns {
    resolver: TokioResolver,
    slots: Arc<Semaphore>,
    timeout: Duration,
    /// How long a temporary failure is remembered.
    failure_ttl: Duration,
    /// The facts of HELO names (lower case, no final dot) and of clients, until they expire.
    helos: Cache<String, HeloDns>,
    clients: Cache<IpAddr, ClientDns>,
}

/// Finished facts by key, each until the earliest expiry of the answers behind it; bounded
/// (least recently used out first).
struct Cache<K: Hash + Eq, V> {
    cache: Mutex<LruCache<K, (V, Instant)>>,
}

impl<K: Hash + Eq, V: Clone> Cache<K, V> {
    fn new(size: usize) -> Self {
        let size = NonZeroUsize::new(size).unwrap_or(NonZeroUsize::MIN);
        Cache { cache: Mutex::new(LruCache::new(size)) }
    }

    fn get(&self, key: &K, now: Instant) -> Option<V> {
        let mut cache = self.cache.lock().expect("dns facts lock");
        match cache.get(key) {
            Some((value, until)) if now < *until => Some(value.clone()),
            Some(_) => {
                cache.pop(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` until `until`; `None`: not to be kept (a temporary failure was in it).
    fn put(&self, key: K, value: &V, until: Option<Instant>) {
        if let Some(until) = until {
            self.cache.lock().expect("dns facts lock").put(key, (value.clone(), until));
        }
    }
}

/// A lookup's expiry (hickory's `valid_until`).
trait Expires {
    fn valid_until(&self) -> Instant;
}

macro_rules! expires {
    ($($t:ty),*) => {
        $(impl Expires for $t {
            fn valid_until(&self) -> Instant {
                <$t>::valid_until(self)
            }
        })*
    };
}
expires!(Ipv4Lookup, Ipv6Lookup, MxLookup, ReverseLookup);

/// The earlier of two expiries, where `None` (not to be kept) wins.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    Some(a?.min(b?))
}

/// Whether a session may go on without DNS when every lookup slot is taken (its verdict cannot
/// depend on DNS), or must wait for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Optional,
    Required,
}

/// How one lookup ended.
enum Answer<T> {
    Records(T),
    /// A definite "no such records" (NXDOMAIN, or the name exists without them), for the
    /// negative TTL the zone's SOA gave (`None`: not said, then not kept).
    None(Option<Duration>),
    TempFail(String),
}

impl<T: Expires> Answer<T> {
    /// Until when this answer holds; `None`: not to be kept.
    fn until(&self, now: Instant) -> Option<Instant> {
        match self {
            Answer::Records(lookup) => Some(lookup.valid_until()),
            Answer::None(ttl) => ttl.map(|ttl| now + ttl),
            Answer::TempFail(_) => None,
        }
    }
}

impl Dns {
    pub fn new(config: &DnsConfig) -> Result<Self, DnsError> {
        let mut options = ResolverOpts::default();
        // dns.timeout bounds the whole lookup (below); one attempt per server.
        options.timeout = config.timeout;
        options.attempts = 1;
        options.cache_size = config.cache_size;
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        let builder = if config.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(DnsError::System)?
        } else {
            let mut group = NameServerConfigGroup::new();
            for &server in &config.servers {
                group.push(NameServerConfig::new(server, Protocol::Udp));
                group.push(NameServerConfig::new(server, Protocol::Tcp));
            }
            let config = ResolverConfig::from_parts(None, Vec::new(), group);
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        Ok(Dns {
            resolver: builder.with_options(options).build(),
            slots: Arc::new(Semaphore::new(config.max_lookups.max(1))),
            timeout: config.timeout,
            failure_ttl: config.failure_ttl,
            helos: Cache::new(config.cache_size),
            clients: Cache::new(config.cache_size),
        })
    }

    /// The client's forward-confirmed reverse name if it is cached and current.
    pub fn cached_client(&self, ip: IpAddr) -> Option<ClientDns> {
        self.clients.get(&canonical(ip), Instant::now())
    }

    /// The HELO name in DNS: A, AAAA and MX, in parallel (each answer cached on its own, the
    /// facts made of them too). A temporary failure is kept for `dns.failure_ttl`.
    pub async fn helo(&self, name: &str, need: Need) -> Option<HeloDns> {
        let key = helo_key(name);
        if let Some(found) = self.helos.get(&key, Instant::now()) {
            return Some(found);
        }
        let _slot = self.slot(need).await?;
        // As the ASCII name it is: a HELO with `_` (which Postfix takes) is a DNS name too,
        // where hickory's IDNA parsing of a str would refuse it. One DNS cannot hold at all
        // has no records.
        let Ok(name) = Name::from_ascii(absolute(name)) else {
            let facts = HeloDns::Missing;
            self.helos.put(key, &facts, Some(Instant::now() + self.failure_ttl));
            return Some(facts);
        };
        let (v4, v6, mx) = tokio::join!(
            self.bounded(async { self.resolver.ipv4_lookup(name.clone()).await }),
            self.bounded(async { self.resolver.ipv6_lookup(name.clone()).await }),
            self.bounded(async { self.resolver.mx_lookup(name.clone()).await }),
        );
        let now = Instant::now();
        let until = earliest(earliest(v4.until(now), v6.until(now)), mx.until(now));
        let mut addresses: Vec<IpAddr> = Vec::new();
        if let Answer::Records(lookup) = &v4 {
            addresses.extend(lookup.iter().map(|a| IpAddr::V4(a.0)));
        }
        if let Answer::Records(lookup) = &v6 {
            addresses.extend(lookup.iter().map(|a| canonical(IpAddr::V6(a.0))));
        }
        let has_mx = matches!(&mx, Answer::Records(lookup) if lookup.iter().next().is_some());
        let facts = match (v4, v6, mx) {
            _ if !addresses.is_empty() || has_mx => HeloDns::Found { addresses, mx: has_mx },
            (Answer::TempFail(why), _, _)
            | (_, Answer::TempFail(why), _)
            | (_, _, Answer::TempFail(why)) => HeloDns::TempFail(why),
            _ => HeloDns::Missing,
        };
        // Found with a failed side (A answered, AAAA timed out) holds no longer than a failure.
        let until = match &facts {
            HeloDns::TempFail(_) => Some(now + self.failure_ttl),
            _ => until.or(Some(now + self.failure_ttl)),
        };
        self.helos.put(key, &facts, until);
        Some(facts)
    }

    /// The client's forward-confirmed reverse name: its PTR names (at most four), then each
    /// name's A and AAAA records (as a HELO name's, cached as such), the first name whose
    /// addresses include the client. Cached until the first answer behind it expires; a
    /// temporary failure for `dns.failure_ttl`. `None` when every slot is taken and `need` is
    /// [`Need::Optional`].
    pub async fn client(&self, ip: IpAddr, need: Need) -> Option<ClientDns> {
        let ip = canonical(ip);
        let now = Instant::now();
        if let Some(found) = self.clients.get(&ip, now) {
            return Some(found);
        }
        let reverse = {
            let _slot = self.slot(need).await?;
            self.bounded(async { self.resolver.reverse_lookup(ip).await }).await
        };
        let mut until = reverse.until(Instant::now());
        let names: Vec<String> = match reverse {
            Answer::Records(lookup) => lookup
                .iter()
                .take(MAX_PTR_NAMES)
                .map(|name| name.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            Answer::None(_) => Vec::new(),
            Answer::TempFail(why) => {
                let facts = ClientDns::TempFail(why);
                self.clients.put(ip, &facts, Some(Instant::now() + self.failure_ttl));
                return Some(facts);
            }
        };
        let forward =
            futures_util::future::join_all(names.iter().map(|name| self.helo(name, need)));
        let mut failed = None;
        let mut confirmed = None;
        for (name, records) in names.iter().zip(forward.await) {
            match records {
                Some(HeloDns::Found { addresses, .. })
                    if addresses.iter().any(|a| canonical(*a) == ip) =>
                {
                    confirmed.get_or_insert_with(|| name.clone());
                }
                Some(HeloDns::TempFail(why)) => failed = Some(why),
                // No slot: not known, so not kept.
                None => until = None,
                Some(_) => {}
            }
        }
        let facts = match (confirmed, failed) {
            (Some(name), _) => ClientDns::Confirmed(name),
            (None, Some(why)) => ClientDns::TempFail(why),
            (None, None) => ClientDns::Unconfirmed(names),
        };
        // Each forward answer is cached as the HELO facts of its name for its own TTL; the
        // client's facts are kept for the PTR's, at most `failure_ttl` when a side failed.
        let until = match &facts {
            ClientDns::TempFail(_) => Some(Instant::now() + self.failure_ttl),
            _ => until,
        };
        self.clients.put(ip, &facts, until);
        Some(facts)
    }

    async fn slot(&self, need: Need) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match need {
            Need::Required => self.slots.acquire().await.ok(),
            Need::Optional => self.slots.try_acquire().ok(),
        }
    }

    /// One lookup, bounded by `dns.timeout` and sorted into records, none, or a temporary
    /// failure.
    async fn bounded<T>(&self, lookup: impl Future<Output = Result<T, ResolveError>>) -> Answer<T> {
        match tokio::time::timeout(self.timeout, lookup).await {
            Err(_) => Answer::TempFail(format!("no answer in {:?}", self.timeout)),
            Ok(Ok(records)) => Answer::Records(records),
            Ok(Err(error)) => match error.proto().map(|p| p.kind()) {
                Some(ProtoErrorKind::NoRecordsFound { response_code, negative_ttl, .. })
                    if matches!(*response_code, ResponseCode::NXDomain | ResponseCode::NoError) =>
                {
                    Answer::None(negative_ttl.map(|ttl| Duration::from_secs(ttl.into())))
                }
                Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
                    Answer::TempFail(format!("the resolver answered {response_code}"))
                }
                _ => Answer::TempFail(error.to_string()),
            },
        }
    }
}

/// A HELO name's key in the facts cache: lower case, no final dot.
fn helo_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `name.`: looked up as is, never with the search list.
fn absolute(name: &str) -> String {
    let name = name.trim_end_matches('.');
    format!("{name}.")
}

/// What Postfix tells the policy service of the client: `client_name` is the verified
/// (forward-confirmed) name or `unknown`, `reverse_client_name` the PTR name or `unknown`.
pub fn from_postfix(client_name: Option<&str>, reverse_client_name: Option<&str>) -> ClientDns {
    let known = |name: Option<&str>| {
        name.map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|n| !n.is_empty() && n != "unknown")
    };
    match (known(client_name), known(reverse_client_name)) {
        (Some(verified), _) => ClientDns::Confirmed(verified),
        (None, reverse) => ClientDns::Unconfirmed(reverse.into_iter().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_names_become_the_client_facts() {
        assert_eq!(
            from_postfix(Some("Mail.Example.COM."), Some("mail.example.com")),
            ClientDns::Confirmed("mail.example.com".into())
        );
        assert_eq!(
            from_postfix(Some("unknown"), Some("dsl-1.isp.example")),
            ClientDns::Unconfirmed(vec!["dsl-1.isp.example".into()])
        );
        assert_eq!(from_postfix(None, Some("unknown")), ClientDns::Unconfirmed(vec![]));
    }

    /// Finished facts hold until the first answer behind them expires; a temporary failure
    /// is never kept; the cache is bounded.
    #[test]
    fn facts_are_kept_until_their_first_answer_expires() {
        let facts: Cache<String, HeloDns> = Cache::new(2);
        let now = Instant::now();
        let secs = Duration::from_secs;
        let until = earliest(Some(now + secs(300)), Some(now + secs(10)));
        assert_eq!(until, Some(now + secs(10)), "the earlier answer bounds the facts");
        assert_eq!(earliest(until, None), None, "a temporary failure in it: not kept");
        facts.put("a.example".into(), &HeloDns::Missing, until);
        facts.put("b.example".into(), &HeloDns::TempFail("timeout".into()), None);
        assert_eq!(facts.get(&"a.example".into(), now + secs(9)), Some(HeloDns::Missing));
        assert_eq!(facts.get(&"a.example".into(), now + secs(10)), None, "expired");
        assert_eq!(facts.get(&"a.example".into(), now), None, "and forgotten");
        assert_eq!(facts.get(&"b.example".into(), now), None, "never kept");
        for name in ["c.example", "d.example", "e.example"] {
            facts.put(name.into(), &HeloDns::Missing, Some(now + secs(60)));
        }
        assert_eq!(facts.cache.lock().unwrap().len(), 2, "bounded");
        assert_eq!(facts.get(&"c.example".into(), now), None, "least recently used out first");
        assert_eq!(helo_key("Mail.Example.COM."), "mail.example.com");
    }

    #[test]
    fn names_are_looked_up_absolute() {
        assert_eq!(absolute("mail.example.com"), "mail.example.com.");
        assert_eq!(absolute("mail.example.com."), "mail.example.com.");
    }
}
