//! Assignment policy benchmark: `cargo run --release -p vipshare-core --example assignment`.
//!
//! Prints how long the policy takes for 4096 buckets x 256 members, and how many
//! buckets move on a member loss, a join and a weight change, next to the
//! theoretical minimum, for vipshare's policy and three stateless alternatives:
//! mod-N rehashing, rendezvous (highest random weight) hashing and Maglev. Also
//! the largest deviation of any member from its weighted share after the event.

use std::time::{Duration, Instant};

use vipshare_core::policy::{assign, theoretical_min_moves, BucketState, Member};

/// The owner of every bucket.
type Table = Vec<Option<String>>;

fn members(n: usize) -> Vec<Member> {
    // Weights 1, 2, 3, 4, 1, 2, ...: unequal on purpose.
    (0..n)
        .map(|i| Member::new(format!("m{i:03}"), 1 + (i % 4) as u32, true))
        .collect()
}

#[derive(Clone, Copy)]
enum Event {
    Loss,
    Join,
    Weight,
}

impl Event {
    const ALL: [Event; 3] = [Event::Loss, Event::Join, Event::Weight];

    fn name(self) -> &'static str {
        match self {
            Event::Loss => "loss",
            Event::Join => "join",
            Event::Weight => "weight x2",
        }
    }

    fn apply(self, before: &[Member]) -> Vec<Member> {
        let mut after = before.to_vec();
        match self {
            Event::Loss => {
                after.remove(before.len() / 3);
            }
            Event::Join => after.push(Member::new("m-new", 2, true)),
            Event::Weight => after[before.len() / 2].weight *= 2,
        }
        after
    }
}

// ---------------------------------------------------------------------------
// Stateless alternatives. Each maps (bucket count, members) to a table.

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_hash(name: &str, salt: u64) -> u64 {
    // FNV-1a, then mixed.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ salt;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(h)
}

/// mod-N: each member gets `weight` slots (members in name order) and bucket b
/// goes to slot `b mod slots`. (Bucket numbers already are hash values.)
fn mod_n(b: usize, ms: &[Member]) -> Table {
    let mut slots: Vec<&str> = Vec::new();
    let mut sorted: Vec<&Member> = ms.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for m in sorted {
        for _ in 0..m.weight {
            slots.push(&m.name);
        }
    }
    (0..b)
        .map(|i| Some(slots[i % slots.len()].to_string()))
        .collect()
}

/// Weighted rendezvous hashing: bucket b goes to the member with the highest
/// `-weight / ln(u)`, u uniform in (0, 1) from hash(member, b) (Schindler's
/// weighted HRW, which gives each member a `weight / sum` probability).
fn rendezvous(b: usize, ms: &[Member]) -> Table {
    let keys: Vec<u64> = ms.iter().map(|m| name_hash(&m.name, 0)).collect();
    (0..b)
        .map(|bucket| {
            let mut best = (f64::NEG_INFINITY, "");
            for (m, &k) in ms.iter().zip(&keys) {
                let h = splitmix(k ^ splitmix(bucket as u64));
                let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let score = -f64::from(m.weight) / u.ln();
                if score > best.0 || (score == best.0 && m.name.as_str() < best.1) {
                    best = (score, &m.name);
                }
            }
            Some(best.1.to_string())
        })
        .collect()
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n / d * d != n)
}

/// Maglev's lookup table (Eisenbud et al., NSDI 2016, section 3.4): each member
/// has a permutation of the M slots (offset = h1 mod M, skip = h2 mod (M-1) + 1)
/// and members take turns claiming their next preferred free slot until the
/// table is full. Weights: the paper only says to adjust the relative frequency
/// of turns; here a member with weight w gets w/w_max of a turn per round
/// (accumulated), which is what weighted implementations (e.g. Envoy) do.
fn maglev_table(m_size: usize, ms: &[Member]) -> Vec<usize> {
    assert!(is_prime(m_size));
    let n = ms.len();
    let offset: Vec<usize> = ms
        .iter()
        .map(|m| (name_hash(&m.name, 1) % m_size as u64) as usize)
        .collect();
    let skip: Vec<usize> = ms
        .iter()
        .map(|m| (name_hash(&m.name, 2) % (m_size as u64 - 1)) as usize + 1)
        .collect();
    let w_max = ms.iter().map(|m| m.weight).max().unwrap();
    let mut next = vec![0usize; n];
    let mut turns = vec![0u64; n];
    let mut table = vec![usize::MAX; m_size];
    let mut filled = 0;
    let mut round = 0u64;
    while filled < m_size {
        round += 1;
        for i in 0..n {
            // Turns owed so far: floor(round * w / w_max).
            while filled < m_size && turns[i] * u64::from(w_max) < round * u64::from(ms[i].weight) {
                turns[i] += 1;
                loop {
                    let c = (offset[i] + next[i] * skip[i]) % m_size;
                    next[i] += 1;
                    if table[c] == usize::MAX {
                        table[c] = i;
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    table
}

/// Maglev over the buckets: a table of the smallest prime size >= B, and bucket
/// b -> table[b]. This keeps "buckets moved" in the same units as the other
/// methods (Maglev itself would hash flows onto the M slots; vipshare's data
/// plane has B power-of-two buckets). The M - B unused slots (3 for B = 4096,
/// 1 for B = 256) cost a little balance.
fn maglev(b: usize, ms: &[Member]) -> Table {
    let m_size = (b..).find(|&x| is_prime(x)).unwrap();
    let t = maglev_table(m_size, ms);
    (0..b).map(|i| Some(ms[t[i]].name.clone())).collect()
}

/// Maglev as the paper sizes it (M = 65537 >> members): the fraction of slots
/// that change owner and the per-member slot counts, both scaled to B buckets.
fn maglev_65537(b: usize, before: &[Member], after: &[Member]) -> (f64, f64) {
    const M: usize = 65537;
    let t0 = maglev_table(M, before);
    let t1 = maglev_table(M, after);
    let moved = (0..M)
        .filter(|&i| before[t0[i]].name != after[t1[i]].name)
        .count();
    let mut counts = vec![0usize; after.len()];
    for &i in &t1 {
        counts[i] += 1;
    }
    let w: f64 = after.iter().map(|m| f64::from(m.weight)).sum();
    let dev = after
        .iter()
        .zip(&counts)
        .map(|(m, &c)| (c as f64 * b as f64 / M as f64 - b as f64 * f64::from(m.weight) / w).abs())
        .fold(0.0, f64::max);
    (moved as f64 * b as f64 / M as f64, dev)
}

// ---------------------------------------------------------------------------
// Measuring.

fn moved(before: &Table, after: &Table) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

/// Largest |count - share| over the members, in buckets.
fn max_deviation(table: &Table, ms: &[Member]) -> f64 {
    let w: f64 = ms.iter().map(|m| f64::from(m.weight)).sum();
    ms.iter()
        .map(|m| {
            let c = table
                .iter()
                .filter(|o| o.as_deref() == Some(m.name.as_str()))
                .count();
            (c as f64 - table.len() as f64 * f64::from(m.weight) / w).abs()
        })
        .fold(0.0, f64::max)
}

fn settled(t: &Table) -> Vec<BucketState> {
    t.iter()
        .map(|o| BucketState::settled(o.as_deref()))
        .collect()
}

fn vipshare(b: usize, ms: &[Member]) -> Table {
    assign(&vec![BucketState::default(); b], ms).unwrap().owners
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_policy(b: usize, n: usize, event: Event) -> (Duration, Duration, Duration) {
    let before_members = members(n);
    let before = settled(&vipshare(b, &before_members));
    let after_members = event.apply(&before_members);
    let mut runs = Vec::new();
    for _ in 0..21 {
        let start = Instant::now();
        let out = assign(&before, &after_members).unwrap();
        runs.push(start.elapsed());
        std::hint::black_box(out);
    }
    let min = *runs.iter().min().unwrap();
    let max = *runs.iter().max().unwrap();
    (median(runs), min, max)
}

fn main() {
    println!("vipshare assignment policy benchmark");
    println!("members have weights 1,2,3,4,1,2,...; loss removes member N/3, join adds a");
    println!("member of weight 2, 'weight x2' doubles member N/2's weight.\n");

    println!("time to compute one assignment, 4096 buckets x 256 members (21 runs):");
    for event in [Event::Loss, Event::Join] {
        let (med, min, max) = time_policy(4096, 256, event);
        println!(
            "  {:<5} median {:>8.3} ms   (min {:.3} ms, max {:.3} ms)",
            event.name(),
            med.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("buckets moved; 'min' is theoretical_min_moves from vipshare's balanced table:");
    println!("the fewest moves any assignment that keeps every member within one bucket");
    println!("(floor/ceil) of its weighted share can make. 'max dev' is the largest");
    println!("|buckets - share| of any member after the event.\n");

    for (b, n) in [(4096usize, 256usize), (256, 8)] {
        println!("{b} buckets x {n} members");
        println!(
            "  {:<10} {:<26} {:>7} {:>7} {:>7} {:>8}",
            "event", "method", "moved", "min", "ratio", "max dev"
        );
        let before_members = members(n);
        for event in Event::ALL {
            let after_members = event.apply(&before_members);
            let vip_before = vipshare(b, &before_members);
            let min = theoretical_min_moves(&settled(&vip_before), &after_members).unwrap();
            let vip = assign(&settled(&vip_before), &after_members).unwrap();
            let mut rows: Vec<(String, f64, f64)> = vec![(
                "vipshare policy".into(),
                vip.moves.len() as f64,
                max_deviation(&vip.owners, &after_members),
            )];
            type Method = fn(usize, &[Member]) -> Table;
            let methods: [(&str, Method); 3] = [
                ("mod-N", mod_n),
                ("rendezvous (HRW)", rendezvous),
                ("maglev (M=next prime>=B)", maglev),
            ];
            for (name, f) in methods {
                let t0 = f(b, &before_members);
                let t1 = f(b, &after_members);
                rows.push((
                    name.into(),
                    moved(&t0, &t1) as f64,
                    max_deviation(&t1, &after_members),
                ));
            }
            let (mg_moved, mg_dev) = maglev_65537(b, &before_members, &after_members);
            rows.push(("maglev (M=65537, scaled)".into(), mg_moved, mg_dev));
            for (name, mv, dev) in rows {
                println!(
                    "  {:<10} {:<26} {:>7.0} {:>7} {:>6.2}x {:>8.2}",
                    event.name(),
                    name,
                    mv,
                    min,
                    mv / min.max(1) as f64,
                    dev
                );
            }
        }
        println!();
    }
}
