//! The control socket: a unix socket through which the CLI's `ban`, `unban`, `list`, `stats`,
//! `reload` and `tophelos` reach the running agent. One JSON request line, one JSON answer line,
//! then the connection closes.
//!
//! Only root may use it: the socket is created mode 0600 by root before the agent drops its
//! privileges, and the server also checks the peer's uid (SO_PEERCRED), so a socket file with
//! loosened permissions still refuses other users. Every request names the pin directory the
//! CLI means; an agent guarding another one refuses, so the CLI never changes the wrong maps.

pub mod server;

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Requests and answers are one line each, at most this long.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// How long the CLI waits for the agent (a reload compiles rules).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The pin directory the CLI works on.
    pub pin_dir: PathBuf,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `ttl_secs: None` bans forever.
    Ban {
        target: String,
        ttl_secs: Option<u64>,
        reason: String,
    },
    Unban {
        target: String,
    },
    List,
    Stats,
    Reload,
    Tophelos {
        since_secs: u64,
        limit: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        let data = serde_json::to_value(data).unwrap_or(serde_json::Value::Null);
        Response { ok: true, error: None, data }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response { ok: false, error: Some(message.into()), data: serde_json::Value::Null }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens there (no socket file, or a stale one).
    #[error("no agent is running at {path} (start it with `helo-agent run`)")]
    NotRunning { path: PathBuf },
    #[error("{path}: permission denied: the control socket is root-only; run this as root")]
    Denied { path: PathBuf },
    #[error("control socket {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("the agent at {path} sent an answer that does not parse: {message}")]
    Garbled { path: PathBuf, message: String },
}

/// Sends one request to the agent at `path` and returns its answer (which may be an error the
/// agent reports).
pub fn request(path: &Path, envelope: &Envelope) -> Result<Response, ClientError> {
    let io = |error: std::io::Error| ClientError::Io { path: path.to_owned(), error };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning { path: path.to_owned() });
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ClientError::Denied { path: path.to_owned() });
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(envelope).expect("requests serialize");
    line.push(b'\n');
    // An agent that refuses us answers without reading: a failed write still leaves its
    // answer to read.
    let written = stream.write_all(&line);
    let mut answer = Vec::new();
    let read = std::io::BufReader::new(std::io::Read::take(stream, MAX_MESSAGE as u64))
        .read_until(b'\n', &mut answer);
    if answer.is_empty() {
        written.map_err(io)?;
        read.map_err(io)?;
    }
    serde_json::from_slice(&answer)
        .map_err(|e| ClientError::Garbled { path: path.to_owned(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let envelope = Envelope {
            pin_dir: "/sys/fs/bpf/helo-filter".into(),
            request: Request::Ban {
                target: "192.0.2.1".into(),
                ttl_secs: Some(60),
                reason: "x".into(),
            },
        };
        let text = serde_json::to_string(&envelope).unwrap();
        assert_eq!(
            text,
            r#"{"pin_dir":"/sys/fs/bpf/helo-filter","command":"ban","target":"192.0.2.1","ttl_secs":60,"reason":"x"}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), envelope);
        let list: Envelope = serde_json::from_str(r#"{"pin_dir":"/p","command":"list"}"#).unwrap();
        assert_eq!(list.request, Request::List);
        assert!(
            serde_json::from_str::<Envelope>(r#"{"pin_dir":"/p","command":"rm -rf"}"#).is_err()
        );
    }

    #[test]
    fn a_missing_socket_means_no_agent() {
        let envelope = Envelope { pin_dir: "/p".into(), request: Request::List };
        let err = request(Path::new("/nonexistent/helo.sock"), &envelope).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    }
}
