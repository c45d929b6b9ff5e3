//! The conformance suite: what every [`Store`] must answer, checked on
//! fresh stores. The SQLite store runs it in its unit tests; the ClickHouse
//! store runs it against a real server in `profiler-tests`
//! (`tests/tests/privileged/clickhouse.rs`). Besides fixed cases, it stores the same
//! random batches in the store under test and in an in-memory SQLite store
//! (the reference) and compares every answer.
//!
//! Panics (with what differed) on the first failure, like a test.
use crate::{
    model::{BatchSample, Labels, Profile, SampleType, Selector, Stored, ValidBatch},
    store::{sqlite::SqliteStore, Store, StoreError},
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
        let now = crate::clock::now_ns();
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
    types_are_kept_apart(open().as_mut());
    one_unit_per_type(open().as_mut());
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

/// A `cpu` batch of agent `a1` with one sample of `value` on `stack`,
/// window ending `end_s` seconds after [`base`].
pub fn batch(seq: u64, end_s: i64, process: &str, stack: &str, value: u64) -> ValidBatch {
    ValidBatch {
        agent_id: "a1".into(),
        sequence: seq,
        node: "n1".into(),
        agent_version: "0".into(),
        window_start_ns: at(end_s - 10),
        window_end_ns: at(end_s),
        frequency_hz: 99,
        sample_type: SampleType::cpu(),
        label_sets: vec![labels(&[("node", "n1"), ("process", process)])],
        stacks: vec![stack.into()],
        samples: vec![BatchSample {
            label_set: 0,
            stack: 0,
            value,
        }],
    }
}

/// [`batch`] of another sample type (frequency 0).
pub fn typed_batch(
    sample_type: SampleType,
    seq: u64,
    end_s: i64,
    process: &str,
    stack: &str,
    value: u64,
) -> ValidBatch {
    ValidBatch {
        sample_type,
        frequency_hz: 0,
        ..batch(seq, end_s, process, stack, value)
    }
}

/// `cpu` samples of windows ending in `(start_s, end_s]` (seconds after
/// [`base`]) matching `matchers`.
pub fn all(start_s: i64, end_s: i64, matchers: &[(&str, &str)]) -> Selector {
    Selector::cpu(
        matchers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        at(start_s),
        at(end_s),
    )
}

/// [`all`] of type `sample_type`.
pub fn of_type(sample_type: &str, start_s: i64, end_s: i64, matchers: &[(&str, &str)]) -> Selector {
    Selector {
        sample_type: sample_type.into(),
        ..all(start_s, end_s, matchers)
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
        store.label_names(None, at(0), at(300)).unwrap(),
        vec!["node", "process"]
    );
    assert_eq!(
        store.label_values("process", None, at(0), at(300)).unwrap(),
        vec!["app", "db"]
    );
    assert_eq!(
        store
            .label_values("process", None, at(195), at(300))
            .unwrap(),
        vec!["app", "db"]
    );
    assert_eq!(
        store.label_values("process", None, at(0), at(50)).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.label_values("nothing", None, at(0), at(300)).unwrap(),
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
        store.label_values("zz", None, at(0), at(300)).unwrap(),
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
        store
            .label_values("process", None, at(0), at(days(4)))
            .unwrap(),
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

/// `cpu` and `off_cpu` batches with the same labels and stacks in the same
/// windows: a query of one type sees only its values, exactly; labels and
/// the list of types follow the type; an unknown type gives nothing.
pub fn types_are_kept_apart(store: &mut dyn Store) {
    let off = SampleType::off_cpu;
    let contentions = SampleType::new("contentions", "count");
    store.insert(&batch(1, 100, "app", "main;hot", 3)).unwrap();
    assert_eq!(
        store
            .insert(&typed_batch(
                off(),
                2,
                100,
                "app",
                "main;hot",
                7_000_000_001
            ))
            .unwrap(),
        Stored::New {
            samples: 7_000_000_001
        }
    );
    store.insert(&batch(3, 200, "app", "main;cold", 2)).unwrap();
    store
        .insert(&typed_batch(off(), 4, 200, "app", "main;cold", 450))
        .unwrap();
    store
        .insert(&typed_batch(off(), 5, 200, "db", "main;io", 1_000))
        .unwrap();
    let mut only_off = typed_batch(off(), 6, 250, "app", "main;hot", 5);
    only_off.label_sets[0].push(("thread".into(), "t1".into()));
    store.insert(&only_off).unwrap();
    store
        .insert(&typed_batch(
            contentions.clone(),
            7,
            3_000,
            "app",
            "lock",
            9,
        ))
        .unwrap();

    assert_eq!(
        store.profile(&all(0, 300, &[])).unwrap().folded(),
        "main;cold 2\nmain;hot 3\n"
    );
    assert_eq!(
        store
            .profile(&of_type("off_cpu", 0, 300, &[]))
            .unwrap()
            .folded(),
        "main;cold 450\nmain;hot 7000000006\nmain;io 1000\n"
    );
    assert_eq!(
        store
            .profile(&of_type("off_cpu", 0, 300, &[("process", "app")]))
            .unwrap()
            .folded(),
        "main;cold 450\nmain;hot 7000000006\n"
    );
    assert_eq!(
        store
            .profile(&of_type("off_cpu", 150, 200, &[("process", "db")]))
            .unwrap()
            .folded(),
        "main;io 1000\n"
    );
    assert_eq!(
        store.profile(&all(0, 300, &[("process", "db")])).unwrap(),
        Profile::default()
    );
    assert_eq!(
        store
            .profile(&of_type("contentions", 0, 4_000, &[]))
            .unwrap()
            .folded(),
        "lock 9\n"
    );
    assert_eq!(
        store.profile(&of_type("wall", 0, 4_000, &[])).unwrap(),
        Profile::default(),
        "an unknown type selects nothing"
    );

    assert_eq!(
        store.sample_types(at(0), at(300)).unwrap(),
        vec![SampleType::cpu(), off()]
    );
    assert_eq!(
        store.sample_types(at(200), at(4_000)).unwrap(),
        vec![contentions.clone(), off()]
    );
    assert_eq!(
        store.sample_types(at(0), at(50)).unwrap(),
        Vec::<SampleType>::new()
    );
    assert_eq!(
        store.label_names(Some("cpu"), at(0), at(300)).unwrap(),
        vec!["node", "process"]
    );
    assert_eq!(
        store.label_names(Some("off_cpu"), at(0), at(300)).unwrap(),
        vec!["node", "process", "thread"]
    );
    assert_eq!(
        store.label_names(None, at(0), at(300)).unwrap(),
        vec!["node", "process", "thread"]
    );
    assert_eq!(
        store.label_names(Some("wall"), at(0), at(300)).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store
            .label_values("process", Some("cpu"), at(0), at(300))
            .unwrap(),
        vec!["app"]
    );
    assert_eq!(
        store
            .label_values("process", Some("off_cpu"), at(0), at(300))
            .unwrap(),
        vec!["app", "db"]
    );
    assert_eq!(
        store
            .label_values("process", Some("contentions"), at(0), at(300))
            .unwrap(),
        Vec::<String>::new()
    );
    let stats = store.stats().unwrap();
    assert_eq!(stats.batches, 7);
}

/// A type keeps the unit it was first stored with: a batch saying another
/// unit is refused whole, naming both units, and stores nothing.
pub fn one_unit_per_type(store: &mut dyn Store) {
    let delay = |unit: &str| SampleType::new("delay", unit);
    store
        .insert(&typed_batch(
            delay("nanoseconds"),
            1,
            100,
            "app",
            "wait",
            10,
        ))
        .unwrap();
    match store.insert(&typed_batch(delay("seconds"), 2, 110, "app", "wait", 3)) {
        Err(StoreError::UnitMismatch {
            sample_type,
            stored,
            got,
        }) => assert_eq!(
            (sample_type.as_str(), stored.as_str(), got.as_str()),
            ("delay", "nanoseconds", "seconds")
        ),
        other => panic!("a second unit for a type must be refused, got {other:?}"),
    }
    // In a group, the refused batch fails alone.
    let outcomes = store.insert_many(&[
        typed_batch(delay("count"), 3, 120, "app", "wait", 4),
        typed_batch(delay("nanoseconds"), 4, 120, "app", "wait", 5),
    ]);
    assert!(matches!(outcomes[0], Err(StoreError::UnitMismatch { .. })));
    assert_eq!(outcomes[1].as_ref().unwrap(), &Stored::New { samples: 5 });
    assert_eq!(
        store
            .profile(&of_type("delay", 0, 300, &[]))
            .unwrap()
            .folded(),
        "wait 15\n"
    );
    assert_eq!(
        store.sample_types(at(0), at(300)).unwrap(),
        vec![delay("nanoseconds")]
    );
    assert_eq!(store.stats().unwrap().batches, 2);
}

pub use profiler_testkit::Rng;

/// A number in `0..n` (`n` > 0) from `rng`.
fn below(rng: &mut Rng, n: i64) -> i64 {
    rng.below(n as usize) as i64
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
                    value: 1 + rng.below(9) as u64,
                });
            }
        }
    }
    if samples.is_empty() {
        samples.push(BatchSample {
            label_set: 0,
            stack: 0,
            value: 1,
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
        sample_type: SampleType::cpu(),
        label_sets,
        stacks,
        samples,
    }
}

/// A time near the data (`hours` from [`T0`]): often exactly on an hour or
/// minute boundary.
pub fn random_time(rng: &mut Rng, hours: i64) -> i64 {
    match rng.below(4) {
        0 => T0 + below(rng, hours + 2) * HOUR_NS,
        1 => T0 + below(rng, (hours + 2) * 60) * MINUTE_NS,
        2 => T0 + below(rng, (hours + 2) * 360) * 10 * S,
        _ => T0 + below(rng, (hours + 2) * HOUR_NS),
    }
}

/// All data, one process, one node and pod, over `(start, end]`.
pub fn selectors(rng: &mut Rng, start: i64, end: i64) -> Vec<Selector> {
    let sel = |m: &[(&str, String)]| {
        Selector::cpu(
            m.iter().map(|(a, b)| (a.to_string(), b.clone())).collect(),
            start,
            end,
        )
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
/// groups with resends, agent 1 sending `off_cpu` batches every other
/// window; then retention. Every answer, of either type, equals the
/// reference's.
pub fn answers_like_the_reference(store: &mut dyn Store) {
    let mut reference = SqliteStore::in_memory().unwrap();
    let mut rng = Rng::new(42);
    // Start 2 hours before a day boundary.
    let t0 = base() + 22 * HOUR_NS;
    let hours = 3;
    let mut sent = Vec::new();
    let mut pending = Vec::new();
    for w in 1..=(hours * 360 + 180) {
        for agent in 0..3 {
            let end = t0 + w * 10 * S - if agent == 2 { 3 * S } else { 0 };
            let mut b = random_batch(&mut rng, agent, w as u64, end);
            if agent == 1 && w % 2 == 0 {
                b.sample_type = SampleType::off_cpu();
                b.frequency_hz = 0;
                for s in &mut b.samples {
                    s.value *= 1_000_003;
                }
            }
            // Some batches sent twice, in the same group or a later one.
            if rng.below(20) == 0 {
                pending.push(b.clone());
            }
            pending.push(b);
        }
        if pending.len() > rng.below(64) {
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
                for sample_type in ["cpu", "off_cpu"] {
                    let sel = Selector {
                        sample_type: sample_type.into(),
                        ..sel.clone()
                    };
                    let got: Profile = store.profile(&sel).unwrap();
                    assert_eq!(got, reference.profile(&sel).unwrap(), "profile of {sel:?}");
                }
            }
            assert_eq!(
                store.sample_types(start, end).unwrap(),
                reference.sample_types(start, end).unwrap(),
                "types in ({start}, {end}]"
            );
            for sample_type in [None, Some("cpu"), Some("off_cpu")] {
                assert_eq!(
                    store.label_names(sample_type, start, end).unwrap(),
                    reference.label_names(sample_type, start, end).unwrap(),
                    "label names of {sample_type:?} in ({start}, {end}]"
                );
                for name in ["pod", "process"] {
                    assert_eq!(
                        store.label_values(name, sample_type, start, end).unwrap(),
                        reference
                            .label_values(name, sample_type, start, end)
                            .unwrap(),
                        "values of {name} of {sample_type:?} in ({start}, {end}]"
                    );
                }
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
