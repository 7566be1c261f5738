//! One way to bind a unix listening socket, for the control socket and the policy door: made
//! as root before privileges drop, with its mode (and group) set from the start, replacing a
//! socket file a crash left behind but never another program's live socket or a file that is
//! not a socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Why a unix socket could not be bound; each caller says it in its own terms.
#[derive(Debug)]
pub enum UnixBindError {
    /// Another process answers on a socket at the path.
    Answering,
    /// A file that is not a socket is at the path.
    InTheWay,
    Io(std::io::Error),
}

impl From<std::io::Error> for UnixBindError {
    fn from(error: std::io::Error) -> Self {
        UnixBindError::Io(error)
    }
}

/// Binds `path` with permissions `mode` (and group `gid`), non-blocking. Its directory is
/// made if missing; a socket file nobody answers on (left by a crash) is replaced.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, UnixBindError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(UnixBindError::Answering);
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => return Err(UnixBindError::InTheWay),
        Err(_) => {}
    }
    // Made with `mode` already: no moment with wider permissions.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(!mode & 0o777));
    let listener = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = listener?;
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::process::Gid::from_raw(gid)))
            .map_err(std::io::Error::from)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control socket's own test (`agent.rs`) covers a file in the way; here, the mode
    /// set from the bind, a directory made, and a live socket never taken over.
    #[test]
    fn a_socket_gets_its_mode_and_a_live_one_is_never_replaced() {
        let dir = std::env::temp_dir().join(format!("helo-unix-{}", std::process::id()));
        let path = dir.join("made").join("s.sock");
        let live = bind(&path, 0o660, None).expect("the directory is made");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path, 0o660, None), Err(UnixBindError::Answering)));
        drop(live);
        assert!(bind(&path, 0o600, None).is_ok(), "nobody answers now: replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
