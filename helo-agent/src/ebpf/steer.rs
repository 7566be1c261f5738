//! The steering front door, user-space side: the sk_lookup program of the same object as the
//! XDP program (so both read the same ban maps, allowlist and counters), its link on the agent's
//! network namespace, the steered endpoints, the agent's sockets, and the pass maps.
//!
//! The order a start follows: [`XdpProgram::load_steering`] (the program, the endpoints), then
//! [`XdpProgram::take_agent_sockets`] and [`AgentSockets::set`] for the agent's listening
//! sockets, then [`XdpProgram::attach_steering`]. The link is pinned
//! (`steer-link-<netns inode>` in the pin directory) so steering outlives the agent; a later
//! start swaps its program into that link atomically (`BPF_LINK_UPDATE` on the netns link), and
//! since the endpoints and the agent sockets are maps of the program a start loaded (not
//! pinned), the swap hands both over to the new agent in the same step: the old agent gets no
//! connection after it, and the new one none before its sockets are in. With no socket in the
//! map (the agent is down, even after `kill -9`: the kernel removes a socket from the map when
//! it closes), the program lets the MTA's own listener take every connection.
//!
//! Passes live in two pinned LRU maps, like bans: [`PassMaps`].

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError, SockMap};
use aya::programs::SkLookup;
use aya::programs::links::FdLink;
use helo_common::{
    AGENT_SOCKET_V4, AGENT_SOCKET_V6, PassValue, STEER_PROGRAM_NAME, SteerEndpoint, maps,
};
use ipnet::IpNet;

use super::{EbpfError, XdpProgram, absent, open_pinned, sys, take_typed};

const STEER_LINK_PREFIX: &str = "steer-link-";

/// The network namespace of the calling thread (a thread may have entered another one than
/// the process's first thread).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Pinned steering links in `dir`, for [`super::detach`].
pub(super) fn pinned_links(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(STEER_LINK_PREFIX)))
        .map(|e| e.path())
        .collect()
}

/// Makes the pinned pass maps anew where their capacity is not `sizes` (a pinned map keeps the
/// capacity it was made with): at one entry each while steering is off, so today's mode does
/// not hold their memory, and at `steer.max_passes_*` with it on. Their passes are lost from
/// the kernel, not from the snapshot, which the start restores next.
pub(super) fn resize_pass_maps(dir: &Path, sizes: crate::config::PassSizes) {
    for (name, wanted) in [(maps::PASS_V4, sizes.v4), (maps::PASS_V6, sizes.v6)] {
        let path = dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else { continue };
        if info.max_entries() != wanted && std::fs::remove_file(&path).is_ok() {
            tracing::info!(
                map = name,
                pinned = info.max_entries(),
                configured = wanted,
                "pass map made anew at its configured capacity (its passes come back from the snapshot)"
            );
        }
    }
}

/// Removes the pinned steering link of the calling thread's network namespace, if any: a start
/// with steering off leaves no program steering connections (and holding the old pass maps).
/// Returns whether there was one.
pub fn unpin_steering(dir: &Path) -> bool {
    let Ok(netns) = std::fs::metadata(THREAD_NETNS) else { return false };
    let path = dir.join(format!("{STEER_LINK_PREFIX}{}", netns.ino()));
    std::fs::remove_file(path).is_ok()
}

/// The address family of an agent socket, and so its slot in the agent sockets map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    const fn slot(self) -> u32 {
        match self {
            Family::V4 => AGENT_SOCKET_V4,
            Family::V6 => AGENT_SOCKET_V6,
        }
    }
}

/// How [`XdpProgram::attach_steering`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerAttached {
    /// The inode of the network namespace steered (as `ls -Li /proc/self/ns/net` shows it).
    pub netns: u64,
    /// The program replaced the one in a link pinned by an earlier run (no gap).
    pub replaced: bool,
    /// The link is pinned: steering goes on after the agent exits.
    pub pinned: bool,
}

/// One lookup for [`XdpProgram::steer_test_run`]: a new TCP connection from `remote` to `local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerLookup {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// What a test run of the steering program did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerRun {
    /// The program's return value: `SK_PASS` (1) or `SK_DROP` (0).
    pub action: u32,
    /// The socket cookie (`SO_COOKIE`) of the socket it selected; `None`: the regular lookup.
    pub selected: Option<u64>,
    /// The kernel's mean time per run.
    pub duration: Duration,
}

impl XdpProgram {
    /// Loads the steering (sk_lookup) program of the object this load made, and makes it steer
    /// new TCP connections to `endpoints` (the MTA's public addresses and ports). It shares the
    /// ban maps, the allowlist and the counters with the XDP program. Call once, before
    /// [`XdpProgram::attach_steering`]; the endpoints can be replaced later through
    /// [`XdpProgram::take_steer_endpoints`].
    pub fn load_steering(&mut self, endpoints: &[SocketAddr]) -> Result<(), EbpfError> {
        let mut steered = SteerEndpoints { map: take_typed(&mut self.ebpf, maps::STEER)? };
        steered.replace(endpoints)?;
        self.steer_endpoints = Some(steered);
        self.agent_sockets =
            Some(AgentSockets { map: take_typed(&mut self.ebpf, maps::AGENT_SOCKETS)? });
        let program = self.steer_program_mut()?;
        program.load().map_err(|error| match error {
            aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
                EbpfError::Verifier { source: io_error, log: verifier_log.to_string() }
            }
            other => EbpfError::Program(other),
        })
    }

    /// The steered endpoints, to replace them on a reload (the program keeps using the map).
    /// `None` before [`XdpProgram::load_steering`] and after the first call.
    pub fn take_steer_endpoints(&mut self) -> Option<SteerEndpoints> {
        self.steer_endpoints.take()
    }

    /// The agent sockets map, to put the agent's listening sockets in. `None` before
    /// [`XdpProgram::load_steering`] and after the first call.
    pub fn take_agent_sockets(&mut self) -> Option<AgentSockets> {
        self.agent_sockets.take()
    }

    /// Attaches the steering program to the calling thread's network namespace and pins the
    /// link. A link pinned by an earlier run for the same namespace gets this program swapped
    /// in atomically; a pinned link that cannot take it (its namespace is gone and the inode
    /// reused) is removed and a new one attached. Put the agent's sockets in first: from the
    /// swap on, steered connections go to whatever sockets this program's map holds.
    pub fn attach_steering(&mut self) -> Result<SteerAttached, EbpfError> {
        let netns_err = |source| EbpfError::Netns { path: PathBuf::from(THREAD_NETNS), source };
        let netns = File::open(THREAD_NETNS).map_err(netns_err)?;
        let inode = netns.metadata().map_err(netns_err)?.ino();
        let path = self.pin_dir.join(format!("{STEER_LINK_PREFIX}{inode}"));
        let program = self.steer_program_mut()?;
        if path.exists() {
            let swapped = {
                let new = program.fd()?.as_fd();
                sys::obj_get(&path).and_then(|link| sys::link_update(link.as_fd(), new))
            };
            match swapped {
                Ok(()) => return Ok(SteerAttached { netns: inode, replaced: true, pinned: true }),
                Err(error) => {
                    tracing::info!(%error, link = %path.display(), "removing a pinned steering link that cannot take the new program");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let id = program
            .attach(&netns)
            .map_err(|source| EbpfError::SteerAttach { netns: inode, source })?;
        let link: FdLink = program.take_link(id)?.into();
        let pinned = match link.pin(&path) {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, link = %path.display(), "cannot pin the steering link: steering stops when the agent exits");
                false
            }
        };
        Ok(SteerAttached { netns: inode, replaced: false, pinned })
    }

    /// Runs the steering program `repeat` times on `lookup` with BPF_PROG_TEST_RUN, as the
    /// kernel would for a new TCP connection (the program sees only what a lookup carries; the
    /// maps are the live ones, so the counters move and passes count hits).
    pub fn steer_test_run(&self, lookup: &SteerLookup, repeat: u32) -> Result<SteerRun, EbpfError> {
        let program: &SkLookup = self
            .ebpf
            .program(STEER_PROGRAM_NAME)
            .expect("the embedded object defines helo_steer")
            .try_into()?;
        let ctx = lookup_ctx(lookup)?;
        let (action, out, duration) = sys::test_run_sk_lookup(program.fd()?.as_fd(), &ctx, repeat)
            .map_err(|source| EbpfError::TestRun { source })?;
        let selected = (out.cookie != 0).then_some(out.cookie);
        Ok(SteerRun { action, selected, duration })
    }

    fn steer_program_mut(&mut self) -> Result<&mut SkLookup, EbpfError> {
        Ok(self
            .ebpf
            .program_mut(STEER_PROGRAM_NAME)
            .expect("the embedded object defines helo_steer")
            .try_into()?)
    }
}

fn lookup_ctx(lookup: &SteerLookup) -> Result<sys::SkLookupCtx, EbpfError> {
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const IPPROTO_TCP: u32 = 6;
    let mut ctx = sys::SkLookupCtx {
        protocol: IPPROTO_TCP,
        remote_port: lookup.remote.port().to_be_bytes(),
        local_port: u32::from(lookup.local.port()),
        ..Default::default()
    };
    match (lookup.remote.ip(), lookup.local.ip()) {
        (IpAddr::V4(remote), IpAddr::V4(local)) => {
            ctx.family = AF_INET;
            ctx.remote_ip4 = remote.octets();
            ctx.local_ip4 = local.octets();
        }
        (IpAddr::V6(remote), IpAddr::V6(local)) => {
            ctx.family = AF_INET6;
            ctx.remote_ip6 = remote.octets();
            ctx.local_ip6 = local.octets();
        }
        _ => {
            return Err(EbpfError::TestRun {
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a lookup's two addresses must be of one family",
                ),
            });
        }
    }
    Ok(ctx)
}

/// The steering map's key for `endpoint`. An IPv4-mapped IPv6 address is its IPv4 address: a
/// connection to it arrives as an IPv4 lookup.
fn endpoint_key(endpoint: &SocketAddr) -> SteerEndpoint {
    match endpoint.ip() {
        IpAddr::V4(ip) => SteerEndpoint::v4(ip.octets(), endpoint.port()),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SteerEndpoint::v4(v4.octets(), endpoint.port()),
            None => SteerEndpoint::v6(ip.octets(), endpoint.port()),
        },
    }
}

fn endpoint_addr(key: &SteerEndpoint) -> SocketAddr {
    let ip = Ipv6Addr::from(key.addr);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes(key.port))
}

/// The steering map: which local addresses and ports are steered.
pub struct SteerEndpoints {
    map: HashMap<MapData, SteerEndpoint, u8>,
}

impl SteerEndpoints {
    /// Makes the map hold exactly `endpoints`: new ones first, then stale ones removed. An
    /// endpoint removed is no longer steered: its connections go to the MTA's listener.
    pub fn replace(&mut self, endpoints: &[SocketAddr]) -> Result<(), EbpfError> {
        let wanted: Vec<SteerEndpoint> = endpoints.iter().map(endpoint_key).collect();
        for key in &wanted {
            self.map
                .insert(key, 1, 0)
                .map_err(|source| EbpfError::Map { name: maps::STEER, source })?;
        }
        let stale: Vec<SteerEndpoint> =
            self.map.keys().flatten().filter(|key| !wanted.contains(key)).collect();
        for key in stale {
            match self.map.remove(&key) {
                Ok(()) => {}
                Err(error) if absent(&error) => {}
                Err(source) => return Err(EbpfError::Map { name: maps::STEER, source }),
            }
        }
        Ok(())
    }

    /// The steered endpoints, IPv4 ones as IPv4 addresses.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.map.keys().flatten().map(|key| endpoint_addr(&key)).collect()
    }
}

/// The agent's listening sockets, one per family, that steered connections go to.
pub struct AgentSockets {
    map: SockMap<MapData>,
}

impl AgentSockets {
    /// Makes `listener` (a listening TCP socket) the agent's socket for its address family,
    /// replacing the one there. Returns the family. An IPv6 socket serves IPv6 lookups only
    /// (the agent's are v6-only); IPv4 connections need an IPv4 socket of their own.
    pub fn set(&mut self, listener: BorrowedFd<'_>) -> Result<Family, EbpfError> {
        let family = socket_family(listener)?;
        self.map
            .set(family.slot(), &listener, 0)
            .map_err(|source| EbpfError::Map { name: maps::AGENT_SOCKETS, source })?;
        Ok(family)
    }

    /// Empties the slot of `family`: its steered connections go to the MTA's listener (fail
    /// open) until a socket is set again. Closing a socket empties its slot too. (Which slots
    /// hold a socket cannot be read back: the kernel answers user-space lookups only in a
    /// SOCKMAP with 8-byte values, and aya-ebpf declares 4-byte ones; the `steer_no_agent`
    /// counter tells when connections find none.)
    ///
    /// An empty slot is no error: a SOCKMAP answers a delete there with EINVAL (the slots
    /// are always in range), not ENOENT.
    pub fn clear(&mut self, family: Family) -> Result<(), EbpfError> {
        match self.map.clear_index(&family.slot()) {
            Ok(()) => Ok(()),
            Err(error) if absent(&error) || empty_slot(&error) => Ok(()),
            Err(source) => Err(EbpfError::Map { name: maps::AGENT_SOCKETS, source }),
        }
    }
}

/// A SOCKMAP's answer to deleting a slot with no socket in it (net/core/sock_map.c,
/// `__sock_map_delete`).
fn empty_slot(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(e)
        if e.io_error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()))
}

fn socket_family(socket: BorrowedFd<'_>) -> Result<Family, EbpfError> {
    let address = rustix::net::getsockname(socket)
        .map_err(|e| EbpfError::AgentSocket { reason: format!("getsockname: {e}") })?;
    match address.address_family() {
        rustix::net::AddressFamily::INET => Ok(Family::V4),
        rustix::net::AddressFamily::INET6 => Ok(Family::V6),
        other => Err(EbpfError::AgentSocket {
            reason: format!("address family {} is neither IPv4 nor IPv6", other.as_raw()),
        }),
    }
}

/// The pinned pass maps: clients that go straight to the MTA until their pass expires. The
/// CLI and the agent open them from the pin directory, as they do the ban maps.
pub struct PassMaps {
    v4: HashMap<MapData, [u8; 4], PassValue>,
    v6: HashMap<MapData, [u8; 16], PassValue>,
}

/// A pass map key: IPv4-mapped IPv6 addresses are IPv4 clients (an IPv4 connection's lookup).
enum PassKey {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl PassKey {
    fn of(client: IpAddr) -> Self {
        match client {
            IpAddr::V4(ip) => PassKey::V4(ip.octets()),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => PassKey::V4(v4.octets()),
                None => PassKey::V6(ip.octets()),
            },
        }
    }
}

fn pass_error(name: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

impl PassMaps {
    pub fn open(dir: &Path) -> Result<Self, EbpfError> {
        if !dir.join(maps::PASS_V4).exists() {
            return Err(EbpfError::NotRunning { dir: dir.to_owned() });
        }
        super::check_pinned(dir)?;
        Ok(Self { v4: open_pinned(dir, maps::PASS_V4)?, v6: open_pinned(dir, maps::PASS_V6)? })
    }

    /// The pass of `client`, expired or not.
    pub fn get(&self, client: IpAddr) -> Result<Option<PassValue>, EbpfError> {
        let found = match PassKey::of(client) {
            PassKey::V4(key) => self.v4.get(&key, 0).map_err(|e| (maps::PASS_V4, e)),
            PassKey::V6(key) => self.v6.get(&key, 0).map_err(|e| (maps::PASS_V6, e)),
        };
        match found {
            Ok(value) => Ok(Some(value)),
            Err((_, error)) if absent(&error) => Ok(None),
            Err((name, source)) => Err(EbpfError::Map { name, source }),
        }
    }

    /// Writes the pass of `client` (replacing one there): its next connections go straight to
    /// the MTA until `value.expires_ns`.
    pub fn insert(&mut self, client: IpAddr, value: &PassValue) -> Result<(), EbpfError> {
        match PassKey::of(client) {
            PassKey::V4(key) => self.v4.insert(key, value, 0).map_err(pass_error(maps::PASS_V4)),
            PassKey::V6(key) => self.v6.insert(key, value, 0).map_err(pass_error(maps::PASS_V6)),
        }
    }

    /// Removes the pass of `client`; returns whether there was one.
    pub fn remove(&mut self, client: IpAddr) -> Result<bool, EbpfError> {
        let removed = match PassKey::of(client) {
            PassKey::V4(key) => self.v4.remove(&key).map_err(|e| (maps::PASS_V4, e)),
            PassKey::V6(key) => self.v6.remove(&key).map_err(|e| (maps::PASS_V6, e)),
        };
        match removed {
            Ok(()) => Ok(true),
            Err((_, error)) if absent(&error) => Ok(false),
            Err((name, source)) => Err(EbpfError::Map { name, source }),
        }
    }

    /// Removes every pass of a client inside `net` (a ban of an IPv6 /64, say); returns how
    /// many went.
    pub fn remove_within(&mut self, net: &IpNet) -> Result<usize, EbpfError> {
        let inside: Vec<IpAddr> =
            self.entries()?.into_iter().map(|(ip, _)| ip).filter(|ip| net.contains(ip)).collect();
        let mut removed = 0;
        for client in inside {
            removed += usize::from(self.remove(client)?);
        }
        Ok(removed)
    }

    /// Every pass, expired ones included (the kernel removes a pass when it finds it expired,
    /// and the LRU the least recently used when full).
    pub fn entries(&self) -> Result<Vec<(IpAddr, PassValue)>, EbpfError> {
        // Entries may vanish while we walk: a failed step of the walk is skipped, not fatal.
        let v4 = self.v4.iter().flatten().map(|(k, v)| (IpAddr::V4(Ipv4Addr::from(k)), v));
        let v6 = self.v6.iter().flatten().map(|(k, v)| (IpAddr::V6(Ipv6Addr::from(k)), v));
        Ok(v4.chain(v6).collect())
    }
}

/// The pinned pass maps as the ban worker writes them.
impl crate::blocklist::passes::PassStore for PassMaps {
    fn get(&self, client: IpAddr) -> Result<Option<PassValue>, crate::blocklist::StoreError> {
        PassMaps::get(self, client).map_err(|e| store_error("lookup", e))
    }

    fn put(
        &mut self,
        client: IpAddr,
        value: &PassValue,
    ) -> Result<(), crate::blocklist::StoreError> {
        self.insert(client, value).map_err(|e| store_error("update", e))
    }

    fn remove_within(&mut self, net: &IpNet) -> Result<usize, crate::blocklist::StoreError> {
        PassMaps::remove_within(self, net).map_err(|e| store_error("delete", e))
    }

    fn entries(&self) -> Result<Vec<(IpAddr, PassValue)>, crate::blocklist::StoreError> {
        PassMaps::entries(self).map_err(|e| store_error("walk", e))
    }
}

fn store_error(operation: &'static str, error: EbpfError) -> crate::blocklist::StoreError {
    crate::blocklist::StoreError::Map { map: "HELO_PASS", operation, source: Box::new(error) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keys_round_trip_and_mapped_v4_is_v4() {
        for text in ["203.0.113.5:25", "[2001:db8::5]:587", "127.0.0.1:2525"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(endpoint_addr(&endpoint_key(&addr)), addr);
        }
        let mapped: SocketAddr = "[::ffff:203.0.113.5]:25".parse().unwrap();
        assert_eq!(endpoint_key(&mapped), SteerEndpoint::v4([203, 0, 113, 5], 25));
    }

    #[test]
    fn a_test_run_context_carries_the_lookup_in_kernel_byte_orders() {
        let lookup = SteerLookup {
            remote: "198.51.100.7:40000".parse().unwrap(),
            local: "203.0.113.5:25".parse().unwrap(),
        };
        let ctx = lookup_ctx(&lookup).unwrap();
        assert_eq!((ctx.family, ctx.protocol), (2, 6));
        assert_eq!(ctx.remote_ip4, [198, 51, 100, 7]);
        assert_eq!(ctx.remote_port, 40000u16.to_be_bytes());
        assert_eq!(ctx.local_port, 25, "host order");
        let mixed = SteerLookup { local: "[2001:db8::5]:25".parse().unwrap(), ..lookup };
        assert!(lookup_ctx(&mixed).is_err());
    }
}
