//! The conformance suite: what every [`Store`] must answer, checked on
//! fresh stores. The SQLite store runs it in its unit tests; the ClickHouse
//! store runs it against a real server in `profiler-tests`
//! (`tests/tests/clickhouse.rs`). Besides fixed cases, it stores the same
//! random batches in the store under test and in an in-memory SQLite store
//! (the reference) and compares every answer.
//!
//! Panics (with what differed) on the first failure, like a test.
use crate::{
    model::{BatchSample, Labels, Profile, Selector, Stored, ValidBatch},
    store::{sqlite::SqliteStore, Store},
};

pub const S: i64 = 1_000_000_000;
pub const MINUTE_NS: i64 = 60 * S;
pub const HOUR_NS: i64 = 60 * MINUTE_NS;
pub const DAY_NS: i64 = 24 * HOUR_NS;
/// A time on an hour boundary, in 2023 (for tests that need no clock).
pub const T0: i64 = 1_700_000_000 * S - 1_700_000_000 * S % HOUR_NS;

/// Where the suite's data starts: midnight (UTC) five days ago, the same
/// for the whole run. Recent, so that a store with a table TTL (ClickHouse
/// 19.6 and later, retention a week) keeps it.
pub fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let now = crate::ingest::now_ns();
        now - now.rem_euclid(DAY_NS) - 5 * DAY_NS
    })
}

/// `s` seconds after [`base`], in ns.
pub fn at(s: i64) -> i64 {
    base() + s * S
}

/// Runs every check, each on a new store from `open`.
pub fn check_all(open: &mut dyn FnMut() -> Box<dyn Store>) {
    stores_once_and_queries_by_label_and_time(open().as_mut());
    hostile_label_values_are_just_values(open().as_mut());
    groups_store_each_batch_once(open().as_mut());
    retention_hides_and_refuses_old_windows(open().as_mut());
    answers_like_the_reference(open().as_mut());
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    let mut l: Labels = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    l.sort();
    l
}

/// A batch of agent `a1` with one sample of `count` on `stack`, window
/// ending `end_s` seconds after [`base`].
pub fn batch(seq: u64, end_s: i64, process: &str, stack: &str, count: u64) -> ValidBatch {
    ValidBatch {
        agent_id: "a1".into(),
        sequence: seq,
        node: "n1".into(),
        agent_version: "0".into(),
        window_start_ns: at(end_s - 10),
        window_end_ns: at(end_s),
        frequency_hz: 99,
        label_sets: vec![labels(&[("node", "n1"), ("process", process)])],
        stacks: vec![stack.into()],
        samples: vec![BatchSample {
            label_set: 0,
            stack: 0,
            count,
        }],
    }
}

/// Windows ending in `(start_s, end_s]` (seconds after [`base`]) matching
/// `matchers`.
pub fn all(start_s: i64, end_s: i64, matchers: &[(&str, &str)]) -> Selector {
    Selector {
        matchers: matchers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        start_ns: at(start_s),
        end_ns: at(end_s),
    }
}

pub fn stores_once_and_queries_by_label_and_time(store: &mut dyn Store) {
    assert_eq!(
        store.insert(&batch(1, 100, "app", "main;hot", 3)).unwrap(),
        Stored::New { samples: 3 }
    );
    assert_eq!(
        store.insert(&batch(1, 100, "app", "main;hot", 3)).unwrap(),
        Stored::Duplicate
    );
    store.insert(&batch(2, 200, "app", "main;hot", 2)).unwrap();
    store.insert(&batch(3, 200, "db", "main;io", 5)).unwrap();

    let p = store.profile(&all(0, 300, &[("process", "app")])).unwrap();
    assert_eq!(p.folded(), "main;hot 5\n");
    let p = store.profile(&all(0, 150, &[])).unwrap();
    assert_eq!(p.total(), 3, "only the first window ends in (0, 150]");
    assert_eq!(store.profile(&all(100, 200, &[])).unwrap().total(), 7);
    assert_eq!(store.profile(&all(0, 300, &[])).unwrap().total(), 10);
    assert_eq!(store.profile(&all(300, 200, &[])).unwrap().total(), 0);
    let stats = store.stats().unwrap();
    assert_eq!(stats.stacks, 2, "stacks are stored once");
    assert_eq!((stats.batches, stats.sample_rows), (3, 3));

    assert_eq!(
        store.label_names(at(0), at(300)).unwrap(),
        vec!["node", "process"]
    );
    assert_eq!(
        store.label_values("process", at(0), at(300)).unwrap(),
        vec!["app", "db"]
    );
    assert_eq!(
        store.label_values("process", at(195), at(300)).unwrap(),
        vec!["app", "db"]
    );
    assert_eq!(
        store.label_values("process", at(0), at(50)).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.label_values("nothing", at(0), at(300)).unwrap(),
        Vec::<String>::new()
    );
}

pub fn hostile_label_values_are_just_values(store: &mut dyn Store) {
    let hostile = "'; DROP TABLE samples; --\\' \" \n\t\0 é";
    let mut b = batch(1, 100, "app", "main;it's \\ \"quoted\"", 1);
    b.label_sets[0].push(("zz".into(), hostile.into()));
    store.insert(&b).unwrap();
    let p = store
        .profile(&all(0, 300, &[("process", "'; DROP TABLE samples; --")]))
        .unwrap();
    assert_eq!(p.total(), 0);
    let p = store.profile(&all(0, 300, &[("zz", hostile)])).unwrap();
    assert_eq!(p.folded(), "main;it's \\ \"quoted\" 1\n");
    assert_eq!(
        store.label_values("zz", at(0), at(300)).unwrap(),
        vec![hostile.to_string()]
    );
    assert_eq!(store.profile(&all(0, 300, &[])).unwrap().total(), 1);
}

/// Several batches at once, with copies inside the group and of batches
/// stored before: each stored once, outcomes in order.
pub fn groups_store_each_batch_once(store: &mut dyn Store) {
    store.insert(&batch(1, 100, "app", "a", 1)).unwrap();
    let group = [
        batch(1, 100, "app", "a", 1),
        batch(2, 110, "app", "b", 2),
        batch(3, 120, "db", "c", 4),
        batch(2, 110, "app", "b", 2),
    ];
    let outcomes: Vec<Stored> = store
        .insert_many(&group)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        outcomes,
        vec![
            Stored::Duplicate,
            Stored::New { samples: 2 },
            Stored::New { samples: 4 },
            Stored::Duplicate
        ]
    );
    assert_eq!(store.profile(&all(0, 300, &[])).unwrap().total(), 7);
    assert_eq!(store.stats().unwrap().batches, 3);
}

/// After `retain(cutoff)` no query sees a window ending before the cutoff
/// and such windows are refused; later windows are untouched.
pub fn retention_hides_and_refuses_old_windows(store: &mut dyn Store) {
    let days = |d: i64| d * 86_400;
    store
        .insert(&batch(1, days(1), "app", "old;stack", 1))
        .unwrap();
    store
        .insert(&batch(2, days(3) + 100, "old", "mid;stack", 2))
        .unwrap();
    store
        .insert(&batch(3, days(3) + 300, "app", "new;stack", 4))
        .unwrap();
    store.retain(at(days(3) + 200)).unwrap();
    assert_eq!(
        store.profile(&all(0, days(4), &[])).unwrap().folded(),
        "new;stack 4\n"
    );
    assert_eq!(
        store.label_values("process", at(0), at(days(4))).unwrap(),
        vec!["app"]
    );
    assert!(matches!(
        store.insert(&batch(4, days(3), "app", "late", 1)),
        Err(crate::store::StoreError::TooOld)
    ));
    store
        .insert(&batch(5, days(3) + 400, "app", "new;stack", 1))
        .unwrap();
    assert_eq!(store.profile(&all(0, days(4), &[])).unwrap().total(), 5);
}

/// xorshift64*, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: i64) -> i64 {
        (self.next_u64() % n as u64) as i64
    }
}

/// A batch of agent `agent` ending at `end`: random processes, pods and
/// stacks.
pub fn random_batch(rng: &mut Rng, agent: i64, seq: u64, end: i64) -> ValidBatch {
    let mut label_sets = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let mut l = vec![
            ("node".to_string(), format!("n{agent}")),
            ("process".to_string(), format!("p{}", rng.below(4))),
        ];
        if rng.below(2) == 0 {
            l.push(("pod".to_string(), format!("pod{}", rng.below(3))));
        }
        l.sort();
        l.dedup_by(|a, b| a.0 == b.0);
        if !label_sets.contains(&l) {
            label_sets.push(l);
        }
    }
    let mut stacks = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let s = format!("main;f{};g{}", rng.below(5), rng.below(3));
        if !stacks.contains(&s) {
            stacks.push(s);
        }
    }
    let mut samples = Vec::new();
    for l in 0..label_sets.len() {
        for s in 0..stacks.len() {
            if rng.below(3) > 0 {
                samples.push(BatchSample {
                    label_set: l,
                    stack: s,
                    count: 1 + rng.below(9) as u64,
                });
            }
        }
    }
    if samples.is_empty() {
        samples.push(BatchSample {
            label_set: 0,
            stack: 0,
            count: 1,
        });
    }
    ValidBatch {
        agent_id: format!("a{agent}"),
        sequence: seq,
        node: format!("n{agent}"),
        agent_version: "0".into(),
        window_start_ns: end - 10 * S,
        window_end_ns: end,
        frequency_hz: 19,
        label_sets,
        stacks,
        samples,
    }
}

/// A time near the data (`hours` from [`T0`]): often exactly on an hour or
/// minute boundary.
pub fn random_time(rng: &mut Rng, hours: i64) -> i64 {
    match rng.below(4) {
        0 => T0 + rng.below(hours + 2) * HOUR_NS,
        1 => T0 + rng.below((hours + 2) * 60) * MINUTE_NS,
        2 => T0 + rng.below((hours + 2) * 360) * 10 * S,
        _ => T0 + rng.below((hours + 2) * HOUR_NS),
    }
}

/// All data, one process, one node and pod, over `(start, end]`.
pub fn selectors(rng: &mut Rng, start: i64, end: i64) -> Vec<Selector> {
    let sel = |m: &[(&str, String)]| Selector {
        matchers: m.iter().map(|(a, b)| (a.to_string(), b.clone())).collect(),
        start_ns: start,
        end_ns: end,
    };
    vec![
        sel(&[]),
        sel(&[("process", format!("p{}", rng.below(4)))]),
        sel(&[
            ("node", format!("n{}", rng.below(3))),
            ("pod", format!("pod{}", rng.below(3))),
        ]),
    ]
}

/// Three agents, 3 hours and a half (crossing a day boundary), sent in
/// groups with resends; then retention. Every answer equals the reference's.
pub fn answers_like_the_reference(store: &mut dyn Store) {
    let mut reference = SqliteStore::in_memory().unwrap();
    let mut rng = Rng(42);
    // Start 2 hours before a day boundary.
    let t0 = base() + 22 * HOUR_NS;
    let hours = 3;
    let mut sent = Vec::new();
    let mut pending = Vec::new();
    for w in 1..=(hours * 360 + 180) {
        for agent in 0..3 {
            let end = t0 + w * 10 * S - if agent == 2 { 3 * S } else { 0 };
            let b = random_batch(&mut rng, agent, w as u64, end);
            // Some batches sent twice, in the same group or a later one.
            if rng.below(20) == 0 {
                pending.push(b.clone());
            }
            pending.push(b);
        }
        if pending.len() > rng.below(64) as usize {
            let got = store.insert_many(&pending);
            let want = reference.insert_many(&pending);
            for ((g, w), b) in got.into_iter().zip(want).zip(&pending) {
                assert_eq!(
                    g.unwrap(),
                    w.unwrap(),
                    "outcome of {} #{}",
                    b.agent_id,
                    b.sequence
                );
            }
            sent.append(&mut pending);
        }
    }
    assert_eq!(store.insert_many(&pending).len(), pending.len());
    reference.insert_many(&pending);
    let compare = |store: &dyn Store, reference: &SqliteStore, rng: &mut Rng, queries: usize| {
        let shift = t0 - T0;
        let mut ranges = vec![
            (t0, t0 + HOUR_NS),
            (t0 - HOUR_NS, t0 + (hours + 1) * HOUR_NS),
            (t0 + 10 * S, t0 + HOUR_NS - 10 * S),
            (t0 + 2 * HOUR_NS - 1, t0 + 2 * HOUR_NS + 1),
        ];
        for _ in 0..queries {
            let (a, b) = (
                random_time(rng, hours) + shift,
                random_time(rng, hours) + shift,
            );
            ranges.push((a.min(b), a.max(b)));
        }
        for (start, end) in ranges {
            for sel in selectors(rng, start, end) {
                let got: Profile = store.profile(&sel).unwrap();
                assert_eq!(got, reference.profile(&sel).unwrap(), "profile of {sel:?}");
            }
            assert_eq!(
                store.label_names(start, end).unwrap(),
                reference.label_names(start, end).unwrap(),
                "label names in ({start}, {end}]"
            );
            for name in ["pod", "process"] {
                assert_eq!(
                    store.label_values(name, start, end).unwrap(),
                    reference.label_values(name, start, end).unwrap(),
                    "values of {name} in ({start}, {end}]"
                );
            }
        }
        assert_eq!(
            store.stats().unwrap().batches,
            reference.stats().unwrap().batches
        );
    };
    compare(store, &reference, &mut rng, 40);
    // Retention inside the data.
    let cutoff = t0 + HOUR_NS + 17 * MINUTE_NS + 5 * S;
    store.retain(cutoff).unwrap();
    reference.retain(cutoff).unwrap();
    compare(store, &reference, &mut rng, 20);
}
