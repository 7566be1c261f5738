//! Reloads (SIGHUP, `helo-agent reload`): the config is read again and what can change live
//! is swapped in (the judge's rules and settings, the ban worker's escalation and allowlist,
//! the kernel's allowlist); what is bound at start-up keeps its value until a restart, and
//! says so. A config that does not validate is refused, with the reason, and the one in force
//! keeps running. Every reload is logged and counted here, whoever asked.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::addr::BanTarget;
use crate::blocklist::worker::BanSender;
use crate::config::{Config, ConfigError, Overrides, ProxyProtocol};
use crate::control::HandedConfig;
use crate::ebpf::Allowlist;
use crate::judge::{Judge, Live};
use crate::metrics::Metrics;

/// Why a reload was refused; the config in force keeps running.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config (or a rule file it names) does not validate.
    #[error("reload refused, the config in force keeps running: {0}")]
    Invalid(#[source] ConfigError),
    /// The agent, no longer root, may not read its own config (a root-only file).
    #[error(
        "reload refused, the config in force keeps running: {0}; the agent runs as {user} \
         and may not read it: make it 0640 root:{user} (as the package installs it), or reload \
         with `helo-agent reload` as root, which hands the agent the file",
        user = .1
    )]
    Unreadable(ConfigError, String),
    #[error("reload refused, the config in force keeps running: the reload task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// What a reload swapped in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadSummary {
    /// The config file, or `<embedded defaults>`.
    pub config: String,
    pub badhelo_patterns: usize,
    pub table_entries: usize,
    pub allowlist: usize,
    pub warnings: Vec<String>,
    /// Keys that changed in the file but take effect only at a restart.
    pub needs_restart: Vec<String>,
    pub ms: u64,
}

/// Re-reads the config and swaps in what can change live.
pub struct Reloader {
    source: Option<PathBuf>,
    /// The command line's overrides, which a reload writes over the re-read file again.
    options: Overrides,
    current: Mutex<Config>,
    /// The kernel's allowlist, when the program is loaded.
    allowlist: Mutex<Option<Allowlist>>,
    judge: Arc<Judge>,
    bans: BanSender,
    metrics: Arc<Metrics>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// Reloads `config` (the one in force, read from its `source`) with the command line's
    /// `options`, into the judge, the ban worker and the kernel's allowlist.
    pub fn new(
        config: &Config,
        options: Overrides,
        allowlist: Option<Allowlist>,
        judge: Arc<Judge>,
        bans: BanSender,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reloader {
            source: config.source.clone(),
            options,
            current: Mutex::new(config.clone()),
            allowlist: Mutex::new(allowlist),
            judge,
            bans,
            metrics,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// Who the agent runs as, for an error that says who may not read a file.
    fn current_user(&self) -> String {
        let user = self.current.lock().expect("config lock").agent.user.clone();
        user.unwrap_or_else(|| "root".into())
    }

    /// The allowlisted network in force that `target` falls in, if any.
    pub fn allowlisted(&self, target: &BanTarget) -> Option<String> {
        let config = self.current.lock().expect("config lock");
        config.rules.allowlist.iter().find(|net| target.overlaps(net)).map(ToString::to_string)
    }

    /// Re-reads the config and swaps it in (see [`Reloader::reload_with`]).
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        self.reload_with(None).await
    }

    /// Re-reads the config, or takes it from `handed` (the root CLI read it: a root-only
    /// file the agent, no longer root, cannot read) when that is the agent's own file, and
    /// swaps it in. Logs and counts the result (`reloads_total{result}`), here only, whoever
    /// asked: SIGHUP or the control socket.
    pub async fn reload_with(
        &self,
        handed: Option<HandedConfig>,
    ) -> Result<ReloadSummary, ReloadError> {
        let result = self.swap(handed).await;
        let label = if result.is_ok() { "ok" } else { "refused" };
        self.metrics.reloads.get_or_create(&crate::metrics::ResultLabels { result: label }).inc();
        match &result {
            Ok(summary) => {
                let summary = serde_json::to_string(summary).unwrap_or_default();
                tracing::info!(%summary, "config reloaded");
            }
            Err(error) => {
                // The message says "reload refused" already; the field is why.
                let error =
                    std::error::Error::source(error).map_or(error.to_string(), |e| e.to_string());
                tracing::error!(%error, "reload refused: the config in force keeps running");
            }
        }
        result
    }

    /// The reload itself; `Err` with the reason when the new config is refused.
    async fn swap(&self, handed: Option<HandedConfig>) -> Result<ReloadSummary, ReloadError> {
        let _one = self.busy.lock().await;
        let source = self.source.clone();
        let options = self.options.clone();
        let started = Instant::now();
        let mut notes = Vec::new();
        let text = match handed {
            Some(handed) if same_file(Some(&handed.path), source.as_deref()) => Some(handed.text),
            Some(handed) => {
                notes.push(format!(
                    "the agent runs with {}, not {}: it read its own",
                    source
                        .as_deref()
                        .map_or("<embedded defaults>".into(), |p| p.display().to_string()),
                    handed.path.display()
                ));
                None
            }
            None => None,
        };
        let loaded = tokio::task::spawn_blocking(move || match (text, source.as_deref()) {
            (Some(text), Some(path)) => Config::load_text(&text, path, &options),
            (_, path) => Config::load_with(path, &options),
        })
        .await
        .map_err(ReloadError::Task)?;
        let mut new = loaded.map_err(|error| match error {
            ConfigError::Read { ref source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ReloadError::Unreadable(error, self.current_user())
            }
            error => ReloadError::Invalid(error),
        })?;
        new.warnings.extend(notes);
        let mut current = self.current.lock().expect("config lock");
        let needs_restart = keep_fixed(&current, &mut new);
        for key in &needs_restart {
            tracing::warn!(
                key,
                "reload: this setting changes only at a restart; the old value stays"
            );
        }
        if new.rules.allowlist != current.rules.allowlist
            && let Some(allowlist) = self.allowlist.lock().expect("allowlist lock").as_mut()
            && let Err(error) = allowlist.replace(&new.rules.allowlist)
        {
            tracing::error!(%error, "reload: the kernel allowlist was not fully updated");
        }
        // The judge's memories (HELO reuse, pregreet passes) are its own, not the file's: the
        // new rules count on in them, with the new limits, so a reload forgets nothing.
        self.judge.replace(Live::of(&new));
        self.bans.reconfigure(new.escalation, crate::blocklist::worker::Spared::of(&new));
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        let summary = ReloadSummary {
            config: new
                .source
                .as_deref()
                .map_or("<embedded defaults>".into(), |p| p.display().to_string()),
            badhelo_patterns: new.rules.badhelo.len(),
            table_entries: new.rules.table.len(),
            allowlist: new.rules.allowlist.len(),
            warnings: new.warnings.clone(),
            needs_restart: needs_restart.iter().map(ToString::to_string).collect(),
            ms: started.elapsed().as_millis() as u64,
        };
        *current = new;
        Ok(summary)
    }
}

/// Whether `a` and `b` name the same file (as given, or once resolved).
fn same_file(a: Option<&std::path::Path>, b: Option<&std::path::Path>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a == b
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(a), Ok(b)) if a == b
                )
        }
        _ => false,
    }
}

/// Settings bound at start-up: copied from `old` into `new`; returns the keys that differed.
fn keep_fixed(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.proxy.listeners != old.proxy.listeners {
        changed.push("proxy.listeners");
        new.proxy.listeners = old.proxy.listeners.clone();
    }
    if new.policy != old.policy {
        changed.push("policy");
        new.policy = old.policy.clone();
    }
    if new.proxy.max_sessions != old.proxy.max_sessions {
        changed.push("proxy.max_sessions");
        new.proxy.max_sessions = old.proxy.max_sessions;
    }
    if new.proxy.workers != old.proxy.workers {
        changed.push("proxy.workers");
        new.proxy.workers = old.proxy.workers;
    }
    let transparent = |c: &Config| c.proxy.proxy_protocol == ProxyProtocol::Transparent;
    if transparent(new) != transparent(old) {
        changed.push("proxy.proxy_protocol (to or from transparent)");
        new.proxy.proxy_protocol = old.proxy.proxy_protocol;
    }
    if new.xdp != old.xdp {
        changed.push("xdp");
        new.xdp = old.xdp.clone();
    }
    if new.agent != old.agent {
        changed.push("agent");
        new.agent = old.agent.clone();
    }
    if new.fleet != old.fleet {
        changed.push("fleet");
        new.fleet = old.fleet.clone();
    }
    if new.steer.addresses != old.steer.addresses {
        changed.push("steer.addresses");
        new.steer.addresses = old.steer.addresses.clone();
    }
    if new.steer.sizes != old.steer.sizes {
        changed.push("steer.max_passes_v4/v6");
        new.steer.sizes = old.steer.sizes;
    }
    if new.snapshot != old.snapshot {
        changed.push("bans.snapshot");
        new.snapshot = old.snapshot.clone();
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocklist::worker;

    /// Every reload is logged and counted in one place, whoever asked (SIGHUP or the control
    /// socket). `helo-agent reload` of a bad file used to leave neither in the agent: the CLI
    /// stopped at its own copy of the error (tests/cli.rs covers that side).
    #[test]
    fn a_reload_is_logged_and_counted_by_result() {
        let dir = std::env::temp_dir().join(format!("helo-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("helo.toml");
        std::fs::write(&path, "[identity]\ndetect = false\n").unwrap();
        let config = Config::load(Some(&path)).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (bans, _worker) = worker::spawn(
            crate::blocklist::fake::FakeStore::default(),
            config.escalation,
            crate::clock::boot_ns,
        );
        let judge = Judge::new(Live::of(&config), Default::default());
        let reloader =
            Reloader::new(&config, Overrides::default(), None, judge, bans, metrics.clone());
        let (logs, _logging) = crate::testing::Captured::start();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let count =
            |result| metrics.reloads.get_or_create(&crate::metrics::ResultLabels { result }).get();

        // The reuse memory outlives a reload; the new [reuse] limits apply at once.
        let client = "198.51.100.7".parse().unwrap();
        let rules = reloader.judge.live().rules.clone();
        let memory = reloader.judge.memory().clone();
        memory.observe("bulk.example", client, 100, rules.reuse.window);
        std::fs::write(
            &path,
            "[identity]\ndetect = false\n[rules]\nregexes = ['^x']\n[reuse]\nclients = 5\n",
        )
        .unwrap();
        let summary = runtime.block_on(reloader.reload()).unwrap();
        assert_eq!(summary.badhelo_patterns, 1);
        let reloaded = reloader.judge.live().rules.clone();
        assert_eq!(reloaded.reuse.clients, 5, "[reuse] changes on reload");
        let after = reloader.judge.memory();
        assert!(Arc::ptr_eq(after, &memory), "one memory across the reload");
        assert_eq!(after.count("bulk.example", 100, reloaded.reuse.window).networks, 1);
        assert!(summary.needs_restart.is_empty(), "{:?}", summary.needs_restart);
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let refused = runtime.block_on(reloader.reload()).unwrap_err().to_string();
        assert!(refused.starts_with("reload refused, the config in force keeps running: "));
        assert!(refused.contains("unknown field `bogus`"), "{refused}");
        assert_eq!((count("ok"), count("refused")), (1, 1));
        let logs = logs.text();
        assert!(logs.contains("config reloaded"), "{logs}");
        assert!(logs.contains("reload refused") && logs.contains("bogus"), "{logs}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
