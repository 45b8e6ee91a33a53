//! [`DiskLog`]: the controller's crash-safe raft log, one redb file per data directory.
//!
//! # On-disk layout
//!
//! `DIR/raft.redb` (DIR is created 0700, the file 0600), with four tables:
//!
//! | table        | key (type)                            | value payload                               |
//! |--------------|---------------------------------------|---------------------------------------------|
//! | `meta`       | `"format_version"` (`&str`)           | `u32` little endian ([`FORMAT_VERSION`])    |
//! |              | `"cluster"`                           | cluster name, UTF-8                         |
//! |              | `"cluster_id"`                        | random cluster ID from the CA, UTF-8 hex    |
//! |              | `"node_id"`                           | `u64` little endian                         |
//! | `hard_state` | `"hard_state"`                        | `eraftpb::HardState`, protobuf              |
//! | `snapshot`   | `"metadata"`                          | `eraftpb::SnapshotMetadata`, protobuf       |
//! |              | `"data"`                              | the snapshot's state-machine bytes          |
//! | `entries`    | raft index (`u64`)                    | `eraftpb::Entry`, protobuf                  |
//!
//! Every value is a *record*: `crc32 (u32 LE) ++ payload`, where the CRC (crc32fast) covers the
//! table name, the key and the payload, so a value that is damaged or that ends up under the
//! wrong key is detected on load. Nothing is ever repaired or reset by this module: any damage
//! is reported as a [`StorageError`] naming the file.
//!
//! # Durability
//!
//! The [`Durable`] write methods only buffer; [`Durable::sync`] applies everything buffered in
//! one redb write transaction committed with `Durability::Immediate` and two-phase commit (two
//! fsyncs). Two-phase commit is what makes redb refuse, rather than silently roll back to the
//! previous commit, a database whose newest commit is damaged: rolling back would lose a vote
//! or entries the node already acknowledged. A failed sync poisons the `DiskLog`: every later
//! call fails, since what reached the disk is unknown.
//!
//! # Opening
//!
//! 1. An existing file is first opened read-only and fully verified (meta, CRCs, contiguity),
//!    so a damaged or foreign file is refused without a byte of it being written. A file a
//!    crash left behind cannot be opened read-only (redb must recover it) and skips this step.
//! 2. It is then opened for writing with redb's integrity check, which verifies the checksum of
//!    every page and rebuilds redb's allocator state from the trees rather than trusting the
//!    copy stored at the last clean close (no checksum covers that copy, and a damaged one makes
//!    redb hand out pages still in use). This is also the recovery a crash needs; it rewrites
//!    redb's header, so a crashed *and* damaged file is refused after redb has touched it.
//! 3. Everything is read and verified again, under the write lock, and returned.
//!
//! redb panics on some damaged files; those panics are caught and reported as
//! [`StorageError::Corrupt`], their message going into the error rather than to stderr.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Instant;

use raft::eraftpb::{Entry, HardState, Snapshot, SnapshotMetadata};
use redb::{
    Builder, Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError,
};
use vipshare_core::storage::{Durable, DurableError, Recovered};
use vipshare_proto::pki::ClusterId;

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "raft.redb";
/// Where a new database is prepared before it is renamed to [`DB_FILE`]; it never holds raft state.
const TMP_FILE: &str = "raft.redb.tmp";
/// Version of the layout described in the module documentation.
pub const FORMAT_VERSION: u32 = 1;

const T_META: &str = "meta";
const T_HARD_STATE: &str = "hard_state";
const T_SNAPSHOT: &str = "snapshot";
const T_ENTRIES: &str = "entries";
const META: TableDefinition<&str, &[u8]> = TableDefinition::new(T_META);
const HARD_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new(T_HARD_STATE);
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new(T_SNAPSHOT);
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new(T_ENTRIES);

const META_FORMAT: &str = "format_version";
const META_CLUSTER: &str = "cluster";
const META_CLUSTER_ID: &str = "cluster_id";
const META_NODE: &str = "node_id";
const HS_KEY: &str = "hard_state";
const SNAP_META: &str = "metadata";
const SNAP_DATA: &str = "data";

/// redb's page cache. The log is kept short by compaction, so a small cache is plenty.
const CACHE_BYTES: usize = 32 << 20;

/// Whom a data directory belongs to; recorded when it is created and checked on every open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreIdentity {
    pub cluster: String,
    /// From the certificates: names repeat across clusters, this does not.
    pub cluster_id: ClusterId,
    pub node_id: u64,
}

/// Why the raft log could not be opened, read or written. Every variant names the file or
/// directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: already in use by another process or another handle in this process \
         (could not lock the file); only one controller may use a data directory",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "{}: not a redb database, or a truncated or damaged one: {detail}; refusing to start",
        path.display()
    )]
    NotADatabase { path: PathBuf, detail: String },
    #[error("{}: database is damaged: {detail}; refusing to start", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{}: CRC mismatch in table `{table}` key {key}: {detail}; the record is damaged, \
         refusing to start",
        path.display()
    )]
    Checksum {
        path: PathBuf,
        table: &'static str,
        key: String,
        detail: String,
    },
    #[error(
        "{}: cannot decode table `{table}` key {key}: {detail}; refusing to start",
        path.display()
    )]
    Decode {
        path: PathBuf,
        table: &'static str,
        key: String,
        detail: String,
    },
    #[error("{}: inconsistent raft log: {detail}; refusing to start", path.display())]
    Inconsistent { path: PathBuf, detail: String },
    #[error(
        "{}: foreign data directory: it belongs to cluster {found:?}, this controller is \
         configured for cluster {expected:?}",
        path.display()
    )]
    ForeignCluster {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "{}: foreign data directory: it belongs to cluster ID {found} (named {name:?}), but \
         this controller's certificates are for cluster ID {expected}; a data directory \
         from another cluster (same name or not) is never served",
        path.display()
    )]
    ForeignClusterId {
        path: PathBuf,
        name: String,
        found: String,
        expected: ClusterId,
    },
    #[error(
        "{}: foreign data directory: it belongs to node id {found}, this controller is \
         configured as node id {expected}",
        path.display()
    )]
    ForeignNode {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error(
        "{}: directory holds other files ({files}) but no {DB_FILE}; refusing to create a \
         raft log here",
        dir.display()
    )]
    ForeignDirectory { dir: PathBuf, files: String },
    #[error(
        "{}: unknown format version {found} (this build reads version {FORMAT_VERSION})",
        path.display()
    )]
    UnknownFormat { path: PathBuf, found: String },
    #[error(
        "{}: missing {what}: not a vipshare raft log, or a damaged one; refusing to start",
        path.display()
    )]
    MissingMeta { path: PathBuf, what: String },
    #[error("{}: {op}: {detail}", path.display())]
    Db {
        path: PathBuf,
        op: &'static str,
        detail: String,
    },
    #[error("{}: cannot encode {what}: {detail}", path.display())]
    Encode {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error(
        "{}: an earlier sync failed ({first}); the state on disk is unknown, the controller \
         must restart",
        path.display()
    )]
    Poisoned { path: PathBuf, first: String },
}

impl From<StorageError> for DurableError {
    fn from(e: StorageError) -> Self {
        DurableError(e.to_string())
    }
}

/// One buffered write, applied by the next [`Durable::sync`].
enum Op {
    /// Sealed entry records; stored entries at or after `first` are discarded first.
    Append {
        first: u64,
        records: Vec<(u64, Vec<u8>)>,
    },
    HardState(Vec<u8>),
    /// `meta` is the sealed metadata record. With `compact`, only entries up to the snapshot's
    /// index are dropped; otherwise (a snapshot installed from the leader) all of them.
    Snapshot {
        snap: Snapshot,
        meta: Vec<u8>,
        compact: bool,
    },
}

/// The controller's raft log on disk. See the module documentation.
pub struct DiskLog {
    db: Database,
    path: PathBuf,
    identity: StoreIdentity,
    fresh: bool,
    pending: Vec<Op>,
    /// Set by a failed sync: nothing more is written, since what is on disk is unknown.
    failed: Option<String>,
    two_phase_commit: bool,
}

impl fmt::Debug for DiskLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskLog")
            .field("path", &self.path)
            .field("identity", &self.identity)
            .field("fresh", &self.fresh)
            .field("pending", &self.pending.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl DiskLog {
    /// Open the raft log in `dir`, creating it if `dir` is missing or empty.
    ///
    /// A new or never-synced log comes back with [`Recovered::default()`] and
    /// [`is_fresh`](Self::is_fresh) set: the caller then bootstraps it (for a founding
    /// controller: `install_snapshot(bootstrap_snapshot(..))` and `sync()`).
    ///
    /// Refuses a directory that belongs to another cluster or node, holds other files but no
    /// `raft.redb`, or holds a file that is not a redb database, is truncated or damaged, fails
    /// a CRC, has an unknown format version, or holds a log that is not contiguous. A refused
    /// file is never modified, unless a crash left it needing redb's recovery (module docs).
    /// Another process (or `DiskLog`) holding the directory is [`StorageError::Locked`].
    pub fn open(dir: &Path, id: &StoreIdentity) -> Result<(DiskLog, Recovered), StorageError> {
        let path = dir.join(DB_FILE);
        match inspect_dir(dir)? {
            DirState::HasDb => {}
            DirState::Missing => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| io_err(dir, "creating data directory", e))?;
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
                initialize(dir, id)?;
            }
            DirState::Empty => initialize(dir, id)?,
            DirState::Foreign(files) => {
                return Err(StorageError::ForeignDirectory {
                    dir: dir.to_path_buf(),
                    files,
                })
            }
        }
        open_existing(path, id)
    }

    /// Whether the log held no raft state when it was opened (just created, or created and
    /// never synced since): the caller must bootstrap it or wait for a snapshot.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn identity(&self) -> &StoreIdentity {
        &self.identity
    }

    /// Writes buffered since the last [`Durable::sync`].
    pub fn pending_ops(&self) -> usize {
        self.pending.len()
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(first) => Err(StorageError::Poisoned {
                path: self.path.clone(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    fn encode<M: protobuf::Message>(
        &self,
        what: &'static str,
        m: &M,
    ) -> Result<Vec<u8>, StorageError> {
        m.write_to_bytes().map_err(|e| StorageError::Encode {
            path: self.path.clone(),
            what,
            detail: e.to_string(),
        })
    }

    fn buffer_snapshot(&mut self, snap: &Snapshot, compact: bool) -> Result<(), StorageError> {
        self.check_usable()?;
        let payload = self.encode("snapshot metadata", snap.get_metadata())?;
        let meta = seal(T_SNAPSHOT, SNAP_META.as_bytes(), &payload);
        self.pending.push(Op::Snapshot {
            snap: snap.clone(),
            meta,
            compact,
        });
        Ok(())
    }

    /// Applies the buffered writes in one transaction; returns the bytes written.
    fn commit_pending(&self) -> Result<u64, StorageError> {
        let db_err = |op: &'static str| {
            let path = self.path.clone();
            move |e: redb::Error| classify(&path, op, e)
        };
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| db_err("beginning write transaction")(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| db_err("setting durability")(e.into()))?;
        txn.set_two_phase_commit(self.two_phase_commit);
        let mut bytes = 0u64;
        {
            let mut entries = txn
                .open_table(ENTRIES)
                .map_err(|e| db_err("opening table entries")(e.into()))?;
            let mut hard_state = txn
                .open_table(HARD_STATE)
                .map_err(|e| db_err("opening table hard_state")(e.into()))?;
            let mut snapshot = txn
                .open_table(SNAPSHOT)
                .map_err(|e| db_err("opening table snapshot")(e.into()))?;
            let write = db_err("writing");
            for op in &self.pending {
                match op {
                    Op::Append { first, records } => {
                        entries
                            .retain_in(*first.., |_, _| false)
                            .map_err(|e| write(e.into()))?;
                        for (index, record) in records {
                            entries
                                .insert(*index, record.as_slice())
                                .map_err(|e| write(e.into()))?;
                            bytes += 8 + record.len() as u64;
                        }
                    }
                    Op::HardState(record) => {
                        hard_state
                            .insert(HS_KEY, record.as_slice())
                            .map_err(|e| write(e.into()))?;
                        bytes += (HS_KEY.len() + record.len()) as u64;
                    }
                    Op::Snapshot {
                        snap,
                        meta,
                        compact,
                    } => {
                        let data = seal(T_SNAPSHOT, SNAP_DATA.as_bytes(), &snap.data);
                        snapshot
                            .insert(SNAP_META, meta.as_slice())
                            .map_err(|e| write(e.into()))?;
                        snapshot
                            .insert(SNAP_DATA, data.as_slice())
                            .map_err(|e| write(e.into()))?;
                        bytes +=
                            (SNAP_META.len() + meta.len() + SNAP_DATA.len() + data.len()) as u64;
                        if *compact {
                            let index = snap.get_metadata().index;
                            entries
                                .retain_in(..=index, |_, _| false)
                                .map_err(|e| write(e.into()))?;
                        } else {
                            entries.retain(|_, _| false).map_err(|e| write(e.into()))?;
                        }
                    }
                }
            }
        }
        txn.commit().map_err(|e| db_err("committing")(e.into()))?;
        Ok(bytes)
    }
}

impl Durable for DiskLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), DurableError> {
        self.check_usable()?;
        let Some(head) = entries.first() else {
            return Ok(());
        };
        let mut records = Vec::with_capacity(entries.len());
        for e in entries {
            let payload = self.encode("entry", e)?;
            records.push((e.index, seal(T_ENTRIES, &e.index.to_be_bytes(), &payload)));
        }
        self.pending.push(Op::Append {
            first: head.index,
            records,
        });
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), DurableError> {
        self.check_usable()?;
        let payload = self.encode("hard state", hs)?;
        self.pending.push(Op::HardState(seal(
            T_HARD_STATE,
            HS_KEY.as_bytes(),
            &payload,
        )));
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), DurableError> {
        Ok(self.buffer_snapshot(snap, false)?)
    }

    fn compact(&mut self, snap: &Snapshot) -> Result<(), DurableError> {
        Ok(self.buffer_snapshot(snap, true)?)
    }

    fn sync(&mut self) -> Result<(), DurableError> {
        self.check_usable()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        match self.commit_pending() {
            Ok(bytes) => {
                self.pending.clear();
                metrics::histogram!("vipshare_storage_sync_seconds")
                    .record(start.elapsed().as_secs_f64());
                metrics::counter!("vipshare_storage_written_bytes_total").increment(bytes);
                Ok(())
            }
            Err(e) => {
                // After a failed commit (possibly a failed fsync) the file's state is unknown:
                // refuse everything from now on rather than retry over it.
                self.failed = Some(e.to_string());
                metrics::counter!("vipshare_storage_sync_failures_total").increment(1);
                Err(e.into())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Opening

enum DirState {
    Missing,
    Empty,
    HasDb,
    Foreign(String),
}

fn inspect_dir(dir: &Path) -> Result<DirState, StorageError> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DirState::Missing),
        Err(e) => return Err(io_err(dir, "reading data directory", e)),
    };
    let mut others = Vec::new();
    let mut has_db = false;
    for item in listing {
        let item = item.map_err(|e| io_err(dir, "reading data directory", e))?;
        let name = item.file_name();
        if name == DB_FILE {
            has_db = true;
        } else if name != TMP_FILE {
            others.push(name.to_string_lossy().into_owned());
        }
    }
    if has_db {
        return Ok(DirState::HasDb);
    }
    if others.is_empty() {
        // Possibly with a TMP_FILE left by an interrupted creation: it never holds raft state.
        return Ok(DirState::Empty);
    }
    others.sort();
    const SHOWN: usize = 5;
    let mut files = others
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if others.len() > SHOWN {
        files.push_str(&format!(", and {} more", others.len() - SHOWN));
    }
    Ok(DirState::Foreign(files))
}

/// Creates `DIR/raft.redb` holding only the meta table: prepared as [`TMP_FILE`] and renamed,
/// so a `raft.redb` always has its meta.
fn initialize(dir: &Path, id: &StoreIdentity) -> Result<(), StorageError> {
    let tmp = dir.join(TMP_FILE);
    let db = match create_db(&tmp) {
        Err(StorageError::NotADatabase { .. }) => {
            // Left by a creation that crashed before redb wrote its header.
            fs::remove_file(&tmp).map_err(|e| io_err(&tmp, "removing unfinished file", e))?;
            create_db(&tmp)?
        }
        other => other?,
    };
    let err = |op: &'static str| {
        let tmp = tmp.clone();
        move |e: redb::Error| classify(&tmp, op, e)
    };
    let mut txn = db
        .begin_write()
        .map_err(|e| err("beginning write transaction")(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err("setting durability")(e.into()))?;
    txn.set_two_phase_commit(true);
    {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| err("opening table meta")(e.into()))?;
        let rows: [(&str, Vec<u8>); 4] = [
            (META_FORMAT, FORMAT_VERSION.to_le_bytes().to_vec()),
            (META_CLUSTER, id.cluster.as_bytes().to_vec()),
            (META_CLUSTER_ID, id.cluster_id.as_str().as_bytes().to_vec()),
            (META_NODE, id.node_id.to_le_bytes().to_vec()),
        ];
        for (key, payload) in rows {
            let record = seal(T_META, key.as_bytes(), &payload);
            meta.insert(key, record.as_slice())
                .map_err(|e| err("writing meta")(e.into()))?;
        }
        // The other tables exist from the start, so a reader never confuses "missing" with "lost".
        txn.open_table(HARD_STATE)
            .map_err(|e| err("creating table hard_state")(e.into()))?;
        txn.open_table(SNAPSHOT)
            .map_err(|e| err("creating table snapshot")(e.into()))?;
        txn.open_table(ENTRIES)
            .map_err(|e| err("creating table entries")(e.into()))?;
    }
    txn.commit().map_err(|e| err("committing meta")(e.into()))?;
    db.close().map_err(|e| err("closing")(e.into()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(&tmp, "syncing", e))?;
    let path = dir.join(DB_FILE);
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, "renaming new database into place", e))?;
    sync_dir(dir)
}

fn create_db(path: &Path) -> Result<Database, StorageError> {
    // Created here rather than by redb so that it is private to the controller's user.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, "creating database file", e))?;
    contain(path, "creating the database", || {
        builder()
            .create(path)
            .map_err(|e| classify_open(path, "creating database", e))
    })
}

fn open_existing(path: PathBuf, id: &StoreIdentity) -> Result<(DiskLog, Recovered), StorageError> {
    // Verify read-only first, so that a bad file is refused untouched. A file a crash left
    // behind needs redb's repair, which only a writable open does.
    let clean = contain(&path, "opening read-only", || {
        match builder().open_read_only(&path) {
            Ok(db) => {
                let txn = db
                    .begin_read()
                    .map_err(|e| classify(&path, "beginning read transaction", e.into()))?;
                load(&txn, &path, id)?;
                drop(txn);
                db.close()
                    .map_err(|e| classify(&path, "closing read-only handle", e.into()))?;
                Ok(true)
            }
            Err(DatabaseError::RepairAborted) => Ok(false),
            Err(e) => Err(classify_open(&path, "opening read-only", e)),
        }
    })?;
    let (db, recovered) = contain(&path, "opening", || {
        // Checking integrity verifies the checksum of every page and rebuilds redb's allocator
        // state from the trees instead of trusting the copy stored at the last close, which no
        // checksum of ours covers: a damaged copy would hand out pages still in use. It is also
        // the repair a crash requires.
        let db = builder()
            .set_check_integrity_on_open(true)
            .open(&path)
            .map_err(|e| classify_open(&path, "opening", e))?;
        let txn = db
            .begin_read()
            .map_err(|e| classify(&path, "beginning read transaction", e.into()))?;
        let recovered = load(&txn, &path, id)?;
        drop(txn);
        adopt_cluster_id(&db, &path, id)?;
        Ok((db, recovered))
    })?;
    if !clean {
        tracing::warn!(path = %path.display(), "raft log was not closed cleanly; redb verified and repaired it");
    }
    let fresh = recovered.snapshot.get_metadata().index == 0
        && recovered.entries.is_empty()
        && recovered.hard_state == HardState::default();
    let log = DiskLog {
        db,
        path,
        identity: id.clone(),
        fresh,
        pending: Vec::new(),
        failed: None,
        two_phase_commit: true,
    };
    Ok((log, recovered))
}

/// Record the cluster ID in a directory created before cluster IDs existed (name and
/// node already matched), so that from now on only this cluster's controller opens it.
fn adopt_cluster_id(db: &Database, path: &Path, id: &StoreIdentity) -> Result<(), StorageError> {
    let err = |op: &'static str| move |e: redb::Error| classify(path, op, e);
    let txn = db
        .begin_write()
        .map_err(|e| err("beginning write transaction")(e.into()))?;
    {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| err("opening table meta")(e.into()))?;
        if meta
            .get(META_CLUSTER_ID)
            .map_err(|e| err("reading meta")(e.into()))?
            .is_some()
        {
            return Ok(());
        }
        let record = seal(
            T_META,
            META_CLUSTER_ID.as_bytes(),
            id.cluster_id.as_str().as_bytes(),
        );
        meta.insert(META_CLUSTER_ID, record.as_slice())
            .map_err(|e| err("writing meta")(e.into()))?;
    }
    let mut txn = txn;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err("setting durability")(e.into()))?;
    txn.commit()
        .map_err(|e| err("committing cluster ID")(e.into()))?;
    tracing::info!(path = %path.display(), cluster_id = %id.cluster_id, "recorded the cluster ID in a data directory made before cluster IDs");
    Ok(())
}

fn builder() -> Builder {
    let mut b = Builder::new();
    b.set_cache_size(CACHE_BYTES);
    b
}

/// Reads and verifies everything: meta, hard state, snapshot, entries.
fn load(txn: &ReadTransaction, path: &Path, id: &StoreIdentity) -> Result<Recovered, StorageError> {
    // Past redb's own checks, a failure to read is damage inside the file.
    let damaged = |table: &str, e: redb::Error| match e {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StorageError::Locked {
                path: path.to_path_buf(),
            }
        }
        e => StorageError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("reading table `{table}`: {e}"),
        },
    };
    let open_err = |table: &str, e: TableError| match e {
        // Created with the file, so only meta's absence can mean "not ours".
        TableError::TableDoesNotExist(_) if table == T_META => StorageError::MissingMeta {
            path: path.to_path_buf(),
            what: format!("table `{table}`"),
        },
        TableError::TableDoesNotExist(_) => StorageError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("table `{table}` is missing"),
        },
        e => damaged(table, e.into()),
    };
    let read_err = |table: &'static str| move |e: redb::StorageError| damaged(table, e.into());

    // meta
    let meta = txn.open_table(META).map_err(|e| open_err(T_META, e))?;
    let meta_get = |key: &str| -> Result<Vec<u8>, StorageError> {
        let guard =
            meta.get(key)
                .map_err(read_err(T_META))?
                .ok_or_else(|| StorageError::MissingMeta {
                    path: path.to_path_buf(),
                    what: format!("`{key}` in table `meta`"),
                })?;
        let payload = unseal(
            path,
            T_META,
            key.as_bytes(),
            &format!("{key:?}"),
            guard.value(),
        )?;
        Ok(payload.to_vec())
    };
    let version = meta_get(META_FORMAT)?;
    match <[u8; 4]>::try_from(version.as_slice()) {
        Ok(v) if u32::from_le_bytes(v) == FORMAT_VERSION => {}
        Ok(v) => {
            return Err(StorageError::UnknownFormat {
                path: path.to_path_buf(),
                found: u32::from_le_bytes(v).to_string(),
            })
        }
        Err(_) => {
            return Err(StorageError::UnknownFormat {
                path: path.to_path_buf(),
                found: format!("of {} bytes", version.len()),
            })
        }
    }
    let cluster = meta_get(META_CLUSTER)?;
    let cluster = String::from_utf8(cluster).map_err(|e| StorageError::Decode {
        path: path.to_path_buf(),
        table: T_META,
        key: format!("{META_CLUSTER:?}"),
        detail: e.to_string(),
    })?;
    if cluster != id.cluster {
        return Err(StorageError::ForeignCluster {
            path: path.to_path_buf(),
            found: cluster,
            expected: id.cluster.clone(),
        });
    }
    let node = meta_get(META_NODE)?;
    let node = <[u8; 8]>::try_from(node.as_slice())
        .map(u64::from_le_bytes)
        .map_err(|_| StorageError::Decode {
            path: path.to_path_buf(),
            table: T_META,
            key: format!("{META_NODE:?}"),
            detail: format!("{} bytes, expected 8", node.len()),
        })?;
    if node != id.node_id {
        return Err(StorageError::ForeignNode {
            path: path.to_path_buf(),
            found: node,
            expected: id.node_id,
        });
    }

    // Absent only in a directory made before cluster IDs: `adopt_cluster_id` records it.
    if let Some(guard) = meta.get(META_CLUSTER_ID).map_err(read_err(T_META))? {
        let key = format!("{META_CLUSTER_ID:?}");
        let payload = unseal(
            path,
            T_META,
            META_CLUSTER_ID.as_bytes(),
            &key,
            guard.value(),
        )?;
        let found = String::from_utf8_lossy(payload).into_owned();
        if found != id.cluster_id.as_str() {
            return Err(StorageError::ForeignClusterId {
                path: path.to_path_buf(),
                name: cluster,
                found,
                expected: id.cluster_id.clone(),
            });
        }
    }

    let mut recovered = Recovered::default();

    // hard state
    let hs_table = txn
        .open_table(HARD_STATE)
        .map_err(|e| open_err(T_HARD_STATE, e))?;
    if let Some(guard) = hs_table.get(HS_KEY).map_err(read_err(T_HARD_STATE))? {
        let key = format!("{HS_KEY:?}");
        let payload = unseal(path, T_HARD_STATE, HS_KEY.as_bytes(), &key, guard.value())?;
        recovered.hard_state = decode(path, T_HARD_STATE, &key, payload)?;
    }

    // snapshot
    let snap_table = txn
        .open_table(SNAPSHOT)
        .map_err(|e| open_err(T_SNAPSHOT, e))?;
    let snap_meta = snap_table.get(SNAP_META).map_err(read_err(T_SNAPSHOT))?;
    let snap_data = snap_table.get(SNAP_DATA).map_err(read_err(T_SNAPSHOT))?;
    match (snap_meta, snap_data) {
        (None, None) => {}
        (Some(m), Some(d)) => {
            let key = format!("{SNAP_META:?}");
            let payload = unseal(path, T_SNAPSHOT, SNAP_META.as_bytes(), &key, m.value())?;
            let metadata: SnapshotMetadata = decode(path, T_SNAPSHOT, &key, payload)?;
            let key = format!("{SNAP_DATA:?}");
            let data = unseal(path, T_SNAPSHOT, SNAP_DATA.as_bytes(), &key, d.value())?;
            recovered.snapshot.set_metadata(metadata);
            recovered.snapshot.data = data.to_vec().into();
        }
        (m, _) => {
            return Err(StorageError::Inconsistent {
                path: path.to_path_buf(),
                detail: format!(
                    "table `snapshot` has {} but not {}",
                    if m.is_some() { "metadata" } else { "data" },
                    if m.is_some() { "data" } else { "metadata" },
                ),
            })
        }
    }
    let snap_index = recovered.snapshot.get_metadata().index;

    // entries
    let entries = txn
        .open_table(ENTRIES)
        .map_err(|e| open_err(T_ENTRIES, e))?;
    let rows = entries.iter().map_err(read_err(T_ENTRIES))?;
    for (expected, row) in (snap_index + 1..).zip(rows) {
        let (k, v) = row.map_err(read_err(T_ENTRIES))?;
        let index = k.value();
        let key = index.to_string();
        let payload = unseal(path, T_ENTRIES, &index.to_be_bytes(), &key, v.value())?;
        let entry: Entry = decode(path, T_ENTRIES, &key, payload)?;
        if entry.index != index {
            return Err(StorageError::Inconsistent {
                path: path.to_path_buf(),
                detail: format!("entry stored under key {index} has index {}", entry.index),
            });
        }
        if index != expected {
            let detail = if recovered.entries.is_empty() {
                format!(
                    "first entry has index {index}, but the snapshot ends at index {snap_index} \
                     (expected {expected})"
                )
            } else {
                format!("entries are not contiguous: expected index {expected}, found {index}")
            };
            return Err(StorageError::Inconsistent {
                path: path.to_path_buf(),
                detail,
            });
        }
        recovered.entries.push(entry);
    }
    Ok(recovered)
}

fn decode<M: protobuf::Message>(
    path: &Path,
    table: &'static str,
    key: &str,
    payload: &[u8],
) -> Result<M, StorageError> {
    M::parse_from_bytes(payload).map_err(|e| StorageError::Decode {
        path: path.to_path_buf(),
        table,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Records

fn record_crc(table: &str, key: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(table.as_bytes());
    h.update(&[0]);
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(payload);
    h.finalize()
}

/// `crc32 (LE) ++ payload`, the CRC covering table, key and payload.
fn seal(table: &str, key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(4 + payload.len());
    record.extend_from_slice(&record_crc(table, key, payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// Checks a record's CRC and returns its payload.
fn unseal<'a>(
    path: &Path,
    table: &'static str,
    key: &[u8],
    key_display: &str,
    record: &'a [u8],
) -> Result<&'a [u8], StorageError> {
    let fail = |detail: String| StorageError::Checksum {
        path: path.to_path_buf(),
        table,
        key: key_display.to_string(),
        detail,
    };
    let Some((crc, payload)) = record.split_first_chunk::<4>() else {
        return Err(fail(format!("record of {} bytes has no CRC", record.len())));
    };
    let stored = u32::from_le_bytes(*crc);
    let actual = record_crc(table, key, payload);
    if stored != actual {
        return Err(fail(format!(
            "stored {stored:#010x}, computed {actual:#010x} over {} bytes",
            payload.len()
        )));
    }
    Ok(payload)
}

// ---------------------------------------------------------------------------------------------
// Errors and panics

fn io_err(path: &Path, op: &'static str, source: io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "syncing directory", e))
}

fn classify_open(path: &Path, op: &'static str, e: DatabaseError) -> StorageError {
    match e {
        DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == io::ErrorKind::InvalidData =>
        {
            StorageError::NotADatabase {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => StorageError::Corrupt {
            path: path.to_path_buf(),
            detail,
        },
        DatabaseError::UpgradeRequired(v) => StorageError::UnknownFormat {
            path: path.to_path_buf(),
            found: format!("{v} of the redb file format"),
        },
        e => classify(path, op, e.into()),
    }
}

fn classify(path: &Path, op: &'static str, e: redb::Error) -> StorageError {
    let path = path.to_path_buf();
    match e {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StorageError::Locked { path }
        }
        redb::Error::Corrupted(detail) => StorageError::Corrupt { path, detail },
        redb::Error::Io(source) => StorageError::Io { path, op, source },
        e => StorageError::Db {
            path,
            op,
            detail: e.to_string(),
        },
    }
}

thread_local! {
    /// Set while [`contain`] runs: panics are recorded instead of printed.
    static CONTAINING: Cell<bool> = const { Cell::new(false) };
    static CONTAINED_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic (redb panics on some damaged files) into [`StorageError::Corrupt`].
/// The panic message goes into the error instead of stderr.
fn contain<T>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CONTAINING.with(Cell::get) {
                CONTAINED_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let message = CONTAINED_PANIC
                .with(|p| p.borrow_mut().take())
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("redb panicked while {what}: {}", message.replace('\n', " ")),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use raft::eraftpb::ConfState;
    use raft::Storage as _;
    use redb::WriteTransaction;
    use vipshare_core::storage::{bootstrap_snapshot, RaftStorage};

    const ID_A: &str = "0123456789abcdef0123456789abcdef";

    fn id() -> StoreIdentity {
        StoreIdentity {
            cluster: "cluster-a".to_string(),
            cluster_id: ID_A.parse().unwrap(),
            node_id: 1,
        }
    }

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            context: format!("ctx{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|i| entry(i, term, format!("payload-{i}-{term}").as_bytes()))
            .collect()
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn snapshot(index: u64, term: u64, voters: &[u64], learners: &[u64], data: &[u8]) -> Snapshot {
        let mut snap = Snapshot {
            data: data.to_vec().into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        *meta.mut_conf_state() = ConfState::from((voters.to_vec(), learners.to_vec()));
        snap
    }

    fn open(dir: &Path) -> (DiskLog, Recovered) {
        match DiskLog::open(dir, &id()) {
            Ok(r) => r,
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }

    fn open_err(dir: &Path, id: &StoreIdentity) -> StorageError {
        match DiskLog::open(dir, id) {
            Ok((log, _)) => panic!("open of {} should fail, got {log:?}", dir.display()),
            Err(e) => {
                eprintln!("refused as expected: {e}");
                e
            }
        }
    }

    /// A store holding the bootstrap snapshot, a hard state and entries 2..=5, closed.
    fn synced_store(dir: &Path) -> (Snapshot, HardState, Vec<Entry>) {
        let (mut log, rec) = open(dir);
        assert!(log.is_fresh());
        let snap = bootstrap_snapshot(&[1, 2, 3], b"initial state".to_vec());
        let hs = hard_state(2, 1, 4);
        let ents = entries(2..=5, 2);
        assert!(rec.entries.is_empty());
        log.install_snapshot(&snap).unwrap();
        log.set_hard_state(&hs).unwrap();
        log.append(&ents).unwrap();
        log.sync().unwrap();
        (snap, hs, ents)
    }

    fn raw_write(path: &Path, f: impl FnOnce(&WriteTransaction)) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        f(&txn);
        txn.commit().unwrap();
    }

    fn indexes(ents: &[Entry]) -> Vec<(u64, u64)> {
        ents.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn disk_log_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<DiskLog>();
        assert_send::<RaftStorage<DiskLog>>();
    }

    #[test]
    fn fresh_open_then_reopen_returns_what_was_synced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (log, rec) = open(&dir);
        assert!(log.is_fresh());
        assert_eq!(rec.hard_state, HardState::default());
        assert_eq!(rec.snapshot, Snapshot::default());
        assert!(rec.entries.is_empty());
        assert_eq!(log.path(), dir.join(DB_FILE));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
        drop(log);

        // Created but never synced: still fresh, so the caller bootstraps again.
        let (log, _) = open(&dir);
        assert!(log.is_fresh());
        drop(log);

        let (snap, hs, ents) = synced_store(&dir);
        let (log, rec) = open(&dir);
        assert!(!log.is_fresh());
        assert_eq!(rec.hard_state, hs);
        assert_eq!(rec.snapshot, snap);
        assert_eq!(
            rec.snapshot.get_metadata().get_conf_state().voters,
            vec![1, 2, 3]
        );
        assert_eq!(&rec.snapshot.data[..], b"initial state");
        assert_eq!(rec.entries, ents);

        // Learners and a bigger snapshot survive too.
        let (mut log, _) = (log, ());
        let big = snapshot(9, 3, &[1, 2], &[4], &vec![7u8; 300_000]);
        log.install_snapshot(&big).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, rec) = open(&dir);
        assert_eq!(rec.snapshot, big);
        assert_eq!(
            rec.snapshot.get_metadata().get_conf_state().learners,
            vec![4]
        );
        assert!(rec.entries.is_empty());
    }

    #[test]
    fn writes_without_sync_are_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let (snap, hs, ents) = synced_store(tmp.path());
        let (mut log, _) = open(tmp.path());
        log.append(&entries(6..=8, 3)).unwrap();
        log.set_hard_state(&hard_state(3, 2, 7)).unwrap();
        log.compact(&snapshot(4, 2, &[1, 2, 3], &[], b"later"))
            .unwrap();
        assert_eq!(log.pending_ops(), 3);
        drop(log);
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.hard_state, hs);
        assert_eq!(rec.snapshot, snap);
        assert_eq!(rec.entries, ents);
    }

    #[test]
    fn empty_sync_is_a_no_op() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let (mut log, _) = open(tmp.path());
        let path = log.path().to_path_buf();
        let before = fs::read(&path).unwrap();
        for _ in 0..3 {
            log.sync().unwrap();
        }
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "an empty sync wrote to the file"
        );
    }

    #[test]
    fn append_truncates_at_first_new_index() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path()); // entries 2..=5, term 2
        let (mut log, _) = open(tmp.path());
        log.append(&entries(6..=9, 2)).unwrap();
        log.sync().unwrap();
        // A new leader overwrites 4.. with a shorter suffix of term 3.
        log.append(&entries(4..=5, 3)).unwrap();
        log.sync().unwrap();
        drop(log);
        let (mut log, rec) = open(tmp.path());
        assert_eq!(indexes(&rec.entries), vec![(2, 2), (3, 2), (4, 3), (5, 3)]);
        assert_eq!(&rec.entries[2].data[..], b"payload-4-3");

        // Several appends in one batch apply in order.
        log.append(&entries(6..=8, 3)).unwrap();
        log.append(&entries(3..=4, 4)).unwrap();
        log.append(&entries(5..=5, 4)).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, rec) = open(tmp.path());
        assert_eq!(indexes(&rec.entries), vec![(2, 2), (3, 4), (4, 4), (5, 4)]);
    }

    #[test]
    fn compact_stores_snapshot_and_drops_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let (mut log, _) = open(tmp.path());
        log.append(&entries(6..=10, 2)).unwrap();
        log.sync().unwrap();
        let snap = snapshot(6, 2, &[1, 2, 3], &[], b"state at 6");
        log.compact(&snap).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.snapshot, snap);
        assert_eq!(indexes(&rec.entries), vec![(7, 2), (8, 2), (9, 2), (10, 2)]);
        assert_eq!(rec.hard_state, hard_state(2, 1, 4), "stored as given");
    }

    #[test]
    fn install_snapshot_replaces_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let (mut log, _) = open(tmp.path());
        let snap = snapshot(20, 5, &[1, 2], &[3], b"leader state");
        log.install_snapshot(&snap).unwrap();
        log.set_hard_state(&hard_state(5, 0, 20)).unwrap();
        log.sync().unwrap();
        log.append(&entries(21..=22, 5)).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.snapshot, snap);
        assert_eq!(indexes(&rec.entries), vec![(21, 5), (22, 5)]);
        assert_eq!(rec.hard_state, hard_state(5, 0, 20));
    }

    #[test]
    fn drives_raft_storage_across_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, rec) = open(tmp.path());
        let mut storage = RaftStorage::new(log, rec);
        storage
            .install_snapshot(&bootstrap_snapshot(&[1, 2, 3], Vec::new()))
            .unwrap();
        storage.append(&entries(2..=6, 2)).unwrap();
        storage.set_hard_state(&hard_state(2, 1, 6)).unwrap();
        storage.sync().unwrap();
        storage
            .compact(&snapshot(4, 2, &[1, 2, 3], &[], b"s4"))
            .unwrap();
        storage.sync().unwrap();
        drop(storage);
        let (log, rec) = open(tmp.path());
        let storage = RaftStorage::new(log, rec);
        assert_eq!(storage.first_index().unwrap(), 5);
        assert_eq!(storage.last_index().unwrap(), 6);
        assert_eq!(storage.term(4).unwrap(), 2);
        let state = storage.initial_state().unwrap();
        assert_eq!(state.hard_state, hard_state(2, 1, 6));
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn foreign_cluster_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let path = tmp.path().join(DB_FILE);
        let before = fs::read(&path).unwrap();
        let other = StoreIdentity {
            cluster: "cluster-b".to_string(),
            cluster_id: ID_A.parse().unwrap(),
            node_id: 1,
        };
        let err = open_err(tmp.path(), &other);
        assert!(matches!(err, StorageError::ForeignCluster { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("cluster"), "{msg}");
        assert!(msg.contains("foreign data directory"), "{msg}");
        assert_eq!(fs::read(&path).unwrap(), before);
        // The right identity still opens it.
        open(tmp.path());
    }

    #[test]
    fn same_name_other_cluster_id_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let path = tmp.path().join(DB_FILE);
        let before = fs::read(&path).unwrap();
        let other = StoreIdentity {
            cluster_id: "fedcba9876543210fedcba9876543210".parse().unwrap(),
            ..id()
        };
        let err = open_err(tmp.path(), &other);
        assert!(
            matches!(err, StorageError::ForeignClusterId { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(ID_A) && msg.contains("fedcba98"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(fs::read(&path).unwrap(), before);
        open(tmp.path());
    }

    #[test]
    fn foreign_node_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let other = StoreIdentity {
            cluster: "cluster-a".to_string(),
            cluster_id: ID_A.parse().unwrap(),
            node_id: 2,
        };
        let err = open_err(tmp.path(), &other);
        assert!(
            matches!(
                err,
                StorageError::ForeignNode {
                    found: 1,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
        let msg = DurableError::from(err).to_string();
        assert!(
            msg.contains(&tmp.path().join(DB_FILE).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("node id"), "{msg}");
    }

    #[test]
    fn random_bytes_are_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(DB_FILE);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let garbage: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(&path, &garbage).unwrap();
        let err = open_err(tmp.path(), &id());
        assert!(matches!(err, StorageError::NotADatabase { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn truncated_file_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let path = tmp.path().join(DB_FILE);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let before = fs::read(&path).unwrap();
        let err = open_err(tmp.path(), &id());
        assert!(
            matches!(
                err,
                StorageError::NotADatabase { .. } | StorageError::Corrupt { .. }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "the refused file was modified"
        );
        // Refusing again gives the same answer: nothing was reset.
        let again = open_err(tmp.path(), &id());
        assert_eq!(again.to_string(), err.to_string());
    }

    #[test]
    fn damaged_entry_fails_its_crc() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let marker = b"VIPSHARE-DAMAGE-ME-0123456789-VIPSHARE-DAMAGE-ME";
        let (mut log, _) = open(tmp.path());
        log.append(&[entry(6, 2, marker)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let path = tmp.path().join(DB_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let hits: Vec<usize> = bytes
            .windows(marker.len())
            .enumerate()
            .filter(|(_, w)| *w == marker)
            .map(|(i, _)| i)
            .collect();
        assert!(!hits.is_empty(), "marker not found in the file");
        for at in hits {
            bytes[at + 10] ^= 0x20;
        }
        fs::write(&path, &bytes).unwrap();
        let err = open_err(tmp.path(), &id());
        assert!(
            matches!(&err, StorageError::Checksum { table: "entries", key, .. } if key == "6"),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("CRC mismatch in table `entries` key 6"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "the refused file was modified"
        );
    }

    #[test]
    fn record_under_the_wrong_key_fails_its_crc() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let path = tmp.path().join(DB_FILE);
        raw_write(&path, |txn| {
            let mut t = txn.open_table(ENTRIES).unwrap();
            let four = t.get(4).unwrap().unwrap().value().to_vec();
            t.insert(5, four.as_slice()).unwrap();
        });
        let err = open_err(tmp.path(), &id());
        assert!(
            matches!(&err, StorageError::Checksum { table: "entries", key, .. } if key == "5"),
            "{err}"
        );
    }

    #[test]
    fn gaps_in_the_log_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path()); // snapshot 1, entries 2..=5
        let path = tmp.path().join(DB_FILE);
        raw_write(&path, |txn| {
            txn.open_table(ENTRIES).unwrap().remove(3).unwrap();
        });
        let err = open_err(tmp.path(), &id());
        assert!(matches!(err, StorageError::Inconsistent { .. }), "{err}");
        assert!(
            err.to_string().contains("expected index 3, found 4"),
            "{err}"
        );

        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let path = tmp.path().join(DB_FILE);
        raw_write(&path, |txn| {
            txn.open_table(ENTRIES).unwrap().remove(2).unwrap();
        });
        let err = open_err(tmp.path(), &id());
        assert!(matches!(err, StorageError::Inconsistent { .. }), "{err}");
        assert!(
            err.to_string().contains("snapshot ends at index 1"),
            "{err}"
        );
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let path = tmp.path().join(DB_FILE);
        raw_write(&path, |txn| {
            let record = seal(T_META, META_FORMAT.as_bytes(), &99u32.to_le_bytes());
            txn.open_table(META)
                .unwrap()
                .insert(META_FORMAT, record.as_slice())
                .unwrap();
        });
        let err = open_err(tmp.path(), &id());
        assert!(matches!(err, StorageError::UnknownFormat { .. }), "{err}");
        assert!(
            err.to_string().contains("unknown format version 99"),
            "{err}"
        );
    }

    #[test]
    fn redb_file_without_meta_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(DB_FILE);
        raw_write(&path, |txn| {
            txn.open_table(ENTRIES).unwrap();
        });
        let err = open_err(tmp.path(), &id());
        assert!(matches!(err, StorageError::MissingMeta { .. }), "{err}");
    }

    #[test]
    fn unrelated_files_without_db_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("notes.txt"), b"not a raft log").unwrap();
        fs::create_dir(tmp.path().join("certs")).unwrap();
        let err = open_err(tmp.path(), &id());
        assert!(
            matches!(err, StorageError::ForeignDirectory { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("notes.txt") && msg.contains("certs"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        assert!(!tmp.path().join(DB_FILE).exists());
        assert!(!tmp.path().join(TMP_FILE).exists());
    }

    #[test]
    fn leftover_creation_file_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        // A creation that crashed before redb wrote its header.
        fs::write(tmp.path().join(TMP_FILE), vec![0u8; 8192]).unwrap();
        let (log, rec) = open(tmp.path());
        assert!(log.is_fresh());
        assert!(rec.entries.is_empty());
        assert!(!tmp.path().join(TMP_FILE).exists());
    }

    #[test]
    fn second_open_of_the_same_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        synced_store(tmp.path());
        let (first, _) = open(tmp.path());
        let err = open_err(tmp.path(), &id());
        assert!(matches!(err, StorageError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("already in use"), "{msg}");
        assert!(
            msg.contains(&tmp.path().join(DB_FILE).display().to_string()),
            "{msg}"
        );
        drop(first);
        open(tmp.path());
    }

    const CRASH_DIR_ENV: &str = "VIPSHARE_STORAGE_TEST_CRASH_DIR";
    const CRASH_EXIT: i32 = 86;

    /// Child half of `crash_keeps_synced_writes_only`; does nothing unless run by it.
    #[test]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let (mut log, _) = open(Path::new(&dir));
        log.install_snapshot(&bootstrap_snapshot(&[1], b"s".to_vec()))
            .unwrap();
        log.append(&entries(2..=4, 1)).unwrap();
        log.set_hard_state(&hard_state(1, 1, 3)).unwrap();
        log.sync().unwrap();
        log.append(&entries(5..=6, 1)).unwrap();
        log.set_hard_state(&hard_state(1, 1, 6)).unwrap();
        // Exit without running destructors: redb neither flushes nor closes the file.
        std::process::exit(CRASH_EXIT);
    }

    /// Runs `crash_child` in a child process on `dir`.
    fn run_crash_child(dir: &Path) {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "storage::tests::crash_child", "--test-threads=1"])
            .env(CRASH_DIR_ENV, dir)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(CRASH_EXIT), "child failed: {status}");
    }

    #[test]
    fn crash_keeps_synced_writes_only() {
        let tmp = tempfile::tempdir().unwrap();
        run_crash_child(tmp.path());
        // The file was left unclean: it needs redb's repair, so a read-only open refuses it.
        assert!(matches!(
            Builder::new().open_read_only(tmp.path().join(DB_FILE)),
            Err(DatabaseError::RepairAborted)
        ));
        let (log, rec) = open(tmp.path());
        assert!(!log.is_fresh());
        assert_eq!(rec.snapshot.get_metadata().index, 1);
        assert_eq!(indexes(&rec.entries), vec![(2, 1), (3, 1), (4, 1)]);
        assert_eq!(rec.hard_state, hard_state(1, 1, 3));
        drop(log);
        // And it was closed cleanly this time.
        assert!(Builder::new()
            .open_read_only(tmp.path().join(DB_FILE))
            .is_ok());
    }

    /// Damages one random byte (or zeroes one random 4 KiB page) of a store, many times: every
    /// open must either refuse, or recover exactly what was synced; and refusing a cleanly
    /// closed file must not modify it. Run for a cleanly closed file and for one a crash left.
    /// `cargo test -p vipshare-controller --lib storage_damage_fuzz -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn storage_damage_fuzz() {
        let iterations: u64 = std::env::var("FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for crashed in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            if crashed {
                run_crash_child(tmp.path());
            } else {
                let (mut log, _) = open(tmp.path());
                log.install_snapshot(&bootstrap_snapshot(&[1, 2, 3], vec![3; 5000]))
                    .unwrap();
                log.append(&entries(2..=400, 2)).unwrap();
                log.set_hard_state(&hard_state(2, 1, 300)).unwrap();
                log.sync().unwrap();
            }
            let path = tmp.path().join(DB_FILE);
            let pristine = fs::read(&path).unwrap();
            let expected = {
                let copy = tempfile::tempdir().unwrap();
                fs::write(copy.path().join(DB_FILE), &pristine).unwrap();
                open(copy.path()).1
            };
            let (mut refused, mut same, mut panics) = (0, 0, 0);
            let mut kinds = std::collections::BTreeMap::<String, u32>::new();
            for _ in 0..iterations {
                let mut bytes = pristine.clone();
                if next() % 4 == 0 {
                    let page = (next() as usize % (bytes.len() / 4096)) * 4096;
                    bytes[page..page + 4096].fill(0);
                } else {
                    let at = next() as usize % bytes.len();
                    bytes[at] ^= 1 << (next() % 8);
                }
                fs::write(&path, &bytes).unwrap();
                match DiskLog::open(tmp.path(), &id()) {
                    Err(e) => {
                        refused += 1;
                        let debug = format!("{e:?}");
                        let kind = debug.split([' ', '{', '(']).next().unwrap_or_default();
                        let seen = kinds.entry(kind.to_string()).or_default();
                        if *seen == 0 && std::env::var_os("FUZZ_SHOW").is_some() {
                            println!("{e}");
                        }
                        *seen += 1;
                        assert!(!matches!(e, StorageError::Locked { .. }), "{e}");
                        if e.to_string().contains("panicked") {
                            panics += 1;
                        }
                        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
                        if !crashed {
                            assert!(fs::read(&path).unwrap() == bytes, "modified: {e}");
                        }
                    }
                    Ok((_, rec)) => {
                        same += 1;
                        assert_eq!(rec.snapshot, expected.snapshot);
                        assert_eq!(rec.hard_state, expected.hard_state);
                        assert!(rec.entries == expected.entries, "damage went unnoticed");
                    }
                }
            }
            println!(
                "{} file, {iterations} damaged copies: {refused} refused ({panics} by a redb \
                 panic), {same} recovered intact; refusals: {kinds:?}",
                if crashed { "crashed" } else { "clean" }
            );
        }
    }

    /// `cargo test -p vipshare-controller --lib storage_sync_latency -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn storage_sync_latency() {
        for two_phase in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let (mut log, _) = open(tmp.path());
            log.two_phase_commit = two_phase;
            log.install_snapshot(&bootstrap_snapshot(&[1, 2, 3], Vec::new()))
                .unwrap();
            log.sync().unwrap();
            let mut samples = Vec::with_capacity(500);
            for i in 0..500u64 {
                log.append(&[entry(i + 2, 1, &[0x5a; 200])]).unwrap();
                let start = Instant::now();
                log.sync().unwrap();
                samples.push(start.elapsed().as_secs_f64() * 1e3);
            }
            samples.sort_by(f64::total_cmp);
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            let pct =
                |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
            println!(
                "sync of one 200-byte entry, 500 syncs, two-phase commit {two_phase}: \
                 mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                pct(0.50),
                pct(0.99),
                samples[samples.len() - 1],
            );
        }
        // What verification costs at start-up, for a log far longer than compaction allows.
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = open(tmp.path());
        log.install_snapshot(&bootstrap_snapshot(&[1, 2, 3], vec![1; 1 << 20]))
            .unwrap();
        let n = 20_000u64;
        log.append(
            &(2..n + 2)
                .map(|i| entry(i, 1, &[0x5a; 200]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        log.sync().unwrap();
        drop(log);
        let start = Instant::now();
        let (_, rec) = open(tmp.path());
        println!(
            "open of a log with {} entries of 200 bytes and a 1 MiB snapshot: {:.1} ms",
            rec.entries.len(),
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}
