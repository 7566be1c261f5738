//! DNS for the DNS checks: the HELO name's A, AAAA and MX records, and the client's
//! forward-confirmed reverse name, turned into the pure [`DnsFacts`] the rules read.
//!
//! One resolver (hickory) for the agent, with its cache (positive and negative answers, each
//! for its TTL, bounded by `dns.cache_size`), at most `dns.max_lookups` lookups in flight, and
//! `dns.timeout` per lookup. Names are looked up as absolute names (a final dot), so a
//! resolv.conf search list never turns a bot's `mail.example` into `mail.example.our.lan`.
//! An answer that cannot be trusted (a timeout, SERVFAIL, REFUSED, no server reachable) is a
//! temporary failure, never "the name does not exist".

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::sync::Semaphore;

use crate::addr::canonical;
use crate::config::DnsConfig;
use crate::rules::{ClientDns, DnsFacts, HeloDns};

/// PTR names followed at most when confirming a client's reverse name.
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
    /// A definite "no such records" (NXDOMAIN, or the name exists without them).
    None,
    TempFail(String),
}

impl Dns {
    pub fn new(config: &DnsConfig) -> Result<Self, DnsError> {
        let mut options = ResolverOpts::default();
        // dns.timeout bounds the whole lookup (below); one attempt per server.
        options.timeout = config.timeout;
        options.attempts = 1;
        options.cache_size = config.cache_size;
        // For the reverse name's confirmation (lookup_ip): both families.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
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
        })
    }

    /// The HELO name's records and the client's reverse name, looked up together. `None` when
    /// every slot is taken and `need` is [`Need::Optional`].
    pub async fn facts(&self, helo: &str, client: IpAddr, need: Need) -> Option<DnsFacts> {
        let (helo, client) = tokio::join!(self.helo(helo, need), self.client(client, need));
        Some(DnsFacts { helo: helo?, client: client? })
    }

    /// The HELO name in DNS: A, AAAA and MX, in parallel (each answer cached on its own).
    pub async fn helo(&self, name: &str, need: Need) -> Option<HeloDns> {
        let _slot = self.slot(need).await?;
        let absolute = absolute(name);
        let name = absolute.as_str();
        let (v4, v6, mx) = tokio::join!(
            self.bounded(async { self.resolver.ipv4_lookup(name).await }),
            self.bounded(async { self.resolver.ipv6_lookup(name).await }),
            self.bounded(async { self.resolver.mx_lookup(name).await }),
        );
        let mut addresses: Vec<IpAddr> = Vec::new();
        if let Answer::Records(lookup) = &v4 {
            addresses.extend(lookup.iter().map(|a| IpAddr::V4(a.0)));
        }
        if let Answer::Records(lookup) = &v6 {
            addresses.extend(lookup.iter().map(|a| canonical(IpAddr::V6(a.0))));
        }
        let has_mx = matches!(&mx, Answer::Records(lookup) if lookup.iter().next().is_some());
        Some(match (v4, v6, mx) {
            _ if !addresses.is_empty() || has_mx => HeloDns::Found { addresses, mx: has_mx },
            (Answer::TempFail(why), _, _)
            | (_, Answer::TempFail(why), _)
            | (_, _, Answer::TempFail(why)) => HeloDns::TempFail(why),
            _ => HeloDns::Missing,
        })
    }

    /// The client's reverse name, confirmed when one of its PTR names resolves back to it.
    pub async fn client(&self, ip: IpAddr, need: Need) -> Option<ClientDns> {
        let _slot = self.slot(need).await?;
        let ip = canonical(ip);
        let names: Vec<String> =
            match self.bounded(async { self.resolver.reverse_lookup(ip).await }).await {
                Answer::Records(lookup) => lookup
                    .iter()
                    .take(MAX_PTR_NAMES)
                    .map(|name| name.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                Answer::None => return Some(ClientDns::Unconfirmed(Vec::new())),
                Answer::TempFail(why) => return Some(ClientDns::TempFail(why)),
            };
        for name in &names {
            let absolute = absolute(name);
            if let Answer::Records(lookup) =
                self.bounded(async { self.resolver.lookup_ip(absolute.as_str()).await }).await
                && lookup.iter().any(|a| canonical(a) == ip)
            {
                return Some(ClientDns::Confirmed(name.clone()));
            }
        }
        Some(ClientDns::Unconfirmed(names))
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
                Some(ProtoErrorKind::NoRecordsFound { response_code, .. })
                    if matches!(*response_code, ResponseCode::NXDomain | ResponseCode::NoError) =>
                {
                    Answer::None
                }
                Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
                    Answer::TempFail(format!("the resolver answered {response_code}"))
                }
                _ => Answer::TempFail(error.to_string()),
            },
        }
    }
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

    #[test]
    fn names_are_looked_up_absolute() {
        assert_eq!(absolute("mail.example.com"), "mail.example.com.");
        assert_eq!(absolute("mail.example.com."), "mail.example.com.");
    }
}
