//! Who may hold one of a server's pending-handshake slots.
//!
//! A connection is anonymous until its handshake completes, so capacity for agents
//! and admins is kept by fairness rather than identity: every newcomer is admitted,
//! and when its source already holds `per_source` pending handshakes, or all `max`
//! slots are taken, it takes the slot of the oldest pending handshake of the source
//! holding the most. A legitimate peer holds one or two slots for milliseconds, so
//! an attacker with fewer source addresses than slots only ever evicts itself.
//! Authenticated connections hold no slot at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

pub(super) struct Admission {
    state: Mutex<State>,
    max: usize,
    per_source: usize,
}

#[derive(Default)]
struct State {
    next: u64,
    total: usize,
    /// Pending handshakes per source, oldest first; dropping a sender evicts.
    by_source: HashMap<IpAddr, BTreeMap<u64, oneshot::Sender<()>>>,
    /// (pending count, source): the last element is the heaviest source.
    load: BTreeSet<(usize, IpAddr)>,
}

/// Why a pending handshake was evicted to admit another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Eviction {
    /// The newcomer's own source held `per_source` pending handshakes.
    SameSource,
    /// All slots were taken; the heaviest source gave one up.
    Busiest,
}

/// A pending handshake's slot. The handshake must stop when `evicted` fires;
/// dropping the ticket frees the slot.
pub(super) struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    id: u64,
    pub(super) evicted: oneshot::Receiver<()>,
}

impl Admission {
    pub(super) fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Admission {
            state: Mutex::new(State::default()),
            max: max.max(1),
            per_source: per_source.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip`, evicting another pending handshake if needed.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> (Ticket, Option<Eviction>) {
        let mut s = self.lock();
        let own = s.by_source.get(&ip).map_or(0, BTreeMap::len);
        let eviction = if own >= self.per_source {
            s.evict_oldest(ip);
            Some(Eviction::SameSource)
        } else if s.total >= self.max {
            let heaviest = s.load.last().map(|&(_, heaviest)| heaviest);
            heaviest.map(|h| {
                s.evict_oldest(h);
                Eviction::Busiest
            })
        } else {
            None
        };
        let (tx, rx) = oneshot::channel();
        let id = s.next;
        s.next += 1;
        let count = {
            let q = s.by_source.entry(ip).or_default();
            q.insert(id, tx);
            q.len()
        };
        s.reindex(ip, count - 1, count);
        s.total += 1;
        drop(s);
        let ticket = Ticket {
            admission: self.clone(),
            ip,
            id,
            evicted: rx,
        };
        (ticket, eviction)
    }

    /// Pending handshakes now (for tests and the gauge).
    pub(super) fn pending(&self) -> usize {
        self.lock().total
    }
}

impl State {
    fn reindex(&mut self, ip: IpAddr, old: usize, new: usize) {
        if old > 0 {
            self.load.remove(&(old, ip));
        }
        if new > 0 {
            self.load.insert((new, ip));
        }
    }

    /// Removes `id` of `ip`; the sender is dropped, which wakes the handshake.
    fn remove(&mut self, ip: IpAddr, id: Option<u64>) -> bool {
        let Some(q) = self.by_source.get_mut(&ip) else {
            return false;
        };
        let old = q.len();
        let removed = match id {
            Some(id) => q.remove(&id).is_some(),
            None => q.pop_first().is_some(),
        };
        if !removed {
            return false;
        }
        let new = q.len();
        if new == 0 {
            self.by_source.remove(&ip);
        }
        self.reindex(ip, old, new);
        self.total -= 1;
        true
    }

    fn evict_oldest(&mut self, ip: IpAddr) {
        self.remove(ip, None);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.lock().remove(self.ip, Some(self.id));
    }
}

impl Ticket {
    /// Frees the slot of a completed handshake; false if it had been evicted
    /// meanwhile (the connection must then be dropped: its slot went to another).
    pub(super) fn complete(self) -> bool {
        // Drop's removal then finds nothing.
        self.admission.lock().remove(self.ip, Some(self.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_at_its_limit_evicts_its_own_oldest() {
        let a = Admission::new(100, 2);
        let (mut t1, e1) = a.admit(ip(1));
        let (_t2, e2) = a.admit(ip(1));
        let (_other, _) = a.admit(ip(2));
        assert_eq!((e1, e2), (None, None));
        let (_t3, e3) = a.admit(ip(1));
        assert_eq!(e3, Some(Eviction::SameSource));
        assert!(
            matches!(
                t1.evicted.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ),
            "the oldest of 10.0.0.1 is evicted"
        );
        assert!(!t1.complete(), "an evicted handshake may not complete");
        assert_eq!(a.pending(), 3);
    }

    #[test]
    fn a_full_server_evicts_from_the_busiest_source_not_the_lone_peer() {
        let a = Admission::new(4, 10);
        let (mut peer, _) = a.admit(ip(9));
        let mut flood: Vec<Ticket> = (0..3).map(|_| a.admit(ip(1)).0).collect();
        let (_late, e) = a.admit(ip(7));
        assert_eq!(e, Some(Eviction::Busiest));
        assert!(matches!(
            peer.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert!(matches!(
            flood[0].evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(a.pending(), 4);
        assert!(peer.complete());
        flood.clear();
        assert_eq!(a.pending(), 1);
    }
}
