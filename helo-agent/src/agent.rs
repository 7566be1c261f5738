//! `helo-agent run`, in two halves. [`prepare`] does everything that needs root, in one
//! thread: validate, bind the SMTP listeners, the control socket and the metrics port, load the
//! XDP program and attach it (into the link pinned by an earlier run, when there is one),
//! restore the ban snapshot. Then the process drops to `agent.user` ([`drop_privileges`]), and
//! [`serve`] starts the runtime's work: the ban worker, the proxy, the control socket, metrics,
//! SIGHUP reloads. On shutdown the worker saves the snapshot; the program stays attached
//! through its pinned link (`helo-agent detach` removes it).
//!
//! With `[steer]` (the kernel front door), [`prepare`] also loads the steering program, puts
//! the agent's listening sockets (one per family) into its map, then attaches it, or swaps it
//! into the link an earlier run pinned: the sockets are in before the swap, so no connection
//! finds the new program without them. On shutdown the sockets leave the map first (the MTA
//! takes new connections from that instant), the listeners keep accepting what the kernel had
//! already handed them for [`STEER_SETTLE`], and every session runs to its end, judged, never
//! told 421 (within `proxy.shutdown_grace`). A watchdog ([`crate::watchdog`]) proves to
//! systemd that the session threads turn, and with steering on empties the map itself when
//! they stop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::blocklist::Blocklist;
use crate::blocklist::snapshot::{self, Loaded};
use crate::blocklist::worker::{self, BanSender};
use crate::config::PassSizes;
use crate::config::{Config, Overrides, ProxyProtocol};
use crate::control::XdpStats;
use crate::ebpf::{
    self, AgentSockets, Allowlist, Attached, EbpfError, Family, LoadOptions, PassMaps, PinnedMaps,
    SteerAttached, SteerEndpoints, XdpProgram,
};
use crate::judge::{Judge, Live, Parts};
use crate::metrics::Metrics;
use crate::passes::PassCache;
use crate::reload::Reloader;

/// After the agent's sockets leave the steering map at shutdown, how long its listeners keep
/// accepting: connections the kernel handed them just before (their handshake completing, or
/// waiting in the accept queue) would be reset when the listeners close.
pub const STEER_SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(
        "{0}; a DNS check enforces (checks.unknown_helo or checks.helo_not_client), or checks.helo_reuse does (its guard reads the client's reverse name), so the agent does not start without a resolver"
    )]
    Dns(#[from] crate::dns::DnsError),
    #[error(
        "no default route to take the interface from: pass --iface or set xdp.interface in the \
         config"
    )]
    NoDefaultInterface,
    #[error(transparent)]
    Bind(#[from] crate::proxy::BindError),
    #[error(transparent)]
    PolicyBind(#[from] crate::policy::BindError),
    #[error("cannot listen on the control socket {path}: {source}")]
    Control { path: PathBuf, source: std::io::Error },
    #[error(
        "another agent is already running with the control socket {path}: stop it first, or \
         give this one another agent.control_socket"
    )]
    AlreadyRunning { path: PathBuf },
    #[error("cannot listen for metrics on {address}: {source}")]
    Metrics { address: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot prepare the snapshot directory {path}: {source}")]
    SnapshotDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Privilege(#[from] crate::privilege::PrivilegeError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0} (lower proxy.workers, or raise the thread limit: ulimit -u, systemd TasksMax)")]
    Threads(crate::proxy::ThreadError),
}

/// What [`prepare`] set up as root, for [`serve`].
pub struct Prepared {
    config: Config,
    /// The command line's overrides, which a reload writes over the re-read file again.
    options: Overrides,
    iface: String,
    /// The SMTP listeners, one set per session thread.
    listeners: Vec<crate::proxy::StdListeners>,
    policy: Vec<crate::policy::StdListener>,
    program: XdpProgram,
    attached: Option<Attached>,
    allowlist: Option<Allowlist>,
    bans: Blocklist<PinnedMaps>,
    maps: Arc<PinnedMaps>,
    history: Vec<(crate::addr::BanTarget, u32, u64)>,
    /// The restored bans that other gateways of the fleet made, with their node.
    origins: Vec<(crate::addr::BanTarget, String)>,
    /// The pregreet test's passes, restored from the snapshot.
    passes: Arc<PassCache>,
    control: std::os::unix::net::UnixListener,
    metrics: Option<std::net::TcpListener>,
    /// The kernel front door, with `[steer]`.
    steering: Option<Steering>,
}

/// The kernel front door as [`prepare`] set it up.
pub struct Steering {
    /// The agent's sockets in the program's map: emptied at shutdown and by the watchdog.
    sockets: Arc<Mutex<AgentSockets>>,
    /// Kept open: the program's steered endpoints.
    _endpoints: SteerEndpoints,
    pub attached: SteerAttached,
    /// The pass maps, for the ban worker.
    passes: Option<PassMaps>,
}

impl Steering {
    /// Empties the agent's slots: from now on the kernel hands every new connection to the MTA.
    fn fail_open(sockets: &Mutex<AgentSockets>) {
        let mut sockets = sockets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for family in [Family::V4, Family::V6] {
            if let Err(error) = sockets.clear(family) {
                tracing::error!(%error, ?family, "cannot take the agent's socket out of the steering map");
            }
        }
    }
}

/// Loads the steering program, puts the agent's HELO-checking listeners (one per family, as
/// the config validated) into its map, then attaches it to this network namespace, or swaps
/// it into the link an earlier run pinned.
fn start_steering(
    program: &mut XdpProgram,
    config: &Config,
    listeners: &[crate::proxy::StdListeners],
) -> Result<Steering, AgentError> {
    use std::os::fd::AsFd;
    program.load_steering(&config.steer.addresses)?;
    let endpoints = program.take_steer_endpoints().expect("load_steering gives the endpoints");
    let mut sockets = program.take_agent_sockets().expect("load_steering gives the socket map");
    for (listener, check_helo) in listeners.first().into_iter().flatten() {
        if *check_helo {
            let family = sockets.set(listener.as_fd())?;
            tracing::debug!(?family, address = ?listener.local_addr().ok(), "agent socket in the steering map");
        }
    }
    let attached = program.attach_steering()?;
    let passes = PassMaps::open(&config.xdp.pin_dir)?;
    Ok(Steering {
        sockets: Arc::new(Mutex::new(sockets)),
        _endpoints: endpoints,
        attached,
        passes: Some(passes),
    })
}

/// The privileged half of start-up; see the module doc. Single-threaded.
pub fn prepare(config: Config, options: Overrides) -> Result<Prepared, AgentError> {
    let iface = match config.xdp.interface.clone() {
        Some(iface) => iface,
        None => crate::host::default_route_interface().ok_or(AgentError::NoDefaultInterface)?,
    };
    // With the proxy off (policy service alone) no session holds sockets of its own.
    let sessions = if config.proxy.listeners.is_empty() { 0 } else { config.proxy.max_sessions };
    let fd_limit = crate::host::raise_fd_limit(sessions);
    tracing::debug!(fd_limit, "open-file limit");
    refuse_if_running(&config.agent.control_socket)?;
    let threads = if config.proxy.listeners.is_empty() { 0 } else { config.proxy.worker_count() };
    let listeners = crate::proxy::bind_std(&config.proxy.listeners, threads)?;
    let policy = crate::policy::bind_std(&config.policy)?;
    let metrics = bind_metrics(&config)?;
    let mut program = ebpf::load(&LoadOptions {
        pin_dir: &config.xdp.pin_dir,
        sizes: config.xdp.sizes,
        ports: &config.xdp.ports,
        allow: &config.rules.allowlist,
        passes: if config.steer.enabled() { config.steer.sizes } else { PassSizes::UNUSED },
    })?;
    // The front door before XDP: a steering start that fails leaves nothing attached.
    let steering = if config.steer.enabled() {
        match start_steering(&mut program, &config, &listeners) {
            Ok(steering) => Some(steering),
            Err(error) => {
                program.discard();
                return Err(error);
            }
        }
    } else {
        if ebpf::unpin_steering(&config.xdp.pin_dir) {
            tracing::info!("steering is off: removed the steering link an earlier run pinned");
        }
        None
    };
    let attached = match attach_xdp(&mut program, &iface, &config) {
        Ok(attached) => attached,
        Err(error) => {
            // Nothing uses the maps this start pinned: leave no trace of it.
            program.discard();
            return Err(error);
        }
    };
    if let Some(steering) = &steering {
        log_steering(steering, &config);
    }
    let allowlist = program.take_allowlist();
    let mut bans = Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?);
    let passes = Arc::new(PassCache::new(config.proxy.pregreet.pass_cache_size));
    let mut steering = steering;
    let steer_passes = steering.as_mut().and_then(|s| s.passes.as_mut());
    let (history, origins) = restore_snapshot(&config, &mut bans, &passes, steer_passes)?;
    let maps = Arc::new(PinnedMaps::open(&config.xdp.pin_dir)?);
    // Last: a control socket that answers means the agent is attached and restored.
    let control = bind_control(&config.agent.control_socket)?;
    Ok(Prepared {
        config,
        options,
        iface,
        listeners,
        policy,
        program,
        attached,
        allowlist,
        bans,
        maps,
        history,
        origins,
        passes,
        control,
        metrics,
        steering,
    })
}

/// The metrics listener (`agent.metrics`), bound as root before privileges are dropped.
fn bind_metrics(config: &Config) -> Result<Option<std::net::TcpListener>, AgentError> {
    config
        .agent
        .metrics
        .map(|address| {
            std::net::TcpListener::bind(address)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| AgentError::Metrics { address, source })
        })
        .transpose()
}

/// Attaches XDP to `iface` and keeps the pins; `None` where the kernel refused the attach. On
/// an error the caller discards the program.
fn attach_xdp(
    program: &mut XdpProgram,
    iface: &str,
    config: &Config,
) -> Result<Option<Attached>, AgentError> {
    // An attach the kernel refuses (no XDP on this driver in this mode, another program there)
    // must not fail open silently: say so, and enforce the bans at accept instead. Other
    // errors (no such interface) are configuration errors and stop the agent.
    let attached = match program.attach(iface, config.xdp.mode) {
        Ok(attached) => Some(attached),
        Err(error @ EbpfError::Attach { .. }) => {
            tracing::error!(
                %error,
                iface,
                "XDP NOT ATTACHED: bans are enforced in user space at accept instead (banned \
                 clients are closed before the greeting; ports not proxied are not protected)"
            );
            None
        }
        Err(error) => return Err(error.into()),
    };
    program.keep_pins();
    if let Some(attached) = attached {
        tracing::info!(
            iface,
            mode = attached.mode,
            replaced_previous = attached.replaced,
            stays_attached = attached.pinned,
            ports = ?config.xdp.ports,
            pin_dir = %config.xdp.pin_dir.display(),
            allowlist = config.rules.allowlist.len(),
            config = %config.source.as_deref().map_or("<embedded defaults>".into(), |p| p.display().to_string()),
            "XDP ban filter attached"
        );
    }
    Ok(attached)
}

/// What the steering start did, in one line.
fn log_steering(steering: &Steering, config: &Config) {
    tracing::info!(
        endpoints = ?config.steer.addresses,
        netns = steering.attached.netns,
        replaced_previous = steering.attached.replaced,
        stays_attached = steering.attached.pinned,
        pass_ttl = %crate::duration::format(config.steer.pass_ttl),
        "steering attached: strangers to the agent, passes straight to the MTA, everyone to the MTA while no agent runs"
    );
}

/// What a snapshot gives back besides the bans: the offence history still in force, and the
/// nodes of the bans other gateways made.
type Remembered = (Vec<(crate::addr::BanTarget, u32, u64)>, Vec<(crate::addr::BanTarget, String)>);

/// Loads the snapshot into the maps; returns the offence history still in force and the
/// restored bans' origins. A corrupt snapshot is reported and set aside; the agent runs on.
fn restore_snapshot(
    config: &Config,
    bans: &mut Blocklist<PinnedMaps>,
    passes: &PassCache,
    steer_passes: Option<&mut PassMaps>,
) -> Result<Remembered, AgentError> {
    let Some(path) = &config.snapshot.path else { return Ok(Default::default()) };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)
        .map_err(|source| AgentError::SnapshotDir { path: dir.to_owned(), source })?;
    if let Some(user) = &config.agent.user {
        // The agent writes snapshots after dropping root: the directory must be its own.
        let user = crate::privilege::lookup(user)?;
        let owner = |p: &Path| {
            rustix::fs::chown(
                p,
                Some(rustix::fs::Uid::from_raw(user.uid)),
                Some(rustix::fs::Gid::from_raw(user.gid)),
            )
            .map_err(|e| AgentError::SnapshotDir { path: p.to_owned(), source: e.into() })
        };
        owner(dir)?;
        if path.exists() {
            owner(path)?;
        }
    }
    let now = crate::clock::Now::read();
    let started = Instant::now();
    let snapshot = match snapshot::load(path, now) {
        Ok(Loaded::Good(snapshot)) => snapshot,
        Ok(Loaded::Absent) => {
            tracing::info!(snapshot = %path.display(), "no ban snapshot yet: starting with the pinned bans only");
            return Ok(Default::default());
        }
        Ok(Loaded::Corrupt { reason, aside }) => {
            let aside = aside.map_or("(could not be renamed)".into(), |p| p.display().to_string());
            tracing::error!(snapshot = %path.display(), reason, set_aside_as = aside, "ban snapshot is corrupt: not restored (the pinned bans still hold); look at the file set aside");
            return Ok(Default::default());
        }
        Err(error) => {
            tracing::error!(%error, "ban snapshot not restored");
            return Ok(Default::default());
        }
    };
    let mut origins = Vec::new();
    let pregreet_passes = passes.restore(&snapshot.passes, now.unix_ns / 1_000_000_000);
    let steer_passes = steer_passes
        .map_or(0, |maps| crate::blocklist::passes::restore(maps, &snapshot.steer_passes, now));
    match snapshot::restore(bans, &snapshot, now) {
        Ok(done) => {
            tracing::info!(
                snapshot = %path.display(),
                restored = done.restored,
                expired = done.expired,
                kept_longer_pinned = done.kept,
                invalid = done.invalid,
                pregreet_passes,
                steer_passes,
                ms = started.elapsed().as_millis() as u64,
                "ban snapshot restored"
            );
            origins = done.origins;
        }
        Err(error) => tracing::error!(%error, "ban snapshot only partly restored"),
    }
    let forget_ns = u64::try_from(config.escalation.max_ttl.as_nanos()).unwrap_or(u64::MAX);
    Ok((snapshot::offences_in_force(&snapshot, forget_ns, now), origins))
}

/// A control socket that answers belongs to a running agent: two agents on the same maps and
/// listeners would fight.
fn refuse_if_running(path: &Path) -> Result<(), AgentError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::AlreadyRunning { path: path.to_owned() });
    }
    Ok(())
}

/// Binds the control socket mode 0600. A socket file nobody answers on is left from a crash
/// and replaced; one that answers belongs to a running agent.
fn bind_control(path: &Path) -> Result<std::os::unix::net::UnixListener, AgentError> {
    use crate::unix::UnixBindError;
    crate::unix::bind(path, 0o600, None).map_err(|error| match error {
        UnixBindError::Answering => AgentError::AlreadyRunning { path: path.to_owned() },
        UnixBindError::InTheWay => AgentError::Control {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way: set agent.control_socket to a path of its own",
            ),
        },
        UnixBindError::Io(source) => AgentError::Control { path: path.to_owned(), source },
    })
}

/// Switches to `agent.user` (see [`crate::privilege`]); transparent mode keeps CAP_NET_RAW.
pub fn drop_privileges(prepared: &Prepared) -> Result<(), AgentError> {
    let Some(name) = &prepared.config.agent.user else {
        tracing::warn!("agent.user is empty: running as root");
        return Ok(());
    };
    let user = crate::privilege::lookup(name)?;
    let keep = if prepared.config.proxy.proxy_protocol == ProxyProtocol::Transparent {
        rustix::thread::CapabilitySet::NET_RAW
    } else {
        rustix::thread::CapabilitySet::empty()
    };
    crate::privilege::drop_to(&user, keep)?;
    tracing::info!(user = name, uid = user.uid, capabilities = ?keep, "privileges dropped");
    Ok(())
}

/// The whole `run`: prepare, drop privileges, serve until `shutdown`.
pub fn run(
    config: Config,
    options: Overrides,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let prepared = prepare(config, options)?;
    drop_privileges(&prepared)?;
    let runtime = tokio::runtime::Runtime::new().map_err(AgentError::Runtime)?;
    runtime.block_on(serve(prepared, shutdown))
}

/// The unprivileged half: starts the ban worker, the control socket, metrics and SIGHUP
/// reloads, runs the proxy until `shutdown` completes, then shuts down.
pub async fn serve(
    prepared: Prepared,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let Prepared {
        config,
        options,
        iface,
        listeners,
        policy,
        program,
        attached,
        allowlist,
        bans,
        maps,
        history,
        origins,
        passes,
        control: control_listener,
        metrics: metrics_listener,
        mut steering,
    } = prepared;
    let metrics = Arc::new(Metrics::default());
    let remembered = (history, origins);
    let steer_passes = steering.as_mut().and_then(|s| s.passes.take());
    let (ban_sender, worker, fleet) =
        start_bans(&config, bans, remembered, &passes, steer_passes, &metrics);
    let judge = judge(&config, &ban_sender, attached.is_some(), &maps, passes, &metrics)?;
    log_ready(&listeners, &config);
    let reloader = Arc::new(Reloader::new(
        &config,
        options,
        allowlist,
        judge.clone(),
        ban_sender.clone(),
        metrics.clone(),
    ));
    let mut background = tokio::task::JoinSet::new();
    let control = control_server(control_listener, &config, &reloader, &ban_sender, &judge, &maps);
    background.spawn(control?);
    if let Some(listener) = metrics_listener {
        background.spawn(metrics_server(listener, &config, &metrics, &maps, &judge)?);
    }
    background.spawn(reload_on_sighup(reloader.clone()));
    if !policy.is_empty() {
        background.spawn(policy_server(policy, &judge)?);
    }
    let sockets = steering.as_ref().map(|s| s.sockets.clone());
    let (beats, watchdog) = start_watchdog(listeners.len(), sockets.clone(), &mut background);
    tell_systemd_ready();
    let watching = watchdog.as_ref().map(|(stop, _)| stop.clone());
    let shutdown = async move {
        shutdown.await;
        // Stopping is systemd's TimeoutStopSec's to watch; the sockets leave the map now.
        if let Some(stop) = watching {
            stop.store(true, Ordering::Relaxed);
        }
        let _ = crate::watchdog::notify("STOPPING=1");
        if let Some(sockets) = sockets {
            Steering::fail_open(&sockets);
            tracing::info!(
                settle_ms = STEER_SETTLE.as_millis() as u64,
                "stopping: the agent's sockets are out of the steering map, the MTA takes new connections; accepting what the kernel handed over already, then every session is judged to its end"
            );
            tokio::time::sleep(STEER_SETTLE).await;
        }
    };
    let serving =
        crate::proxy::Serving { judge_to_the_end: steering.is_some(), beats: Some(beats) };
    let proxied = crate::proxy::serve_with(listeners, judge.clone(), shutdown, serving).await;
    if let Some((stop, _)) = &watchdog {
        stop.store(true, Ordering::Relaxed);
    }
    drop((judge, reloader, ban_sender));
    shut_down(background, worker, program, attached, &iface, &config.xdp.pin_dir).await;
    if let Some(fleet) = fleet {
        finish_fleet(fleet, config.fleet.timeout.saturating_mul(2)).await;
    }
    proxied.map_err(AgentError::Threads)
}

/// `READY=1` to systemd, where it listens (`NOTIFY_SOCKET`).
fn tell_systemd_ready() {
    match crate::watchdog::notify("READY=1") {
        Ok(true) => tracing::debug!("told systemd the agent is ready"),
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%error, "cannot tell systemd the agent is ready (NOTIFY_SOCKET)")
        }
    }
}

/// Waits for the fleet task: the worker has stopped, so its queue is closed, and the task
/// sends what is left, or gives up with Redis unreachable.
async fn finish_fleet(fleet: tokio::task::JoinHandle<()>, timeout: Duration) {
    if tokio::time::timeout(timeout, fleet).await.is_err() {
        tracing::warn!("fleet: the last bans were not all shared before stopping");
    }
}

/// Starts the ban worker (with the offence history and the fleet's bans the snapshot gave
/// back) and, with a fleet, the task that shares bans through Redis; it is not among the
/// background tasks: it outlives the worker to share the last bans.
fn start_bans(
    config: &Config,
    bans: Blocklist<PinnedMaps>,
    (history, origins): Remembered,
    passes: &Arc<PassCache>,
    steer_passes: Option<PassMaps>,
    metrics: &Arc<Metrics>,
) -> (BanSender, worker::Worker<PinnedMaps>, Option<tokio::task::JoinHandle<()>>) {
    let (fleet_events, fleet_queue) = crate::fleet::queue();
    let fleet_on = config.fleet.redis.is_some();
    let (ban_sender, worker) = worker::start(
        bans,
        worker::Options {
            escalation: config.escalation,
            clock: crate::clock::boot_ns,
            snapshot: config.snapshot.path.clone().map(|p| (p, config.snapshot.interval)),
            metrics: Some(metrics.clone()),
            history,
            origins,
            fleet: fleet_on.then(|| worker::FleetLink {
                node: config.fleet.node.clone(),
                events: fleet_events,
            }),
            spared: worker::Spared::of(config),
            passes: Some(passes.clone()),
            steer: steer_passes
                .map(|maps| Box::new(maps) as Box<dyn crate::blocklist::passes::PassStore>),
        },
    );
    let fleet = fleet_on.then(|| {
        let fleet =
            crate::fleet::Fleet::new(config.fleet.clone(), ban_sender.clone(), metrics.clone());
        tokio::spawn(fleet.run(fleet_queue))
    });
    (ban_sender, worker, fleet)
}

/// The judge every door shares: the config in force, the ban queue, the maps where the kernel
/// cannot enforce them (every client without XDP: the doors refuse banned clients at accept),
/// the restored pregreet passes, the resolver.
fn judge(
    config: &Config,
    bans: &BanSender,
    xdp_attached: bool,
    maps: &Arc<PinnedMaps>,
    passes: Arc<PassCache>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Judge>, AgentError> {
    let enforce = (!xdp_attached).then(|| maps.clone() as Arc<dyn crate::blocklist::BanCheck>);
    let parts = Parts {
        bans: Some(bans.clone()),
        enforce,
        lookup: Some(maps.clone()),
        metrics: Some(metrics.clone()),
        report_window: config.agent.report_window,
        passes: Some(passes),
        dns: resolver(config)?,
    };
    Ok(Judge::new(Live::of(config), parts))
}

/// The resolver of the checks that read DNS: `None` when none does. The DNS checks
/// (`unknown_helo`, `helo_not_client`) and an enforcing `helo_reuse` read it, and so do
/// `impersonation` (a name under a provider) and, with `trust.forward_confirmed`, every
/// enforcing heuristic and `forged_identity` (the client's forward-confirmed reverse name).
/// Without a usable resolver configuration the agent does not start if a DNS check or
/// `helo_reuse` enforces; otherwise it runs without (saying so): the DNS checks do not fire,
/// the heuristics enforce against everyone, `impersonation` judges bare domains only.
fn resolver(config: &Config) -> Result<Option<Arc<crate::dns::Dns>>, AgentError> {
    use crate::rules::{Check, CheckAction};
    let rules = &config.rules;
    let enforces = |check| matches!(rules.action(check), CheckAction::Reject | CheckAction::Ban);
    let dns_checks = [Check::UnknownHelo, Check::HeloNotClient];
    let required = dns_checks.iter().any(|c| enforces(*c)) || enforces(Check::HeloReuse);
    let anchored = rules.trust
        && Check::ALL
            .iter()
            .any(|c| (c.is_heuristic() || *c == Check::ForgedIdentity) && enforces(*c));
    let wanted = dns_checks.iter().any(|c| rules.action(*c) != CheckAction::Off)
        || rules.action(Check::Impersonation) != CheckAction::Off
        || anchored;
    if !required && !wanted {
        return Ok(None);
    }
    match crate::dns::Dns::new(&config.dns) {
        Ok(dns) => Ok(Some(Arc::new(dns))),
        Err(error) if !required => {
            tracing::warn!(
                %error,
                "no resolver: the DNS checks do not fire, the heuristic checks enforce against \
                 every client, impersonation judges bare provider domains only"
            );
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// A session thread stopped turning (see [`crate::watchdog`]): the kernel hands every new
/// connection to the MTA from now on, and the agent goes, for its supervisor to restart it.
fn stalled(sockets: &Mutex<AgentSockets>) {
    Steering::fail_open(sockets);
    let _ = crate::watchdog::notify("STATUS=hung: aborting");
    std::process::abort();
}

/// The watchdog thread and the flag that stops it.
type WatchdogThread = (Arc<AtomicBool>, std::thread::JoinHandle<()>);

/// The heartbeats of the session threads (slots `0..threads`) and of this runtime (the last
/// slot, beaten by a background task), and the watchdog thread that reads them, when systemd
/// watches the agent or steering is on (see [`crate::watchdog`]).
fn start_watchdog(
    threads: usize,
    sockets: Option<Arc<Mutex<AgentSockets>>>,
    background: &mut tokio::task::JoinSet<()>,
) -> (Arc<crate::watchdog::Heartbeats>, Option<WatchdogThread>) {
    let mut names: Vec<String> = (0..threads).map(|i| format!("helo-proxy-{i}")).collect();
    names.push("main".into());
    let beats = crate::watchdog::Heartbeats::new(names);
    background.spawn(beats.clone().keep_beating(threads));
    let systemd = crate::watchdog::systemd_interval();
    if systemd.is_none() && sockets.is_none() {
        return (beats, None);
    }
    let on_stall =
        sockets.map(|sockets| Box::new(move || stalled(&sockets)) as crate::watchdog::OnStall);
    let stop = Arc::new(AtomicBool::new(false));
    let limit = crate::watchdog::limit();
    match crate::watchdog::start(beats.clone(), systemd, limit, on_stall, stop.clone()) {
        Ok(thread) => {
            tracing::info!(
                systemd_interval_s = systemd.map(|d| d.as_secs_f64()),
                "watchdog: the session threads must keep turning"
            );
            (beats, Some((stop, thread)))
        }
        Err(error) => {
            tracing::error!(%error, "cannot start the watchdog thread");
            (beats, None)
        }
    }
}

fn log_ready(listeners: &[crate::proxy::StdListeners], config: &Config) {
    let threads = listeners.len();
    for (listener, check_helo) in listeners.first().into_iter().flatten() {
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, check_helo, upstream = %config.proxy.upstream, threads, "SMTP listener ready");
        }
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

/// The control socket's server over the listener bound by [`prepare`]: the ban worker, the
/// XDP counters, reloads and the allowlist in force.
fn control_server(
    listener: std::os::unix::net::UnixListener,
    config: &Config,
    reloader: &Arc<Reloader>,
    bans: &BanSender,
    judge: &Arc<Judge>,
    maps: &Arc<PinnedMaps>,
) -> Result<impl Future<Output = ()> + use<>, AgentError> {
    let stats_maps = maps.clone();
    let reload = reloader.clone();
    let current = reloader.clone();
    let control = crate::control::server::Control {
        pin_dir: config.xdp.pin_dir.clone(),
        bans: bans.clone(),
        judge: judge.clone(),
        stats: Box::new(move || stats_maps.stats().map(XdpStats)),
        reload: Box::new(move |handed| {
            let reload = reload.clone();
            Box::pin(async move { reload.reload_with(handed).await })
        }),
        allowlisted: Box::new(move |target| current.allowlisted(target)),
        policy_listeners: config.policy.listeners.iter().map(ToString::to_string).collect(),
        fleet: config.fleet.redis.is_some(),
    };
    let path = &config.agent.control_socket;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|source| AgentError::Control { path: path.clone(), source })?;
    tracing::info!(path = %path.display(), "control socket ready");
    Ok(crate::control::server::serve(listener, Arc::new(control)))
}

/// `GET /metrics` over the listener bound by [`prepare`]; each scrape first reads the XDP
/// counters and the open sessions.
fn metrics_server(
    listener: std::net::TcpListener,
    config: &Config,
    metrics: &Arc<Metrics>,
    maps: &Arc<PinnedMaps>,
    judge: &Arc<Judge>,
) -> Result<impl Future<Output = ()> + use<>, AgentError> {
    let address = listener.local_addr().ok();
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
        AgentError::Metrics { address: config.agent.metrics.expect("bound"), source }
    })?;
    let scrape_maps = maps.clone();
    let scrape_judge = judge.clone();
    let scrape_metrics = metrics.clone();
    tracing::info!(address = ?address, "metrics at http://{}/metrics", address.map(|a| a.to_string()).unwrap_or_default());
    Ok(crate::metrics::serve(listener, metrics.clone(), move || {
        if let Ok(totals) = scrape_maps.stats() {
            scrape_metrics.update_xdp(&totals);
        }
        let open = scrape_judge.court().open_sessions();
        crate::metrics::set_gauge(&scrape_metrics.sessions_open, open);
    }))
}

/// The Postfix policy service over the listeners bound by [`prepare`]; it stops with the other
/// background tasks.
fn policy_server(
    listeners: Vec<crate::policy::StdListener>,
    judge: &Arc<Judge>,
) -> Result<impl Future<Output = ()> + use<>, AgentError> {
    let listeners = listeners
        .into_iter()
        .map(crate::policy::StdListener::into_async)
        .collect::<Result<Vec<_>, _>>()?;
    for listener in &listeners {
        tracing::info!(listener = listener.describe(), "policy service ready");
    }
    Ok(crate::policy::serve(listeners, judge.clone(), std::future::pending()))
}

/// Reloads the config at each SIGHUP (the reloader logs and counts the result).
async fn reload_on_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        let _ = reloader.reload().await;
    }
}

/// After the proxy stopped: ends the background tasks (control socket, metrics, SIGHUP), lets
/// the ban worker finish its queue and save the snapshot, and says what stays in the kernel.
async fn shut_down(
    mut background: tokio::task::JoinSet<()>,
    worker: worker::Worker<PinnedMaps>,
    program: XdpProgram,
    attached: Option<Attached>,
    iface: &str,
    pin_dir: &Path,
) {
    background.shutdown().await;
    let saving = Instant::now();
    let _ = tokio::task::spawn_blocking(move || worker.stop()).await;
    tracing::debug!(ms = saving.elapsed().as_millis() as u64, "ban worker stopped");
    drop(program);
    match attached {
        Some(a) if a.pinned => tracing::info!(
            iface,
            "stopped; the XDP program stays attached and keeps dropping banned sources (`helo-agent detach` removes it); bans stay pinned in {}",
            pin_dir.display()
        ),
        Some(_) => {
            tracing::info!(iface, "XDP program detached; bans stay pinned in {}", pin_dir.display())
        }
        None => tracing::info!(iface, "stopped; bans stay pinned in {}", pin_dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_socket_replaces_a_stale_socket_but_never_another_file() {
        let dir = std::env::temp_dir().join(format!("helo-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        let err = bind_control(&file).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious", "left alone");

        let path = dir.join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // a crash leaves this
        let listener = bind_control(&path).expect("the stale socket is replaced");
        let err = bind_control(&path).unwrap_err();
        assert!(matches!(err, AgentError::AlreadyRunning { .. }), "{err}");
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
