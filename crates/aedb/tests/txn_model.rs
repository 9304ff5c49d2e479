//! Property tests of transaction semantics against a plain in-memory model.
//!
//! Random sequences over two scopes: single and multi-op transactions with read
//! assertions, pairs of transactions from (possibly different) snapshots committed in
//! either order, scans (prefix and range, on snapshots and inside transactions) and
//! close/reopen. After every step the database must equal the model: values, versions,
//! key counts, the head sequence and the assertion-audit row count; every commit's
//! outcome (sequence, `Conflict`, `AssertionFailed` with its index) must be the
//! model's. A failed assertion is audited by a commit of its own; a conflict is not.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use aedb::{
    AedbConfig, AedbInstance, CommitError, CompareOp, DurabilityMode, Limits, ReadAssertion,
    WriteTransaction,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

const PROJECT: &str = "p";
const SYSTEM_PROJECT: &str = "_system";
const AUDIT_SCOPE: &str = "audit";
const ASSERTION_AUDIT: &str = "assertion_audit";
const SCOPES: [&str; 2] = ["s0", "s1"];
/// Key bytes: two letters and 0xFF, which exercises the prefix-successor edge.
const ALPHABET: [u8; 3] = [b'a', b'b', 0xFF];

fn config() -> AedbConfig {
    AedbConfig::development()
        .with_durability(DurabilityMode::Full)
        .with_segment_bytes(256 * 1024)
        .with_limits(Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 1024,
            snapshot_history: 8,
            ..Limits::default()
        })
}

// ---------------------------------------------------------------------------------
// The model.

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    version: u64,
    /// `None`: a tombstone (still conflicts with older snapshots).
    value: Option<Vec<u8>>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    seq: u64,
    kv: [BTreeMap<Vec<u8>, Entry>; 2],
    /// Failed assertions: each is recorded in `_system/audit/assertion_audit` by a
    /// commit of its own (it takes a sequence number, changes no user key).
    audited_failures: usize,
}

type Writes = BTreeMap<(usize, Vec<u8>), Option<Vec<u8>>>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Committed(u64),
    Conflict,
    AssertionFailed(usize),
}

impl Model {
    fn live(&self, scope: usize, key: &[u8]) -> Option<(u64, &[u8])> {
        let e = self.kv[scope].get(key)?;
        e.value.as_deref().map(|v| (e.version, v))
    }

    fn eval(&self, a: &ReadAssertion) -> bool {
        let sc = |s: &str| SCOPES.iter().position(|x| *x == s).expect("known scope");
        match a {
            ReadAssertion::KeyExists { scope, key } => self.live(sc(scope), key).is_some(),
            ReadAssertion::KeyEquals { scope, key, value } => self
                .live(sc(scope), key)
                .is_some_and(|(_, v)| v == value.as_slice()),
            ReadAssertion::KeyVersion {
                scope,
                key,
                version,
            } => self.live(sc(scope), key).map_or(0, |(v, _)| v) == *version,
            ReadAssertion::KeyCompare {
                scope,
                key,
                op,
                value,
            } => self.live(sc(scope), key).is_some_and(|(_, v)| {
                let o = v.cmp(value.as_slice());
                match op {
                    CompareOp::Lt => o.is_lt(),
                    CompareOp::Le => o.is_le(),
                    CompareOp::Eq => o.is_eq(),
                    CompareOp::Ne => o.is_ne(),
                    CompareOp::Ge => o.is_ge(),
                    CompareOp::Gt => o.is_gt(),
                }
            }),
            ReadAssertion::All(v) => v.iter().all(|a| self.eval(a)),
            ReadAssertion::Any(v) => v.iter().any(|a| self.eval(a)),
            ReadAssertion::Not(a) => !self.eval(a),
            other => panic!("model does not evaluate {other:?}"),
        }
    }

    /// First-committer-wins on the write set, then assertions (a failure is audited),
    /// then apply.
    fn commit(&mut self, snapshot_seq: u64, writes: &Writes, asserts: &[ReadAssertion]) -> Outcome {
        for (scope, key) in writes.keys() {
            if self.kv[*scope]
                .get(key)
                .is_some_and(|e| e.version > snapshot_seq)
            {
                return Outcome::Conflict;
            }
        }
        if let Some(i) = asserts.iter().position(|a| !self.eval(a)) {
            self.seq += 1;
            self.audited_failures += 1;
            return Outcome::AssertionFailed(i);
        }
        if writes.is_empty() {
            return Outcome::Committed(self.seq);
        }
        self.seq += 1;
        for ((scope, key), value) in writes {
            self.kv[*scope].insert(
                key.clone(),
                Entry {
                    version: self.seq,
                    value: value.clone(),
                },
            );
        }
        Outcome::Committed(self.seq)
    }

    /// Live pairs of `scope` in range, with `writes` (a transaction's own) on top.
    fn scan(
        &self,
        scope: usize,
        writes: &Writes,
        range: &RangeSpec,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = self.kv[scope]
            .iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect();
        for ((s, k), v) in writes {
            if *s == scope {
                merged.insert(k.clone(), v.clone());
            }
        }
        merged
            .into_iter()
            .filter(|(k, _)| range.contains(k))
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .take(limit)
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// Generated operations.

#[derive(Clone, Debug)]
enum WOp {
    Set(usize, Vec<u8>, Vec<u8>),
    Del(usize, Vec<u8>),
}

#[derive(Clone, Debug)]
enum Pick {
    /// Whatever the model holds when the transaction is built.
    Current,
    Literal(u64),
}

#[derive(Clone, Debug)]
enum AssertSpec {
    Exists(usize, Vec<u8>),
    Equals(usize, Vec<u8>, Option<Vec<u8>>),
    Version(usize, Vec<u8>, Pick),
    Compare(usize, Vec<u8>, CompareOp, Vec<u8>),
    Not(Box<AssertSpec>),
    All(Vec<AssertSpec>),
    Any(Vec<AssertSpec>),
}

#[derive(Clone, Debug)]
enum RangeSpec {
    Prefix(Vec<u8>),
    Range(Bound<Vec<u8>>, Bound<Vec<u8>>),
}

impl RangeSpec {
    fn contains(&self, k: &[u8]) -> bool {
        match self {
            RangeSpec::Prefix(p) => k.starts_with(p),
            RangeSpec::Range(s, e) => {
                (match s {
                    Bound::Included(s) => k >= s.as_slice(),
                    Bound::Excluded(s) => k > s.as_slice(),
                    Bound::Unbounded => true,
                }) && (match e {
                    Bound::Included(e) => k <= e.as_slice(),
                    Bound::Excluded(e) => k < e.as_slice(),
                    Bound::Unbounded => true,
                })
            }
        }
    }
}

fn as_bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

#[derive(Clone, Debug)]
struct TxnSpec {
    writes: Vec<WOp>,
    asserts: Vec<AssertSpec>,
    /// Scans run inside the transaction before it commits.
    scans: Vec<(usize, RangeSpec, usize)>,
}

#[derive(Clone, Debug)]
enum Op {
    Txn(TxnSpec),
    /// `a` begins; `between` (if any) commits; `b` begins; then both commit, `a`
    /// first unless `b_first`. Without `between` both read the same snapshot.
    Pair {
        a: TxnSpec,
        b: TxnSpec,
        between: Option<Vec<WOp>>,
        b_first: bool,
    },
    Scan(usize, RangeSpec, usize),
    Reopen,
}

fn scope() -> impl Strategy<Value = usize> {
    0..2usize
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(ALPHABET.to_vec()), 1..=3)
}

/// Possibly empty: bounds and prefixes may be.
fn bound_key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(ALPHABET.to_vec()), 0..=3)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0u8, 1, 2, 0xFF]), 0..=3)
}

fn wop() -> impl Strategy<Value = WOp> {
    prop_oneof![
        3 => (scope(), key(), value()).prop_map(|(s, k, v)| WOp::Set(s, k, v)),
        1 => (scope(), key()).prop_map(|(s, k)| WOp::Del(s, k)),
    ]
}

fn compare_op() -> impl Strategy<Value = CompareOp> {
    prop::sample::select(vec![
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Eq,
        CompareOp::Ne,
        CompareOp::Ge,
        CompareOp::Gt,
    ])
}

fn assert_spec() -> impl Strategy<Value = AssertSpec> {
    let leaf = prop_oneof![
        (scope(), key()).prop_map(|(s, k)| AssertSpec::Exists(s, k)),
        (scope(), key(), prop::option::of(value()))
            .prop_map(|(s, k, v)| AssertSpec::Equals(s, k, v)),
        (
            scope(),
            key(),
            prop_oneof![
                3 => Just(Pick::Current),
                1 => (0..40u64).prop_map(Pick::Literal),
            ]
        )
            .prop_map(|(s, k, p)| AssertSpec::Version(s, k, p)),
        (scope(), key(), compare_op(), value())
            .prop_map(|(s, k, op, v)| AssertSpec::Compare(s, k, op, v)),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|a| AssertSpec::Not(Box::new(a))),
            prop::collection::vec(inner.clone(), 0..3).prop_map(AssertSpec::All),
            prop::collection::vec(inner, 0..3).prop_map(AssertSpec::Any),
        ]
    })
}

fn range_spec() -> impl Strategy<Value = RangeSpec> {
    let bound = || {
        prop_oneof![
            2 => bound_key().prop_map(Bound::Included),
            2 => bound_key().prop_map(Bound::Excluded),
            1 => Just(Bound::Unbounded),
        ]
    };
    prop_oneof![
        bound_key().prop_map(RangeSpec::Prefix),
        (bound(), bound()).prop_map(|(s, e)| RangeSpec::Range(s, e)),
    ]
}

fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0..6usize, 1 => Just(1000usize)]
}

fn scan_spec() -> impl Strategy<Value = (usize, RangeSpec, usize)> {
    (scope(), range_spec(), limit())
}

fn txn_spec() -> impl Strategy<Value = TxnSpec> {
    (
        prop::collection::vec(wop(), 0..6),
        prop::collection::vec(assert_spec(), 0..3),
        prop::collection::vec(scan_spec(), 0..2),
    )
        .prop_map(|(writes, asserts, scans)| TxnSpec {
            writes,
            asserts,
            scans,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => txn_spec().prop_map(Op::Txn),
        3 => (
            txn_spec(),
            txn_spec(),
            prop::option::weighted(0.3, prop::collection::vec(wop(), 1..4)),
            any::<bool>()
        )
            .prop_map(|(a, b, between, b_first)| Op::Pair {
                a,
                b,
                between,
                b_first
            }),
        2 => scan_spec().prop_map(|(s, r, l)| Op::Scan(s, r, l)),
        1 => Just(Op::Reopen),
    ]
}

// ---------------------------------------------------------------------------------
// Running against the engine.

fn resolve(spec: &AssertSpec, m: &Model) -> ReadAssertion {
    let s = |i: usize| SCOPES[i].to_string();
    match spec {
        AssertSpec::Exists(sc, k) => ReadAssertion::KeyExists {
            scope: s(*sc),
            key: k.clone(),
        },
        AssertSpec::Equals(sc, k, v) => ReadAssertion::KeyEquals {
            scope: s(*sc),
            key: k.clone(),
            // `None`: the value the model holds now (or an impossible one if absent).
            value: v.clone().unwrap_or_else(|| {
                m.live(*sc, k)
                    .map_or_else(|| b"absent".to_vec(), |(_, v)| v.to_vec())
            }),
        },
        AssertSpec::Version(sc, k, p) => ReadAssertion::KeyVersion {
            scope: s(*sc),
            key: k.clone(),
            version: match p {
                Pick::Current => m.live(*sc, k).map_or(0, |(v, _)| v),
                Pick::Literal(v) => *v,
            },
        },
        AssertSpec::Compare(sc, k, op, v) => ReadAssertion::KeyCompare {
            scope: s(*sc),
            key: k.clone(),
            op: *op,
            value: v.clone(),
        },
        AssertSpec::Not(a) => ReadAssertion::Not(Box::new(resolve(a, m))),
        AssertSpec::All(v) => ReadAssertion::All(v.iter().map(|a| resolve(a, m)).collect()),
        AssertSpec::Any(v) => ReadAssertion::Any(v.iter().map(|a| resolve(a, m)).collect()),
    }
}

fn writes_of(ops: &[WOp]) -> Writes {
    let mut w = Writes::new();
    for op in ops {
        match op {
            WOp::Set(s, k, v) => w.insert((*s, k.clone()), Some(v.clone())),
            WOp::Del(s, k) => w.insert((*s, k.clone()), None),
        };
    }
    w
}

/// A key/value pair as the engine returns it from scans.
type SharedPair = aedb::KvPair;

fn pairs(v: Vec<SharedPair>) -> Vec<(Vec<u8>, Vec<u8>)> {
    v.into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

/// A transaction built from `spec` on the current state, with `snap` the model of
/// that state. Checks reads through the transaction (own writes on top of its
/// snapshot) before returning it.
struct Built {
    tx: WriteTransaction,
    writes: Writes,
    asserts: Vec<ReadAssertion>,
    snapshot_seq: u64,
}

fn build(db: &AedbInstance, spec: &TxnSpec, snap: &Model) -> Result<Built, TestCaseError> {
    let mut tx = db.begin_write(PROJECT).expect("begin");
    prop_assert_eq!(tx.snapshot_seq(), snap.seq);
    for op in &spec.writes {
        match op {
            WOp::Set(s, k, v) => tx.kv_set(SCOPES[*s], k, v).expect("kv_set"),
            WOp::Del(s, k) => tx.kv_del(SCOPES[*s], k).expect("kv_del"),
        }
    }
    let writes = writes_of(&spec.writes);
    // Point reads see own writes first, then the snapshot.
    for ((s, k), v) in &writes {
        let got = tx.kv_get(SCOPES[*s], k).expect("tx get");
        prop_assert_eq!(got.as_deref(), v.as_deref(), "own write of {:?}", k);
    }
    for (s, range, limit) in &spec.scans {
        let got = match range {
            RangeSpec::Prefix(p) => tx.kv_scan_prefix(SCOPES[*s], p, *limit),
            RangeSpec::Range(a, b) => {
                tx.kv_scan_range(SCOPES[*s], as_bound(a), as_bound(b), *limit)
            }
        }
        .expect("tx scan");
        prop_assert_eq!(
            pairs(got),
            snap.scan(*s, &writes, range, *limit),
            "scan inside a transaction: scope {} {:?} limit {}",
            s,
            range,
            limit
        );
    }
    let asserts: Vec<ReadAssertion> = spec.asserts.iter().map(|a| resolve(a, snap)).collect();
    for a in &asserts {
        tx.assert(a.clone());
    }
    Ok(Built {
        tx,
        writes,
        asserts,
        snapshot_seq: snap.seq,
    })
}

fn outcome(r: Result<aedb::CommitResult, CommitError>) -> Outcome {
    match r {
        Ok(c) => {
            assert!(!c.idempotent_replay);
            Outcome::Committed(c.commit_seq)
        }
        Err(CommitError::Conflict { .. }) => Outcome::Conflict,
        Err(CommitError::AssertionFailed { index, .. }) => Outcome::AssertionFailed(index),
        Err(e) => panic!("unexpected commit error: {e}"),
    }
}

fn commit(db: &AedbInstance, model: &mut Model, b: Built) -> Result<Outcome, TestCaseError> {
    let want = model.commit(b.snapshot_seq, &b.writes, &b.asserts);
    let got = outcome(db.commit(b.tx));
    prop_assert_eq!(&got, &want, "commit outcome (writes {:?})", b.writes);
    Ok(got)
}

/// The whole state: every live pair with its version, counts, head sequence, and
/// that keys the model says are absent (or deleted) read as absent.
fn check_state(db: &AedbInstance, model: &Model) -> Result<(), TestCaseError> {
    let snap = db.snapshot().expect("snapshot");
    prop_assert_eq!(snap.seq(), model.seq, "head sequence");
    let audit = snap
        .table(SYSTEM_PROJECT, AUDIT_SCOPE, ASSERTION_AUDIT)
        .expect("assertion audit table");
    prop_assert_eq!(audit.len(), model.audited_failures, "assertion audit rows");
    for (i, scope) in SCOPES.iter().enumerate() {
        let kv = snap.kv(PROJECT, scope).expect("kv");
        let all = pairs(
            kv.scan_range(Bound::Unbounded, Bound::Unbounded, usize::MAX)
                .expect("scan"),
        );
        let want: Vec<(Vec<u8>, Vec<u8>)> = model.kv[i]
            .iter()
            .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
            .collect();
        prop_assert_eq!(&all, &want, "contents of {}", scope);
        prop_assert_eq!(kv.len(), want.len(), "live key count of {}", scope);
        for (k, e) in &model.kv[i] {
            match &e.value {
                Some(v) => {
                    let got = kv.get_versioned(k).expect("read");
                    prop_assert_eq!(
                        got.map(|(ver, val)| (ver, val.to_vec())),
                        Some((e.version, v.clone())),
                        "{}/{:?}",
                        scope,
                        k
                    );
                }
                None => {
                    prop_assert!(
                        kv.get(k).expect("read").is_none(),
                        "{}/{:?} deleted",
                        scope,
                        k
                    );
                    prop_assert_eq!(kv.version(k).expect("read"), 0);
                }
            }
        }
    }
    Ok(())
}

fn scan_snapshot(
    db: &AedbInstance,
    model: &Model,
    s: usize,
    range: &RangeSpec,
    limit: usize,
) -> Result<(), TestCaseError> {
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv(PROJECT, SCOPES[s]).expect("kv");
    let got = match range {
        RangeSpec::Prefix(p) => kv.scan_prefix(p, limit).expect("scan"),
        RangeSpec::Range(a, b) => kv
            .scan_range(as_bound(a), as_bound(b), limit)
            .expect("scan"),
    };
    prop_assert_eq!(
        pairs(got),
        model.scan(s, &Writes::new(), range, limit),
        "snapshot scan: scope {} {:?} limit {}",
        s,
        range,
        limit
    );
    Ok(())
}

fn open(dir: &Path) -> AedbInstance {
    AedbInstance::open(config(), dir).expect("open")
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut db = open(tmp.path());
    db.create_project(PROJECT).expect("project");
    for s in SCOPES {
        db.create_scope(PROJECT, s).expect("scope");
    }
    let mut model = Model {
        seq: db.snapshot().expect("snapshot").seq(),
        ..Model::default()
    };
    for op in ops {
        match op {
            Op::Txn(spec) => {
                let built = build(&db, spec, &model)?;
                commit(&db, &mut model, built)?;
            }
            Op::Pair {
                a,
                b,
                between,
                b_first,
            } => {
                let snap_a = model.clone();
                let old = db.snapshot().expect("snapshot");
                let ta = build(&db, a, &snap_a)?;
                if let Some(ops) = between {
                    let mut tx = db.begin_write(PROJECT).expect("begin");
                    for op in ops {
                        match op {
                            WOp::Set(s, k, v) => tx.kv_set(SCOPES[*s], k, v).expect("set"),
                            WOp::Del(s, k) => tx.kv_del(SCOPES[*s], k).expect("del"),
                        }
                    }
                    let want = model.commit(model.seq, &writes_of(ops), &[]);
                    prop_assert_eq!(outcome(db.commit(tx)), want);
                }
                let tb = build(&db, b, &model.clone())?;
                let same_snapshot = between.is_none();
                let (first, second) = if *b_first { (tb, ta) } else { (ta, tb) };
                let first_writes = first.writes.clone();
                let second_writes = second.writes.clone();
                let second_unconditional = second.asserts.is_empty();
                let r1 = commit(&db, &mut model, first)?;
                let before_second = model.seq;
                let r2 = commit(&db, &mut model, second)?;
                // The rule, stated directly: from one snapshot, the second committer
                // on an overlapping key loses and changes nothing.
                if same_snapshot && matches!(r1, Outcome::Committed(_)) {
                    let overlap = second_writes.keys().any(|k| first_writes.contains_key(k));
                    if overlap && !first_writes.is_empty() {
                        prop_assert_eq!(&r2, &Outcome::Conflict);
                        prop_assert_eq!(model.seq, before_second);
                    } else if second_unconditional {
                        prop_assert!(matches!(r2, Outcome::Committed(_)));
                    }
                }
                // The old snapshot still shows the state before the pair.
                for (i, scope) in SCOPES.iter().enumerate() {
                    let kv = old.kv(PROJECT, scope).expect("old kv");
                    let all = pairs(
                        kv.scan_range(Bound::Unbounded, Bound::Unbounded, usize::MAX)
                            .expect("scan"),
                    );
                    prop_assert_eq!(
                        all,
                        snap_a.scan(i, &Writes::new(), &RangeSpec::Prefix(vec![]), usize::MAX)
                    );
                }
            }
            Op::Scan(s, range, limit) => scan_snapshot(&db, &model, *s, range, *limit)?,
            Op::Reopen => {
                db.close().expect("close");
                db = open(tmp.path());
                prop_assert!(db.recovery_report().torn_tail.is_none());
                prop_assert!(db.recovery_report().dropped.is_none());
                prop_assert_eq!(db.recovery_report().last_lsn, model.seq);
            }
        }
        check_state(&db, &model)?;
    }
    db.close().expect("close");
    // Whatever the sequence, a final reopen reproduces the model.
    let db = open(tmp.path());
    check_state(&db, &model)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn transactions_match_the_model(ops in prop::collection::vec(op(), 1..30)) {
        run(&ops)?;
    }
}
