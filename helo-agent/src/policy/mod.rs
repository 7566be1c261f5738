//! The second front door: Postfix's policy service (`check_policy_service`). Postfix asks,
//! over a long-lived connection, one request at a time, what to do with a client; the agent
//! answers with the same judge, the same log line (`door=policy`), tophelos, metrics and bans
//! as the proxy, and nothing in the mail path changes.
//!
//! One SMTP session is one client address and port: its HELO is judged once (again only if it
//! changes), it gets one log line per verdict, and one ban. A ban is applied at verdict time:
//! the kernel drops only a banned source's new connections, so the session that earned it goes
//! on to hear Postfix's 5xx and say QUIT. [`protocol`] is the wire format, sans-IO;
//! [`session`] the decisions, sans-IO; [`listen`] the listeners and the per-connection loop.

pub mod listen;
pub mod protocol;
pub mod session;

pub use self::listen::{BindError, Listener, StdListener, bind_std, serve};
pub use self::session::PolicySession;
