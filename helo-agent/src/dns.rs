//! DNS for the DNS checks: the HELO name's A, AAAA and MX records, and the client's reverse
//! names (PTR), turned into the pure [`DnsFacts`] the rules read.
//!
//! The client is forward-confirmed against its HELO ([`confirm`]): a PTR name that is the HELO
//! name, whose A or AAAA records (the HELO lookup's own) include the client. That is the one
//! confirmation any rule reads (`DnsFacts::confirms` compares with the HELO), and it needs no
//! lookup of its own: the PTR lookup starts at accept, the HELO's at HELO, and a session waits
//! for one resolver round trip, not a PTR answer and then its name's addresses.
//!
//! One resolver (hickory) for the agent, with its cache (positive and negative answers, each
//! for its TTL, bounded by `dns.cache_size`), at most `dns.max_lookups` lookups in flight, and
//! `dns.timeout` per lookup. Names are looked up as absolute names (a final dot), so a
//! resolv.conf search list never turns a bot's `mail.example` into `mail.example.our.lan`.
//! An answer that cannot be trusted (a timeout, SERVFAIL, REFUSED, no server reachable) is a
//! temporary failure, never "the name does not exist".
//!
//! In front of hickory's cache, the finished facts are cached too: a HELO name's [`HeloDns`]
//! and a client's [`ReverseNames`], each until the first of the answers it was made from expires
//! (a negative answer for its SOA's negative TTL; a temporary failure is never kept), at most
//! `dns.cache_size` of each. A sender seen before then costs one hash lookup a side, where
//! going through hickory's cache again costs four lookups of a few µs each (bench section
//! `dns`).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::rules::{ClientDns, DnsFacts, HeloDns};

/// PTR names kept at most.
const MAX_PTR_NAMES: usize = 4;

/// The client's reverse names as DNS gave them: its PTR names (lower case, no final dot; maybe
/// none), or why DNS could not say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReverseNames {
    Names(Vec<String>),
    TempFail(String),
}

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
    /// The facts of HELO names (lower case, no final dot) and of clients, until they expire.
    helos: Cache<String, HeloDns>,
    clients: Cache<IpAddr, ReverseNames>,
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
            helos: Cache::new(config.cache_size),
            clients: Cache::new(config.cache_size),
        })
    }

    /// The client's reverse names if they are cached and current.
    pub fn cached_reverse(&self, ip: IpAddr) -> Option<ReverseNames> {
        self.clients.get(&canonical(ip), Instant::now())
    }

    /// The HELO name's records and the client's reverse names, looked up together, the
    /// client confirmed against the HELO. `None` when every slot is taken and `need` is
    /// [`Need::Optional`].
    pub async fn facts(&self, helo: &str, client: IpAddr, need: Need) -> Option<DnsFacts> {
        self.facts_with(helo, client, need, self.reverse(client, need)).await
    }

    /// As [`Dns::facts`], with the client's reverse names from `names`: a lookup started
    /// earlier (the proxy's, at accept) or a cached answer, awaited beside the HELO's lookups.
    /// No reverse names (no slot was free) leave the client not looked at.
    pub async fn facts_with(
        &self,
        helo: &str,
        client: IpAddr,
        need: Need,
        names: impl Future<Output = Option<ReverseNames>>,
    ) -> Option<DnsFacts> {
        let (records, names) = tokio::join!(self.helo(helo, need), names);
        let records = records?;
        let client = match names {
            Some(names) => confirm(client, &names, helo, &records),
            None => ClientDns::NotLooked,
        };
        Some(DnsFacts { client, helo: records })
    }

    /// The HELO name in DNS: A, AAAA and MX, in parallel (each answer cached on its own, the
    /// facts made of them too).
    pub async fn helo(&self, name: &str, need: Need) -> Option<HeloDns> {
        let key = helo_key(name);
        if let Some(found) = self.helos.get(&key, Instant::now()) {
            return Some(found);
        }
        let _slot = self.slot(need).await?;
        let absolute = absolute(name);
        let name = absolute.as_str();
        let (v4, v6, mx) = tokio::join!(
            self.bounded(async { self.resolver.ipv4_lookup(name).await }),
            self.bounded(async { self.resolver.ipv6_lookup(name).await }),
            self.bounded(async { self.resolver.mx_lookup(name).await }),
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
        // Found with a failed side (A answered, AAAA timed out) holds no longer than the
        // failure: `until` is then `None`, and the next session asks again.
        self.helos.put(key, &facts, until);
        Some(facts)
    }

    /// The client's reverse names (PTR), each answer cached for its TTL.
    pub async fn reverse(&self, ip: IpAddr, need: Need) -> Option<ReverseNames> {
        let ip = canonical(ip);
        if let Some(found) = self.clients.get(&ip, Instant::now()) {
            return Some(found);
        }
        let _slot = self.slot(need).await?;
        let reverse = self.bounded(async { self.resolver.reverse_lookup(ip).await }).await;
        let until = reverse.until(Instant::now());
        let names = match reverse {
            Answer::Records(lookup) => ReverseNames::Names(
                lookup
                    .iter()
                    .take(MAX_PTR_NAMES)
                    .map(|name| name.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            ),
            Answer::None(_) => ReverseNames::Names(Vec::new()),
            Answer::TempFail(why) => ReverseNames::TempFail(why),
        };
        self.clients.put(ip, &names, until);
        Some(names)
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

/// The client as DNS sees it, against its HELO: forward-confirmed (`Confirmed(helo)`) when one
/// of its PTR names is the HELO name and the HELO's A or AAAA records (`records`) include it.
/// A HELO among its PTR names whose lookup failed for now leaves that unknown: a temporary
/// failure, as the PTR's own would be.
pub fn confirm(client: IpAddr, reverse: &ReverseNames, helo: &str, records: &HeloDns) -> ClientDns {
    let names = match reverse {
        ReverseNames::TempFail(why) => return ClientDns::TempFail(why.clone()),
        ReverseNames::Names(names) => names,
    };
    let helo = helo_key(helo);
    if !names.contains(&helo) {
        return ClientDns::Unconfirmed(names.clone());
    }
    let client = canonical(client);
    match records {
        HeloDns::Found { addresses, .. } if addresses.iter().any(|a| canonical(*a) == client) => {
            ClientDns::Confirmed(helo)
        }
        HeloDns::TempFail(why) => ClientDns::TempFail(why.clone()),
        _ => ClientDns::Unconfirmed(names.clone()),
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

    /// The client is confirmed against its HELO: a PTR name that is the HELO, whose records
    /// (the HELO lookup's) include the client; nothing else confirms.
    #[test]
    fn a_client_is_confirmed_by_a_ptr_name_that_is_its_helo_and_points_back() {
        let client: IpAddr = "192.0.2.10".parse().unwrap();
        let names = |n: &[&str]| ReverseNames::Names(n.iter().map(|s| (*s).to_owned()).collect());
        let at = |a: &str| HeloDns::Found { addresses: vec![a.parse().unwrap()], mx: false };
        let ptr = names(&["other.test", "mail.good.test"]);
        assert_eq!(
            confirm(client, &ptr, "Mail.Good.Test.", &at("::ffff:192.0.2.10")),
            ClientDns::Confirmed("mail.good.test".into())
        );
        let unconfirmed =
            ClientDns::Unconfirmed(vec!["other.test".into(), "mail.good.test".into()]);
        assert_eq!(confirm(client, &ptr, "mail.good.test", &at("192.0.2.99")), unconfirmed);
        assert_eq!(confirm(client, &ptr, "mail.good.test", &HeloDns::Missing), unconfirmed);
        assert_eq!(confirm(client, &ptr, "liar.test", &at("192.0.2.10")), unconfirmed, "not a PTR");
        assert_eq!(
            confirm(client, &ptr, "mail.good.test", &HeloDns::TempFail("timeout".into())),
            ClientDns::TempFail("timeout".into())
        );
        assert_eq!(
            confirm(
                client,
                &ReverseNames::TempFail("servfail".into()),
                "x.test",
                &at("192.0.2.10")
            ),
            ClientDns::TempFail("servfail".into())
        );
        assert_eq!(
            confirm(client, &names(&[]), "x.test", &at("192.0.2.10")),
            ClientDns::Unconfirmed(vec![])
        );
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
