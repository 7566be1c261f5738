//! The agent's side of the control socket: accept, check the peer is root, read one request,
//! answer, close. A bad or slow client costs one task and a timeout, never the agent.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use super::{
    Answer, Banned, Envelope, MAX_MESSAGE, Refusal, ReloadSummary, Request, Unbanned, XdpStats,
};
use crate::addr::{AddrError, BanTarget};
use crate::agent::ReloadError;
use crate::blocklist::Ttl;
use crate::blocklist::worker::{AdminAnswer, AdminCommand, BanSender, WorkerError};
use crate::ebpf::EbpfError;
use crate::proxy::Shared;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A reload in progress, as [`Control::reload`] starts it.
pub type Reloading = Pin<Box<dyn Future<Output = Result<ReloadSummary, ReloadError>> + Send>>;
/// The allowlisted network a ban target falls in, if any.
pub type AllowlistCheck = Box<dyn Fn(&BanTarget) -> Option<String> + Send + Sync>;

/// What the control socket can reach in the running agent.
pub struct Control {
    pub pin_dir: PathBuf,
    pub bans: BanSender,
    pub shared: Arc<Shared>,
    /// The XDP counters.
    pub stats: Box<dyn Fn() -> Result<XdpStats, EbpfError> + Send + Sync>,
    /// Re-reads and swaps in the config; answers what changed.
    pub reload: Box<dyn Fn() -> Reloading + Send + Sync>,
    /// Allowlisted networks: a manual ban inside one is refused.
    pub allowlisted: AllowlistCheck,
}

/// Why a request was refused or failed; the client receives the message.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("permission denied: the control socket is root-only")]
    NotRoot { uid: Option<u32> },
    #[error(
        "this agent guards the pin directory {}, not {}: pass the same --config or --pin-dir as \
         the agent",
        guards.display(),
        asked.display()
    )]
    OtherPinDir { guards: PathBuf, asked: PathBuf },
    #[error("reading the request: {0}")]
    Read(std::io::Error),
    #[error("no request within 10 s")]
    Timeout,
    #[error("not a control request: {0}")]
    Malformed(serde_json::Error),
    #[error(transparent)]
    Target(#[from] AddrError),
    #[error(
        "{target} is in the allowlisted network {network} and would never be dropped: remove it \
         from allowlist.networks first"
    )]
    Allowlisted { target: BanTarget, network: String },
    #[error("the ttl must be longer than 0s")]
    ZeroTtl,
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("the ban worker answered {0:?} to another command: this is a bug, please report it")]
    Mismatched(AdminAnswer),
    #[error(transparent)]
    Stats(#[from] EbpfError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::UnixListener, control: Arc<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move { connection(stream, &control).await });
    }
}

async fn connection(mut stream: UnixStream, control: &Control) {
    let result = handle(&mut stream, control).await;
    let line = match &result {
        Ok(answer) => super::encode(Ok(answer)),
        Err(error) => {
            let guards = match error {
                ControlError::OtherPinDir { guards, .. } => Some(guards.as_path()),
                _ => None,
            };
            super::encode(Err(Refusal { message: error.to_string(), guards }))
        }
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&line)).await;
}

/// Checks the peer, reads its request and carries it out.
async fn handle(stream: &mut UnixStream, control: &Control) -> Result<Answer, ControlError> {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(0) {
        tracing::warn!(uid, "control socket: refused a connection from a non-root user");
        return Err(ControlError::NotRoot { uid });
    }
    let envelope = read_request(stream).await?;
    if envelope.pin_dir != control.pin_dir {
        return Err(ControlError::OtherPinDir {
            guards: control.pin_dir.clone(),
            asked: envelope.pin_dir,
        });
    }
    answer(envelope.request, control).await
}

async fn read_request(stream: &mut UnixStream) -> Result<Envelope, ControlError> {
    let mut reader =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(&mut *stream, MAX_MESSAGE as u64));
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ControlError::Read(e)),
        Err(_) => return Err(ControlError::Timeout),
    }
    serde_json::from_slice(&line).map_err(ControlError::Malformed)
}

async fn answer(request: Request, control: &Control) -> Result<Answer, ControlError> {
    Ok(match request {
        Request::Ban { target, ttl_secs, reason } => {
            Answer::Banned(ban(control, &target, ttl_secs, reason).await?)
        }
        Request::Unban { target } => {
            let target = target.parse()?;
            match control.bans.command(AdminCommand::Unban { target }).await? {
                AdminAnswer::Unbanned(was_banned) => Answer::Unbanned(Unbanned { was_banned }),
                other => return Err(ControlError::Mismatched(other)),
            }
        }
        Request::List => match control.bans.command(AdminCommand::List).await? {
            AdminAnswer::Listed(entries) => Answer::Listed(entries),
            other => return Err(ControlError::Mismatched(other)),
        },
        Request::Stats => Answer::Stats((control.stats)()?),
        Request::Reload => Answer::Reloaded((control.reload)().await?),
        Request::Tophelos { since_secs, limit } => {
            let now = crate::clock::unix_ns() / 1_000_000_000;
            let rows = control.shared.court.report.lock().expect("report lock").top(
                now,
                Duration::from_secs(since_secs),
                limit,
            );
            Answer::Tophelos(rows)
        }
    })
}

async fn ban(
    control: &Control,
    target: &str,
    ttl_secs: Option<u64>,
    reason: String,
) -> Result<Banned, ControlError> {
    let target: BanTarget = target.parse()?;
    if let Some(network) = (control.allowlisted)(&target) {
        return Err(ControlError::Allowlisted { target, network });
    }
    let ttl = match ttl_secs {
        None => Ttl::Forever,
        Some(0) => return Err(ControlError::ZeroTtl),
        Some(secs) => Ttl::For(Duration::from_secs(secs)),
    };
    match control.bans.command(AdminCommand::Ban { target, ttl, reason }).await? {
        AdminAnswer::Banned(value) => Ok(Banned { expires_ns: value.expires_ns }),
        other => Err(ControlError::Mismatched(other)),
    }
}
