//! Where the fleet's Redis is: one server (`redis://`, `rediss://`), or the master of a Redis
//! Sentinel service (`redis+sentinel://`, `rediss+sentinel://`), found again after every
//! failover.
//!
//! The URL is read here, sans IO, so `check-config` refuses a bad one and names what is
//! wrong; [`Discovery`] is the part that talks to the sentinels, through the redis crate's
//! `redis::sentinel` (it asks them `SENTINEL MASTERS`, skips a master they flag down, and
//! checks with `ROLE` that the node it names is a master before handing out a client).
//!
//! ```text
//! redis+sentinel://[[user]:password@]host1[:26379],host2[:26379],.../service[/db]
//! ```
//!
//! The credentials and the database are the master's (and its replicas'); the sentinels get
//! `fleet.sentinel_password` when they require one. `rediss+sentinel://` speaks TLS to both,
//! verifying their certificates with the system's CA store.

use std::time::Duration;

/// The sentinel port when a host names none.
pub const SENTINEL_PORT: u16 = 26379;

/// A `fleet.redis` value, read.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// One Redis server: the URL as the redis crate reads it.
    Direct(String),
    Sentinel(SentinelService),
}

/// A master known to a set of sentinels under a service name.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelService {
    pub tls: bool,
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub service: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for SentinelService {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelService")
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("service", &self.service)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Direct(url) => {
                write!(f, "Direct({})", crate::config::RedisUrl(url.clone()))
            }
            Endpoint::Sentinel(service) => write!(f, "Sentinel({service:?})"),
        }
    }
}

/// Why a `fleet.redis` value is not usable; never repeats the password.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "is not a Redis URL (the value is not repeated here: it may hold a password): write \
         redis://[user:password@]host:port/db (rediss:// for TLS), or \
         redis+sentinel://[user:password@]host1:26379,host2:26379/service/db for a Sentinel \
         service (rediss+sentinel:// for TLS)"
    )]
    Scheme,
    #[error("names no sentinel: list them as host1:26379,host2:26379")]
    NoSentinel,
    #[error("sentinel {0:?} is not host or host:port (an IPv6 address in brackets: [::1]:26379)")]
    BadSentinel(String),
    #[error(
        "names no service: add the name the sentinels monitor the master under, as in \
         redis+sentinel://host1:26379,host2:26379/mymaster/0"
    )]
    NoService,
    #[error("service name {0:?} must not hold spaces or control characters")]
    BadService(String),
    #[error("database {0:?} is not a number")]
    BadDatabase(String),
    #[error("the user name or password is not valid percent-encoding (write %40 for @)")]
    BadCredentials,
}

impl Endpoint {
    /// Reads a `fleet.redis` value (already trimmed, not empty).
    pub fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            (true, rest)
        } else if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(Endpoint::Direct(url.to_owned()));
        } else {
            return Err(EndpointError::Scheme);
        };
        // Credentials end at the last `@` (a password may hold `/`, percent-encoded or not).
        let (credentials, rest) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(credentials) => {
                let (user, password) = match credentials.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (credentials, None),
                };
                let decode = |s: &str| percent_decode(s).ok_or(EndpointError::BadCredentials);
                let user = (!user.is_empty()).then(|| decode(user)).transpose()?;
                let password = password.filter(|p| !p.is_empty()).map(decode).transpose()?;
                (user, password)
            }
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut sentinels = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            sentinels.push(sentinel_address(host)?);
        }
        if sentinels.is_empty() {
            return Err(EndpointError::NoSentinel);
        }
        let mut parts = path.trim_end_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default();
        if service.is_empty() {
            return Err(EndpointError::NoService);
        }
        if service.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(EndpointError::BadService(service.to_owned()));
        }
        let db = match parts.next() {
            None | Some("") => 0,
            Some(db) => db.parse().map_err(|_| EndpointError::BadDatabase(db.to_owned()))?,
        };
        Ok(Endpoint::Sentinel(SentinelService {
            tls,
            sentinels,
            service: service.to_owned(),
            db,
            username,
            password,
        }))
    }

    /// Whether it speaks TLS (rustls then needs its crypto provider).
    pub fn tls(&self) -> bool {
        match self {
            Endpoint::Direct(url) => url.starts_with("rediss://"),
            Endpoint::Sentinel(service) => service.tls,
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn sentinel_address(text: &str) -> Result<(String, u16), EndpointError> {
    let bad = || EndpointError::BadSentinel(text.to_owned());
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or_else(bad)?),
        };
        host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (host, port)
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "/@?#[]".contains(c)) {
        return Err(bad());
    }
    let port = match port {
        None => SENTINEL_PORT,
        Some(port) => port.parse().ok().filter(|&p| p != 0).ok_or_else(bad)?,
    };
    Ok((host.to_owned(), port))
}

/// `%XX` decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Finds the master to connect to: the one server, or the master the sentinels name now.
pub enum Discovery {
    Direct(redis::Client),
    Sentinel {
        sentinel: redis::sentinel::Sentinel,
        service: String,
        node: redis::sentinel::SentinelNodeConnectionInfo,
    },
}

impl Discovery {
    /// Builds the clients (no connection yet). `sentinel_password`: what the sentinels
    /// require, if anything.
    pub fn new(
        endpoint: &Endpoint,
        sentinel_password: Option<&str>,
    ) -> redis::RedisResult<Discovery> {
        let service = match endpoint {
            Endpoint::Direct(url) => return Ok(Discovery::Direct(redis::Client::open(&**url)?)),
            Endpoint::Sentinel(service) => service,
        };
        let mut sentinel_settings = redis::RedisConnectionInfo::default();
        if let Some(password) = sentinel_password {
            sentinel_settings = sentinel_settings.set_password(password);
        }
        let sentinels: Vec<redis::ConnectionInfo> = service
            .sentinels
            .iter()
            .map(|(host, port)| {
                let address = match service.tls {
                    false => redis::ConnectionAddr::Tcp(host.clone(), *port),
                    true => redis::ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port: *port,
                        insecure: false,
                        tls_params: None,
                    },
                };
                redis::IntoConnectionInfo::into_connection_info(address)
                    .map(|info| info.set_redis_settings(sentinel_settings.clone()))
            })
            .collect::<redis::RedisResult<_>>()?;
        let mut master = redis::RedisConnectionInfo::default().set_db(service.db);
        if let Some(user) = &service.username {
            master = master.set_username(user);
        }
        if let Some(password) = &service.password {
            master = master.set_password(password);
        }
        let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(master);
        if service.tls {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        Ok(Discovery::Sentinel {
            sentinel: redis::sentinel::Sentinel::build(sentinels)?,
            service: service.service.clone(),
            node,
        })
    }

    /// A client for the master, and its address (`host:port`). With sentinels, asks them; the
    /// node they name has answered `ROLE` as a master.
    pub async fn master(&mut self) -> redis::RedisResult<(redis::Client, String)> {
        let client = match self {
            Discovery::Direct(client) => client.clone(),
            Discovery::Sentinel { sentinel, service, node } => {
                sentinel.async_master_for(service, Some(node)).await?
            }
        };
        let address = client.get_connection_info().addr().to_string();
        Ok((client, address))
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self, Discovery::Sentinel { .. })
    }

    /// Reconnection backoff, from the first wait, doubling up to the last. With sentinels the
    /// master's death is followed by a failover that completes at a moment worth catching
    /// within a second, and asking a sentinel costs little: at most 1 s between attempts.
    /// One server may be down for long: up to 10 s.
    pub fn backoff(&self) -> (Duration, Duration) {
        match self {
            Discovery::Direct(_) => (Duration::from_millis(250), Duration::from_secs(10)),
            Discovery::Sentinel { .. } => (Duration::from_millis(100), Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> SentinelService {
        match Endpoint::parse(url) {
            Ok(Endpoint::Sentinel(service)) => service,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_service_and_the_masters_credentials() {
        let s = sentinel("redis+sentinel://:s3cret@10.0.0.5:26379,10.0.0.6:26380,mx3/mymaster/2");
        assert_eq!(
            s.sentinels,
            [("10.0.0.5".into(), 26379), ("10.0.0.6".into(), 26380), ("mx3".into(), 26379)]
        );
        assert_eq!((s.service.as_str(), s.db, s.tls), ("mymaster", 2, false));
        assert_eq!((s.username, s.password.as_deref()), (None, Some("s3cret")));
        let s = sentinel("rediss+sentinel://helo:p%40ss%2Fw@[2001:db8::1]:26379,[::1]/fleet");
        assert!(s.tls);
        assert_eq!(s.sentinels, [("2001:db8::1".into(), 26379), ("::1".into(), 26379)]);
        assert_eq!((s.username.as_deref(), s.password.as_deref()), (Some("helo"), Some("p@ss/w")));
        assert_eq!((s.service.as_str(), s.db), ("fleet", 0));
        let s = sentinel("redis+sentinel://h1,h2/m/");
        assert_eq!((s.password, s.db, s.sentinels.len()), (None, 0, 2));
        assert!(!format!("{:?}", sentinel("redis+sentinel://:pw@h/m")).contains("pw"));
    }

    #[test]
    fn plain_urls_pass_through_and_bad_ones_say_what_is_wrong() {
        assert_eq!(
            Endpoint::parse("rediss://:pw@h:6379/0"),
            Ok(Endpoint::Direct("rediss://:pw@h:6379/0".into()))
        );
        assert!(Endpoint::parse("rediss://h").unwrap().tls());
        let cases = [
            ("localhost:6379", EndpointError::Scheme),
            ("sentinel://h/m", EndpointError::Scheme),
            ("redis+sentinel:///m", EndpointError::NoSentinel),
            ("redis+sentinel://:pw@/m", EndpointError::NoSentinel),
            ("redis+sentinel://h1,h2", EndpointError::NoService),
            ("redis+sentinel://h1/", EndpointError::NoService),
            ("redis+sentinel://h1:0/m", EndpointError::BadSentinel("h1:0".into())),
            ("redis+sentinel://h1:x/m", EndpointError::BadSentinel("h1:x".into())),
            ("redis+sentinel://[::1/m", EndpointError::BadSentinel("[::1".into())),
            ("redis+sentinel://[mx]:1/m", EndpointError::BadSentinel("[mx]:1".into())),
            ("redis+sentinel://h/m/x", EndpointError::BadDatabase("x".into())),
            ("redis+sentinel://:p%zz@h/m", EndpointError::BadCredentials),
        ];
        for (url, error) in cases {
            assert_eq!(Endpoint::parse(url), Err(error), "{url}");
        }
    }

    #[test]
    fn the_backoff_with_sentinels_catches_a_failover_within_a_second() {
        let endpoint = Endpoint::parse("redis+sentinel://127.0.0.1:1,127.0.0.1:2/m").unwrap();
        let discovery = Discovery::new(&endpoint, Some("x")).unwrap();
        assert!(discovery.is_sentinel());
        assert_eq!(discovery.backoff().1, Duration::from_secs(1));
        let direct =
            Discovery::new(&Endpoint::parse("redis://127.0.0.1:1").unwrap(), None).unwrap();
        assert_eq!(direct.backoff().1, Duration::from_secs(10));
    }
}
