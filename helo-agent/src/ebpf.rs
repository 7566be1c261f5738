//! The only module that touches aya: loading the XDP program, pinning and opening its maps,
//! attaching it to an interface, test runs, and the [`BanStore`] over the pinned ban maps.
//! The steering program (sk_lookup) of the same object, its link, its maps and the pass maps
//! are in `ebpf/steer.rs`; the few bpf() commands aya lacks for it, in `ebpf/sys.rs`.
//!
//! Bans and counters live in maps pinned under the pin directory (default
//! `/sys/fs/bpf/helo-filter`): they outlive the agent, and `helo-agent ban/unban/list/stats`
//! work on them from another shell. The allowlist and guarded ports are written from the
//! config at every start and are not pinned.
//!
//! The XDP link is pinned too (`xdp-link-<iface>-<mode>`), so the program keeps dropping banned
//! sources while the agent is stopped, restarting or crashed. The next start swaps its program
//! into the pinned link atomically (no moment without a filter); `helo-agent detach` removes
//! the pinned link, which detaches the program.
//!
//! The steering link is pinned the same way (`steer-link-<netns inode>`), and swapped the same
//! way; `detach` removes it too.
//!
//! A start that fails before it attaches leaves the pin directory as it found it
//! ([`XdpProgram::discard`]); a counters map pinned by a version with other counters is
//! replaced, the ban maps never are.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use helo_common::{
    BanValue, LENGTHS_V4, LENGTHS_V6, PREFIX_SLOTS, PROGRAM_NAME, PassValue, PrefixV4, PrefixV6,
    REASON_TEXT_LEN, STAT_COUNT, Stat, maps,
};
use ipnet::IpNet;

use crate::addr::BanTarget;
use crate::blocklist::{BanStore, StoreError};
use crate::config::{AttachMode, MapSizes, PassSizes};

mod steer;
mod sys;

pub use steer::{
    AgentSockets, Family, PassMaps, SteerAttached, SteerEndpoints, SteerLookup, SteerRun,
    unpin_steering,
};

/// The XDP object built from `helo-ebpf` by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/helo-ebpf"));

const BPFFS_MAGIC: u64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading XDP programs needs root (or CAP_BPF and CAP_NET_ADMIN): run as root")]
    NotRoot,
    #[error(
        "{path} is not a mounted bpf filesystem: mount it with `mount -t bpf bpf /sys/fs/bpf` \
         (`cargo xtask setup` does this)"
    )]
    NoBpffs { path: PathBuf },
    #[error("no network interface named {name:?}: see `ip -br link` for the names on this host")]
    NoSuchInterface { name: String },
    #[error(
        "no pinned helo-filter maps in {dir}: start the agent first (`helo-agent run`), or pass \
         the --pin-dir it runs with"
    )]
    NotRunning { dir: PathBuf },
    #[error("cannot create pin directory {dir}: {source}")]
    PinDir { dir: PathBuf, source: io::Error },
    #[error(
        "pinned map {path} does not fit this agent ({found}; expected {expected}); it was left by \
         another version: remove it with `rm {path}` (the bans in it are lost) and start again"
    )]
    Incompatible { path: PathBuf, found: String, expected: String },
    #[error("cannot load the XDP object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("the kernel verifier rejected the XDP program: {source}\nverifier log:\n{log}")]
    Verifier { source: io::Error, log: String },
    #[error("cannot attach XDP to {iface} in {mode} mode: {source}")]
    Attach { iface: String, mode: &'static str, source: ProgramError },
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("cannot open the network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error(
        "cannot attach the steering (sk_lookup) program to network namespace {netns}: {source} \
         (it needs Linux 5.9 or later)"
    )]
    SteerAttach { netns: u64, source: ProgramError },
    #[error("the agent's steering socket must be a listening IPv4 or IPv6 TCP socket: {reason}")]
    AgentSocket { reason: String },
    #[error("test run of the steering program: {source}")]
    TestRun { source: io::Error },
}

pub struct LoadOptions<'a> {
    pub pin_dir: &'a Path,
    pub sizes: MapSizes,
    pub ports: &'a [u16],
    pub allow: &'a [IpNet],
    /// The pass maps' capacities: `steer.max_passes_*` with steering on, else
    /// [`PassSizes::UNUSED`].
    pub passes: PassSizes,
}

/// The loaded object: the XDP program (maybe attached), and the steering program once
/// [`XdpProgram::load_steering`] has loaded it. Dropping it closes the agent's handles; pinned
/// links keep the programs attached, and the pinned maps stay.
pub struct XdpProgram {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    allowlist: Option<Allowlist>,
    steer_endpoints: Option<SteerEndpoints>,
    agent_sockets: Option<AgentSockets>,
    pins: PinChanges,
}

/// The maps pinned under the pin directory (the allowlist, the ports, the steered endpoints
/// and the agent sockets are not).
const PINNED_MAPS: [&str; 10] = [
    maps::BANS_V4,
    maps::BANS_V6,
    maps::BANS_V6_NET,
    maps::BANS_V4_PREFIX,
    maps::BANS_V6_PREFIX,
    maps::BAN_LENGTHS,
    maps::REASONS,
    maps::STATS,
    maps::PASS_V4,
    maps::PASS_V6,
];

/// Where a counters map of another version waits while a start replaces it (bpffs refuses
/// names with a dot).
const STATS_ASIDE: &str = "HELO_STATS_OLD";

/// What a load changed in the pin directory, undone when the start fails before it attaches:
/// the pins (and the directory) it created go, a counters map it set aside comes back.
#[derive(Debug, Default)]
struct PinChanges {
    created_dir: Option<PathBuf>,
    created: Vec<PathBuf>,
    /// The counters map of another version, set aside, and its number of counters.
    stats_aside: Option<(PathBuf, u32)>,
}

impl PinChanges {
    fn undo(self) {
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
        if let Some((aside, _)) = &self.stats_aside {
            let _ = std::fs::rename(aside, aside.with_file_name(maps::STATS));
        }
        if let Some(dir) = &self.created_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }

    fn keep(&mut self) {
        self.created_dir = None;
        self.created.clear();
        if let Some((aside, counters)) = self.stats_aside.take() {
            let _ = std::fs::remove_file(&aside);
            tracing::warn!(
                pinned_counters = counters,
                counters = STAT_COUNT,
                "replaced the pinned XDP counters map left by another version: the counters \
                 start from zero (bans are kept)"
            );
        }
    }
}

/// How [`XdpProgram::attach`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub mode: &'static str,
    /// The program replaced the one in a link pinned by an earlier run (no gap).
    pub replaced: bool,
    /// The link is pinned: the program stays attached after the agent exits.
    pub pinned: bool,
}

const LINK_PREFIX: &str = "xdp-link-";

fn link_pin(dir: &Path, iface: &str, mode: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{iface}-{mode}"))
}

/// Pinned links in `dir` for `iface` (any mode).
fn pinned_links(dir: &Path, iface: Option<&str>) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(LINK_PREFIX)?;
            let (link_iface, mode) = rest.rsplit_once('-')?;
            (iface.is_none_or(|i| i == link_iface)).then(|| (e.path(), mode.to_owned()))
        })
        .collect()
}

/// Removes every pinned XDP and steering link in `dir`, which detaches the programs where no
/// agent holds them; with `maps`, the pinned maps too (their bans and passes are lost). Returns
/// what was removed.
pub fn detach(dir: &Path, maps: bool) -> Result<Vec<PathBuf>, EbpfError> {
    let mut removed = Vec::new();
    let links = pinned_links(dir, None).into_iter().map(|(path, _)| path);
    for path in links.chain(steer::pinned_links(dir)) {
        std::fs::remove_file(&path)
            .map_err(|source| EbpfError::PinDir { dir: path.clone(), source })?;
        removed.push(path);
    }
    if maps {
        for name in PINNED_MAPS.into_iter().chain([STATS_ASIDE]) {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .map_err(|source| EbpfError::PinDir { dir: path.clone(), source })?;
                removed.push(path);
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    Ok(removed)
}

/// Loads the program, reusing the pinned ban maps in `pin_dir` when present, and writes the
/// guarded ports and the allowlist. On failure, the pins this load created are removed again.
/// The caller keeps them with [`XdpProgram::keep_pins`] once the start has succeeded, or
/// removes them with [`XdpProgram::discard`].
pub fn load(options: &LoadOptions<'_>) -> Result<XdpProgram, EbpfError> {
    if !rustix::process::geteuid().is_root() {
        return Err(EbpfError::NotRoot);
    }
    let bpffs = options.pin_dir.parent().unwrap_or(options.pin_dir);
    if !is_bpffs(bpffs) {
        return Err(EbpfError::NoBpffs { path: bpffs.to_owned() });
    }
    let mut pins = PinChanges::default();
    if !options.pin_dir.exists() {
        pins.created_dir = Some(options.pin_dir.to_owned());
    }
    match load_pinning(options, &mut pins) {
        Ok((ebpf, allowlist)) => Ok(XdpProgram {
            ebpf,
            pin_dir: options.pin_dir.to_owned(),
            allowlist: Some(allowlist),
            steer_endpoints: None,
            agent_sockets: None,
            pins,
        }),
        Err(error) => {
            pins.undo();
            Err(error)
        }
    }
}

/// [`load`]'s work, noting in `pins` what it changes in the pin directory.
fn load_pinning(
    options: &LoadOptions<'_>,
    pins: &mut PinChanges,
) -> Result<(Ebpf, Allowlist), EbpfError> {
    std::fs::create_dir_all(options.pin_dir)
        .map_err(|source| EbpfError::PinDir { dir: options.pin_dir.to_owned(), source })?;
    set_aside_stale_stats(options.pin_dir, pins)?;
    check_pinned(options.pin_dir)?;
    steer::resize_pass_maps(options.pin_dir, options.passes);
    pins.created =
        PINNED_MAPS.iter().map(|name| options.pin_dir.join(name)).filter(|p| !p.exists()).collect();

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(options.pin_dir)
        .map_max_entries(maps::BANS_V4, options.sizes.bans_v4)
        .map_max_entries(maps::BANS_V6, options.sizes.bans_v6)
        .map_max_entries(maps::BANS_V6_NET, options.sizes.bans_v6_net)
        .map_max_entries(maps::PASS_V4, options.passes.v4)
        .map_max_entries(maps::PASS_V6, options.passes.v6)
        .map_max_entries(maps::BANS_V4_PREFIX, options.sizes.bans_v4_prefix)
        .map_max_entries(maps::BANS_V6_PREFIX, options.sizes.bans_v6_prefix)
        .load(PROGRAM_OBJECT)?;
    warn_on_resize(options.pin_dir, &options.sizes);

    {
        let mut ports: Array<_, u8> = typed(&mut ebpf, maps::PORTS)?;
        for port in options.ports {
            ports
                .set(u32::from(*port), 1, 0)
                .map_err(|source| EbpfError::Map { name: maps::PORTS, source })?;
        }
    }
    let mut allowlist = Allowlist {
        v4: take_typed(&mut ebpf, maps::ALLOW_V4)?,
        v6: take_typed(&mut ebpf, maps::ALLOW_V6)?,
    };
    allowlist.replace(options.allow)?;

    let program: &mut Xdp =
        ebpf.program_mut(PROGRAM_NAME).expect("the embedded object defines helo_xdp").try_into()?;
    program.load().map_err(|error| match error {
        ProgramError::LoadError { io_error, verifier_log } => {
            EbpfError::Verifier { source: io_error, log: verifier_log.to_string() }
        }
        other => EbpfError::Program(other),
    })?;
    Ok((ebpf, allowlist))
}

/// A counters map pinned by a version with another set of counters cannot serve this program
/// (a counter past its end would go uncounted, and `stats` could not read it), and holds
/// nothing worth keeping: it is set aside for a new one, removed once the start succeeds, put
/// back if it fails. Ban maps of another layout are refused instead ([`check_pinned`]).
fn set_aside_stale_stats(dir: &Path, pins: &mut PinChanges) -> Result<(), EbpfError> {
    let path = dir.join(maps::STATS);
    let Ok(info) = MapInfo::from_pin(&path) else { return Ok(()) };
    if info.max_entries() == STAT_COUNT && info.key_size() == 4 && info.value_size() == 8 {
        return Ok(());
    }
    let aside = dir.join(STATS_ASIDE);
    std::fs::rename(&path, &aside).map_err(|source| EbpfError::PinDir { dir: path, source })?;
    pins.stats_aside = Some((aside, info.max_entries()));
    Ok(())
}

/// A map taken out of a loaded object, typed.
fn take_typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).expect("the embedded object defines every map in helo_common");
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// A typed handle on a map of a loaded object (the handle borrows the object).
fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).expect("the embedded object defines every map in helo_common");
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// The loaded program's allowlist tries, kept to replace the allowlist on a reload.
pub struct Allowlist {
    v4: LpmTrie<MapData, [u8; 4], u8>,
    v6: LpmTrie<MapData, [u8; 16], u8>,
}

impl Allowlist {
    /// Makes the tries hold exactly `allow`: new entries first, then stale ones removed, so an
    /// address allowlisted before and after is never dropped in between.
    pub fn replace(&mut self, allow: &[IpNet]) -> Result<(), EbpfError> {
        let wanted: Vec<IpNet> = allow.iter().map(IpNet::trunc).collect();
        for net in &wanted {
            self.update(net, true)?;
        }
        for net in self.networks().into_iter().filter(|net| !wanted.contains(net)) {
            self.update(&net, false)?;
        }
        Ok(())
    }

    /// Inserts or removes one network.
    fn update(&mut self, net: &IpNet, insert: bool) -> Result<(), EbpfError> {
        let (name, result) = match net {
            IpNet::V4(n) => {
                let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
                let result = if insert { self.v4.insert(&key, 1, 0) } else { self.v4.remove(&key) };
                (maps::ALLOW_V4, result)
            }
            IpNet::V6(n) => {
                let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
                let result = if insert { self.v6.insert(&key, 1, 0) } else { self.v6.remove(&key) };
                (maps::ALLOW_V6, result)
            }
        };
        result.map_err(|source| EbpfError::Map { name, source })
    }

    /// What the tries hold, as networks.
    pub fn networks(&self) -> Vec<IpNet> {
        let v4 = self.v4.keys().flatten().filter_map(|k| {
            ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8).ok().map(IpNet::V4)
        });
        let v6 = self.v6.keys().flatten().filter_map(|k| {
            ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8).ok().map(IpNet::V6)
        });
        v4.chain(v6).collect()
    }
}

impl XdpProgram {
    /// Keeps the maps this load pinned, for good: the start has succeeded (the program is
    /// attached, or the agent enforces the bans itself). A replaced counters map goes now.
    pub fn keep_pins(&mut self) {
        self.pins.keep();
    }

    /// Gives up a start that failed before attaching: closes the program and removes the maps
    /// (and the pin directory) this load created, and puts back a counters map it replaced.
    /// Maps pinned before are never touched.
    pub fn discard(self) {
        let XdpProgram { ebpf, pins, .. } = self;
        drop(ebpf);
        pins.undo();
    }

    /// The allowlist tries, to replace the allowlist on a reload (the program keeps using
    /// them). `None` after the first call.
    pub fn take_allowlist(&mut self) -> Option<Allowlist> {
        self.allowlist.take()
    }

    /// Attaches to `iface` and pins the link. A link pinned by an earlier run on the same
    /// interface (in the mode asked for; any mode under [`AttachMode::Auto`]) gets this
    /// program swapped in atomically; a pinned link in another mode, or a dead one (its
    /// interface gone), is removed first. In [`AttachMode::Auto`] native mode is tried first,
    /// then generic.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, EbpfError> {
        let program: &mut Xdp =
            self.ebpf.program_mut(PROGRAM_NAME).expect("loaded above").try_into()?;
        for (path, pinned_mode) in pinned_links(&self.pin_dir, Some(iface)) {
            let wanted = match mode {
                AttachMode::Auto => true,
                AttachMode::Native => pinned_mode == "native",
                AttachMode::Skb => pinned_mode == "skb",
            };
            let reused = wanted
                .then(|| {
                    let link = PinnedLink::from_pin(&path).ok()?;
                    let link = XdpLink::try_from(FdLink::from(link)).ok()?;
                    program.attach_to_link(link).ok()
                })
                .flatten();
            if reused.is_some() {
                let mode = if pinned_mode == "native" { "native" } else { "skb" };
                return Ok(Attached { mode, replaced: true, pinned: true });
            }
            tracing::info!(link = %path.display(), "removing a pinned XDP link of another mode or a gone interface");
            let _ = std::fs::remove_file(&path);
        }
        let attempt = |program: &mut Xdp, mode: XdpMode, name: &'static str| {
            program.attach(iface, mode).map(|id| (name, id)).map_err(|source| match source {
                // if_nametoindex in the agent's own network namespace; /sys/class/net may show
                // another one's.
                ProgramError::UnknownInterface { name } => EbpfError::NoSuchInterface { name },
                source => EbpfError::Attach { iface: iface.to_owned(), mode: name, source },
            })
        };
        let (used, link_id) = match mode {
            AttachMode::Native => attempt(program, XdpMode::Driver, "native")?,
            AttachMode::Skb => attempt(program, XdpMode::Skb, "skb")?,
            AttachMode::Auto => match attempt(program, XdpMode::Driver, "native") {
                Ok(used) => used,
                Err(error @ EbpfError::NoSuchInterface { .. }) => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, iface, "native XDP refused; attaching in generic (skb) mode");
                    attempt(program, XdpMode::Skb, "skb")?
                }
            },
        };
        // Pin the link so the program outlives the agent. A netlink attachment (kernels
        // without XDP links) cannot be pinned: it detaches when the agent exits.
        let path = link_pin(&self.pin_dir, iface, used);
        let pinned = program
            .take_link(link_id)
            .ok()
            .and_then(|link| FdLink::try_from(link).ok())
            .map(|link| link.pin(&path));
        let pinned = match pinned {
            Some(Ok(_)) => true,
            Some(Err(error)) => {
                tracing::warn!(%error, link = %path.display(), "cannot pin the XDP link: the program detaches when the agent exits");
                false
            }
            None => {
                tracing::warn!(
                    iface,
                    "XDP attached through netlink (no BPF link): the program detaches when the agent exits"
                );
                false
            }
        };
        Ok(Attached { mode: used, replaced: false, pinned })
    }

    /// Runs the program once per `repeat` on `frame` with BPF_PROG_TEST_RUN; returns the XDP
    /// action and the kernel's mean time per run.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration), EbpfError> {
        let program: &Xdp = self.ebpf.program(PROGRAM_NAME).expect("loaded").try_into()?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok((result.return_value, result.duration))
    }
}

/// The pinned maps, opened from the pin directory: what the CLI and the agent share.
pub struct PinnedMaps {
    bans_v4: HashMap<MapData, [u8; 4], BanValue>,
    bans_v6: HashMap<MapData, [u8; 16], BanValue>,
    bans_v6_net: HashMap<MapData, [u8; 8], BanValue>,
    /// The prefix maps of other lengths: `None` in a pin directory an older agent made that
    /// no agent of this version has started on yet (its hosts and /64s work as before).
    prefixes: Option<PrefixMaps>,
    reasons: HashMap<MapData, u32, [u8; REASON_TEXT_LEN]>,
    stats: PerCpuArray<MapData, u64>,
    /// Each ban map's capacity, by [`BanTarget::map`]'s names.
    capacities: Vec<(&'static str, usize)>,
}

/// The ban maps of prefixes of other lengths than /64, and the lengths they hold.
struct PrefixMaps {
    v4: HashMap<MapData, PrefixV4, BanValue>,
    v6: HashMap<MapData, PrefixV6, BanValue>,
    lengths: Array<MapData, [u8; PREFIX_SLOTS]>,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self, EbpfError> {
        if !dir.join(maps::BANS_V4).exists() {
            return Err(EbpfError::NotRunning { dir: dir.to_owned() });
        }
        check_pinned(dir)?;
        let prefixes = match dir.join(maps::BAN_LENGTHS).exists() {
            true => Some(PrefixMaps {
                v4: open_pinned(dir, maps::BANS_V4_PREFIX)?,
                v6: open_pinned(dir, maps::BANS_V6_PREFIX)?,
                lengths: open_pinned(dir, maps::BAN_LENGTHS)?,
            }),
            false => None,
        };
        let capacities = [
            ("v4", maps::BANS_V4),
            ("v6", maps::BANS_V6),
            ("v6_net", maps::BANS_V6_NET),
            ("v4_prefix", maps::BANS_V4_PREFIX),
            ("v6_prefix", maps::BANS_V6_PREFIX),
        ]
        .into_iter()
        .filter_map(|(label, name)| {
            let info = MapInfo::from_pin(dir.join(name)).ok()?;
            Some((label, info.max_entries() as usize))
        })
        .collect();
        Ok(Self {
            bans_v4: open_pinned(dir, maps::BANS_V4)?,
            bans_v6: open_pinned(dir, maps::BANS_V6)?,
            bans_v6_net: open_pinned(dir, maps::BANS_V6_NET)?,
            prefixes,
            reasons: open_pinned(dir, maps::REASONS)?,
            stats: open_pinned(dir, maps::STATS)?,
            capacities,
        })
    }

    /// The prefix maps, or what to do when this pin directory has none yet.
    fn prefixes(&self) -> Result<&PrefixMaps, StoreError> {
        self.prefixes.as_ref().ok_or(StoreError::NoPrefixMaps)
    }

    fn prefixes_mut(&mut self) -> Result<&mut PrefixMaps, StoreError> {
        self.prefixes.as_mut().ok_or(StoreError::NoPrefixMaps)
    }

    /// The counters of both programs (XDP verdicts, steering outcomes), summed over CPUs,
    /// indexed by [`Stat`]. Counters a map pinned by an older version lacks read as 0.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], EbpfError> {
        let mut totals = [0u64; STAT_COUNT as usize];
        for stat in Stat::ALL.into_iter().filter(|s| (*s as u32) < self.stats.len()) {
            let per_cpu = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(|source| EbpfError::Map { name: maps::STATS, source })?;
            totals[stat as usize] = per_cpu.iter().sum();
        }
        Ok(totals)
    }
}

fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data =
        MapData::from_pin(dir.join(name)).map_err(|source| EbpfError::Map { name, source })?;
    let map = Map::from_map_data(data).map_err(|source| EbpfError::Map { name, source })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Refuses pinned maps whose key or value sizes differ from this build's: reusing them would
/// make the kernel read bans with the wrong layout.
fn check_pinned(dir: &Path) -> Result<(), EbpfError> {
    let expected: [(&'static str, usize, usize); 10] = [
        (maps::BANS_V4, 4, size_of::<BanValue>()),
        (maps::BANS_V6, 16, size_of::<BanValue>()),
        (maps::BANS_V6_NET, 8, size_of::<BanValue>()),
        (maps::BANS_V4_PREFIX, size_of::<PrefixV4>(), size_of::<BanValue>()),
        (maps::BANS_V6_PREFIX, size_of::<PrefixV6>(), size_of::<BanValue>()),
        (maps::BAN_LENGTHS, 4, PREFIX_SLOTS),
        (maps::REASONS, 4, REASON_TEXT_LEN),
        (maps::STATS, 4, 8),
        (maps::PASS_V4, 4, size_of::<PassValue>()),
        (maps::PASS_V6, 16, size_of::<PassValue>()),
    ];
    for (name, key, value) in expected {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| EbpfError::Map { name, source })?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(EbpfError::Incompatible {
                found: format!("key {} bytes, value {} bytes", info.key_size(), info.value_size()),
                expected: format!("key {key} bytes, value {value} bytes"),
                path,
            });
        }
    }
    Ok(())
}

/// A pinned map keeps the capacity it was created with; say so when the config asks for another.
fn warn_on_resize(dir: &Path, sizes: &MapSizes) {
    for (name, wanted) in [
        (maps::BANS_V4, sizes.bans_v4),
        (maps::BANS_V6, sizes.bans_v6),
        (maps::BANS_V6_NET, sizes.bans_v6_net),
        (maps::BANS_V4_PREFIX, sizes.bans_v4_prefix),
        (maps::BANS_V6_PREFIX, sizes.bans_v6_prefix),
    ] {
        if let Ok(info) = MapInfo::from_pin(dir.join(name))
            && info.max_entries() != wanted
        {
            tracing::warn!(
                map = name,
                pinned = info.max_entries(),
                configured = wanted,
                "pinned ban map keeps its old capacity; remove it (losing its bans) to resize"
            );
        }
    }
}

fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|fs| fs.f_type as u64 == BPFFS_MAGIC)
}

fn map_error(map: &'static str, operation: &'static str, error: MapError) -> StoreError {
    StoreError::Map { map, operation, source: Box::new(error) }
}

fn absent(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(e) => {
            e.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error())
        }
        _ => false,
    }
}

/// Looks `$key` up in `$map` (a map named `$name`): the value, `None` when absent.
macro_rules! lookup {
    ($map:expr, $key:expr, $name:expr) => {
        match $map.get($key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(error) if absent(&error) => Ok(None),
            Err(error) => Err(map_error($name, "lookup", error)),
        }
    };
}

/// Removes `$key` from `$map`: whether it was there.
macro_rules! delete {
    ($map:expr, $key:expr, $name:expr) => {
        match $map.remove($key) {
            Ok(()) => Ok(true),
            Err(error) if absent(&error) => Ok(false),
            Err(error) => Err(map_error($name, "delete", error)),
        }
    };
}

impl PinnedMaps {
    /// Makes sure the programs probe the prefix maps for `len` (of IPv4 or IPv6 prefixes)
    /// before a ban of that length goes in, so that none is ever in a map unseen.
    fn use_length(&mut self, v6: bool, len: u8) -> Result<(), StoreError> {
        let (entry, family) = if v6 { (LENGTHS_V6, "IPv6") } else { (LENGTHS_V4, "IPv4") };
        let lengths = &mut self.prefixes_mut()?.lengths;
        let mut slots = lengths
            .get(&entry, 0)
            .map_err(|error| map_error(maps::BAN_LENGTHS, "lookup", error))?;
        if slots.contains(&len) {
            return Ok(());
        }
        let Some(free) = slots.iter().position(|slot| *slot == 0) else {
            let in_use = slots.iter().map(|l| format!("/{l}")).collect::<Vec<_>>().join(", ");
            return Err(StoreError::Lengths { family, len, in_use });
        };
        slots[free] = len;
        lengths.set(entry, slots, 0).map_err(|error| map_error(maps::BAN_LENGTHS, "update", error))
    }
}

impl BanStore for PinnedMaps {
    fn get(&self, target: &BanTarget) -> Result<Option<BanValue>, StoreError> {
        match *target {
            BanTarget::V4(k) => lookup!(self.bans_v4, &k, maps::BANS_V4),
            BanTarget::V6(k) => lookup!(self.bans_v6, &k, maps::BANS_V6),
            BanTarget::V6Net64(k) => lookup!(self.bans_v6_net, &k, maps::BANS_V6_NET),
            BanTarget::V4Net(a, len) => match &self.prefixes {
                Some(p) => lookup!(p.v4, &PrefixV4::new(a, len), maps::BANS_V4_PREFIX),
                None => Ok(None),
            },
            BanTarget::V6Net(a, len) => match &self.prefixes {
                Some(p) => lookup!(p.v6, &PrefixV6::new(a, len), maps::BANS_V6_PREFIX),
                None => Ok(None),
            },
        }
    }

    fn put(&mut self, target: &BanTarget, value: &BanValue) -> Result<(), StoreError> {
        let update = |name| move |error| map_error(name, "update", error);
        match *target {
            BanTarget::V4(k) => self.bans_v4.insert(k, value, 0).map_err(update(maps::BANS_V4)),
            BanTarget::V6(k) => self.bans_v6.insert(k, value, 0).map_err(update(maps::BANS_V6)),
            BanTarget::V6Net64(k) => {
                self.bans_v6_net.insert(k, value, 0).map_err(update(maps::BANS_V6_NET))
            }
            BanTarget::V4Net(a, len) => {
                self.use_length(false, len)?;
                let key = PrefixV4::new(a, len);
                self.prefixes_mut()?.v4.insert(key, value, 0).map_err(update(maps::BANS_V4_PREFIX))
            }
            BanTarget::V6Net(a, len) => {
                self.use_length(true, len)?;
                let key = PrefixV6::new(a, len);
                self.prefixes_mut()?.v6.insert(key, value, 0).map_err(update(maps::BANS_V6_PREFIX))
            }
        }
    }

    fn remove(&mut self, target: &BanTarget) -> Result<bool, StoreError> {
        match *target {
            BanTarget::V4(k) => delete!(self.bans_v4, &k, maps::BANS_V4),
            BanTarget::V6(k) => delete!(self.bans_v6, &k, maps::BANS_V6),
            BanTarget::V6Net64(k) => delete!(self.bans_v6_net, &k, maps::BANS_V6_NET),
            BanTarget::V4Net(a, len) => match &mut self.prefixes {
                Some(p) => delete!(p.v4, &PrefixV4::new(a, len), maps::BANS_V4_PREFIX),
                None => Ok(false),
            },
            BanTarget::V6Net(a, len) => match &mut self.prefixes {
                Some(p) => delete!(p.v6, &PrefixV6::new(a, len), maps::BANS_V6_PREFIX),
                None => Ok(false),
            },
        }
    }

    fn entries(&self) -> Result<Vec<(BanTarget, BanValue)>, StoreError> {
        // Entries may vanish while we walk (the kernel removes expired bans, LRU evicts): a
        // failed step of the walk is skipped, not fatal.
        let mut all = Vec::new();
        all.extend(self.bans_v4.iter().flatten().map(|(k, v)| (BanTarget::V4(k), v)));
        all.extend(self.bans_v6.iter().flatten().map(|(k, v)| (BanTarget::V6(k), v)));
        all.extend(self.bans_v6_net.iter().flatten().map(|(k, v)| (BanTarget::V6Net64(k), v)));
        if let Some(p) = &self.prefixes {
            let len = |l: u32| u8::try_from(l).unwrap_or(u8::MAX);
            all.extend(
                p.v4.iter().flatten().map(|(k, v)| (BanTarget::V4Net(k.addr, len(k.len)), v)),
            );
            all.extend(
                p.v6.iter().flatten().map(|(k, v)| (BanTarget::V6Net(k.addr, len(k.len)), v)),
            );
        }
        Ok(all)
    }

    fn prefix_lengths(&self, v6: bool) -> Vec<u8> {
        let entry = if v6 { LENGTHS_V6 } else { LENGTHS_V4 };
        let Ok(prefixes) = self.prefixes() else { return Vec::new() };
        let slots = prefixes.lengths.get(&entry, 0).unwrap_or([0; PREFIX_SLOTS]);
        slots.into_iter().filter(|len| *len != 0).collect()
    }

    fn keep_lengths(&mut self, used: &[(bool, u8)]) -> Result<(), StoreError> {
        let Some(prefixes) = &mut self.prefixes else { return Ok(()) };
        for (v6, entry) in [(false, LENGTHS_V4), (true, LENGTHS_V6)] {
            let slots = prefixes
                .lengths
                .get(&entry, 0)
                .map_err(|error| map_error(maps::BAN_LENGTHS, "lookup", error))?;
            let kept = slots.map(|len| if used.contains(&(v6, len)) { len } else { 0 });
            if kept != slots {
                prefixes
                    .lengths
                    .set(entry, kept, 0)
                    .map_err(|error| map_error(maps::BAN_LENGTHS, "update", error))?;
            }
        }
        Ok(())
    }

    fn capacities(&self) -> Vec<(&'static str, usize)> {
        self.capacities.clone()
    }

    fn reason(&self, code: u32) -> Result<Option<[u8; REASON_TEXT_LEN]>, StoreError> {
        match self.reasons.get(&code, 0) {
            Ok(text) => Ok(Some(text)),
            Err(error) if absent(&error) => Ok(None),
            Err(error) => Err(map_error(maps::REASONS, "lookup", error)),
        }
    }

    fn put_reason(&mut self, code: u32, text: &[u8; REASON_TEXT_LEN]) -> Result<(), StoreError> {
        self.reasons
            .insert(code, text, 0)
            .map_err(|error| map_error(maps::REASONS, "update", error))
    }
}
