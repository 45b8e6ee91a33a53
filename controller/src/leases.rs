//! This controller's lease promises ([`vipshare_core::lease::Promises`]) behind a
//! lock, on a monotonic clock, with fence marks persisted before they are granted.
//!
//! A plain mutex is enough here: the hot path is one map update per heartbeat
//! (members x 10 per second), and keeping the pure `Promises` type lets the
//! simulator run exactly this logic. The fence-file fsync happens outside that
//! lock, on a blocking thread.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use vipshare_core::heartbeat;
use vipshare_core::lease::{LeaseTiming, Promises};
use vipshare_core::state::ClusterState;

pub struct Leases {
    started: Instant,
    promises: Mutex<Promises>,
    /// Serialises fence-file writes (taken without the promises lock).
    writer: Mutex<()>,
    fence_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{}: {reason}", file.display())]
    FenceFile { file: PathBuf, reason: String },
}

impl Leases {
    /// Loads the fence marks from `data_dir/fences.json`, refusing a corrupt one,
    /// and a missing one unless the raft store is new (`fresh_store`): the marks
    /// must be as durable as the log, or a restarted controller could ack an
    /// epoch it agreed to fence. A new store gets an empty file at once.
    pub fn open(data_dir: &Path, fresh_store: bool) -> Result<Self, LeaseError> {
        let fence_file = data_dir.join("fences.json");
        let (fenced, missing): (BTreeMap<String, u64>, bool) = match std::fs::read(&fence_file) {
            Ok(bytes) => (serde_json::from_slice(&bytes).map_err(|e| LeaseError::FenceFile {
                file: fence_file.clone(),
                reason: format!("corrupt: {e}; it records which members this controller fenced and must not be discarded"),
            })?, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !fresh_store {
                    return Err(LeaseError::FenceFile {
                        file: fence_file,
                        reason: "missing, but the raft store next to it is not new: the fence marks this controller agreed to would be lost, and it could ack a fenced member again. Restore the file; only if this controller never agreed to a fence (a store from before the file was always written), create it containing {}".into(),
                    });
                }
                (BTreeMap::new(), true)
            }
            Err(e) => {
                return Err(LeaseError::FenceFile {
                    file: fence_file,
                    reason: e.to_string(),
                })
            }
        };
        let leases = Leases {
            started: Instant::now(),
            promises: Mutex::new(Promises::new(LeaseTiming::default(), 0, fenced)),
            writer: Mutex::new(()),
            fence_file,
        };
        if missing {
            leases.persist(&BTreeMap::new())?;
        }
        Ok(leases)
    }

    /// Milliseconds on this controller's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Promises> {
        // A panic while holding the lock leaves the promises consistent (every
        // method updates one map entry), so a poisoned lock is still usable.
        self.promises.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a heartbeat ([`heartbeat::answer`]) from the applied `state`.
    pub fn heartbeat(
        &self,
        state: &ClusterState,
        voter: bool,
        hb: &heartbeat::Heartbeat,
    ) -> heartbeat::Answer {
        let now = self.now_ms();
        heartbeat::answer(&mut self.lock(), now, state, voter, hb)
    }

    /// What `member`'s agent last reported keeps it from serving, and for how
    /// many milliseconds it has reported problems.
    pub fn health(&self, member: &str) -> (Vec<String>, u64) {
        let now = self.now_ms();
        let p = self.lock();
        let (problems, since) = p.health(now, member);
        (problems.to_vec(), since)
    }

    /// Cluster time now, the base of damping ([`Promises::cluster_ms`]).
    pub fn cluster_ms(&self) -> u64 {
        let now = self.now_ms();
        self.lock().cluster_ms(now)
    }

    /// Milliseconds since this controller last acked `member`.
    pub fn since_ack(&self, member: &str) -> u64 {
        let now = self.now_ms();
        now.saturating_sub(self.lock().last_ack(member))
    }

    /// Whether this controller could agree to fence now; records nothing.
    /// `None` when it could, `Some(wait_ms)` otherwise.
    pub fn could_fence(&self, member: &str) -> Option<u64> {
        let now = self.now_ms();
        let p = self.lock();
        if p.may_fence(now, member) {
            None
        } else {
            Some(p.promised_until(member).saturating_sub(now))
        }
    }

    /// Agree to fence if the promise ran out; returns once the mark is on disk.
    /// `Ok(None)` on agreement, `Ok(Some(wait_ms))` when not yet. Blocking (an
    /// fsync): call it from `spawn_blocking`. The mark holds in memory from the
    /// moment it is made, so no ack slips in while it is written, and the lock
    /// is not held across the fsync (heartbeats are not stalled by the disk).
    pub fn fence(&self, member: &str, epoch: u64) -> Result<Option<u64>, LeaseError> {
        let now = self.now_ms();
        {
            let mut p = self.lock();
            if !p.fence(now, member, epoch) {
                let lc = p.timing().controller_promise_ms();
                return Ok(Some((p.last_ack(member) + lc).saturating_sub(now)));
            }
        }
        // Writers take turns and each writes the newest marks (which include
        // this one), so an older set never overwrites a newer one.
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let newest = self.lock().fenced().clone();
        self.persist(&newest)?;
        Ok(None)
    }

    pub fn with<T>(&self, f: impl FnOnce(&Promises) -> T) -> T {
        f(&self.lock())
    }

    pub fn with_mut<T>(&self, f: impl FnOnce(&mut Promises) -> T) -> T {
        f(&mut self.lock())
    }

    fn persist(&self, fenced: &BTreeMap<String, u64>) -> Result<(), LeaseError> {
        let err = |reason: String| LeaseError::FenceFile {
            file: self.fence_file.clone(),
            reason,
        };
        let tmp = self.fence_file.with_extension("json.tmp");
        let bytes = serde_json::to_vec(fenced).map_err(|e| err(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
        f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.fence_file).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = self.fence_file.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_marks_are_as_durable_as_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let e = Leases::open(dir.path(), false).err().unwrap().to_string();
        assert!(e.contains("fences.json") && e.contains("not new"), "{e}");
        let l = Leases::open(dir.path(), true).unwrap();
        assert!(dir.path().join("fences.json").exists(), "written at once");
        drop(l);
        let l = Leases::open(dir.path(), false).unwrap();
        assert!(l.with(|p| p.fenced().is_empty()));
        std::fs::write(dir.path().join("fences.json"), "{").unwrap();
        let e = Leases::open(dir.path(), false).err().unwrap().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
