//! Configuration: TOML read into [`RawConfig`] (serde, unknown keys refused), then validated into
//! [`Config`], which holds real values (parsed networks, durations, sizes). Nothing binds or loads
//! before the whole config has validated. With no file the agent runs on the embedded defaults,
//! which `helo-filter.example.toml` documents key by key (a test keeps the two in step).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::blocklist::Ttl;
use crate::ebpf::{AttachMode, MapSizes};

/// The example config, every key at its default, with comments.
pub const EXAMPLE: &str = include_str!("../helo-filter.example.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub xdp: RawXdp,
    #[serde(default)]
    pub bans: RawBans,
    #[serde(default)]
    pub allowlist: RawAllowlist,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawXdp {
    pub interface: Option<String>,
    #[serde(default = "default_mode")]
    pub mode: AttachMode,
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_max_bans_v4")]
    pub max_bans_v4: u32,
    #[serde(default = "default_max_bans_v6")]
    pub max_bans_v6: u32,
    #[serde(default = "default_max_bans_v6_net")]
    pub max_bans_v6_net: u32,
}

impl Default for RawXdp {
    fn default() -> Self {
        Self {
            interface: None,
            mode: default_mode(),
            ports: default_ports(),
            pin_dir: default_pin_dir(),
            max_bans_v4: default_max_bans_v4(),
            max_bans_v6: default_max_bans_v6(),
            max_bans_v6_net: default_max_bans_v6_net(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBans {
    #[serde(default = "default_ttl")]
    pub default_ttl: String,
}

impl Default for RawBans {
    fn default() -> Self {
        Self { default_ttl: default_ttl() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllowlist {
    #[serde(default = "default_allow")]
    pub networks: Vec<String>,
}

impl Default for RawAllowlist {
    fn default() -> Self {
        Self { networks: default_allow() }
    }
}

fn default_mode() -> AttachMode {
    AttachMode::Auto
}
fn default_ports() -> Vec<u16> {
    helo_common::DEFAULT_PORTS.to_vec()
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from(crate::ebpf::DEFAULT_PIN_DIR)
}
fn default_max_bans_v4() -> u32 {
    helo_common::DEFAULT_MAX_BANS_V4
}
fn default_max_bans_v6() -> u32 {
    helo_common::DEFAULT_MAX_BANS_V6
}
fn default_max_bans_v6_net() -> u32 {
    helo_common::DEFAULT_MAX_BANS_V6_NET
}
fn default_ttl() -> String {
    "1h".to_owned()
}
fn default_allow() -> Vec<String> {
    vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()]
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where it came from (`None`: embedded defaults), for messages.
    pub source: Option<PathBuf>,
    pub xdp: XdpConfig,
    pub default_ttl: Duration,
    pub allowlist: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct XdpConfig {
    /// `None`: the interface of the default route.
    pub interface: Option<String>,
    pub mode: AttachMode,
    pub ports: Vec<u16>,
    pub pin_dir: PathBuf,
    pub sizes: MapSizes,
}

impl Config {
    /// Reads and validates `path`, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_raw(RawConfig::default(), None),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                Self::parse(&text, path)
            }
        }
    }

    /// Parses and validates TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string().trim_end().to_owned(),
        })?;
        Self::from_raw(raw, Some(path))
    }

    pub fn from_raw(raw: RawConfig, path: Option<&Path>) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.map_or_else(|| PathBuf::from("<embedded defaults>"), Path::to_owned),
            key: key.to_owned(),
            message,
        };
        if raw.xdp.ports.is_empty() {
            return Err(invalid("xdp.ports", "no ports: list at least one, such as 25".into()));
        }
        if raw.xdp.ports.contains(&0) {
            return Err(invalid("xdp.ports", "port 0 is not a TCP port".into()));
        }
        for (key, size) in [
            ("xdp.max_bans_v4", raw.xdp.max_bans_v4),
            ("xdp.max_bans_v6", raw.xdp.max_bans_v6),
            ("xdp.max_bans_v6_net", raw.xdp.max_bans_v6_net),
        ] {
            if !(16..=16_777_216).contains(&size) {
                return Err(invalid(key, format!("{size} is outside 16..=16777216")));
            }
        }
        if let Some(iface) = &raw.xdp.interface
            && (iface.is_empty() || iface.len() > 15 || iface.contains('/'))
        {
            return Err(invalid("xdp.interface", format!("{iface:?} is not an interface name")));
        }
        if !raw.xdp.pin_dir.is_absolute() {
            return Err(invalid("xdp.pin_dir", "must be an absolute path under a bpffs".into()));
        }
        let default_ttl = crate::duration::parse(&raw.bans.default_ttl)
            .map_err(|e| invalid("bans.default_ttl", e.to_string()))?;
        if default_ttl.is_zero() {
            return Err(invalid("bans.default_ttl", "must be longer than 0s".into()));
        }
        let allowlist = parse_networks(&raw.allowlist.networks)
            .map_err(|message| invalid("allowlist.networks", message))?;
        let mut ports = raw.xdp.ports;
        ports.sort_unstable();
        ports.dedup();
        Ok(Config {
            source: path.map(Path::to_owned),
            xdp: XdpConfig {
                interface: raw.xdp.interface,
                mode: raw.xdp.mode,
                ports,
                pin_dir: raw.xdp.pin_dir,
                sizes: MapSizes {
                    bans_v4: raw.xdp.max_bans_v4,
                    bans_v6: raw.xdp.max_bans_v6,
                    bans_v6_net: raw.xdp.max_bans_v6_net,
                },
            },
            default_ttl,
            allowlist,
        })
    }

    pub fn default_ban_ttl(&self) -> Ttl {
        Ttl::For(self.default_ttl)
    }
}

/// Parses CIDRs (a bare address means that one host), refusing host bits set below the prefix
/// length, since `192.0.2.1/24` is usually a typo for something else.
pub fn parse_networks(items: &[String]) -> Result<Vec<IpNet>, String> {
    items.iter().map(|item| parse_network(item)).collect()
}

pub fn parse_network(item: &str) -> Result<IpNet, String> {
    let text = item.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "{item:?} is not a network (write 192.0.2.0/24 or 2001:db8::/32)"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!("{item:?} has host bits set: did you mean {}?", net.trunc()));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn the_example_file_is_exactly_the_defaults() {
        let example = parse(EXAMPLE).expect("the example config parses");
        let defaults = Config::load(None).unwrap();
        assert_eq!(Config { source: None, ..example }, defaults);
    }

    #[test]
    fn empty_file_means_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.xdp.ports, vec![25, 465, 587]);
        assert_eq!(config.default_ttl, Duration::from_secs(3600));
        assert_eq!(config.xdp.mode, AttachMode::Auto);
        assert_eq!(config.xdp.pin_dir, PathBuf::from("/sys/fs/bpf/helo-filter"));
    }

    #[test]
    fn values_are_read() {
        let config = parse(
            r#"
            [xdp]
            interface = "eth1"
            mode = "skb"
            ports = [2525, 25, 25]
            [bans]
            default_ttl = "2d"
            [allowlist]
            networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
            "#,
        )
        .unwrap();
        assert_eq!(config.xdp.interface.as_deref(), Some("eth1"));
        assert_eq!(config.xdp.mode, AttachMode::Skb);
        assert_eq!(config.xdp.ports, vec![25, 2525]);
        assert_eq!(config.default_ttl, Duration::from_secs(172_800));
        assert_eq!(config.allowlist.len(), 3);
        assert_eq!(config.allowlist[2].to_string(), "192.0.2.7/32");
    }

    #[test]
    fn unknown_keys_are_refused_with_the_line() {
        let err = parse("[xdp]\nport = [25]\n").unwrap_err().to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("unknown field `port`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let cases = [
            ("[xdp]\nports = []", "xdp.ports"),
            ("[xdp]\nports = [0]", "xdp.ports"),
            ("[xdp]\nmax_bans_v4 = 1", "xdp.max_bans_v4"),
            ("[xdp]\npin_dir = \"relative\"", "xdp.pin_dir"),
            ("[xdp]\ninterface = \"\"", "xdp.interface"),
            ("[bans]\ndefault_ttl = \"60\"", "60s"),
            ("[bans]\ndefault_ttl = \"0s\"", "bans.default_ttl"),
            ("[allowlist]\nnetworks = [\"10.0.0.1/8\"]", "did you mean 10.0.0.0/8"),
            ("[allowlist]\nnetworks = [\"example.com\"]", "allowlist.networks"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        let err = parse("[xdp]\nmode = \"fast\"").unwrap_err().to_string();
        assert!(err.contains("unknown variant `fast`"), "{err}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load(Some(Path::new("/nonexistent/helo.toml"))).unwrap_err();
        assert!(err.to_string().contains("cannot read config file /nonexistent/helo.toml"));
    }
}
