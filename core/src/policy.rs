//! The assignment policy: which member should own each bucket.
//!
//! [`assign`] is a pure function of the current bucket table (owner and home of
//! every bucket) and the members (name, weight, eligibility). It returns the
//! target owner of every bucket and the list of buckets whose owner changes.
//! It is deterministic: ties are broken by member name and bucket number, never
//! by hash-map iteration order or by the order of the input member list.
//!
//! # What it guarantees
//! Let `B` be the number of buckets, `W` the sum of the eligible members' weights
//! and `share(m) = B * w(m) / W`. A member is *within one bucket of its share*
//! when it owns `floor(share)` or `ceil(share)` buckets (exactly `share` when that
//! is an integer); see [`share_bounds`].
//!
//! 1. **Balance.** Every output gives every eligible member a count within one
//!    bucket of its share, and ineligible or unknown members own nothing. With no
//!    eligible member every bucket is unowned (`None`).
//! 2. **Minimum movement.** Among all balanced outputs it picks one that changes
//!    the owner of the fewest buckets, which is [`theoretical_min_moves`]. So:
//!    - losing a member (ineligible or gone) moves that member's buckets, plus
//!      the few other buckets balance forces (see below);
//!    - a join, undrain or weight change moves the minimum number of buckets.
//!
//!    No member both gains and loses buckets. Buckets are taken first from
//!    members above `ceil(share)`, then from members already giving some up,
//!    then from the most over-loaded (largest `count - share`) members; they go
//!    first to members below `floor(share)`, then to members already gaining,
//!    then to the most under-loaded. (Home buckets, below, come before all of
//!    these when choosing between members of equal cost.)
//! 3. **Homes.** Each bucket remembers its *home* (the member that last owned it
//!    in a stable state; the controller maintains it). Among the buckets that must
//!    move, as many as possible move back to their home member (a maximum flow
//!    over the shedding members' home buckets), and a member that has to give up
//!    buckets keeps its own home buckets longest. So a member that flaps out and
//!    back in gets its old buckets back: all of them when the shares are whole
//!    numbers; otherwise it may come back at `floor(share)` while a member at
//!    `ceil(share)` keeps one of them, because undoing the flap exactly would
//!    cost an extra move.
//! 4. **Idempotence.** On its own output the policy moves nothing.
//!
//! *Balance sometimes forces moves between two members that both stay.* With
//! unequal weights, removing a member can raise another member's
//! `floor(share)` by more than the freed buckets can cover (example: weights
//! a=8, b=2, c=10, d=6 with 2 buckets owned by b and d; when c, owning nothing,
//! leaves, a's share becomes exactly 1, and one bucket must move from b or d to
//! a). The same happens in mirror image on joins and weight changes. No rule
//! that keeps every member within one bucket of its share can avoid these
//! moves; the policy makes only the forced ones ([`theoretical_min_moves`]
//! counts them) and with equal weights there are none.
//!
//! *A stateless policy cannot tell which member changed.* When the changed
//! member's new share does not by itself force it to gain or lose (its count is
//! already within its new floor/ceil), the one bucket that the totals require
//! may move between two unchanged members of equal standing instead of to or
//! from the changed one: the same number of moves, a different pair. In the
//! property tests (2 to 10 members, random weights 1 to 6) this happens in about
//! 1% of joins, undrains and weight changes.
//!
//! # What it deliberately leaves out (the controller's job)
//! - **Rate limiting and ordering**: it returns the target, not a schedule. The
//!   controller moves a few buckets at a time, releases before it assigns, and
//!   waits for acknowledgements (see the lease design).
//! - **Leases, fencing and epochs**: a member whose lease may still run is
//!   still the owner as far as the kernel is concerned; the controller marks it
//!   ineligible only after fencing, and bumps epochs when it commits moves.
//! - **Damping**: flap suppression decides `eligible`; the policy trusts it.
//! - **Home bookkeeping**: when a bucket's home changes to its new owner
//!   (after the new state has been stable for a while) is the controller's call.
//! - **Address-block shape**: it does not try to keep a member's buckets in
//!   aligned blocks, which would keep FreeBSD ipfw mask rules short.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A member as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Relative capacity, at least 1.
    pub weight: u32,
    /// False when draining, suppressed by damping or without a lease.
    pub eligible: bool,
}

impl Member {
    pub fn new(name: impl Into<String>, weight: u32, eligible: bool) -> Self {
        Member {
            name: name.into(),
            weight,
            eligible,
        }
    }
}

/// What the policy needs to know about one bucket.
pub trait BucketSlot {
    /// The member that owns the bucket now, if any.
    fn owner(&self) -> Option<&str>;
    /// The member that last owned the bucket in a stable state, if any.
    fn home(&self) -> Option<&str>;
}

/// A plain [`BucketSlot`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    pub owner: Option<String>,
    pub home: Option<String>,
}

impl BucketState {
    /// A bucket owned by `owner` whose home is also `owner` (a stable state).
    pub fn settled(owner: Option<&str>) -> Self {
        BucketState {
            owner: owner.map(str::to_string),
            home: owner.map(str::to_string),
        }
    }
}

impl BucketSlot for BucketState {
    fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }
    fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }
}

impl<T: BucketSlot> BucketSlot for &T {
    fn owner(&self) -> Option<&str> {
        (**self).owner()
    }
    fn home(&self) -> Option<&str> {
        (**self).home()
    }
}

/// One bucket changing owner. `None` means unowned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub bucket: u32,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Target owner of every bucket, indexed by bucket number.
    pub owners: Vec<Option<String>>,
    /// The buckets whose target owner differs from the current one, by bucket.
    pub moves: Vec<Move>,
}

impl Assignment {
    /// The output as a bucket table, with `home` carried over from `before`
    /// (what the table looks like once the moves are applied but before the
    /// controller updates homes).
    pub fn as_table<B: BucketSlot>(&self, before: &[B]) -> Vec<BucketState> {
        self.owners
            .iter()
            .zip(before)
            .map(|(owner, b)| BucketState {
                owner: owner.clone(),
                home: b.home().map(str::to_string),
            })
            .collect()
    }

    /// Number of buckets each member owns in the output.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for owner in self.owners.iter().flatten() {
            *counts.entry(owner.as_str()).or_insert(0) += 1;
        }
        counts
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("member {0:?} is listed twice")]
    DuplicateMember(String),
    #[error("member {0:?} has weight 0; weights start at 1")]
    ZeroWeight(String),
    #[error("{0} buckets is more than the policy handles (bucket numbers are u32)")]
    TooManyBuckets(usize),
}

/// The lowest and highest bucket count of a member within one bucket of its
/// share: `floor(share)` and `ceil(share)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub floor: usize,
    pub ceil: usize,
}

/// The eligible members, sorted by name, with the numbers the policy works on.
struct Roster<'a> {
    names: Vec<&'a str>,
    weights: Vec<u128>,
    total_weight: u128,
    lo: Vec<usize>,
    hi: Vec<usize>,
    index: BTreeMap<&'a str, usize>,
}

impl<'a> Roster<'a> {
    fn new(bucket_count: usize, members: &'a [Member]) -> Result<Self, PolicyError> {
        if u32::try_from(bucket_count).is_err() {
            return Err(PolicyError::TooManyBuckets(bucket_count));
        }
        let mut seen = BTreeMap::new();
        for m in members {
            if m.weight == 0 {
                return Err(PolicyError::ZeroWeight(m.name.clone()));
            }
            if seen.insert(m.name.as_str(), m).is_some() {
                return Err(PolicyError::DuplicateMember(m.name.clone()));
            }
        }
        let eligible: Vec<&Member> = seen.into_values().filter(|m| m.eligible).collect();
        let names: Vec<&str> = eligible.iter().map(|m| m.name.as_str()).collect();
        let weights: Vec<u128> = eligible.iter().map(|m| u128::from(m.weight)).collect();
        let total_weight: u128 = weights.iter().sum();
        let b = bucket_count as u128;
        let (mut lo, mut hi) = (Vec::new(), Vec::new());
        for &w in &weights {
            let num = b * w;
            lo.push((num / total_weight) as usize);
            hi.push(num.div_ceil(total_weight) as usize);
        }
        let index = names.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        Ok(Roster {
            names,
            weights,
            total_weight,
            lo,
            hi,
            index,
        })
    }

    fn len(&self) -> usize {
        self.names.len()
    }

    fn idx(&self, name: Option<&str>) -> Option<usize> {
        name.and_then(|n| self.index.get(n).copied())
    }

    /// `(count - share) * W`, exact: positive when over-loaded.
    fn excess(&self, i: usize, count: usize, bucket_count: usize) -> i128 {
        count as i128 * self.total_weight as i128 - bucket_count as i128 * self.weights[i] as i128
    }
}

/// `floor(share)` and `ceil(share)` of every eligible member, by name. Errors as
/// [`assign`].
pub fn share_bounds(
    bucket_count: usize,
    members: &[Member],
) -> Result<BTreeMap<String, Bounds>, PolicyError> {
    let r = Roster::new(bucket_count, members)?;
    Ok((0..r.len())
        .map(|i| {
            (
                r.names[i].to_string(),
                Bounds {
                    floor: r.lo[i],
                    ceil: r.hi[i],
                },
            )
        })
        .collect())
}

/// The fewest buckets any balanced assignment (guarantee 1 of the module doc)
/// for `after_members` must move away from the table `before`. Buckets owned by
/// ineligible or unknown members always count; with no eligible member, every
/// owned bucket counts (it becomes unowned).
pub fn theoretical_min_moves<B: BucketSlot>(
    before: &[B],
    after_members: &[Member],
) -> Result<usize, PolicyError> {
    let r = Roster::new(before.len(), after_members)?;
    if r.len() == 0 {
        return Ok(before.iter().filter(|b| b.owner().is_some()).count());
    }
    let counts = current_counts(&r, before);
    // Each member keeps min(count, target) buckets; the best targets start from
    // clamp(count, floor, ceil) and only add gains when the clamped total is short.
    let mut forced_gains = 0;
    let mut total = 0;
    for ((&c, &lo), &hi) in counts.iter().zip(&r.lo).zip(&r.hi) {
        forced_gains += lo.saturating_sub(c);
        total += c.clamp(lo, hi);
    }
    Ok(forced_gains + before.len().saturating_sub(total))
}

fn current_counts<B: BucketSlot>(r: &Roster<'_>, buckets: &[B]) -> Vec<usize> {
    let mut counts = vec![0; r.len()];
    for b in buckets {
        if let Some(i) = r.idx(b.owner()) {
            counts[i] += 1;
        }
    }
    counts
}

/// Computes the target owner of every bucket. See the module doc for what the
/// answer guarantees. Errors on a member listed twice or with weight 0.
pub fn assign<B: BucketSlot>(buckets: &[B], members: &[Member]) -> Result<Assignment, PolicyError> {
    let r = Roster::new(buckets.len(), members)?;
    let n = buckets.len();
    let owner: Vec<Option<usize>> = buckets.iter().map(|b| r.idx(b.owner())).collect();
    let home: Vec<Option<usize>> = buckets.iter().map(|b| r.idx(b.home())).collect();

    let target: Vec<Option<usize>> = if r.len() == 0 {
        vec![None; n]
    } else {
        let counts = current_counts(&r, buckets);
        let targets = target_counts(&r, n, &owner, &home, &counts);
        place(&r, &owner, &home, &counts, &targets)
    };

    let owners: Vec<Option<String>> = target
        .iter()
        .map(|t| t.map(|i| r.names[i].to_string()))
        .collect();
    let moves = buckets
        .iter()
        .zip(&owners)
        .enumerate()
        .filter(|(_, (b, to))| b.owner() != to.as_deref())
        .map(|(bucket, (b, to))| Move {
            bucket: bucket as u32,
            from: b.owner().map(str::to_string),
            to: to.clone(),
        })
        .collect();
    Ok(Assignment { owners, moves })
}

/// How many `(holder, home)` buckets there are, for holder != home, both eligible.
fn foreign_homes(
    owner: &[Option<usize>],
    home: &[Option<usize>],
) -> BTreeMap<(usize, usize), usize> {
    let mut m = BTreeMap::new();
    for (&o, &h) in owner.iter().zip(home) {
        if let (Some(o), Some(h)) = (o, h) {
            if o != h {
                *m.entry((o, h)).or_insert(0) += 1;
            }
        }
    }
    m
}

/// The bucket count of every eligible member: balanced, with the fewest moves,
/// then preferring choices that let buckets return home, then the most over-
/// (under-) loaded members, then names.
fn target_counts(
    r: &Roster<'_>,
    n: usize,
    owner: &[Option<usize>],
    home: &[Option<usize>],
    counts: &[usize],
) -> Vec<usize> {
    let m = r.len();
    let mut t: Vec<usize> = (0..m).map(|i| counts[i].clamp(r.lo[i], r.hi[i])).collect();
    let total: usize = t.iter().sum();
    if total == n {
        return t;
    }
    let foreign = foreign_homes(owner, home);
    // Buckets each member must give up anyway after clamping.
    let shed: Vec<usize> = (0..m).map(|i| counts[i].saturating_sub(t[i])).collect();
    let gaining: Vec<bool> = (0..m).map(|i| t[i] > counts[i]).collect();
    if total > n {
        // Lower some members from ceil to floor. Each costs one kept bucket,
        // whoever it is; prefer members holding home buckets of gaining members
        // (beyond what they shed already), then members that shed anyway (so no
        // bucket moves between two members that would otherwise both keep
        // theirs), then the most over-loaded.
        let mut held_for_gainers = vec![0usize; m];
        for (&(o, h), &k) in &foreign {
            if gaining[h] {
                held_for_gainers[o] += k;
            }
        }
        let mut cands: Vec<usize> = (0..m).filter(|&i| t[i] > r.lo[i]).collect();
        cands.sort_by_key(|&i| {
            (
                std::cmp::Reverse(held_for_gainers[i].saturating_sub(shed[i])),
                shed[i] == 0,
                std::cmp::Reverse(r.excess(i, t[i], n)),
                i,
            )
        });
        for &i in &cands[..total - n] {
            t[i] -= 1;
        }
    } else {
        // Raise some members from floor to ceil. Each costs one move, whoever it
        // is; prefer members whose home buckets are up for grabs, then members
        // that gain anyway (so no bucket moves between two members that would
        // otherwise both keep theirs), then the most under-loaded.
        let mut pool_homes = vec![0usize; m];
        for (&o, &h) in owner.iter().zip(home) {
            if let (None, Some(h)) = (o, h) {
                pool_homes[h] += 1;
            }
        }
        for (&(o, h), &k) in &foreign {
            pool_homes[h] += k.min(shed[o]);
        }
        let mut cands: Vec<usize> = (0..m).filter(|&i| t[i] < r.hi[i]).collect();
        cands.sort_by_key(|&i| {
            (
                std::cmp::Reverse(pool_homes[i].saturating_sub(t[i].saturating_sub(counts[i]))),
                !gaining[i],
                r.excess(i, t[i], n),
                i,
            )
        });
        for &i in &cands[..n - total] {
            t[i] += 1;
        }
    }
    t
}

/// Chooses which buckets move, given the target counts.
fn place(
    r: &Roster<'_>,
    owner: &[Option<usize>],
    home: &[Option<usize>],
    counts: &[usize],
    targets: &[usize],
) -> Vec<Option<usize>> {
    let m = r.len();
    let mut need: Vec<usize> = (0..m)
        .map(|i| targets[i].saturating_sub(counts[i]))
        .collect();
    let mut shed: Vec<usize> = (0..m)
        .map(|i| counts[i].saturating_sub(targets[i]))
        .collect();
    let mut result: Vec<Option<usize>> = owner.to_vec();
    // Buckets not owned by an eligible member all move (or stay unowned).
    let mut free: Vec<bool> = owner.iter().map(Option::is_none).collect();

    // 1. Send as many buckets home as possible: a maximum flow from shedding
    //    members (capacity: what they shed) and the free pool, along "holds a
    //    bucket whose home is g", to gaining members g (capacity: what they need).
    let free_node = m; // node ids: members 0..m, free pool m, source m+1, sink m+2
    let (src, sink) = (m + 1, m + 2);
    let mut flow = MaxFlow::new(m + 3);
    let mut holder_edges: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut edge_caps: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for (&o, &h) in owner.iter().zip(home) {
        if let Some(h) = h {
            if need[h] == 0 {
                continue;
            }
            match o {
                Some(o) if o != h && shed[o] > 0 => *edge_caps.entry((o, h)).or_insert(0) += 1,
                None => *edge_caps.entry((free_node, h)).or_insert(0) += 1,
                _ => {}
            }
        }
    }
    if !edge_caps.is_empty() {
        for i in 0..m {
            if shed[i] > 0 {
                flow.add_edge(src, i, shed[i]);
            }
            if need[i] > 0 {
                flow.add_edge(i, sink, need[i]);
            }
        }
        flow.add_edge(src, free_node, owner.len());
        for (&(from, to), &cap) in &edge_caps {
            holder_edges.insert((from, to), flow.add_edge(from, to, cap));
        }
        flow.run(src, sink);
    }
    let mut homeward: BTreeMap<(usize, usize), usize> = holder_edges
        .iter()
        .map(|(&k, &e)| (k, flow.flow(e)))
        .filter(|&(_, f)| f > 0)
        .collect();
    for (b, (&o, &h)) in owner.iter().zip(home).enumerate() {
        let Some(h) = h else { continue };
        let from = o.unwrap_or(free_node);
        if let Some(left) = homeward.get_mut(&(from, h)) {
            if *left > 0 {
                *left -= 1;
                result[b] = Some(h);
                need[h] -= 1;
                if let Some(o) = o {
                    shed[o] -= 1;
                } else {
                    free[b] = false;
                }
            }
        }
    }

    // 2. The rest of the shedding: a member gives up buckets whose home is
    //    someone else first, its own home buckets last; lower numbers first.
    let mut pool: Vec<usize> = (0..owner.len()).filter(|&b| free[b]).collect();
    for pass in 0..2 {
        for b in 0..owner.len() {
            if let Some(o) = owner[b] {
                let own_home = home[b] == Some(o);
                if shed[o] > 0 && result[b] == Some(o) && own_home == (pass == 1) {
                    shed[o] -= 1;
                    pool.push(b);
                }
            }
        }
    }
    pool.sort_unstable();

    // 3. Hand the pool out in bucket order to the members that still need
    //    buckets, in name order (so each gets a run of neighbouring buckets).
    let mut takers = (0..m).flat_map(|i| std::iter::repeat_n(i, need[i]));
    for b in pool {
        result[b] = takers.next();
    }
    debug_assert!(takers.next().is_none());
    result
}

/// Dinic's maximum flow on a small graph, deterministic (edges in insertion order).
struct MaxFlow {
    adj: Vec<Vec<usize>>,
    to: Vec<usize>,
    cap: Vec<usize>,
    orig: Vec<usize>,
}

impl MaxFlow {
    fn new(nodes: usize) -> Self {
        MaxFlow {
            adj: vec![Vec::new(); nodes],
            to: Vec::new(),
            cap: Vec::new(),
            orig: Vec::new(),
        }
    }

    /// Adds an edge and returns its id.
    fn add_edge(&mut self, from: usize, to: usize, cap: usize) -> usize {
        let id = self.to.len();
        self.adj[from].push(id);
        self.to.push(to);
        self.cap.push(cap);
        self.orig.push(cap);
        self.adj[to].push(id + 1);
        self.to.push(from);
        self.cap.push(0);
        self.orig.push(0);
        id
    }

    fn flow(&self, edge: usize) -> usize {
        self.orig[edge] - self.cap[edge]
    }

    fn run(&mut self, src: usize, sink: usize) {
        let nodes = self.adj.len();
        loop {
            let mut level = vec![usize::MAX; nodes];
            level[src] = 0;
            let mut queue = std::collections::VecDeque::from([src]);
            while let Some(v) = queue.pop_front() {
                for &e in &self.adj[v] {
                    if self.cap[e] > 0 && level[self.to[e]] == usize::MAX {
                        level[self.to[e]] = level[v] + 1;
                        queue.push_back(self.to[e]);
                    }
                }
            }
            if level[sink] == usize::MAX {
                return;
            }
            let mut next = vec![0usize; nodes];
            while self.push(src, sink, usize::MAX, &level, &mut next) > 0 {}
        }
    }

    fn push(
        &mut self,
        v: usize,
        sink: usize,
        limit: usize,
        level: &[usize],
        next: &mut [usize],
    ) -> usize {
        if v == sink {
            return limit;
        }
        while next[v] < self.adj[v].len() {
            let e = self.adj[v][next[v]];
            let w = self.to[e];
            if self.cap[e] > 0 && level[w] == level[v] + 1 {
                let pushed = self.push(w, sink, limit.min(self.cap[e]), level, next);
                if pushed > 0 {
                    self.cap[e] -= pushed;
                    self.cap[e ^ 1] += pushed;
                    return pushed;
                }
            }
            next[v] += 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_flow_routes_around_a_greedy_trap() {
        // a can send to x or y, b only to x; each has capacity one.
        let mut f = MaxFlow::new(6);
        let (src, sink, a, b, x, y) = (0, 1, 2, 3, 4, 5);
        f.add_edge(src, a, 1);
        f.add_edge(src, b, 1);
        f.add_edge(a, x, 1);
        f.add_edge(a, y, 1);
        f.add_edge(b, x, 1);
        let ex = f.add_edge(x, sink, 1);
        let ey = f.add_edge(y, sink, 1);
        f.run(src, sink);
        assert_eq!(f.flow(ex) + f.flow(ey), 2);
    }
}
