//! The lease watchdog: a separate process that withdraws the owned ipfw rules
//! when the lease runs out and nobody renewed it.
//!
//! ipfw rules have no timeout (nftables set elements do), so on FreeBSD the
//! lease end is enforced in user space, by a process other than the agent:
//! freezing or killing the agent does not stop it. The agent talks to it over
//! a pipe (the watchdog's stdin), one line per message:
//!
//! ```text
//! arm <microseconds>   withdraw <microseconds> from now unless re-armed
//! disarm               nothing to withdraw
//! ```
//!
//! When the pipe closes (the agent exited or died), a pending deadline still
//! fires, then the watchdog exits. The expiry action is
//! [`plan::withdraw_argv`](super::plan::withdraw_argv): `ipfw -q set disable
//! <owned set>`, one atomic operation.
//!
//! Limits: the deadline starts when the watchdog reads the line, a little after
//! the agent wrote it, and the watchdog may wake late under load; both count
//! against `stop_margin`. A stall of the whole host, or killing the watchdog,
//! defeats it. The agent binary runs [`run_watchdog`] in a child process (for
//! instance as a `watchdog` subcommand) and talks to it with
//! [`ProcessWatchdog`].

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::dataplane::DataPlaneError;

/// How the executor reaches the watchdog.
pub trait WatchdogLink {
    /// Withdraw `stop_after` from now unless re-armed.
    fn arm(&mut self, stop_after: Duration) -> Result<(), DataPlaneError>;
    /// Cancel any pending withdrawal.
    fn disarm(&mut self) -> Result<(), DataPlaneError>;
}

/// A message on the watchdog pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Arm(Duration),
    Disarm,
}

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Arm(d) => format!("arm {}\n", d.as_micros()),
            Message::Disarm => "disarm\n".to_string(),
        }
    }

    pub fn parse(line: &str) -> Option<Message> {
        let mut it = line.split_whitespace();
        match (it.next(), it.next(), it.next()) {
            (Some("arm"), Some(us), None) => us
                .parse()
                .ok()
                .map(|us| Message::Arm(Duration::from_micros(us))),
            (Some("disarm"), None, None) => Some(Message::Disarm),
            _ => None,
        }
    }
}

/// The watchdog's state, without clocks or I/O.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WatchdogState {
    deadline: Option<Instant>,
}

impl WatchdogState {
    /// Applies a message received at `now`.
    pub fn on_message(&mut self, now: Instant, msg: Message) {
        self.deadline = match msg {
            Message::Arm(d) => Some(now + d),
            Message::Disarm => None,
        };
    }

    /// The pending deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the withdrawal is due at `now`; if so it is consumed.
    pub fn poll(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if now >= d => {
                self.deadline = None;
                true
            }
            _ => false,
        }
    }
}

/// The watchdog loop: reads messages from `input` and calls `expire` when a
/// deadline passes. Returns after `input` reaches end of file and no deadline
/// is pending. Lines it cannot parse are ignored (and reported to `on_bad`).
pub fn run_watchdog<R, F, B>(input: R, mut expire: F, mut on_bad: B)
where
    R: BufRead + Send + 'static,
    F: FnMut(),
    B: FnMut(&str),
{
    let (tx, rx) = mpsc::channel::<Result<Message, String>>();
    thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            let msg = Message::parse(&line).ok_or(line);
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    let mut state = WatchdogState::default();
    let mut open = true;
    loop {
        let now = Instant::now();
        if state.poll(now) {
            expire();
        }
        let received = match (state.deadline(), open) {
            (None, false) => return,
            (None, true) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (Some(d), true) => rx.recv_timeout(d.saturating_duration_since(now)),
            (Some(d), false) => {
                thread::sleep(d.saturating_duration_since(now));
                continue;
            }
        };
        match received {
            Ok(Ok(msg)) => state.on_message(Instant::now(), msg),
            Ok(Err(bad)) => on_bad(&bad),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
    }
}

/// The agent's end: a child process running [`run_watchdog`] on its stdin.
pub struct ProcessWatchdog {
    child: Child,
    stdin: ChildStdin,
}

impl ProcessWatchdog {
    /// Starts `argv` (e.g. the agent's own binary with a `watchdog`
    /// subcommand) with a pipe on its stdin.
    pub fn spawn(argv: &[String]) -> Result<Self, DataPlaneError> {
        let (program, args) = argv.split_first().ok_or_else(|| DataPlaneError::Command {
            command: String::new(),
            detail: "empty watchdog command".into(),
        })?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|source| DataPlaneError::Io {
                context: format!("starting the watchdog {program}"),
                source,
            })?;
        let stdin = child.stdin.take().ok_or_else(|| DataPlaneError::Command {
            command: argv.join(" "),
            detail: "no stdin pipe".into(),
        })?;
        Ok(ProcessWatchdog { child, stdin })
    }

    fn send(&mut self, msg: Message) -> Result<(), DataPlaneError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(DataPlaneError::Command {
                command: "watchdog".into(),
                detail: format!("the watchdog exited ({status}); the lease cannot be enforced"),
            });
        }
        self.stdin
            .write_all(msg.encode().as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(|source| DataPlaneError::Io {
                context: "writing to the watchdog".into(),
                source,
            })
    }
}

impl WatchdogLink for ProcessWatchdog {
    fn arm(&mut self, stop_after: Duration) -> Result<(), DataPlaneError> {
        self.send(Message::Arm(stop_after))
    }

    fn disarm(&mut self) -> Result<(), DataPlaneError> {
        self.send(Message::Disarm)
    }
}

/// Records messages (tests).
#[derive(Debug, Default)]
pub struct RecordingWatchdog {
    pub messages: Vec<Message>,
}

impl WatchdogLink for RecordingWatchdog {
    fn arm(&mut self, stop_after: Duration) -> Result<(), DataPlaneError> {
        self.messages.push(Message::Arm(stop_after));
        Ok(())
    }

    fn disarm(&mut self) -> Result<(), DataPlaneError> {
        self.messages.push(Message::Disarm);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Arm(Duration::from_micros(450_000)),
            Message::Disarm,
        ] {
            assert_eq!(Message::parse(m.encode().trim_end()), Some(m));
        }
        assert_eq!(Message::parse("arm"), None);
        assert_eq!(Message::parse("arm x"), None);
        assert_eq!(Message::parse("arm 1 2"), None);
        assert_eq!(Message::parse("fire"), None);
    }

    #[test]
    fn state_fires_once_at_deadline() {
        let t0 = Instant::now();
        let mut s = WatchdogState::default();
        assert!(!s.poll(t0));
        s.on_message(t0, Message::Arm(Duration::from_millis(100)));
        assert!(!s.poll(t0 + Duration::from_millis(99)));
        // Re-arming pushes the deadline out.
        s.on_message(
            t0 + Duration::from_millis(50),
            Message::Arm(Duration::from_millis(100)),
        );
        assert!(!s.poll(t0 + Duration::from_millis(149)));
        assert!(s.poll(t0 + Duration::from_millis(150)));
        assert!(!s.poll(t0 + Duration::from_millis(500)));
        s.on_message(t0, Message::Arm(Duration::from_millis(10)));
        s.on_message(t0, Message::Disarm);
        assert!(!s.poll(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn loop_fires_after_input_closes_and_ignores_disarmed() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let f = fired.clone();
        let bad = Arc::new(Mutex::new(Vec::new()));
        let b = bad.clone();
        let start = Instant::now();
        // Arm, disarm, garbage, arm 30 ms; then EOF: the last arm must fire.
        let input = Cursor::new(b"arm 1000000\ndisarm\nbogus\narm 30000\n".to_vec());
        run_watchdog(
            input,
            move || f.lock().unwrap().push(start.elapsed()),
            move |l| b.lock().unwrap().push(l.to_string()),
        );
        let fired = fired.lock().unwrap();
        assert_eq!(fired.len(), 1);
        assert!(fired[0] >= Duration::from_millis(30), "{:?}", fired[0]);
        assert!(fired[0] < Duration::from_secs(1), "{:?}", fired[0]);
        assert_eq!(*bad.lock().unwrap(), vec!["bogus".to_string()]);
    }

    #[test]
    fn loop_returns_at_eof_when_disarmed() {
        let fired = Arc::new(Mutex::new(0));
        let f = fired.clone();
        run_watchdog(
            Cursor::new(b"arm 10000000\ndisarm\n".to_vec()),
            move || *f.lock().unwrap() += 1,
            |_| {},
        );
        assert_eq!(*fired.lock().unwrap(), 0);
    }
}
