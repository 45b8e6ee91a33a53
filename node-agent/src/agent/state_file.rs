//! The agent's durable state ([`AgentState`]) in `<state_dir>/agent-state.json`:
//! written to a temporary file, fsync'd, renamed over the old one and the
//! directory fsync'd, so a crash leaves the old or the new state, never a mix.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use vipshare_core::agent::AgentState;

/// What [`StateFile::load_for`] found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The owner's own state (or a file too old to name its owner).
    Own,
    /// Nothing: a fresh host.
    Nothing,
    /// The state of another cluster or member (its owner), not used.
    Foreign(Option<String>),
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an agent state file: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: held by another vipshare-agent ({holder}); one agent per state directory", .path.display())]
    Locked { path: PathBuf, holder: String },
}

/// The lock that makes an agent the only one using its state directory (and
/// so its host's kernel tables): two agents would each take the other's
/// writes for a foreign edit and rebuild the filter over and over. Held until
/// dropped; the kernel releases it when the process dies, even by SIGKILL.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        StateFile {
            path: dir.join("agent-state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes `agent.lock` beside the state (creating the directory), or fails
    /// naming the process that holds it.
    pub fn lock(&self) -> Result<InstanceLock, StateFileError> {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        let path = self.path.with_file_name("agent.lock");
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(self.io(dir))?;
        }
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(self.io(&path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(self.io(&path)(err));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "pid unknown".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(StateFileError::Locked { path, holder });
        }
        file.set_len(0).map_err(self.io(&path))?;
        file.rewind().map_err(self.io(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(self.io(&path))?;
        Ok(InstanceLock { _file: file })
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> StateFileError {
        let path = path.to_path_buf();
        move |source| StateFileError::Io {
            path: path.clone(),
            source,
        }
    }

    /// The state as last stored; a missing file is a fresh host.
    pub fn load(&self) -> Result<Option<AgentState>, StateFileError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(&self.path)(e)),
        };
        AgentState::from_json(&text)
            .map(Some)
            .map_err(|reason| StateFileError::Corrupt {
                path: self.path.clone(),
                reason,
            })
    }

    /// The state `owner` ("<cluster ID>/<member>") starts from: what it stored
    /// (or a file too old to name its owner), else a fresh one; a file of
    /// another cluster or member is not used (its floors mean nothing here)
    /// and is named in [`Found::Foreign`], for the log.
    pub fn load_for(&self, owner: &str) -> Result<(AgentState, Found), StateFileError> {
        let fresh = || AgentState {
            owner: Some(owner.to_string()),
            ..AgentState::default()
        };
        Ok(match self.load()? {
            None => (fresh(), Found::Nothing),
            Some(s) if !s.belongs_to(owner) => (fresh(), Found::Foreign(s.owner)),
            Some(s) => (
                AgentState {
                    owner: Some(owner.to_string()),
                    ..s
                },
                Found::Own,
            ),
        })
    }

    /// Stores `state` durably; returns once it is on disk.
    pub fn store(&self, state: &AgentState) -> Result<(), StateFileError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(self.io(dir))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(self.io(&tmp))?;
        f.write_all(state.to_json().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(self.io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(self.io(&self.path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io(dir))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_agent_on_the_same_state_directory_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = super::StateFile::new(dir.path());
        let held = f.lock().expect("first lock");
        let e = f.lock().expect_err("second lock");
        let text = e.to_string();
        assert!(text.contains("agent.lock"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(held);
        f.lock().expect("free again once dropped");
    }

    use super::*;

    #[test]
    fn stored_state_loads_back_and_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(&dir.path().join("sub"));
        assert_eq!(f.load().unwrap(), None, "fresh host");
        let mut s = AgentState::default();
        s.raise(4, 7);
        s.voters = [1, 2, 3].into();
        f.store(&s).unwrap();
        assert_eq!(f.load().unwrap(), Some(s));
        // Its owner's; another cluster's or member's is not used.
        let (own, found) = f.load_for("c1/h1").unwrap();
        assert_eq!(
            (own.floors.len(), found),
            (1, Found::Own),
            "an older file is kept"
        );
        f.store(&own).unwrap();
        assert_eq!(f.load_for("c1/h1").unwrap().0, own);
        let (other, found) = f.load_for("c2/h1").unwrap();
        assert_eq!(found, Found::Foreign(Some("c1/h1".into())));
        assert!(other.floors.is_empty() && other.owner.as_deref() == Some("c2/h1"));
        assert!(
            matches!(f.load_for("c1/h2").unwrap().1, Found::Foreign(_)),
            "another member's"
        );
        fs::write(f.path(), "{").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(
            e.contains("agent-state.json") && e.contains("not an agent state file"),
            "{e}"
        );
    }
}
