//! The client workload: random [`Command`]s, some of which the state machine
//! refuses (unknown member, bad weight, bucket out of range...) so that refusals,
//! which must also be identical everywhere, get exercised too.
//!
//! With agents ([`Workload::set_members`]) the members are the agents' hosts: the
//! client adds them, and otherwise sends commands that leave ownership to the
//! planner (no-ops, VIPs, refused commands, and now and then an assignment of an
//! unowned bucket, which an administrator may do). Drains, undrains and weight
//! changes are the agent fault plan's operator actions.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use vipshare_core::bucket::{Affinity, BucketFn};
use vipshare_core::command::{Command, OwnerChange};
use vipshare_core::lease::LeaseTiming;
use vipshare_core::net::Mac;
use vipshare_core::state::{Settings, Vip};

const MEMBERS: [&str; 6] = ["h0", "h1", "h2", "h3", "h4", "h5"];
const BUCKETS: u32 = 16;

#[derive(Debug, Default)]
pub struct Workload {
    next_payload: u64,
    /// Agents mode: the agents' member names.
    members: Vec<String>,
    /// Lease timing for InitCluster (None: the default).
    lease: Option<LeaseTiming>,
}

impl Workload {
    /// Agents mode: these are the members (each an agent host).
    pub fn set_members(&mut self, members: Vec<String>) {
        self.members = members;
    }

    pub fn set_lease_timing(&mut self, timing: LeaseTiming) {
        self.lease = (timing != LeaseTiming::default()).then_some(timing);
    }

    pub fn init_command(&self) -> Command {
        // Built from JSON so that settings fields with serde defaults (added as the
        // state machine grows) take their defaults.
        let mut settings = serde_json::json!({
            "vips": [vip(0)],
            "bucket_count": BUCKETS,
            "bucket_fn": BucketFn::Jhash,
            "affinity": Affinity::Address,
            "seed": 0x5eed,
        });
        if let Some(lease) = self.lease {
            settings["lease"] = serde_json::to_value(lease).unwrap_or_default();
        }
        let settings: Settings = serde_json::from_value(settings).unwrap_or_else(|e| {
            panic!("workload: Settings no longer decode ({e}); update workload.rs")
        });
        Command::InitCluster { settings }
    }

    /// A random command; `initialised` says whether InitCluster has been applied.
    pub fn next_command(&mut self, rng: &mut ChaCha8Rng, initialised: bool) -> Command {
        if !initialised && rng.gen_bool(0.5) {
            return self.init_command();
        }
        if !self.members.is_empty() {
            return self.agents_command(rng);
        }
        let pick = |rng: &mut ChaCha8Rng| MEMBERS[rng.gen_range(0..MEMBERS.len())].to_string();
        match rng.gen_range(0..100) {
            0..=34 => {
                self.next_payload += 1;
                let mut payload = self.next_payload.to_be_bytes().to_vec();
                payload.extend(std::iter::repeat_n(0xab, rng.gen_range(0..64)));
                Command::Noop { payload }
            }
            35..=49 => Command::AddMember {
                name: pick(rng),
                weight: weight(rng),
            },
            50..=56 => Command::RemoveMember { name: pick(rng) },
            57..=66 => Command::SetWeight {
                name: pick(rng),
                weight: weight(rng),
            },
            67..=70 => Command::Drain { name: pick(rng) },
            71..=74 => Command::Undrain { name: pick(rng) },
            75..=78 => Command::AddVip {
                vip: vip(rng.gen_range(0..4)),
            },
            79..=81 => Command::RemoveVip {
                address: vip(rng.gen_range(0..4)).address,
            },
            82..=97 => {
                let n = rng.gen_range(1..5);
                let changes = (0..n)
                    .map(|_| OwnerChange {
                        // Now and then out of range: the whole batch is refused.
                        bucket: rng.gen_range(0..BUCKETS + 1),
                        owner: if rng.gen_ratio(1, 5) {
                            None
                        } else {
                            Some(pick(rng))
                        },
                    })
                    .collect();
                Command::SetOwners { changes }
            }
            _ => self.init_command(),
        }
    }
}

impl Workload {
    fn agents_command(&mut self, rng: &mut ChaCha8Rng) -> Command {
        let members = &self.members;
        let pick = |rng: &mut ChaCha8Rng| members[rng.gen_range(0..members.len())].clone();
        match rng.gen_range(0..100) {
            0..=69 => {
                self.next_payload += 1;
                let mut payload = self.next_payload.to_be_bytes().to_vec();
                payload.extend(std::iter::repeat_n(0xab, rng.gen_range(0..64)));
                Command::Noop { payload }
            }
            // Adds the agents' members (refused once they exist).
            70..=84 => Command::AddMember {
                name: pick(rng),
                weight: rng.gen_range(1..=4),
            },
            // Refused: unknown member. (Removing an agent's member and adding it
            // back resets its epoch to 1, below what its agent knows: that agent
            // is then stuck. An operator decommissions the host first.)
            85..=86 => Command::RemoveMember {
                name: "ghost".into(),
            },
            87..=88 => Command::SetWeight {
                name: pick(rng),
                weight: [0, 1001][rng.gen_range(0..2)],
            },
            89..=91 => Command::AddVip {
                vip: vip(rng.gen_range(0..4)),
            },
            92..=93 => Command::RemoveVip {
                address: vip(rng.gen_range(0..4)).address,
            },
            94..=97 => {
                // Mostly refused (owned buckets); an unowned one goes to a member
                // that may hold it, as an administrator may do.
                let changes = vec![OwnerChange {
                    bucket: rng.gen_range(0..BUCKETS + 1),
                    owner: Some(pick(rng)),
                }];
                Command::SetOwners { changes }
            }
            _ => self.init_command(),
        }
    }
}

fn weight(rng: &mut ChaCha8Rng) -> u32 {
    if rng.gen_ratio(1, 20) {
        // Out of range: refused by the state machine.
        [0, 1001][rng.gen_range(0..2)]
    } else {
        rng.gen_range(1..=1000)
    }
}

fn vip(i: u32) -> Vip {
    let last = 10 + i as u8;
    Vip {
        address: std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, last)),
        prefix_len: 24,
        mac: Mac([0x01, 0x00, 0x5e, 0, 0, last]),
        mode: Default::default(),
    }
}
