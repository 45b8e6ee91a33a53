//! The assignment policy's claims (see `vipshare_core::policy`), each checked by a
//! property test, plus hand-written examples.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vipshare_core::policy::{
    assign, share_bounds, theoretical_min_moves, Assignment, BucketSlot, BucketState, Member, Move,
    PolicyError,
};

// ---------------------------------------------------------------------------
// helpers

/// 400 cases (more with PROPTEST_CASES), no regression files written.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(400),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// SplitMix64: the tests build structured inputs from one proptest seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi_incl: usize) -> usize {
        lo + self.below(hi_incl - lo + 1)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

fn name(i: usize) -> String {
    format!("m{i:02}")
}

fn members(weights: &[u32]) -> Vec<Member> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Member::new(name(i), w, true))
        .collect()
}

fn random_members(rng: &mut Rng, min: usize, max: usize, max_weight: u32) -> Vec<Member> {
    let n = rng.range(min, max);
    let weights: Vec<u32> = (0..n)
        .map(|_| rng.range(1, max_weight as usize) as u32)
        .collect();
    members(&weights)
}

fn random_bucket_count(rng: &mut Rng) -> usize {
    1 << rng.range(1, 9)
}

/// A settled (home = owner), balanced table for `members`: the members that get
/// ceil(share) and the placement of buckets are random.
fn random_balanced(rng: &mut Rng, b: usize, members: &[Member]) -> Vec<BucketState> {
    let bounds = share_bounds(b, members).unwrap();
    let mut counts: BTreeMap<String, usize> =
        bounds.iter().map(|(n, bd)| (n.clone(), bd.floor)).collect();
    let mut fractional: Vec<&String> = bounds
        .iter()
        .filter(|(_, bd)| bd.ceil > bd.floor)
        .map(|(n, _)| n)
        .collect();
    rng.shuffle(&mut fractional);
    let extra = b - counts.values().sum::<usize>();
    for n in &fractional[..extra] {
        *counts.get_mut(*n).unwrap() += 1;
    }
    let mut owners: Vec<Option<&str>> = counts
        .iter()
        .flat_map(|(n, &c)| std::iter::repeat_n(Some(n.as_str()), c))
        .collect();
    if owners.is_empty() {
        owners = vec![None; b];
    }
    rng.shuffle(&mut owners);
    owners.into_iter().map(BucketState::settled).collect()
}

fn counts_of<B: BucketSlot>(table: &[B]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for b in table {
        if let Some(o) = b.owner() {
            *c.entry(o.to_string()).or_insert(0) += 1;
        }
    }
    c
}

/// Claim 3: every eligible member within floor/ceil of its share, nobody else
/// owns anything.
fn assert_balanced(out: &Assignment, members: &[Member]) {
    let bounds = share_bounds(out.owners.len(), members).unwrap();
    let counts = out.counts();
    for (n, c) in &counts {
        assert!(bounds.contains_key(*n), "{n} is not eligible but owns {c}");
    }
    for (n, bd) in &bounds {
        let c = counts.get(n.as_str()).copied().unwrap_or(0);
        assert!(
            bd.floor <= c && c <= bd.ceil,
            "{n} owns {c}, share bounds {bd:?}"
        );
    }
    if bounds.is_empty() {
        assert!(out.owners.iter().all(Option::is_none));
    }
}

/// Moves are exactly the differences between input and output.
fn assert_moves_consistent<B: BucketSlot>(before: &[B], out: &Assignment) {
    let expected: Vec<Move> = before
        .iter()
        .zip(&out.owners)
        .enumerate()
        .filter(|(_, (b, to))| b.owner() != to.as_deref())
        .map(|(i, (b, to))| Move {
            bucket: i as u32,
            from: b.owner().map(str::to_string),
            to: to.clone(),
        })
        .collect();
    assert_eq!(out.moves, expected);
}

/// No member both gains and loses buckets.
fn assert_no_member_gains_and_loses(out: &Assignment) {
    let gainers: Vec<&str> = out.moves.iter().filter_map(|m| m.to.as_deref()).collect();
    for m in &out.moves {
        if let Some(f) = m.from.as_deref() {
            assert!(!gainers.contains(&f), "{f} both gains and loses");
        }
    }
}

/// Independent brute force over every balanced count vector: the fewest moves,
/// and among those, the fewest moves from one member of `stayers` to another.
fn brute_force<B: BucketSlot>(before: &[B], after: &[Member], stayers: &[&str]) -> (usize, usize) {
    let bounds = share_bounds(before.len(), after).unwrap();
    let current = counts_of(before);
    let names: Vec<&String> = bounds.keys().collect();
    let owned_by_eligible: usize = names
        .iter()
        .map(|n| current.get(*n).copied().unwrap_or(0))
        .sum();
    let free = before.len() - owned_by_eligible;
    if names.is_empty() {
        return (before.iter().filter(|b| b.owner().is_some()).count(), 0);
    }
    let flex: Vec<usize> = (0..names.len())
        .filter(|&i| bounds[names[i]].ceil > bounds[names[i]].floor)
        .collect();
    assert!(flex.len() <= 16, "brute force too big");
    let mut best = (usize::MAX, usize::MAX);
    for mask in 0u32..(1 << flex.len()) {
        let mut t: Vec<usize> = names.iter().map(|n| bounds[*n].floor).collect();
        for (k, &i) in flex.iter().enumerate() {
            if mask & (1 << k) != 0 {
                t[i] += 1;
            }
        }
        if t.iter().sum::<usize>() != before.len() {
            continue;
        }
        let c = |i: usize| current.get(names[i]).copied().unwrap_or(0);
        let moves: usize = (0..names.len()).map(|i| t[i].saturating_sub(c(i))).sum();
        let is_stayer = |i: usize| stayers.contains(&names[i].as_str());
        let stayer_gains: usize = (0..names.len())
            .filter(|&i| is_stayer(i))
            .map(|i| t[i].saturating_sub(c(i)))
            .sum();
        let other_sheds: usize = (0..names.len())
            .filter(|&i| !is_stayer(i))
            .map(|i| c(i).saturating_sub(t[i]))
            .sum();
        let between_stayers = stayer_gains.saturating_sub(other_sheds + free);
        best = best.min((moves, between_stayers));
    }
    best
}

fn between(out: &Assignment, stayers: &[&str]) -> usize {
    out.moves
        .iter()
        .filter(|m| {
            matches!((m.from.as_deref(), m.to.as_deref()),
                (Some(f), Some(t)) if stayers.contains(&f) && stayers.contains(&t))
        })
        .count()
}

fn run<B: BucketSlot>(before: &[B], after: &[Member]) -> Assignment {
    let out = assign(before, after).unwrap();
    assert_moves_consistent(before, &out);
    assert_balanced(&out, after);
    assert_no_member_gains_and_loses(&out);
    assert_eq!(
        out.moves.len(),
        theoretical_min_moves(before, after).unwrap(),
        "not the minimum number of moves"
    );
    out
}

// ---------------------------------------------------------------------------
// claim 1: losing a member moves only its buckets (plus what balance forces)

proptest! {
    #![proptest_config(config())]

    #[test]
    fn loss_moves_only_the_lost_members_buckets(seed: u64, remove: bool) {
        let mut rng = Rng(seed);
        let before_members = random_members(&mut rng, 2, 12, 6);
        let b = random_bucket_count(&mut rng);
        let before = random_balanced(&mut rng, b, &before_members);
        let x = name(rng.below(before_members.len()));
        let mut after: Vec<Member> = before_members.clone();
        if remove {
            after.retain(|m| m.name != x);
        } else {
            after.iter_mut().filter(|m| m.name == x).for_each(|m| m.eligible = false);
        }
        let out = run(&before, &after);
        // All of X's buckets move.
        prop_assert!(out.owners.iter().all(|o| o.as_deref() != Some(x.as_str())));
        // Other moves: exactly those the floor/ceil bounds force, computed
        // independently: survivors must reach max(count, floor(new share)).
        let counts = counts_of(&before);
        let bounds = share_bounds(b, &after).unwrap();
        let need: usize = bounds
            .iter()
            .map(|(n, bd)| counts.get(n).copied().unwrap_or(0).max(bd.floor))
            .sum();
        let forced = need.saturating_sub(b);
        let others = out.moves.iter().filter(|m| m.from.as_deref() != Some(x.as_str())).count();
        prop_assert_eq!(others, forced);
        let stayers: Vec<&str> = bounds.keys().map(String::as_str).collect();
        prop_assert_eq!(others, brute_force(&before, &after, &stayers).1);
        if before_members.iter().all(|m| m.weight == before_members[0].weight) {
            prop_assert_eq!(others, 0);
        }
    }
}

// ---------------------------------------------------------------------------
// claim 2: join / undrain / weight change move the minimum, none between stayers

#[derive(Debug, Clone, Copy)]
enum Event {
    Join,
    Undrain,
    WeightUp,
    WeightDown,
}

fn event_strategy() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::Join),
        Just(Event::Undrain),
        Just(Event::WeightUp),
        Just(Event::WeightDown),
    ]
}

/// Returns (before members, after members, name of the changed member).
fn apply_event(rng: &mut Rng, event: Event) -> (Vec<Member>, Vec<Member>, String) {
    let base = random_members(rng, 2, 10, 6);
    match event {
        Event::Join => {
            let y = name(base.len());
            let mut after = base.clone();
            after.push(Member::new(y.clone(), rng.range(1, 6) as u32, true));
            (base, after, y)
        }
        Event::Undrain => {
            let u = rng.below(base.len());
            let mut before = base.clone();
            before[u].eligible = false;
            (before, base.clone(), name(u))
        }
        Event::WeightUp | Event::WeightDown => {
            let z = rng.below(base.len());
            let mut after = base.clone();
            let w = base[z].weight;
            after[z].weight = match event {
                Event::WeightUp => w + rng.range(1, 6) as u32,
                _ if w > 1 => rng.range(1, w as usize - 1) as u32,
                _ => w + 1,
            };
            (base, after, name(z))
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn changes_move_the_minimum_and_nothing_between_stayers(seed: u64, event in event_strategy()) {
        let mut rng = Rng(seed);
        let (before_members, after_members, changed) = apply_event(&mut rng, event);
        let b = random_bucket_count(&mut rng);
        let before = random_balanced(&mut rng, b, &before_members);
        let out = run(&before, &after_members);
        let stayers: Vec<&str> = after_members
            .iter()
            .filter(|m| m.eligible && m.name != changed)
            .map(|m| m.name.as_str())
            .collect();
        let (min_moves, min_between) = brute_force(&before, &after_members, &stayers);
        prop_assert_eq!(out.moves.len(), min_moves);
        // Moves between two unchanged members: only those balance forces. A
        // stateless policy cannot single out the changed member when it is not
        // gaining or losing anything by itself; then it may pick another member
        // of equal standing, so the exact check is limited to the cases where
        // the changed member's own bound already makes it gain or lose.
        let c = counts_of(&before).get(&changed).copied().unwrap_or(0);
        let bd = share_bounds(b, &after_members).unwrap()[&changed];
        if c < bd.floor || c > bd.ceil {
            prop_assert_eq!(between(&out, &stayers), min_between);
        }
        // Buckets are taken from the most over-loaded: every member that loses a
        // bucket ends at least as loaded, relative to its share, as any member
        // that keeps ceil(share) without losing.
        let after_counts = out.counts();
        let total_w: u64 = after_members.iter().filter(|m| m.eligible).map(|m| u64::from(m.weight)).sum();
        let load = |n: &str| {
            let w = after_members.iter().find(|m| m.name == n).unwrap().weight;
            // (count - share) * W
            after_counts.get(n).copied().unwrap_or(0) as i128 * total_w as i128 - (b as i128) * i128::from(w)
        };
        let losers: Vec<&str> = out.moves.iter().filter_map(|m| m.from.as_deref()).collect();
        let bounds = share_bounds(b, &after_members).unwrap();
        for l in &losers {
            if !bounds.contains_key(*l) { continue; }
            let before_c = counts_of(&before)[*l];
            // A loser that was above ceil had no choice.
            if before_c > bounds[*l].ceil { continue; }
            for (n, bd) in &bounds {
                let cnt = after_counts.get(n.as_str()).copied().unwrap_or(0);
                let kept_ceil = cnt == bd.ceil && bd.ceil > bd.floor && !losers.contains(&n.as_str())
                    && counts_of(&before).get(n).copied().unwrap_or(0) == cnt;
                if kept_ceil {
                    // l was lowered from ceil to floor; n kept ceil.
                    prop_assert!(load(l) + total_w as i128 >= load(n),
                        "{} lost a bucket but {} is more over-loaded", l, n);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// claim 3: balance, on arbitrary (messy) inputs; claim 5 idempotence; claim 6
// determinism and independence of the member list order

fn messy_input(rng: &mut Rng) -> (Vec<BucketState>, Vec<Member>) {
    let mut ms = random_members(rng, 0, 9, 8);
    for m in ms.iter_mut() {
        m.eligible = rng.below(4) != 0;
    }
    let b = random_bucket_count(rng);
    let pick = |rng: &mut Rng| -> Option<String> {
        match rng.below(ms.len() + 2) {
            0 => None,
            1 => Some("ghost".to_string()),
            k => Some(ms[k - 2].name.clone()),
        }
    };
    let table = (0..b)
        .map(|_| BucketState {
            owner: pick(rng),
            home: pick(rng),
        })
        .collect();
    (table, ms)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_input_gives_a_balanced_minimal_answer(seed: u64) {
        let mut rng = Rng(seed);
        let (table, ms) = messy_input(&mut rng);
        let out = run(&table, &ms);
        prop_assert_eq!(out.moves.len(), brute_force(&table, &ms, &[]).0);
    }

    #[test]
    fn idempotent(seed: u64) {
        let mut rng = Rng(seed);
        let (table, ms) = messy_input(&mut rng);
        let out = run(&table, &ms);
        let again = run(&out.as_table(&table), &ms);
        prop_assert!(again.moves.is_empty(), "second run moved {:?}", again.moves);
        prop_assert_eq!(again.owners, out.owners);
    }

    #[test]
    fn deterministic_and_member_order_independent(seed: u64) {
        let mut rng = Rng(seed);
        let (table, mut ms) = messy_input(&mut rng);
        let out = assign(&table, &ms).unwrap();
        prop_assert_eq!(&assign(&table, &ms).unwrap(), &out);
        rng.shuffle(&mut ms);
        prop_assert_eq!(&assign(&table, &ms).unwrap(), &out);
    }
}

// ---------------------------------------------------------------------------
// claim 4: a returning member gets its home buckets back

proptest! {
    #![proptest_config(config())]

    #[test]
    fn returning_member_gets_home_buckets_back(seed: u64) {
        let mut rng = Rng(seed);
        let ms = random_members(&mut rng, 2, 10, 6);
        let b = random_bucket_count(&mut rng);
        let stable = random_balanced(&mut rng, b, &ms);
        let x = name(rng.below(ms.len()));
        let mut without = ms.clone();
        without.iter_mut().filter(|m| m.name == x).for_each(|m| m.eligible = false);
        let lost = run(&stable, &without);
        let x_had = counts_of(&stable).get(&x).copied().unwrap_or(0);
        // Homes stay: the controller has not declared the new state stable.
        let away = lost.as_table(&stable);
        let back = run(&away, &ms);
        let got: Vec<&Move> = back.moves.iter().filter(|m| m.to.as_deref() == Some(x.as_str())).collect();
        let got_home = got.iter().filter(|m| stable[m.bucket as usize].home.as_deref() == Some(x.as_str())).count();
        if lost.moves.len() == x_had {
            // Only X's buckets were displaced, so only X has homes to claim: it
            // gets back as many as the members giving up buckets hold.
            let after_counts = back.counts();
            let mut available = 0;
            for (holder, c) in counts_of(&away) {
                let sheds = c.saturating_sub(after_counts.get(holder.as_str()).copied().unwrap_or(0));
                let holds = away.iter().filter(|s| s.owner.as_deref() == Some(holder.as_str())
                    && s.home.as_deref() == Some(x.as_str())).count();
                available += sheds.min(holds);
            }
            prop_assert_eq!(got_home, got.len().min(available));
            // When every share is a whole number of buckets, the flap is undone
            // exactly. (Otherwise the minimum may leave X at floor(share) while a
            // member that held ceil(share) keeps one of X's old buckets: undoing
            // the flap exactly would cost an extra move.)
            if share_bounds(b, &ms).unwrap().values().all(|bd| bd.floor == bd.ceil) {
                prop_assert_eq!(&back.owners, &stable.iter().map(|s| s.owner.clone()).collect::<Vec<_>>());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// theoretical_min_moves against brute force

proptest! {
    #![proptest_config(config())]

    #[test]
    fn theoretical_min_matches_brute_force(seed: u64) {
        let mut rng = Rng(seed);
        let (table, ms) = messy_input(&mut rng);
        prop_assert_eq!(theoretical_min_moves(&table, &ms).unwrap(), brute_force(&table, &ms, &[]).0);
    }
}

// ---------------------------------------------------------------------------
// examples

fn table(owners: &[Option<&str>]) -> Vec<BucketState> {
    owners.iter().map(|o| BucketState::settled(*o)).collect()
}

#[test]
fn fresh_cluster_is_spread_evenly_in_runs() {
    let ms = members(&[1, 1, 1, 1]);
    let out = run(&table(&[None; 8]), &ms);
    let owners: Vec<&str> = out.owners.iter().map(|o| o.as_deref().unwrap()).collect();
    assert_eq!(
        owners,
        ["m00", "m00", "m01", "m01", "m02", "m02", "m03", "m03"]
    );
}

#[test]
fn weights_are_respected() {
    let ms = members(&[1, 3]);
    let out = run(&table(&[None; 16]), &ms);
    assert_eq!(out.counts()["m00"], 4);
    assert_eq!(out.counts()["m01"], 12);
}

#[test]
fn losing_a_member_moves_only_its_buckets() {
    let ms = members(&[1, 1, 1, 1]);
    let stable = run(&table(&[None; 16]), &ms).as_table(&table(&[None; 16]));
    let stable: Vec<BucketState> = stable
        .into_iter()
        .map(|b| BucketState::settled(b.owner.as_deref()))
        .collect();
    let mut without = ms.clone();
    without[1].eligible = false;
    let out = run(&stable, &without);
    assert_eq!(out.moves.len(), 4);
    assert!(out.moves.iter().all(|m| m.from.as_deref() == Some("m01")));
    // The flap back restores the original table.
    let back = run(&out.as_table(&stable), &ms);
    assert_eq!(back.moves.len(), 4);
    assert_eq!(
        back.owners,
        stable.iter().map(|b| b.owner.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn forced_extra_move_on_loss_is_the_minimum() {
    // The module doc's example: c owns nothing, yet its departure makes a's
    // share exactly 1, so one bucket must move from b or d to a.
    let ms = vec![
        Member::new("a", 8, true),
        Member::new("b", 2, true),
        Member::new("c", 10, true),
        Member::new("d", 6, true),
    ];
    let before = table(&[Some("b"), Some("d")]);
    let out = run(&before, &ms);
    assert!(out.moves.is_empty(), "the input is balanced");
    let without: Vec<Member> = ms.into_iter().filter(|m| m.name != "c").collect();
    let out = run(&before, &without);
    assert_eq!(out.moves.len(), 1);
    assert_eq!(out.moves[0].to.as_deref(), Some("a"));
    // New shares: a 1, b 0.25, d 0.75. b is the most over-loaded (1 - 0.25 is
    // more than 1 - 0.75), so b gives up its bucket.
    assert_eq!(out.moves[0].from.as_deref(), Some("b"));
}

#[test]
fn join_takes_from_the_most_over_loaded() {
    // 10 buckets over a (w=1, share 10/3 -> owns 4), b and c (3 each).
    let ms = members(&[1, 1, 1]);
    let mut owners = vec![Some("m00"); 4];
    owners.extend([Some("m01"); 3]);
    owners.extend([Some("m02"); 3]);
    let before = table(&owners);
    let mut after = ms.clone();
    after.push(Member::new("m03", 1, true));
    let out = run(&before, &after);
    // Shares are 2.5: 2 members keep 3, the newcomer gets 2 or 3, total 10.
    assert!(out.moves.iter().all(|m| m.to.as_deref() == Some("m03")));
    assert!(out.moves.iter().any(|m| m.from.as_deref() == Some("m00")));
    assert_eq!(
        out.moves.len(),
        theoretical_min_moves(&before, &after).unwrap()
    );
}

#[test]
fn undrain_gets_home_buckets_back_first() {
    let ms = members(&[1, 1]);
    // m01 was drained; its home buckets 4..8 went to m00 (homes kept).
    let mut before: Vec<BucketState> = (0..8)
        .map(|b| BucketState {
            owner: Some("m00".into()),
            home: Some(if b < 4 { "m00" } else { "m01" }.into()),
        })
        .collect();
    before[0].home = Some("m01".into());
    let out = run(&before, &ms);
    let got: Vec<u32> = out.moves.iter().map(|m| m.bucket).collect();
    // m01 gets back 4 buckets: all four are its home buckets (0 and three of
    // 4..8), and m00 keeps its own home buckets 1..4.
    assert_eq!(got.len(), 4);
    for g in &got {
        assert_eq!(before[*g as usize].home.as_deref(), Some("m01"));
    }
}

#[test]
fn no_eligible_members_unowns_everything() {
    let before = table(&[Some("a"), None, Some("b")]);
    let ms = vec![Member::new("a", 1, false)];
    let out = run(&before, &ms);
    assert_eq!(out.owners, vec![None, None, None]);
    assert_eq!(out.moves.len(), 2);
    let out = run(&before, &[]);
    assert_eq!(out.owners, vec![None, None, None]);
    let empty: Vec<BucketState> = vec![];
    assert!(run(&empty, &members(&[1])).owners.is_empty());
}

#[test]
fn bad_members_are_refused() {
    let t = table(&[None; 4]);
    assert_eq!(
        assign(&t, &[Member::new("a", 1, true), Member::new("a", 2, false)]),
        Err(PolicyError::DuplicateMember("a".into()))
    );
    assert_eq!(
        assign(&t, &[Member::new("a", 0, true)]),
        Err(PolicyError::ZeroWeight("a".into()))
    );
}

#[test]
fn unknown_owners_lose_their_buckets() {
    let before = table(&[Some("ghost"), Some("m00"), Some("m01"), None]);
    let out = run(&before, &members(&[1, 1]));
    assert_eq!(out.counts()["m00"], 2);
    assert_eq!(out.counts()["m01"], 2);
    assert_eq!(out.moves.len(), 2);
}

#[test]
fn large_cluster_loss_join_and_weight_change() {
    let ms: Vec<Member> = (0..256)
        .map(|i| Member::new(format!("m{i:03}"), 1 + (i % 4) as u32, true))
        .collect();
    let empty = vec![BucketState::default(); 4096];
    let stable: Vec<BucketState> = run(&empty, &ms)
        .owners
        .iter()
        .map(|o| BucketState::settled(o.as_deref()))
        .collect();
    // Loss: only the lost member's buckets move.
    let mut lost = ms.clone();
    lost[85].eligible = false;
    let out = run(&stable, &lost);
    assert!(out.moves.iter().all(|m| m.from.as_deref() == Some("m085")));
    // And back: the same buckets return.
    let back = run(&out.as_table(&stable), &ms);
    assert!(back.moves.iter().all(|m| m.to.as_deref() == Some("m085")
        && stable[m.bucket as usize].home.as_deref() == Some("m085")));
    // Join and weight change: everything goes to the changed member.
    let mut joined = ms.clone();
    joined.push(Member::new("m-new", 2, true));
    let out = run(&stable, &joined);
    assert!(out.moves.iter().all(|m| m.to.as_deref() == Some("m-new")));
    let mut heavier = ms.clone();
    heavier[128].weight *= 2;
    let out = run(&stable, &heavier);
    assert!(out.moves.iter().all(|m| m.to.as_deref() == Some("m128")));
}
