//! A simulated disk: [`SimDisk`] implements [`Durable`] the way a real disk with
//! a write cache behaves.
//!
//! Every write is queued as *pending* and reaches the *durable* image only on
//! [`Durable::sync`]. [`SimDisk::crash`] models power loss: it keeps an ordered
//! prefix of the pending writes (a disk may have flushed some of them on its own,
//! but never out of order) and drops the rest. On restart, [`SimDisk::recover`]
//! hands the durable image back as a [`Recovered`], exactly what a real backend
//! reads at start-up.
//!
//! The disk can also be armed to fail its next `sync` ([`SimDisk::fail_next_sync`]):
//! the replica's Ready round then errors out mid-write and the simulator crashes
//! the node, leaving a torn (prefix-only) write on disk.

use raft::eraftpb::{Entry, HardState, Snapshot};
use vipshare_core::storage::{Durable, DurableError, Recovered};

/// One queued write, applied to the durable image in order.
#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Entry>),
    HardState(HardState),
    InstallSnapshot(Snapshot),
    Compact(Snapshot),
}

/// What survives a crash: the same shape as [`Recovered`].
#[derive(Debug, Clone, Default)]
pub struct DiskImage {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
}

impl DiskImage {
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot_index(), |e| e.index)
    }

    /// Term of the entry at `index`, if this image holds it (the snapshot's own
    /// index counts, with the snapshot's term).
    pub fn term(&self, index: u64) -> Option<u64> {
        let snap = self.snapshot_index();
        if index == snap {
            return Some(self.snapshot.get_metadata().term);
        }
        if index < snap || index > self.last_index() {
            return None;
        }
        self.entries
            .get((index - snap - 1) as usize)
            .map(|e| e.term)
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append(ents) => {
                let Some(head) = ents.first() else { return };
                let first = self.snapshot_index() + 1;
                let keep = head.index.saturating_sub(first) as usize;
                self.entries.truncate(keep);
                self.entries
                    .extend(ents.into_iter().filter(|e| e.index >= first));
            }
            Op::HardState(hs) => self.hard_state = hs,
            Op::InstallSnapshot(snap) => {
                self.snapshot = snap;
                self.entries.clear();
            }
            Op::Compact(snap) => {
                let index = snap.get_metadata().index;
                if index <= self.snapshot_index() {
                    return;
                }
                self.entries.retain(|e| e.index > index);
                self.snapshot = snap;
            }
        }
    }
}

/// Counters, for the end-of-run summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskStats {
    pub writes: u64,
    pub syncs: u64,
    pub lost_writes: u64,
}

/// The simulated disk of one controller. Survives the controller's crashes: the
/// simulator takes it out of a crashed [`vipshare_core::replica::Replica`] and
/// hands it to the next incarnation.
#[derive(Debug, Default)]
pub struct SimDisk {
    durable: DiskImage,
    pending: Vec<Op>,
    fail_next_sync: bool,
    /// Lowest log index appended since the invariant checker last looked.
    dirty_from: Option<u64>,
    stats: DiskStats,
}

impl SimDisk {
    /// A founding controller's disk: `snap` (the bootstrap snapshot) installed and synced.
    pub fn bootstrapped(snap: &Snapshot) -> Self {
        let mut d = SimDisk::default();
        d.durable.apply(Op::InstallSnapshot(snap.clone()));
        d
    }

    /// The durable image as a fresh backend reads it back at start-up.
    pub fn recover(&self) -> Recovered {
        Recovered {
            hard_state: self.durable.hard_state.clone(),
            snapshot: self.durable.snapshot.clone(),
            entries: self.durable.entries.clone(),
        }
    }

    /// What is on the platters right now (what a crash would keep, at least).
    pub fn durable(&self) -> &DiskImage {
        &self.durable
    }

    /// Number of writes not yet synced.
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    /// Power loss: the first `keep` pending writes reach the disk, the rest are lost.
    pub fn crash(&mut self, keep: usize) {
        let keep = keep.min(self.pending.len());
        let rest = self.pending.split_off(keep);
        self.stats.lost_writes += rest.len() as u64;
        for op in std::mem::take(&mut self.pending) {
            self.durable.apply(op);
        }
        self.fail_next_sync = false;
        self.dirty_from = None;
    }

    /// Make the next `sync` fail (an fsync error; the node treats it as fatal).
    pub fn fail_next_sync(&mut self) {
        self.fail_next_sync = true;
    }

    /// Cancel an armed [`SimDisk::fail_next_sync`].
    pub fn disarm(&mut self) {
        self.fail_next_sync = false;
    }

    /// Lowest index appended since the last call (for the log-matching checker).
    pub fn take_dirty_from(&mut self) -> Option<u64> {
        self.dirty_from.take()
    }

    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    fn push(&mut self, op: Op) {
        self.stats.writes += 1;
        self.pending.push(op);
    }
}

impl Durable for SimDisk {
    fn append(&mut self, entries: &[Entry]) -> Result<(), DurableError> {
        if let Some(head) = entries.first() {
            self.dirty_from = Some(self.dirty_from.map_or(head.index, |d| d.min(head.index)));
            self.push(Op::Append(entries.to_vec()));
        }
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), DurableError> {
        self.push(Op::HardState(hs.clone()));
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), DurableError> {
        self.push(Op::InstallSnapshot(snap.clone()));
        Ok(())
    }

    fn compact(&mut self, snap: &Snapshot) -> Result<(), DurableError> {
        self.push(Op::Compact(snap.clone()));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DurableError> {
        if self.fail_next_sync {
            self.fail_next_sync = false;
            return Err(DurableError("simulated fsync failure".into()));
        }
        self.stats.syncs += 1;
        for op in std::mem::take(&mut self.pending) {
            self.durable.apply(op);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn unsynced_writes_vanish_on_crash_and_prefixes_survive() {
        let mut d = SimDisk::default();
        d.append(&[ent(1, 1), ent(2, 1)]).unwrap();
        d.sync().unwrap();
        d.append(&[ent(3, 1)]).unwrap();
        let hs = HardState {
            term: 2,
            ..Default::default()
        };
        d.set_hard_state(&hs).unwrap();
        d.crash(1);
        let r = d.recover();
        assert_eq!(r.entries.len(), 3);
        assert_eq!(r.hard_state.term, 0);
        d.append(&[ent(2, 3)]).unwrap();
        d.crash(0);
        assert_eq!(d.durable().last_index(), 3);
        d.append(&[ent(2, 3)]).unwrap();
        d.sync().unwrap();
        assert_eq!(d.durable().last_index(), 2);
        assert_eq!(d.durable().term(2), Some(3));
    }

    #[test]
    fn failed_sync_keeps_writes_pending() {
        let mut d = SimDisk::default();
        d.append(&[ent(1, 1)]).unwrap();
        d.fail_next_sync();
        assert!(d.sync().is_err());
        assert_eq!(d.pending_writes(), 1);
        d.sync().unwrap();
        assert_eq!(d.durable().last_index(), 1);
    }
}
