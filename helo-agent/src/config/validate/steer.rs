//! `[steer]`: the steered endpoints, the pass TTL and the pass maps, checked against the
//! agent's own sockets (the proxy listeners the kernel hands strangers to).

use std::net::SocketAddr;
use std::time::Duration;

use super::Origin;
use crate::config::raw::RawSteer;
use crate::config::{ConfigError, PassSizes, ProxyConfig, SteerConfig, XdpConfig};

/// The longest `steer.pass_ttl`, as a pass is a promise about a client the agent will not see.
const MAX_PASS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// `[steer]`, checked against the agent's own listeners: one per address family, none of them
/// a steered endpoint, and `proxy.upstream` not steered either (the agent's own connection to
/// the MTA would be steered back to it).
pub(super) fn config(
    raw: &RawSteer,
    proxy: &ProxyConfig,
    origin: &Origin,
) -> Result<SteerConfig, ConfigError> {
    let key = "steer.addresses";
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for text in &raw.addresses {
        let address = origin.socket(key, text)?;
        let address = SocketAddr::new(crate::addr::canonical(address.ip()), address.port());
        if address.ip().is_unspecified() {
            return Err(origin.invalid(
                key,
                format!(
                    "{address}: a wildcard address cannot be steered: name the MTA's public \
                     addresses, such as 203.0.113.5:25"
                ),
            ));
        }
        if address.port() == crate::config::SMTPS_PORT || address.port() == 0 {
            return Err(origin.invalid(
                key,
                format!(
                    "{address}: only plaintext SMTP ports are steered (25; port 465 is SMTPS, \
                     whose HELO the agent cannot read)"
                ),
            ));
        }
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    let max = helo_common::MAX_STEER_ENDPOINTS as usize;
    if addresses.len() > max {
        return Err(origin.invalid(key, format!("{} endpoints; at most {max}", addresses.len())));
    }
    // 0s is allowed here: steering with no passes.
    let pass_ttl = crate::duration::parse(&raw.pass_ttl)
        .map_err(|e| origin.invalid("steer.pass_ttl", e.to_string()))?;
    if pass_ttl > MAX_PASS_TTL {
        return Err(
            origin.invalid("steer.pass_ttl", "at most 30d (postscreen's caches keep a day)")
        );
    }
    for (key, size) in
        [("steer.max_passes_v4", raw.max_passes_v4), ("steer.max_passes_v6", raw.max_passes_v6)]
    {
        if !(16..=16_777_216).contains(&size) {
            return Err(origin.invalid(key, format!("{size} is outside 16..=16777216")));
        }
    }
    let steer = SteerConfig {
        addresses,
        pass_ttl,
        sizes: PassSizes { v4: raw.max_passes_v4, v6: raw.max_passes_v6 },
    };
    if steer.enabled() {
        agent_sockets(&steer, proxy, origin)?;
    }
    Ok(steer)
}

/// With steering on, the HELO-checking proxy listeners are the agent's sockets the kernel
/// hands strangers to: at most one per family, one for every family steered, none on a
/// steered endpoint.
fn agent_sockets(
    steer: &SteerConfig,
    proxy: &ProxyConfig,
    origin: &Origin,
) -> Result<(), ConfigError> {
    let judged: Vec<SocketAddr> =
        proxy.listeners.iter().filter(|l| l.check_helo).map(|l| l.address).collect();
    for (v6, family, example) in [(false, "IPv4", "127.0.0.1:2525"), (true, "IPv6", "[::1]:2525")] {
        let of_family: Vec<&SocketAddr> = judged.iter().filter(|a| a.is_ipv6() == v6).collect();
        if of_family.len() > 1 {
            return Err(origin.invalid(
                "proxy.listeners",
                format!(
                    "with steering on, the proxy's listeners are the agent's sockets the kernel \
                     hands strangers to, one per address family: {} are {family} (keep one, such \
                     as {example})",
                    of_family.len()
                ),
            ));
        }
        if of_family.is_empty() && steer.addresses.iter().any(|a| a.is_ipv6() == v6) {
            return Err(origin.invalid(
                "proxy.listeners",
                format!(
                    "steer.addresses has an {family} endpoint but proxy.listeners has no {family} \
                     listener to hand its strangers to: add one, such as {example}"
                ),
            ));
        }
    }
    for listener in &proxy.listeners {
        let covers = |endpoint: &SocketAddr| {
            endpoint.port() == listener.address.port()
                && (listener.address.ip().is_unspecified()
                    || crate::addr::canonical(listener.address.ip()) == endpoint.ip())
        };
        if let Some(endpoint) = steer.addresses.iter().find(|e| covers(e)) {
            return Err(origin.invalid(
                "proxy.listeners",
                format!(
                    "{} covers the steered endpoint {endpoint}, which is the MTA's own \
                     listener: with steering on, give the agent a port of its own, such as \
                     127.0.0.1:2525 and [::1]:2525",
                    listener.address
                ),
            ));
        }
    }
    let upstream =
        SocketAddr::new(crate::addr::canonical(proxy.upstream.ip()), proxy.upstream.port());
    if steer.addresses.contains(&upstream) {
        return Err(origin.invalid(
            "proxy.upstream",
            format!(
                "{upstream} is a steered endpoint: the agent's own connections to it would be \
                 steered back to the agent; point proxy.upstream at a second smtpd taking PROXY \
                 headers, such as 127.0.0.1:10025"
            ),
        ));
    }
    Ok(())
}

/// A steered port XDP does not guard lets a banned client's SYN through to the steering
/// program, which then hands it to the agent (never to the MTA) to be refused there: it
/// works, but costs a session's start where XDP would have dropped a packet.
pub(super) fn warnings(steer: &SteerConfig, xdp: &XdpConfig) -> Vec<String> {
    steer
        .addresses
        .iter()
        .filter(|a| !xdp.ports.contains(&a.port()))
        .map(|a| {
            format!(
                "steer.addresses: port {} of {a} is not in xdp.ports: banned clients reach the \
                 agent there instead of being dropped by XDP; add it",
                a.port()
            )
        })
        .collect()
}
