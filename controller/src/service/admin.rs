//! Admin API: reads for admins and the read-only role, mutations for admins only.
//! Reads are linearizable (ReadIndex) unless the caller asks for `local`.
//! A mutation sent to a follower fails with `unavailable` and the leader's address
//! in the `vipshare-leader` metadata, so clients retry there.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vipshare_core::command::Command;
use vipshare_core::damping::Damping;
use vipshare_core::lease::LeaseTiming;
use vipshare_core::net::{Mac, SwitchMode};
use vipshare_core::replica::ControllerChange;
use vipshare_core::state::{MemberState, Settings, Vip};
use vipshare_proto::pki::Role;
use vipshare_proto::v1::admin_api_server::AdminApi;
use vipshare_proto::v1::mutate_request::Op;
use vipshare_proto::v1::{self as pb};
use vipshare_proto::{check_version, PROTOCOL_VERSION};

use super::{authorize, node_status, task_stream, TaskStream};
use crate::node::{NodeHandle, NodeView};

const SERVICE: &str = "admin";

fn status_reply(v: &NodeView) -> pb::StatusReply {
    let s = &v.state;
    let controllers = s
        .controllers
        .iter()
        .map(|(&id, address)| pb::ControllerInfo {
            id,
            address: address.clone(),
            role: if v.learners.contains(&id) {
                "learner"
            } else {
                "voter"
            }
            .into(),
        })
        .collect();
    pb::StatusReply {
        protocol_version: PROTOCOL_VERSION,
        id: v.id,
        leader_id: v.role.leader,
        term: v.role.term,
        role: role_name(v.role.role).into(),
        commit_index: v.commit,
        applied_index: v.applied,
        controllers,
        settings: s.settings.as_ref().map(settings_to_pb),
        initialized: s.initialized(),
        members: s.members.len() as u32,
        unowned_buckets: s.unowned() as u32,
        revoked_serials: s.revoked.iter().cloned().collect(),
    }
}

fn members_reply(v: &NodeView, leases: &crate::leases::Leases) -> pb::MembersReply {
    let s = &v.state;
    let damping = s.settings.as_ref().map(|x| x.damping).unwrap_or_default();
    // Penalties decay on cluster time, as the planner sees them.
    let cluster_ms = leases.cluster_ms();
    let owned = s.owned_counts();
    let members = s
        .members
        .iter()
        .map(|(name, m)| {
            let (problems, unhealthy_ms) = leases.health(name);
            pb::MemberInfo {
                name: name.clone(),
                weight: m.weight,
                state: if m.suppressed {
                    "suppressed"
                } else if m.stopped {
                    "stopped"
                } else if m.down {
                    "down"
                } else if m.evicted {
                    "evicted"
                } else {
                    match m.state {
                        MemberState::Active => "active",
                        MemberState::Draining => "draining",
                    }
                }
                .into(),
                epoch: m.epoch,
                buckets: owned.get(name.as_str()).copied().unwrap_or(0) as u32,
                penalty: f64::from(damping.current(m.penalty, cluster_ms)),
                returns_in_ms: if m.suppressed {
                    damping.time_to_reuse(m.penalty, cluster_ms)
                } else {
                    0
                },
                last_ack_ms_ago: leases.since_ack(name),
                problems,
                unhealthy_ms,
            }
        })
        .collect();
    pb::MembersReply {
        protocol_version: PROTOCOL_VERSION,
        members,
        applied_index: v.applied,
    }
}

fn history_event(e: &vipshare_core::history::Event) -> pb::HistoryEvent {
    pb::HistoryEvent {
        index: e.index,
        at_ms: e.at_ms,
        by: e.by.clone(),
        what: e.what.clone(),
        members: e.members.clone(),
        moves: e
            .moves
            .iter()
            .map(|m| pb::BucketMove {
                bucket: m.bucket,
                from: m.from.clone(),
                to: m.to.clone(),
            })
            .collect(),
    }
}

/// Runs of alike events (same cause, same proposer: a drain hands over bucket
/// after bucket) sent to `vipsharectl watch`, which shows each run as one line.
const RECENT_RUNS: usize = 8;
/// At most this many events in one picture, however long the runs.
const RECENT_MAX: usize = 4096;

/// The newest events making up [`RECENT_RUNS`] runs, oldest first.
fn recent(h: &vipshare_core::history::History) -> Vec<pb::HistoryEvent> {
    let mut picked = Vec::new();
    let mut runs = 0;
    let mut last: Option<(&str, &str)> = None;
    for e in h.iter().rev().take(RECENT_MAX) {
        let key = (e.what.as_str(), e.by.as_str());
        if last != Some(key) {
            runs += 1;
            if runs > RECENT_RUNS {
                break;
            }
            last = Some(key);
        }
        picked.push(history_event(e));
    }
    picked.reverse();
    picked
}

fn watch_reply(v: &NodeView, leases: &crate::leases::Leases) -> pb::WatchReply {
    pb::WatchReply {
        status: Some(status_reply(v)),
        members: Some(members_reply(v, leases)),
        buckets: Some(buckets_reply(v)),
        recent: recent(&v.state.history),
    }
}

fn buckets_reply(v: &NodeView) -> pb::BucketsReply {
    let buckets = (0u32..)
        .zip(&v.state.buckets)
        .map(|(bucket, b)| pb::BucketInfo {
            bucket,
            owner: b.owner.clone().unwrap_or_default(),
            epoch: b.epoch,
        })
        .collect();
    pb::BucketsReply {
        protocol_version: PROTOCOL_VERSION,
        buckets,
        applied_index: v.applied,
    }
}
const READERS: &[Role] = &[Role::Admin, Role::Reader];

pub struct AdminService {
    pub node: NodeHandle,
    pub leases: std::sync::Arc<crate::leases::Leases>,
}

impl AdminService {
    async fn view(&self, local: bool) -> Result<Arc<NodeView>, Status> {
        if local {
            return Ok(self.node.view());
        }
        self.node.read().await.map_err(|e| {
            let v = self.node.view();
            node_status(e, v.leader_address())
        })
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        authorize(&req, SERVICE, READERS, &self.node)?;
        check_version(req.get_ref().protocol_version)?;
        let v = self.view(req.get_ref().local).await?;
        Ok(Response::new(status_reply(&v)))
    }

    async fn members(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        authorize(&req, SERVICE, READERS, &self.node)?;
        check_version(req.get_ref().protocol_version)?;
        let v = self.view(req.get_ref().local).await?;
        Ok(Response::new(members_reply(&v, &self.leases)))
    }

    async fn buckets(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::BucketsReply>, Status> {
        authorize(&req, SERVICE, READERS, &self.node)?;
        check_version(req.get_ref().protocol_version)?;
        let v = self.view(req.get_ref().local).await?;
        Ok(Response::new(buckets_reply(&v)))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        authorize(&req, SERVICE, READERS, &self.node)?;
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        let v = self.view(r.local).await?;
        let h = &v.state.history;
        let matching: Vec<_> = h
            .iter()
            .filter(|e| r.member.is_empty() || e.concerns_member(&r.member))
            .filter(|e| r.bucket.is_none_or(|b| e.concerns_bucket(b)))
            .filter(|e| e.at_ms >= r.since_ms && (r.until_ms == 0 || e.at_ms < r.until_ms))
            .collect();
        let skip = match r.limit {
            0 => 0,
            n => matching.len().saturating_sub(n as usize),
        };
        let events = matching.into_iter().skip(skip).map(history_event).collect();
        Ok(Response::new(pb::HistoryReply {
            protocol_version: PROTOCOL_VERSION,
            events,
            kept: h.len() as u64,
        }))
    }

    type WatchStream = TaskStream<pb::WatchReply>;

    async fn watch(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        authorize(&req, SERVICE, READERS, &self.node)?;
        check_version(req.get_ref().protocol_version)?;
        let mut views = self.node.subscribe();
        let leases = self.leases.clone();
        Ok(Response::new(task_stream(4, move |tx| async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                let view = views.borrow_and_update().clone();
                if tx.send(Ok(watch_reply(&view, &leases))).await.is_err() {
                    return;
                }
                // Coalesce bursts: at most ten pictures a second.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { return },
                    _ = tick.tick() => {}
                }
            }
        })))
    }

    type WatchBucketsStream = TaskStream<pb::BucketsReply>;

    async fn watch_buckets(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::WatchBucketsStream>, Status> {
        authorize(&req, SERVICE, READERS, &self.node)?;
        check_version(req.get_ref().protocol_version)?;
        let mut views = self.node.subscribe();
        Ok(Response::new(task_stream(16, move |tx| async move {
            let mut last: Option<pb::BucketsReply> = None;
            loop {
                let view = views.borrow_and_update().clone();
                let reply = buckets_reply(&view);
                if last.as_ref().is_none_or(|l| l.buckets != reply.buckets) {
                    if tx.send(Ok(reply.clone())).await.is_err() {
                        return;
                    }
                    last = Some(reply);
                }
                if views.changed().await.is_err() {
                    return;
                }
            }
        })))
    }

    async fn mutate(
        &self,
        req: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateReply>, Status> {
        let who = authorize(&req, SERVICE, &[Role::Admin], &self.node)?;
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let op = req
            .op
            .ok_or_else(|| Status::invalid_argument("mutation without an operation"))?;
        // Debug: one line per proposal would flood the log at INFO, and payloads are
        // never logged, only their size.
        tracing::debug!(admin = %who.to_uri(), op = %op_summary(&op), "mutation requested");
        if let Op::AddController(a) = &op {
            refuse_duplicate_controller(&self.node.view(), a)?;
        }
        let result = match to_action(op)? {
            Action::Command(cmd) => self.node.propose_by(cmd, &who.to_uri()).await,
            Action::Controllers(change) => self.node.change_controllers(change).await,
        };
        let v = self.node.view();
        let index = result.map_err(|e| node_status(e, v.leader_address()))?;
        Ok(Response::new(pb::MutateReply {
            protocol_version: PROTOCOL_VERSION,
            index,
            leader_id: v.role.leader,
        }))
    }
}

/// What an operation is, for logs: names and numbers, never a payload.
fn op_summary(op: &Op) -> String {
    match op {
        Op::InitCluster(i) => format!(
            "init_cluster vips={:?}",
            i.settings.as_ref().map(|s| s
                .vips
                .iter()
                .map(|v| v.address.as_str())
                .collect::<Vec<_>>())
        ),
        Op::AddVip(a) => format!("add_vip {:?}", a.vip.as_ref().map(|v| &v.address)),
        Op::RemoveVip(r) => format!("remove_vip {:?}", r.address),
        Op::AddMember(a) => format!("add_member {:?} weight {}", a.name, a.weight),
        Op::RemoveMember(r) => format!("remove_member {:?}", r.name),
        Op::SetWeight(w) => format!("set_weight {:?} {}", w.name, w.weight),
        Op::Drain(d) => format!("drain {:?}", d.name),
        Op::Undrain(u) => format!("undrain {:?}", u.name),
        Op::ResetMember(r) => format!("reset_member {:?}", r.name),
        Op::Noop(n) => format!("noop ({} payload bytes)", n.payload.len()),
        Op::Revoke(r) => format!("revoke serial {:?}", r.serial),
        Op::Unrevoke(u) => format!("unrevoke serial {:?}", u.serial),
        Op::AddController(a) => format!("add_controller {} at {:?}", a.id, a.address),
        Op::RemoveController(r) => format!("remove_controller {}", r.id),
    }
}

/// `controller add` of a voter that exists, or at an address another controller
/// has, would answer "ok" and change nothing (or confuse the peers' transport).
#[allow(clippy::result_large_err)]
fn refuse_duplicate_controller(v: &NodeView, a: &pb::AddController) -> Result<(), Status> {
    if let Some(address) = v.state.controllers.get(&a.id) {
        if !v.learners.contains(&a.id) {
            return Err(Status::already_exists(format!(
                "controller {} is already a voter (at {address}); remove it first to move it",
                a.id
            )));
        }
    }
    if let Some((other, _)) = v
        .state
        .controllers
        .iter()
        .find(|(id, addr)| **id != a.id && **addr == a.address)
    {
        return Err(Status::already_exists(format!(
            "address {} already belongs to controller {other}",
            a.address
        )));
    }
    Ok(())
}

enum Action {
    Command(Command),
    Controllers(ControllerChange),
}

#[allow(clippy::result_large_err)]
fn to_action(op: Op) -> Result<Action, Status> {
    let cmd = match op {
        Op::InitCluster(i) => Command::InitCluster {
            settings: settings_from_pb(
                i.settings
                    .ok_or_else(|| Status::invalid_argument("init_cluster needs settings"))?,
            )?,
        },
        Op::AddVip(a) => Command::AddVip {
            vip: vip_from_pb(
                a.vip
                    .ok_or_else(|| Status::invalid_argument("add_vip needs a vip"))?,
            )?,
        },
        Op::RemoveVip(r) => Command::RemoveVip {
            address: r.address.parse().map_err(|_| {
                Status::invalid_argument(format!("VIP {:?} is not an IP address", r.address))
            })?,
        },
        Op::AddMember(a) => Command::AddMember {
            name: member_name(a.name)?,
            weight: a.weight,
        },
        Op::RemoveMember(r) => Command::RemoveMember { name: r.name },
        Op::SetWeight(w) => Command::SetWeight {
            name: w.name,
            weight: w.weight,
        },
        Op::Drain(d) => Command::Drain { name: d.name },
        Op::Undrain(u) => Command::Undrain { name: u.name },
        Op::ResetMember(r) => Command::ResetMember { name: r.name },
        Op::Noop(n) => Command::Noop { payload: n.payload },
        Op::Revoke(r) => Command::Revoke {
            serial: serial(&r.serial)?,
        },
        Op::Unrevoke(u) => Command::Unrevoke {
            serial: serial(&u.serial)?,
        },
        Op::AddController(a) => {
            if a.id == 0 || a.address.is_empty() {
                return Err(Status::invalid_argument(
                    "add_controller needs an id > 0 and an address",
                ));
            }
            return Ok(Action::Controllers(ControllerChange::Add {
                id: a.id,
                address: a.address,
            }));
        }
        Op::RemoveController(r) => {
            return Ok(Action::Controllers(ControllerChange::Remove { id: r.id }))
        }
    };
    Ok(Action::Command(cmd))
}

#[allow(clippy::result_large_err)]
fn serial(s: &str) -> Result<String, Status> {
    vipshare_proto::pki::normalize_serial(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[allow(clippy::result_large_err)]
fn member_name(name: String) -> Result<String, Status> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(name)
    } else {
        Err(Status::invalid_argument(format!(
            "member name {name:?} must be 1-63 characters of a-z, 0-9, '-', '_' or '.'"
        )))
    }
}

#[allow(clippy::result_large_err)]
fn vip_from_pb(v: pb::Vip) -> Result<Vip, Status> {
    let addr: std::net::IpAddr = v.address.parse().map_err(|_| {
        Status::invalid_argument(format!("VIP {:?} is not an IP address", v.address))
    })?;
    // Hosts answer ARP for the VIP and accept flows to it: these never are one host's
    // service address, and the kernel would treat them specially.
    let special = if addr.is_multicast() {
        Some("a multicast address")
    } else if addr.is_unspecified() {
        Some("the unspecified address")
    } else if addr.is_loopback() {
        Some("a loopback address")
    } else if matches!(addr, std::net::IpAddr::V4(a) if a.is_broadcast()) {
        Some("the broadcast address")
    } else if matches!(addr, std::net::IpAddr::V6(a) if a.is_unicast_link_local()) {
        // Neighbour discovery and routing scope it to one link and interface.
        Some("a link-local address")
    } else {
        None
    };
    if let Some(what) = special {
        return Err(Status::invalid_argument(format!(
            "VIP {addr} is {what}; a VIP must be a unicast address"
        )));
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = if v.prefix_len == 0 { max } else { v.prefix_len };
    if prefix_len > max {
        return Err(Status::invalid_argument(format!(
            "prefix length {prefix_len} too long for {addr}"
        )));
    }
    // "" is what clients from before switch modes send.
    let mode = if v.mode.is_empty() {
        SwitchMode::Multicast
    } else {
        v.mode
            .parse::<SwitchMode>()
            .map_err(|e| Status::invalid_argument(format!("VIP {addr}: {e}")))?
    };
    let mac = if v.mac.is_empty() {
        Mac::default_for(addr, mode)
    } else {
        v.mac
            .parse::<Mac>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?
    };
    mode.check_mac(addr, mac)
        .map_err(|e| Status::invalid_argument(format!("VIP {addr}: {e}")))?;
    Ok(Vip {
        address: addr,
        prefix_len: prefix_len as u8,
        mac,
        mode,
    })
}

#[allow(clippy::result_large_err)]
fn settings_from_pb(s: pb::ClusterSettings) -> Result<Settings, Status> {
    let bucket_fn = if s.bucket_function.is_empty() {
        "jhash"
    } else {
        &s.bucket_function
    };
    let affinity = if s.affinity.is_empty() {
        "address"
    } else {
        &s.affinity
    };
    Ok(Settings {
        vips: s
            .vips
            .into_iter()
            .map(vip_from_pb)
            .collect::<Result<_, _>>()?,
        bucket_count: if s.bucket_count == 0 {
            256
        } else {
            s.bucket_count
        },
        bucket_fn: bucket_fn
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bucket_function: {e}")))?,
        affinity: affinity
            .parse()
            .map_err(|e| Status::invalid_argument(format!("affinity: {e}")))?,
        seed: s.seed,
        lease: s.lease.map_or_else(LeaseTiming::default, |l| LeaseTiming {
            heartbeat_ms: l.heartbeat_ms,
            lease_ms: l.lease_ms,
            kernel_delay_ms: l.kernel_delay_ms,
            clock_rate_ppm: l.clock_rate_ppm,
            margin_ms: l.margin_ms,
        }),
        damping: s.damping.map_or_else(Damping::default, |d| Damping {
            penalty_per_loss: d.penalty_per_loss,
            half_life_ms: d.half_life_ms,
            suppress: d.suppress,
            reuse: d.reuse,
            min_stable_ms: d.min_stable_ms,
            cap: d.cap,
        }),
    })
}

pub fn settings_to_pb(s: &Settings) -> pb::ClusterSettings {
    pb::ClusterSettings {
        vips: s
            .vips
            .iter()
            .map(|v| pb::Vip {
                address: v.address.to_string(),
                prefix_len: u32::from(v.prefix_len),
                mac: v.mac.to_string(),
                mode: v.mode.to_string(),
            })
            .collect(),
        bucket_count: s.bucket_count,
        bucket_function: s.bucket_fn.to_string(),
        affinity: s.affinity.to_string(),
        seed: s.seed,
        lease: Some(pb::LeaseTiming {
            heartbeat_ms: s.lease.heartbeat_ms,
            lease_ms: s.lease.lease_ms,
            kernel_delay_ms: s.lease.kernel_delay_ms,
            clock_rate_ppm: s.lease.clock_rate_ppm,
            margin_ms: s.lease.margin_ms,
        }),
        damping: Some(pb::Damping {
            penalty_per_loss: s.damping.penalty_per_loss,
            half_life_ms: s.damping.half_life_ms,
            suppress: s.damping.suppress,
            reuse: s.damping.reuse,
            min_stable_ms: s.damping.min_stable_ms,
            cap: s.damping.cap,
        }),
    }
}

fn role_name(r: raft::StateRole) -> &'static str {
    match r {
        raft::StateRole::Leader => "leader",
        raft::StateRole::Follower => "follower",
        raft::StateRole::Candidate => "candidate",
        raft::StateRole::PreCandidate => "pre_candidate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_validation_names_the_problem() {
        let v = |a: &str, mac: &str| {
            vip_from_pb(pb::Vip {
                address: a.into(),
                prefix_len: 0,
                mac: mac.into(),
                mode: String::new(),
            })
        };
        assert_eq!(
            v("192.0.2.10", "").unwrap().mac.to_string(),
            "01:00:5e:00:02:0a"
        );
        assert_eq!(
            v("192.0.2.10", "01-00-5E-7F-00-0A")
                .unwrap()
                .mac
                .to_string(),
            "01:00:5e:7f:00:0a",
            "either separator and case, stored one way"
        );
        assert!(v("192.0.2.10", "01:00:5e:7f:00")
            .unwrap_err()
            .message()
            .contains("\"01:00:5e:7f:00\" is not a MAC address"));
        assert!(v("192.0.2.300", "")
            .unwrap_err()
            .message()
            .contains("192.0.2.300"));
        for bad in [
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "::",
            "ff02::1",
            "127.0.0.1",
            "fe80::1",
        ] {
            let e = v(bad, "").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains(bad) && e.message().contains("unicast"),
                "{e:?}"
            );
        }
        let six = v("2001:db8::a:b", "").unwrap();
        assert_eq!(
            (six.prefix_len, six.mac.to_string()),
            (128, "33:33:00:0a:00:0b".to_string()),
            "IPv6: a /128 with the RFC 2464 MAC by default"
        );
        assert!(v("192.0.2.10", "00:11:22:33:44:55")
            .unwrap_err()
            .message()
            .contains("multicast"));
    }

    #[test]
    fn switch_modes_default_to_multicast_and_check_the_mac() {
        let v = |a: &str, mac: &str, mode: &str| {
            vip_from_pb(pb::Vip {
                address: a.into(),
                prefix_len: 0,
                mac: mac.into(),
                mode: mode.into(),
            })
        };
        let old = v("192.0.2.10", "", "").unwrap();
        assert_eq!(old.mode, SwitchMode::Multicast, "\"\" from older clients");
        let u = v("192.0.2.10", "", "unicast").unwrap();
        assert_eq!(
            (u.mode, u.mac.to_string()),
            (SwitchMode::Unicast, "02:00:5e:00:02:0a".into())
        );
        let g = v("2001:db8::a:b", "", "igmp").unwrap();
        assert_eq!(
            (g.mode, g.mac.to_string()),
            (SwitchMode::Igmp, "33:33:00:0a:00:0b".into())
        );
        // Round trip through the wire form.
        let mut settings = settings_from_pb(pb::ClusterSettings::default()).unwrap();
        settings.vips = vec![u.clone()];
        let s = settings_to_pb(&settings);
        assert_eq!(s.vips[0].mode, "unicast");
        assert_eq!(vip_from_pb(s.vips[0].clone()).unwrap(), u);
        let e = v("192.0.2.10", "", "flood").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("192.0.2.10")
                && e.message().contains("\"flood\" is not a switch mode"),
            "{e:?}"
        );
        let e = v("192.0.2.10", "01:00:5e:00:02:0a", "unicast").unwrap_err();
        assert!(
            e.message().contains("locally administered unicast"),
            "{e:?}"
        );
        let e = v("192.0.2.10", "00:11:22:33:44:55", "unicast").unwrap_err();
        assert!(e.message().contains("00:11:22:33:44:55"), "{e:?}");
    }

    #[test]
    fn member_names_are_restricted() {
        assert!(member_name("web-1".into()).is_ok());
        assert!(member_name("a/b".into()).is_err());
        assert!(member_name(String::new()).is_err());
    }
}
