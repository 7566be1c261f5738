//! `helo-agent top`: the running agent, live in the terminal, for an admin on the gateway or
//! over ssh. A thread asks the agent for an [`Overview`] through the control socket every
//! second; the terminal loop reads keys and draws the last two answers with [`view::draw`],
//! which is pure (rates are deltas between the answers, on the agent's clock).
//!
//! The terminal is put back as it was on every way out: `q`, Esc or Ctrl-C (raw mode turns
//! Ctrl-C into a key), SIGTERM, SIGHUP or SIGINT, an error, and a panic (ratatui's hook
//! restores it before the message).
//! With no agent at the socket, `top` says so before touching the terminal.

pub mod view;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::control::{Answer, ClientError, Envelope, Overview, Request};

/// How often the agent is asked.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How many HELOs and rules are asked for: more than a tall terminal shows.
const TOP_LIMIT: usize = 60;
/// How long a key is waited for before the answers are looked at again.
const KEY_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(
        "no agent is running at {} (tried that control socket): start it with `helo-agent run` \
         (or `systemctl start helo-agent`), or pass top the --config the agent runs with",
        path.display()
    )]
    NotRunning { path: PathBuf },
    #[error(transparent)]
    Agent(ClientError),
    #[error(
        "helo-agent top draws on a terminal and standard output is not one: run it in a \
         terminal (over ssh: `ssh -t`); scripts can read `helo-agent stats --json` and \
         `helo-agent tophelos --json`"
    )]
    NotATerminal,
    #[error("the terminal: {0}")]
    Terminal(std::io::Error),
    #[error("the thread asking the agent stopped: this is a bug, please report it")]
    PollerGone,
}

/// The agent `top` watches, and how far back its tops look.
#[derive(Clone, Debug)]
pub struct Target {
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub since: Duration,
}

impl Target {
    /// One [`Overview`] from the agent.
    pub fn overview(&self) -> Result<Overview, ClientError> {
        let request = Request::Overview { since_secs: self.since.as_secs(), limit: TOP_LIMIT };
        let envelope = Envelope { pin_dir: self.pin_dir.clone(), request };
        match crate::control::request(&self.socket, &envelope)? {
            Answer::Overview(overview) => Ok(*overview),
            // `request` decodes the answer as the request's own.
            other => unreachable!("an overview request answered with {other:?}"),
        }
    }
}

/// Runs the view until the user quits.
pub fn run(target: Target) -> Result<(), TopError> {
    let first = target.overview().map_err(|error| match error {
        ClientError::NotRunning { path } => TopError::NotRunning { path },
        error => TopError::Agent(error),
    })?;
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(TopError::NotATerminal);
    }
    let socket = target.socket.display().to_string();
    let (sender, answers) = mpsc::channel();
    spawn_poller(target, sender.clone());
    watch_signals(sender);
    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(error) => {
            ratatui::restore();
            return Err(TopError::Terminal(error));
        }
    };
    let result = show(&mut terminal, first, &answers, &socket);
    ratatui::restore();
    result
}

/// What the terminal loop hears besides keys.
enum Heard {
    /// An overview, or why the agent gave none.
    Polled(Result<Box<Overview>, String>),
    /// A signal that ends `top`.
    Signal,
}

/// Asks the agent every [`REFRESH`] on a thread of its own (a slow agent never freezes the
/// keys), until the receiver is dropped.
fn spawn_poller(target: Target, sender: mpsc::Sender<Heard>) {
    std::thread::Builder::new()
        .name("top-poll".into())
        .spawn(move || {
            let mut next = Instant::now() + REFRESH;
            loop {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                // A slow answer is not made up for with a burst.
                next = (next + REFRESH).max(Instant::now());
                // The terminal hung up (an ssh session dropped, a tmux server killed).
                if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    end(&sender);
                    return;
                }
                let polled = target.overview().map(Box::new).map_err(|e| e.to_string());
                if sender.send(Heard::Polled(polled)).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the poller thread");
}

/// SIGTERM, SIGHUP and SIGINT (`kill`, a closed ssh session) end `top` through the terminal
/// loop, so the terminal is restored; without a handler they would kill it in raw mode.
fn watch_signals(sender: mpsc::Sender<Heard>) {
    use tokio::signal::unix::{SignalKind, signal};
    let watch = async move {
        let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = hup.recv() => {}
            _ = int.recv() => {}
        }
        end(&sender);
    };
    let _ = std::thread::Builder::new().name("top-signals".into()).spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_io().build() {
            runtime.block_on(watch);
        }
    });
}

/// How long the terminal loop gets to end by itself after a signal or a hang-up.
const END_GRACE: Duration = Duration::from_secs(1);

/// Ends `top`: through the terminal loop, which restores the terminal; and if that loop does
/// not come round within [`END_GRACE`] (with its terminal gone, reading keys can spin on end of
/// file and never return), from here.
fn end(sender: &mpsc::Sender<Heard>) {
    let _ = sender.send(Heard::Signal);
    std::thread::sleep(END_GRACE);
    ratatui::restore();
    std::process::exit(0);
}

/// The terminal loop: draw, then read keys until the next answer.
fn show(
    terminal: &mut ratatui::DefaultTerminal,
    first: Overview,
    answers: &mpsc::Receiver<Heard>,
    socket: &str,
) -> Result<(), TopError> {
    let (mut previous, mut current, mut error) = (None, first, None::<String>);
    loop {
        terminal
            .draw(|frame| {
                let screen = view::Screen {
                    previous: previous.as_ref(),
                    current: &current,
                    socket,
                    error: error.as_deref(),
                };
                view::draw(frame, &screen);
            })
            .map_err(TopError::Terminal)?;
        loop {
            if event::poll(KEY_WAIT).map_err(TopError::Terminal)? {
                match event::read().map_err(TopError::Terminal)? {
                    Event::Key(key) if quits(key) => return Ok(()),
                    Event::Resize(..) => break,
                    _ => {}
                }
            }
            match answers.try_recv() {
                Ok(Heard::Polled(Ok(overview))) => {
                    previous = Some(std::mem::replace(&mut current, *overview));
                    error = None;
                    break;
                }
                Ok(Heard::Polled(Err(message))) => {
                    error = Some(message);
                    break;
                }
                Ok(Heard::Signal) => return Ok(()),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => return Err(TopError::PollerGone),
            }
        }
    }
}

/// `q`, Esc and Ctrl-C quit.
fn quits(key: KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_esc_and_ctrl_c_quit_and_other_keys_do_not() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(quits(key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(quits(key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(key(KeyCode::Char('x'), KeyModifiers::NONE)));
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!quits(release));
    }

    #[test]
    fn no_agent_is_said_before_the_terminal_is_touched() {
        let target = Target {
            socket: "/nonexistent/helo-top.sock".into(),
            pin_dir: "/p".into(),
            since: Duration::from_secs(300),
        };
        let error = run(target).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, TopError::NotRunning { .. }), "{text}");
        assert!(text.contains("/nonexistent/helo-top.sock") && text.contains("helo-agent run"));
    }
}
