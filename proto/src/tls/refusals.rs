//! Rate-limited logging of refused connections: a flood must not become a flood of
//! log lines. The first `burst` refusals of each window are logged one by one; the
//! rest are counted and summarised (by reason, with the number of sources) when
//! the window ends. The metric counts every refusal regardless.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Length of one logging window.
pub(super) const WINDOW: Duration = Duration::from_secs(10);
/// Refusals logged individually per window.
pub(super) const BURST: u32 = 20;
/// Distinct sources remembered per window (beyond it the count is a lower bound).
const MAX_SOURCES: usize = 65_536;

pub(super) struct RefusalLog {
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    logged: u32,
    suppressed: BTreeMap<&'static str, u64>,
    sources: HashSet<IpAddr>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Window {
            start: now,
            logged: 0,
            suppressed: BTreeMap::new(),
            sources: HashSet::new(),
        }
    }

    fn summarise(&self) {
        let total: u64 = self.suppressed.values().sum();
        if total == 0 {
            return;
        }
        let by_reason: Vec<String> = self
            .suppressed
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        tracing::warn!(
            suppressed = total,
            sources = self.sources.len(),
            by_reason = %by_reason.join(" "),
            window_s = self.start.elapsed().as_secs(),
            "TLS connections rejected without a line each (rate-limited log)"
        );
    }
}

impl RefusalLog {
    pub(super) fn new() -> Self {
        RefusalLog {
            window: Mutex::new(Window::new(Instant::now())),
        }
    }

    pub(super) fn record(&self, peer: SocketAddr, reason: &'static str, detail: &str) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(w.start) >= WINDOW {
            w.summarise();
            *w = Window::new(now);
        }
        if w.logged < BURST {
            w.logged += 1;
            tracing::warn!(%peer, reason, %detail, "TLS connection rejected");
            if w.logged == BURST {
                tracing::warn!(
                    "further TLS rejections in the next {WINDOW:?} are summarised, not logged each"
                );
            }
            return;
        }
        *w.suppressed.entry(reason).or_default() += 1;
        if w.sources.len() < MAX_SOURCES {
            w.sources.insert(peer.ip());
        }
    }

    /// Ends the window if it is over (called periodically, so that the summary of
    /// a flood that stopped still appears).
    pub(super) fn tick(&self) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(w.start) >= WINDOW {
            w.summarise();
            *w = Window::new(now);
        }
    }
}
