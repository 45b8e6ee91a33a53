//! The client workload: random [`Command`]s, some of which the state machine
//! refuses (unknown member, bad weight, bucket out of range...) so that refusals,
//! which must also be identical everywhere, get exercised too.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use vipshare_core::bucket::{Affinity, BucketFn};
use vipshare_core::command::{Command, OwnerChange};
use vipshare_core::state::{Settings, Vip};

const MEMBERS: [&str; 6] = ["h0", "h1", "h2", "h3", "h4", "h5"];
const BUCKETS: u32 = 16;

#[derive(Debug, Default)]
pub struct Workload {
    next_payload: u64,
}

impl Workload {
    pub fn init_command(&self) -> Command {
        // Built from JSON so that settings fields with serde defaults (added as the
        // state machine grows) take their defaults.
        let settings = serde_json::json!({
            "vips": [vip(0)],
            "bucket_count": BUCKETS,
            "bucket_fn": BucketFn::Jhash,
            "affinity": Affinity::Address,
            "seed": 0x5eed,
        });
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

fn weight(rng: &mut ChaCha8Rng) -> u32 {
    if rng.gen_ratio(1, 20) {
        // Out of range: refused by the state machine.
        [0, 1001][rng.gen_range(0..2)]
    } else {
        rng.gen_range(1..=1000)
    }
}

fn vip(i: u32) -> Vip {
    Vip {
        address: format!("192.0.2.{}", 10 + i),
        prefix_len: 24,
        mac: format!("01:00:5e:00:00:{:02x}", 10 + i),
    }
}
