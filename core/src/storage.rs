//! Raft storage: an in-memory view of the log that raft reads from, kept in step
//! with a [`Durable`] backend that survives crashes.
//!
//! Every write goes to both. The [`Durable`] backend may buffer writes until
//! [`Durable::sync`]; the Ready loop in `replica.rs` calls `sync` before anything
//! that depends on the writes leaves the node. The controller's backend is redb
//! (`controller/src/storage.rs`); the simulator's models a disk whose unsynced
//! writes vanish on a crash.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// What a [`Durable`] backend hands back on start-up.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// The newest snapshot (index 0 if none).
    pub snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
}

/// Error of a durable backend. Carries enough context to name the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DurableError(pub String);

/// Crash-safe persistence of the raft log. Writes may be buffered; after `sync`
/// returns, everything written before it survives a crash.
pub trait Durable {
    /// Append entries, first discarding any stored entries at or after `entries[0].index`.
    fn append(&mut self, entries: &[Entry]) -> Result<(), DurableError>;
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), DurableError>;
    /// A snapshot received from the leader: replaces the whole log.
    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), DurableError>;
    /// A snapshot of our own applied state: stored, and entries up to its index dropped.
    fn compact(&mut self, snap: &Snapshot) -> Result<(), DurableError>;
    /// Barrier: returns once every earlier write is durable.
    fn sync(&mut self) -> Result<(), DurableError>;
}

/// The raft log in memory plus its durable backend. Implements [`raft::Storage`].
pub struct RaftStorage<D> {
    hard_state: HardState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    durable: D,
}

impl<D: Durable> RaftStorage<D> {
    /// Rebuild the in-memory view from what the backend recovered.
    pub fn new(durable: D, recovered: Recovered) -> Self {
        let Recovered {
            mut hard_state,
            snapshot,
            entries,
        } = recovered;
        // The commit index is written lazily; it is never below the snapshot.
        hard_state.commit = hard_state.commit.max(snapshot.get_metadata().index);
        RaftStorage {
            hard_state,
            snapshot,
            entries,
            durable,
        }
    }

    pub fn durable(&self) -> &D {
        &self.durable
    }

    pub fn durable_mut(&mut self) -> &mut D {
        &mut self.durable
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The newest stored snapshot (metadata index 0 when there is none).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snap_index() + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snap_index(), |e| e.index)
    }

    pub fn append(&mut self, ents: &[Entry]) -> Result<(), DurableError> {
        let Some(head) = ents.first() else {
            return Ok(());
        };
        if head.index < self.first() || head.index > self.last() + 1 {
            return Err(DurableError(format!(
                "append at index {} outside [{}, {}]",
                head.index,
                self.first(),
                self.last() + 1
            )));
        }
        self.durable.append(ents)?;
        let keep = (head.index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), DurableError> {
        self.durable.set_hard_state(hs)?;
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Commit index from a LightReady; persisted with the next write, since a lost
    /// commit index is simply re-learned from the leader.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), DurableError> {
        self.durable.install_snapshot(snap)?;
        let meta = snap.get_metadata();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.snapshot = snap.clone();
        self.entries.clear();
        Ok(())
    }

    pub fn compact(&mut self, snap: &Snapshot) -> Result<(), DurableError> {
        let index = snap.get_metadata().index;
        if index <= self.snap_index() {
            return Ok(());
        }
        if index > self.last() {
            return Err(DurableError(format!(
                "compact to {index} beyond last index {}",
                self.last()
            )));
        }
        self.durable.compact(snap)?;
        let drop = (index + 1 - self.first()) as usize;
        self.entries.drain(..drop);
        self.snapshot = snap.clone();
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), DurableError> {
        self.durable.sync()
    }
}

impl<D> Storage for RaftStorage<D>
where
    D: Durable,
{
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snap_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// The snapshot every founding controller starts from: index 1, term 1, the initial
/// voters, and an empty state machine. Starting above index 0 means a controller
/// added later always catches up by snapshot, so it learns the configuration.
pub fn bootstrap_snapshot(voters: &[u64], state: Vec<u8>) -> Snapshot {
    let mut snap = Snapshot {
        data: state.into(),
        ..Default::default()
    };
    let meta = snap.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    *meta.mut_conf_state() = ConfState::from((voters.to_vec(), vec![]));
    snap
}

/// A backend that keeps nothing: for tests of the in-memory view alone.
#[derive(Debug, Default)]
pub struct NullDurable;

impl Durable for NullDurable {
    fn append(&mut self, _: &[Entry]) -> Result<(), DurableError> {
        Ok(())
    }
    fn set_hard_state(&mut self, _: &HardState) -> Result<(), DurableError> {
        Ok(())
    }
    fn install_snapshot(&mut self, _: &Snapshot) -> Result<(), DurableError> {
        Ok(())
    }
    fn compact(&mut self, _: &Snapshot) -> Result<(), DurableError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), DurableError> {
        Ok(())
    }
}
