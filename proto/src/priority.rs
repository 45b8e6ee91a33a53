//! Scheduling priority and locked memory for the daemons' timing paths.
//!
//! An agent's lease (heartbeats, deadlines, kernel writes) and a controller's
//! promises and fences must keep their timing on hosts whose CPUs are busy by
//! design. Both daemons call [`prioritise`] first thing, before any thread exists,
//! because Linux keeps nice values and policies per thread and new threads (and
//! child processes, such as `nft`) inherit them from their creator.
//!
//! What systemd granted (`CPUSchedulingPolicy=`, `Nice=`) is kept; otherwise the
//! process raises itself where permitted: to `SCHED_RR` when asked for (the
//! agent: its lease must not lapse however many nice-0 processes compete, and it
//! does little work), else to [`DEFAULT_NICE`] (the controller: a flood of
//! handshakes must not be able to take a host's CPUs away). Memory is locked
//! (`mlockall`, on fault) when the memlock limit allows it, so that a page the
//! lease path needs is never evicted under memory pressure.

use std::fmt;
use std::io;

/// Nice value the daemons raise themselves to. On a CPU taken by nice-0 work
/// this gives them about 9 times the weight of each competitor.
pub const DEFAULT_NICE: i32 = -10;

/// What [`prioritise`] found or obtained, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    /// `SCHED_FIFO`/`SCHED_RR` priority, if the process runs real-time.
    pub realtime: Option<i32>,
    pub nice: i32,
    /// Why the nice value is not [`DEFAULT_NICE`] (or better), if it is not.
    pub nice_refused: Option<String>,
    /// Why real-time scheduling was not obtained, if asked for and not.
    pub realtime_refused: Option<String>,
    pub memory_locked: bool,
    /// Why memory is not locked, if it is not.
    pub lock_refused: Option<String>,
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.realtime {
            Some(p) => write!(f, "real-time priority {p}")?,
            None => write!(f, "nice {}", self.nice)?,
        }
        if let Some(why) = &self.realtime_refused {
            write!(f, " (could not get SCHED_RR: {why})")?;
        }
        if let Some(why) = &self.nice_refused {
            write!(f, " (could not raise to nice {DEFAULT_NICE}: {why})")?;
        }
        match (&self.memory_locked, &self.lock_refused) {
            (true, _) => write!(f, ", memory locked"),
            (false, Some(why)) => write!(f, ", memory not locked ({why})"),
            (false, None) => write!(f, ", memory not locked"),
        }
    }
}

impl Priority {
    /// Whether the timing paths run with less than the intended priority.
    pub fn is_degraded(&self) -> bool {
        self.nice_refused.is_some()
            || self.realtime_refused.is_some()
            || self.lock_refused.is_some()
    }
}

/// `SCHED_RR` priority the agent asks for: above every normal process, below the
/// kernel's own real-time threads (50 and up) and anything an operator set higher.
pub const AGENT_RT_PRIORITY: i32 = 10;

/// Raises the calling thread (and so every thread and child created after) to
/// `SCHED_RR` at `realtime` if given and permitted, else to [`DEFAULT_NICE`],
/// unless it already runs real-time or nicer; locks memory where permitted.
/// Call before starting any runtime. The kernel's real-time throttling
/// (`sched_rt_runtime_us`, 95 % by default) still leaves others some CPU.
pub fn prioritise(realtime: Option<i32>) -> Priority {
    // SAFETY: plain syscalls on the calling thread, with no pointers but `lim`.
    unsafe {
        let policy = libc::sched_getscheduler(0);
        let mut granted = if policy == libc::SCHED_FIFO || policy == libc::SCHED_RR {
            let mut param = libc::sched_param { sched_priority: 0 };
            libc::sched_getparam(0, &mut param);
            Some(param.sched_priority)
        } else {
            None
        };
        let mut rt_refused = None;
        if let (None, Some(prio)) = (granted, realtime) {
            let param = libc::sched_param {
                sched_priority: prio,
            };
            if libc::sched_setscheduler(0, libc::SCHED_RR, &param) == 0 {
                granted = Some(prio);
            } else {
                rt_refused = Some(io::Error::last_os_error().to_string());
            }
        }
        let realtime = granted;
        // getpriority returns -1 both as a value and as an error: clear errno first.
        *libc::__errno_location() = 0;
        let mut nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        let mut nice_refused = None;
        if realtime.is_none() && nice > DEFAULT_NICE {
            if libc::setpriority(libc::PRIO_PROCESS, 0, DEFAULT_NICE) == 0 {
                nice = DEFAULT_NICE;
            } else {
                nice_refused = Some(io::Error::last_os_error().to_string());
            }
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let unlimited = libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0
            && lim.rlim_cur == libc::RLIM_INFINITY;
        let (memory_locked, lock_refused) = if unlimited || libc::geteuid() == 0 {
            // On fault: pages are locked as they are first used, not the whole
            // binary and every reserved stack at once.
            let flags = libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT;
            if libc::mlockall(flags) == 0 {
                (true, None)
            } else {
                (false, Some(io::Error::last_os_error().to_string()))
            }
        } else {
            // With a finite limit MCL_FUTURE would make allocations fail past it.
            (
                false,
                Some(format!(
                    "memlock limit {} bytes; LimitMEMLOCK=infinity grants it",
                    lim.rlim_cur
                )),
            )
        };
        Priority {
            realtime,
            nice,
            nice_refused,
            realtime_refused: rt_refused,
            memory_locked,
            lock_refused,
        }
    }
}
