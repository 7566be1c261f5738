//! The agent's side of the control socket: accept, check the peer is root, read one request,
//! answer, close. A bad or slow client costs one task and a timeout, never the agent.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use super::{Envelope, MAX_MESSAGE, Request, Response};
use crate::blocklist::Ttl;
use crate::blocklist::worker::{Answer, BanSender, Command};
use crate::proxy::Shared;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub type Reply = Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + Send>>;
/// The allowlisted network a ban target falls in, if any.
pub type AllowlistCheck = Box<dyn Fn(&crate::addr::BanTarget) -> Option<String> + Send + Sync>;

/// What the control socket can reach in the running agent.
pub struct Control {
    pub pin_dir: PathBuf,
    pub bans: BanSender,
    pub shared: Arc<Shared>,
    /// The XDP counters by name.
    pub stats: Box<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>,
    /// Re-reads and swaps in the config; answers what changed.
    pub reload: Box<dyn Fn() -> Reply + Send + Sync>,
    /// Allowlisted networks: a manual ban inside one is refused.
    pub allowlisted: AllowlistCheck,
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
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let response = if uid != Some(0) {
        tracing::warn!(uid, "control socket: refused a connection from a non-root user");
        Response::error("permission denied: the control socket is root-only")
    } else {
        match read_request(&mut stream).await {
            Ok(envelope) if envelope.pin_dir != control.pin_dir => Response {
                ok: false,
                error: Some(format!(
                    "this agent guards the pin directory {}, not {}: pass the same --config or \
                     --pin-dir as the agent",
                    control.pin_dir.display(),
                    envelope.pin_dir.display()
                )),
                data: serde_json::json!({ "pin_dir": control.pin_dir }),
            },
            Ok(envelope) => answer(envelope.request, control).await,
            Err(message) => Response::error(message),
        }
    };
    let mut line = serde_json::to_vec(&response).expect("responses serialize");
    line.push(b'\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&line)).await;
}

async fn read_request(stream: &mut UnixStream) -> Result<Envelope, String> {
    let mut reader =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(&mut *stream, MAX_MESSAGE as u64));
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Err(_) => return Err("no request within 10 s".into()),
    }
    serde_json::from_slice(&line).map_err(|e| format!("not a control request: {e}"))
}

async fn answer(request: Request, control: &Control) -> Response {
    let result = match request {
        Request::Ban { target, ttl_secs, reason } => ban(control, &target, ttl_secs, reason).await,
        Request::Unban { target } => match target.parse() {
            Ok(target) => match control.bans.command(Command::Unban { target }).await {
                Ok(Answer::Unbanned(was)) => Ok(serde_json::json!({ "was_banned": was })),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e),
            },
            Err(e) => Err(format!("{e}")),
        },
        Request::List => match control.bans.command(Command::List).await {
            Ok(Answer::Listed(entries)) => serde_json::to_value(entries).map_err(|e| e.to_string()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e),
        },
        Request::Stats => (control.stats)(),
        Request::Reload => (control.reload)().await,
        Request::Tophelos { since_secs, limit } => {
            let now = crate::clock::unix_ns() / 1_000_000_000;
            let rows = control.shared.court.report.lock().expect("report lock").top(
                now,
                Duration::from_secs(since_secs),
                limit,
            );
            serde_json::to_value(rows).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(data) => Response { ok: true, error: None, data },
        Err(message) => Response::error(message),
    }
}

async fn ban(
    control: &Control,
    target: &str,
    ttl_secs: Option<u64>,
    reason: String,
) -> Result<serde_json::Value, String> {
    let target: crate::addr::BanTarget = target.parse().map_err(|e| format!("{e}"))?;
    if let Some(net) = (control.allowlisted)(&target) {
        return Err(format!(
            "{target} is in the allowlisted network {net} and would never be dropped: remove it \
             from allowlist.networks first"
        ));
    }
    let ttl = match ttl_secs {
        None => Ttl::Forever,
        Some(0) => return Err("the ttl must be longer than 0s".into()),
        Some(secs) => Ttl::For(Duration::from_secs(secs)),
    };
    match control.bans.command(Command::Ban { target, ttl, reason }).await? {
        Answer::Banned(value) => Ok(serde_json::json!({ "expires_ns": value.expires_ns })),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
