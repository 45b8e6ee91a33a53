//! The agent engine (`vipshare_core::agent`): events in, commands out.

use vipshare_core::agent::{AgentState, Assignment, Command, Controller, Engine, Event, Reply};
use vipshare_core::lease::LeaseTiming;

fn controllers(voters: &[u64]) -> Vec<Controller> {
    voters
        .iter()
        .map(|&id| Controller {
            id,
            address: format!("c{id}:7001"),
            voter: true,
        })
        .collect()
}

fn assignment(index: u64, epoch: u64, owned: &[(u32, u64)], release: &[(u32, u64)]) -> Assignment {
    Assignment {
        applied_index: index,
        member_epoch: epoch,
        timing: Some(LeaseTiming::default()),
        owned: owned.iter().copied().collect(),
        release: release.iter().copied().collect(),
        controllers: controllers(&[1, 2, 3]),
    }
}

fn answer(controller: u64, round: u64, acked: bool, epoch: u64) -> Reply {
    Reply {
        controller,
        round,
        acked,
        member_epoch: epoch,
        leader: 1,
        lease_ms: if acked { 500 } else { 0 },
        stale_assignment: false,
    }
}

fn reply(controller: u64, round: u64, acked: bool, epoch: u64) -> Event {
    Event::Reply(answer(controller, round, acked, epoch))
}

/// A refusal at epoch 1 (`stale`: of a stale assignment, not for good).
fn refusal(controller: u64, round: u64, stale: bool) -> Event {
    Event::Reply(Reply {
        stale_assignment: stale,
        ..answer(controller, round, false, 1)
    })
}

fn engine() -> Engine {
    Engine::new(controllers(&[1, 2, 3]), AgentState::default())
}

fn give(e: &mut Engine, now: u64, a: Assignment) -> Vec<Command> {
    e.step(
        now,
        Event::Assignment {
            controller: 1,
            assignment: a,
        },
    )
}

/// Starts a round at `now` and returns its number.
fn round(e: &mut Engine, now: u64) -> u64 {
    let cmds = e.step(now, Event::Tick);
    cmds.iter()
        .find_map(|c| match c {
            Command::Heartbeat { round, .. } => Some(*round),
            _ => None,
        })
        .expect("a heartbeat")
}

fn installs(cmds: &[Command]) -> Vec<(Vec<(u32, u64)>, u64)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Install {
                buckets,
                timeout_ms,
                ..
            } => Some((buckets.clone(), *timeout_ms)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_majority_at_the_current_epoch_renews_the_kernel_lease() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 2, &[(1, 1), (2, 1)], &[]));
    assert_eq!(e.epoch(), 2);
    let r = round(&mut e, 100);
    assert!(installs(&e.step(101, reply(1, r, true, 2))).is_empty());
    assert!(
        installs(&e.step(102, reply(2, r, true, 1))).is_empty(),
        "an ack for another epoch does not count"
    );
    let cmds = e.step(103, reply(3, r, true, 2));
    // Lease to 100 + 500; kernel timeout = 600 - 103 - delta 50.
    assert_eq!(installs(&cmds), vec![(vec![(1, 1), (2, 1)], 447)]);
    assert_eq!(e.lease_expiry(), Some(600));
}

#[test]
fn no_lease_before_the_timing_and_the_voters_are_learned() {
    let mut e = engine();
    let r = round(&mut e, 0);
    e.step(1, reply(1, r, false, 1));
    for c in 1..=3 {
        assert!(installs(&e.step(2, reply(c, r, true, 1))).is_empty());
    }
    assert_eq!(
        e.lease_expiry(),
        None,
        "configured controllers are only seeds"
    );
    let cmds = give(&mut e, 3, assignment(10, 1, &[(1, 1)], &[]));
    assert!(
        matches!(&cmds[0], Command::Persist(s) if s.voters == [1, 2, 3].into() && s.timing.is_some()),
        "{cmds:?}"
    );
    let r = round(&mut e, 10);
    e.step(11, reply(1, r, true, 1));
    assert_eq!(installs(&e.step(12, reply(2, r, true, 1))).len(), 1);
}

#[test]
fn a_newer_epoch_flushes_the_kernel_and_the_lease() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 2, &[(1, 1)], &[]));
    let r = round(&mut e, 0);
    e.step(1, reply(1, r, true, 2));
    e.step(1, reply(2, r, true, 2));
    assert!(e.lease_valid(2));
    let cmds = e.step(100, reply(3, r, false, 3));
    assert_eq!(installs(&cmds), vec![(vec![], 0)]);
    assert!(!e.lease_valid(101));
    assert!(e.assignment().is_none());
    // A stale assignment at the old epoch is ignored.
    give(&mut e, 101, assignment(11, 2, &[(1, 1)], &[]));
    assert!(e.assignment().is_none());
}

#[test]
fn a_release_is_persisted_before_it_is_withdrawn_and_confirmed() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 4), (2, 4)], &[]));
    let r = round(&mut e, 0);
    e.step(1, reply(1, r, true, 1));
    e.step(1, reply(2, r, true, 1));
    let cmds = give(&mut e, 50, assignment(11, 1, &[(2, 4)], &[(1, 4)]));
    assert!(
        matches!(&cmds[0], Command::Persist(s) if s.floors[&1] == 5),
        "{cmds:?}"
    );
    assert!(cmds.contains(&Command::Withdraw {
        bucket: 1,
        epoch: 4
    }));
    assert_eq!(installs(&cmds), vec![(vec![(2, 4)], 400)]);
    let cmds = e.step(
        60,
        Event::Withdrawn {
            bucket: 1,
            epoch: 4,
        },
    );
    assert_eq!(
        cmds,
        vec![Command::Released {
            buckets: vec![(1, 4)],
            to: vec![1, 2, 3]
        }]
    );
    // Repeated with every round while the assignment lists it.
    let cmds = e.step(100, Event::Tick);
    assert!(cmds.iter().any(|c| matches!(c, Command::Released { .. })));
}

#[test]
fn a_granted_bucket_is_installed_before_its_raised_floor_is_written() {
    // Only release floors must be durable before what depends on them; the
    // floor a grant raises protects nothing a release floor does not, so its
    // fsync waits behind the install (one fsync less in a planned move's gap).
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 4)], &[]));
    let r = round(&mut e, 0);
    e.step(1, reply(1, r, true, 1));
    e.step(1, reply(2, r, true, 1));
    let cmds = give(&mut e, 50, assignment(11, 1, &[(1, 4), (2, 6)], &[]));
    assert_eq!(installs(&cmds), vec![(vec![(1, 4), (2, 6)], 400)]);
    assert!(
        matches!(cmds.last(), Some(Command::Persist(s)) if s.floors[&2] == 6),
        "{cmds:?}"
    );
    // A step that also raises a release floor writes everything first.
    let cmds = give(&mut e, 60, assignment(12, 1, &[(2, 6), (3, 2)], &[(1, 4)]));
    assert!(
        matches!(&cmds[0], Command::Persist(s) if s.floors[&1] == 5 && s.floors[&3] == 2),
        "{cmds:?}"
    );
    assert_eq!(
        cmds.iter()
            .filter(|c| matches!(c, Command::Persist(_)))
            .count(),
        1
    );
}

#[test]
fn a_restarted_agent_never_installs_what_it_released_before() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 4)], &[]));
    let cmds = give(&mut e, 10, assignment(11, 1, &[], &[(1, 4)]));
    let Some(Command::Persist(state)) = cmds.first().cloned() else {
        panic!("{cmds:?}");
    };
    // Restarted; a lagging controller still lists bucket 1 as owned at epoch 4.
    let mut e = Engine::new(controllers(&[1, 2, 3]), state);
    give(&mut e, 100, assignment(9, 1, &[(1, 4), (3, 2)], &[]));
    let r = round(&mut e, 100);
    e.step(101, reply(1, r, true, 1));
    let cmds = e.step(101, reply(2, r, true, 1));
    assert_eq!(installs(&cmds), vec![(vec![(3, 2)], 449)]);
}

#[test]
fn a_voter_change_drops_the_lease() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 1)], &[]));
    let r = round(&mut e, 0);
    e.step(1, reply(1, r, true, 1));
    e.step(1, reply(2, r, true, 1));
    assert!(e.lease_valid(2));
    let mut a = assignment(11, 1, &[(1, 1)], &[]);
    a.controllers = controllers(&[1, 2, 4]);
    let cmds = give(&mut e, 3, a);
    assert!(!e.lease_valid(4));
    assert!(cmds.contains(&Command::Watch {
        controllers: controllers(&[1, 2, 4])
    }));
    // Acks now count against {1, 2, 4}: 1 + 3 is no majority.
    let r = round(&mut e, 10);
    e.step(11, reply(1, r, true, 1));
    e.step(11, reply(3, r, true, 1));
    assert!(!e.lease_valid(12));
    e.step(12, reply(4, r, true, 1));
    assert!(e.lease_valid(13));
}

#[test]
fn refused_for_good_by_a_majority_it_goes_silent() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 1)], &[]));
    let r = round(&mut e, 0);
    // Follower 2 refuses: one refusal of three is not final.
    let mut rep = |c: u64| e.step(1, refusal(c, r, false));
    rep(2);
    rep(3);
    assert!(e.silent_until().is_some());
    assert!(
        e.step(100, Event::Tick).is_empty(),
        "no heartbeats while silent"
    );
    // The stream shows the fence: a new epoch ends the silence.
    give(&mut e, 200, assignment(11, 2, &[], &[]));
    assert!(e.silent_until().is_none());
    assert_eq!(e.epoch(), 2);
}

#[test]
fn a_resume_withdraws_everything_and_drops_the_lease() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 1)], &[]));
    let r = round(&mut e, 0);
    e.step(1, reply(1, r, true, 1));
    assert_eq!(installs(&e.step(1, reply(2, r, true, 1))).len(), 1);
    assert!(
        installs(&e.step(600, Event::Tick)).is_empty(),
        "a late tick alone (a starved process) changes nothing"
    );
    let cmds = e.step(601, Event::Resumed);
    assert_eq!(installs(&cmds), vec![(vec![], 0)]);
    assert!(!e.lease_valid(601));
}

#[test]
fn a_stale_assignment_refusal_is_not_for_good_and_heartbeats_say_the_index() {
    let mut e = engine();
    give(&mut e, 0, assignment(10, 1, &[(1, 1)], &[]));
    let hb = e.step(5, Event::Tick);
    let (r, index) = hb
        .iter()
        .find_map(|c| match c {
            Command::Heartbeat {
                round,
                assignment_index,
                ..
            } => Some((*round, *assignment_index)),
            _ => None,
        })
        .expect("a heartbeat");
    assert_eq!(index, 10, "the assignment it acts on");
    for c in [1, 2, 3] {
        e.step(6, refusal(c, r, true));
    }
    assert!(!e.lease_valid(7));
    assert_eq!(e.silent_until(), None, "it waits for a newer assignment");
}

#[test]
fn a_restart_also_watches_the_controllers_the_cluster_last_listed() {
    let mut e = engine();
    let cmds = give(&mut e, 0, assignment(10, 1, &[], &[]));
    let Some(Command::Persist(state)) = cmds.first().cloned() else {
        panic!("{cmds:?}");
    };
    assert_eq!(state.controllers.len(), 3);
    // Its configuration names only controller 9, which left the cluster.
    let gone = Controller {
        id: 9,
        address: "c9:7001".into(),
        voter: true,
    };
    let e = Engine::new(vec![gone], state);
    let mut ids: Vec<u64> = e.controllers().iter().map(|c| c.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 9]);
}
