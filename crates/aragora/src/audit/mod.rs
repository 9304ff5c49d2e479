//! The security audit log: every security event appended to a hash chain in the
//! store, fail-closed (an action whose audit record cannot be written fails), and
//! searchable by action, actor and time.
//!
//! Entry ids are `{timestamp_us:016x}{seq:016x}`: byte order is time order, so
//! "the last N minutes" is a range scan. The chain head (seq, hash, id) is a
//! record of its own, written with compare-and-set in the same batch as the
//! entry, so two writers (replicas on a shared store) cannot fork the chain.
//!
//! The same batch updates what is derived from the entries: counts per action
//! and time bucket (`counts`, for search totals that are not a scan) and the
//! index of which secrets each user read (`access`, for rotation-by-accessor).
//! Retention (`retention`) removes entries an export holds and leaves an
//! anchor the live chain continues from.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod access;
pub mod counts;
pub mod export;
pub mod retention;

use crate::clock;
use crate::store::{
    Collection, Durability, Expect, ListQuery, Receipt, Record, Store, StoreError, WriteOp, decode,
    get_json,
};

const HEAD_ID: &str = "audit_head";
/// The retention anchor's record in `Collection::AuditChain`.
const ANCHOR_ID: &str = "audit_anchor";
/// Entries one bounded search (the HTTP API's) reads at most for one page:
/// a filter matching few entries of a busy window returns a short page and
/// `next_before` to continue, instead of reading the whole window.
pub const SEARCH_SCAN_BUDGET: usize = 20_000;
/// Bound on one search response; more is paged with `before`.
pub const MAX_SEARCH_LIMIT: usize = 10_000;
pub const DEFAULT_SEARCH_LIMIT: usize = 1_000;
/// Conflicts retried before an append gives up (another replica appending).
const APPEND_RETRIES: usize = 64;
/// Most entries one group commit writes: the bound on one batch's size
/// (entries are small: details are typed and bounded by their writers).
const MAX_GROUP: usize = 128;

/// The pause before retry `attempt` of an append whose head moved: random in
/// [0, min(2^attempt, 32) ms), about a second in all over `APPEND_RETRIES`.
fn conflict_pause(attempt: usize) -> std::time::Duration {
    crate::store::conflict_pause(attempt, 1_000, 5)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

/// What happened, before it is placed in the chain.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub action: &'static str,
    pub actor: String,
    pub ip_address: Option<String>,
    pub details: Value,
    pub outcome: Outcome,
}

impl AuditEvent {
    pub fn new(action: &'static str, actor: impl Into<String>, outcome: Outcome) -> Self {
        Self {
            action,
            actor: actor.into(),
            ip_address: None,
            details: Value::Object(Default::default()),
            outcome,
        }
    }

    pub fn ip(mut self, ip: Option<String>) -> Self {
        self.ip_address = ip;
        self
    }

    /// The event's details: a typed struct of the action's fields (stored and
    /// searched as a JSON object).
    pub fn details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_value(details).unwrap_or_else(|e| {
            let mut m = serde_json::Map::new();
            m.insert("details_error".into(), Value::String(e.to_string()));
            Value::Object(m)
        });
        self
    }
}

/// One entry as stored and as the search API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub seq: u64,
    pub timestamp: String,
    pub timestamp_us: i64,
    pub action: String,
    pub actor: String,
    pub ip_address: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
    pub outcome: Outcome,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct ChainHead {
    seq: u64,
    hash: String,
    id: String,
    timestamp_us: i64,
    /// Entries with ids from this one on are in the counts and the access
    /// index ("": all of them). Absent in a head written before those
    /// existed; the first append after an upgrade sets it to its own id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    indexed_from: Option<String>,
}

/// Where the live chain starts once retention removed its beginning: the
/// last removed entry, as the export that holds it has it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChainAnchor {
    /// Sequence number of the last removed entry.
    pub seq: u64,
    /// Its hash: the first live entry's `prev_hash`.
    pub hash: String,
    /// Its id: live entries all sort after it.
    pub id: String,
    pub timestamp_us: i64,
    /// The export directory whose signed segments held every removed entry.
    pub export_dir: String,
    /// Entries removed in all.
    pub removed: u64,
    pub updated_at: String,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log write failed (the action was not performed): {0}")]
    Write(StoreError),
    #[error("audit log read failed: {0}")]
    Read(StoreError),
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The entry that extends the chain at `head` with `event` at `now_us`, and
/// the new head.
fn chain_entry(head: &ChainHead, event: &AuditEvent, now_us: i64) -> (AuditEntry, ChainHead) {
    let now = now_us.max(head.timestamp_us);
    let seq = head.seq + 1;
    let mut entry = AuditEntry {
        id: entry_id(now, seq),
        seq,
        timestamp: clock::format_us(now),
        timestamp_us: now,
        action: event.action.to_string(),
        actor: event.actor.clone(),
        ip_address: event.ip_address.clone(),
        details: event.details.clone(),
        outcome: event.outcome,
        prev_hash: if head.seq == 0 {
            GENESIS.into()
        } else {
            head.hash.clone()
        },
        hash: String::new(),
    };
    entry.hash = entry_hash(&entry);
    let next = ChainHead {
        seq,
        hash: entry.hash.clone(),
        id: entry.id.clone(),
        timestamp_us: now,
        indexed_from: head.indexed_from.clone(),
    };
    (entry, next)
}

/// The head record's expectation: absent before the first entry.
fn head_expect(head_version: u64) -> Expect {
    if head_version == 0 {
        Expect::Absent
    } else {
        Expect::Version(head_version)
    }
}

fn entry_id(timestamp_us: i64, seq: u64) -> String {
    format!("{:016x}{seq:016x}", timestamp_us.max(0))
}

/// The hash covers every field but itself, in a fixed order, and the previous
/// hash: changing, removing or reordering an entry breaks every later link.
fn entry_hash(e: &AuditEntry) -> String {
    let canonical = serde_json::json!([
        e.prev_hash,
        e.seq,
        e.id,
        e.timestamp_us,
        e.action,
        e.actor,
        e.ip_address,
        e.details,
        e.outcome,
    ]);
    hex::encode(digest(&SHA256, canonical.to_string().as_bytes()))
}

#[derive(Debug, Default, Clone)]
pub struct SearchFilter {
    pub action: Option<String>,
    pub actor: Option<String>,
    /// Only entries of the last `minutes`.
    pub minutes: Option<u64>,
    /// Only entries older than this entry id (paging backwards).
    pub before: Option<String>,
    pub limit: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SearchResult {
    /// The newest `limit` matches, oldest first. Fewer than `limit` with
    /// `next_before` set: the page's read budget ran out first (a filter
    /// matching few entries of a busy window); continue with `before`.
    pub entries: Vec<AuditEntry>,
    /// Every match in the window older than `before` (not only this page).
    /// Exact when `total_is_exact`; otherwise an estimate.
    pub total: u64,
    /// Whether `total` is a count. It is for an action filter (or none),
    /// from the counts kept per action and time bucket, and for any filter
    /// whose matches all fit in the page. With an actor filter and more
    /// matches than the page, it is estimated from the share of the page's
    /// reads that matched; and with a partial edge minute of more than
    /// 4096 entries, that minute is prorated.
    pub total_is_exact: bool,
    /// Pass as `before` for the previous (older) page; absent on the last page.
    pub next_before: Option<String>,
    /// More matches than this page holds (`total` > entries): page with
    /// `before=next_before`, or a larger `limit`, before drawing conclusions.
    pub truncated: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub ok: bool,
    pub entries_checked: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub problems: Vec<String>,
    /// Present once retention removed the chain's beginning: the live chain
    /// was checked from this anchor (the last removed entry) instead of the
    /// genesis hash; `aragora audit verify --export DIR` checks the anchor
    /// against the export that holds the removed entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<ChainAnchor>,
}

/// An event waiting for a group commit, and where its outcome goes.
#[derive(Debug)]
struct Queued {
    event: AuditEvent,
    outcome: Arc<Mutex<Option<GroupOutcome>>>,
}

type GroupOutcome = Result<(Receipt, AuditEntry), AuditError>;

#[derive(Debug)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    /// Microseconds since the epoch: `clock::now_us` but in tests.
    now: fn() -> i64,
    /// Serializes appends of this process: the head is read, extended and written
    /// under it, and only the in-memory part of the write happens while it is held.
    head: Mutex<Option<(u64, ChainHead)>>,
    /// Events without a change of their own, waiting for whoever holds `head`
    /// next to write them with its own in one batch (group commit). Its
    /// length is bounded by the threads appending (each waits for its own).
    queue: Mutex<Vec<Queued>>,
    /// The count and access-index records this process wrote last, at the
    /// version its write gave them: an append extends them without reading
    /// them back (a round trip under the head lock on a shared store). A
    /// stale one fails its compare-and-set, which clears this and retries.
    /// Used under the head lock; at most `MAX_DERIVED_CACHE` records.
    derived: Mutex<HashMap<(Collection, String), Record>>,
}

/// Records `AuditLog::derived` holds at most (the current buckets and the
/// recently read secrets' index records); when full it starts over.
const MAX_DERIVED_CACHE: usize = 4_096;

impl AuditLog {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_clock(store, clock::now_us)
    }

    /// A log whose entries are stamped, and whose windows measured, by `now`
    /// (microseconds since the epoch) instead of the system clock: for tests
    /// and tools that need entries at chosen times.
    pub fn with_clock(store: Arc<dyn Store>, now: fn() -> i64) -> Self {
        Self {
            store,
            now,
            head: Mutex::new(None),
            queue: Mutex::new(Vec::new()),
            derived: Mutex::new(HashMap::new()),
        }
    }

    /// The store the log lives in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Appends one event, durably.
    pub fn record(&self, event: AuditEvent) -> Result<AuditEntry, AuditError> {
        self.append_grouped(event, true)
    }

    /// Appends one event without waiting for its fsync (the store syncs it
    /// within its batch interval, and any later durable append covers it).
    /// For best-effort entries on paths an outsider drives (refused
    /// authentications): they must not cost an fsync each.
    pub fn record_unsynced(&self, event: AuditEvent) -> Result<AuditEntry, AuditError> {
        self.append_grouped(event, false)
    }

    /// Group commit. The event joins the queue; whoever gets the head lock
    /// first writes every queued event (up to `MAX_GROUP`) as one chained batch,
    /// so concurrent appends cost one store write, not one each: on a shared
    /// store each write is a network round trip and a synchronous commit,
    /// which the head lock would otherwise make every append wait out in turn.
    fn append_grouped(&self, event: AuditEvent, durable: bool) -> Result<AuditEntry, AuditError> {
        let outcome = Arc::new(Mutex::new(None));
        self.queue.lock().push(Queued {
            event,
            outcome: outcome.clone(),
        });
        let (receipt, entry) = loop {
            let mut guard = self.head.lock();
            // A writer fills the outcomes of its group before releasing the head
            // lock, so while this thread holds it an unfilled outcome means the
            // event is still queued.
            if let Some(done) = outcome.lock().take() {
                break done?;
            }
            let group: Vec<Queued> = {
                let mut queue = self.queue.lock();
                let n = queue.len().min(MAX_GROUP);
                queue.drain(..n).collect()
            };
            if group.is_empty() {
                // Only a writer that took this event and then panicked leaves
                // it neither queued nor answered.
                return Err(AuditError::Write(StoreError::Backend(
                    "an audit append was lost by a writer that failed mid-batch".into(),
                )));
            }
            self.write_group(&mut guard, group);
        };
        // Durability outside the lock: concurrent appends share one fsync.
        if durable {
            self.store
                .wait_durable(receipt)
                .map_err(AuditError::Write)?;
        }
        Ok(entry)
    }

    /// Writes `group` as one batch chained from the head, retrying when
    /// another replica moved the head, and fills every member's outcome.
    fn write_group(&self, head_slot: &mut Option<(u64, ChainHead)>, group: Vec<Queued>) {
        let mut attempt = 0;
        let outcome: GroupOutcome = loop {
            attempt += 1;
            if attempt > 1 {
                std::thread::sleep(conflict_pause(attempt));
            }
            let (head_version, mut head) = match head_slot.as_ref() {
                Some(h) => h.clone(),
                None => match self.load_head() {
                    Ok(h) => h,
                    Err(e) => break Err(e),
                },
            };
            let first_seq = head.seq;
            let mut batch = Vec::with_capacity(group.len() + 8);
            let mut entries = Vec::with_capacity(group.len());
            let mut encode_error = None;
            for queued in &group {
                let (entry, next) = chain_entry(&head, &queued.event, (self.now)());
                match WriteOp::put_json(Collection::Audit, entry.id.clone(), &entry, Expect::Absent)
                {
                    Ok(op) => batch.push(op),
                    Err(e) => {
                        encode_error = Some(e);
                        break;
                    }
                }
                head = next;
                entries.push(entry);
            }
            if let Some(e) = encode_error {
                break Err(AuditError::Write(e));
            }
            mark_indexed(&mut head, first_seq, &entries);
            let derived = match self.derived_ops(&entries) {
                Ok(ops) => ops,
                Err(e) => break Err(e),
            };
            batch.extend(derived.iter().cloned());
            match WriteOp::put_json(
                Collection::AuditChain,
                HEAD_ID,
                &head,
                head_expect(head_version),
            ) {
                Ok(op) => batch.push(op),
                Err(e) => break Err(AuditError::Write(e)),
            }
            match self.store.write(batch, Durability::Visible) {
                Ok(receipt) => {
                    *head_slot = Some((receipt.seq, head));
                    self.remember(&derived, receipt.seq);
                    for (queued, entry) in group.iter().zip(entries) {
                        *queued.outcome.lock() = Some(Ok((receipt, entry)));
                    }
                    return;
                }
                Err(e @ StoreError::Conflict { .. }) => {
                    // Someone else moved the head (or a count retention
                    // changed): forget it and retry.
                    *head_slot = None;
                    self.derived.lock().clear();
                    if attempt >= APPEND_RETRIES {
                        break Err(AuditError::Write(e));
                    }
                }
                Err(e) => {
                    *head_slot = None;
                    self.derived.lock().clear();
                    break Err(AuditError::Write(e));
                }
            }
        };
        for queued in &group {
            *queued.outcome.lock() = Some(outcome.clone());
        }
    }

    /// Appends one event in the same atomic write as `ops` (the change it
    /// describes): both apply or neither. A conflict in `ops` is returned as
    /// `RecordError::Ops` so the caller can re-read and retry its change.
    pub fn record_with(
        &self,
        event: AuditEvent,
        ops: Vec<WriteOp>,
    ) -> Result<AuditEntry, RecordError> {
        self.append(event, ops)
    }

    /// One event in the same batch as `ops` (not grouped: a conflict on `ops`
    /// must fail this event alone).
    fn append(&self, event: AuditEvent, ops: Vec<WriteOp>) -> Result<AuditEntry, RecordError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                // Another replica moved the head (a shared store): without a
                // pause the two keep colliding in step under load; a random
                // one, growing with the attempts, lets one of them through.
                std::thread::sleep(conflict_pause(attempt));
            }
            let (receipt, entry) = {
                let mut guard = self.head.lock();
                let (head_version, head) = match guard.as_ref() {
                    Some(h) => h.clone(),
                    None => self.load_head().map_err(RecordError::Audit)?,
                };
                let (entry, mut new_head) = chain_entry(&head, &event, (self.now)());
                mark_indexed(&mut new_head, head.seq, std::slice::from_ref(&entry));
                let head_expect = head_expect(head_version);
                let mut batch = ops.clone();
                let n_ops = batch.len();
                batch.push(
                    WriteOp::put_json(Collection::Audit, entry.id.clone(), &entry, Expect::Absent)
                        .map_err(|e| RecordError::Audit(AuditError::Write(e)))?,
                );
                let derived = self
                    .derived_ops(std::slice::from_ref(&entry))
                    .map_err(RecordError::Audit)?;
                batch.extend(derived.iter().cloned());
                batch.push(
                    WriteOp::put_json(Collection::AuditChain, HEAD_ID, &new_head, head_expect)
                        .map_err(|e| RecordError::Audit(AuditError::Write(e)))?,
                );
                match self.store.write(batch, Durability::Visible) {
                    Ok(receipt) => {
                        *guard = Some((receipt.seq, new_head));
                        self.remember(&derived, receipt.seq);
                        (receipt, entry)
                    }
                    Err(e @ StoreError::Conflict { .. }) => {
                        // A conflict on the caller's ops (not on the chain's own records) is
                        // theirs to resolve.
                        let ours = matches!(&e, StoreError::Conflict { collection, id, .. }
                            if *collection != Collection::Audit.name()
                                && *collection != Collection::AuditCounts.name()
                                && *collection != Collection::AuditAccess.name()
                                && !(*collection == Collection::AuditChain.name() && id == HEAD_ID));
                        // Someone else moved the head: forget it and retry.
                        *guard = None;
                        self.derived.lock().clear();
                        if ours && n_ops > 0 {
                            return Err(RecordError::Ops(e));
                        }
                        if attempt >= APPEND_RETRIES {
                            return Err(RecordError::Audit(AuditError::Write(e)));
                        }
                        continue;
                    }
                    Err(e) => {
                        *guard = None;
                        self.derived.lock().clear();
                        return Err(RecordError::Audit(AuditError::Write(e)));
                    }
                }
            };
            // Durability outside the lock: concurrent appends share one fsync.
            self.store
                .wait_durable(receipt)
                .map_err(|e| RecordError::Audit(AuditError::Write(e)))?;
            return Ok(entry);
        }
    }

    fn load_head(&self) -> Result<(u64, ChainHead), AuditError> {
        Ok(
            get_json::<ChainHead>(self.store.as_ref(), Collection::AuditChain, HEAD_ID)
                .map_err(AuditError::Read)?
                .unwrap_or_default(),
        )
    }

    /// The retention anchor and its version (0: none, the chain starts at
    /// the genesis hash).
    pub fn anchor(&self) -> Result<Option<ChainAnchor>, AuditError> {
        Ok(self.load_anchor()?.map(|(_, a)| a))
    }

    fn load_anchor(&self) -> Result<Option<(u64, ChainAnchor)>, AuditError> {
        get_json::<ChainAnchor>(self.store.as_ref(), Collection::AuditChain, ANCHOR_ID)
            .map_err(AuditError::Read)
    }

    /// The count and access-index ops for `entries` (about to be appended),
    /// read and built while the head lock is held: their compare-and-set on
    /// the versions read here fails the batch if anything else changed them.
    fn derived_ops(&self, entries: &[AuditEntry]) -> Result<Vec<WriteOp>, AuditError> {
        let count_deltas = counts::deltas(entries);
        let access_deltas = access::deltas(entries);
        let keys: Vec<(Collection, &str)> = count_deltas
            .keys()
            .map(|id| (Collection::AuditCounts, id.as_str()))
            .chain(
                access_deltas
                    .keys()
                    .map(|id| (Collection::AuditAccess, id.as_str())),
            )
            .collect();
        let mut current: Vec<Option<Record>> = Vec::with_capacity(keys.len());
        let mut missing: Vec<usize> = Vec::new();
        {
            let cache = self.derived.lock();
            for (i, (c, id)) in keys.iter().enumerate() {
                let hit = cache.get(&(*c, (*id).to_string())).cloned();
                if hit.is_none() {
                    missing.push(i);
                }
                current.push(hit);
            }
        }
        if !missing.is_empty() {
            let ask: Vec<(Collection, &str)> = missing.iter().map(|i| keys[*i]).collect();
            let found = self.store.get_many(&ask).map_err(AuditError::Read)?;
            for (i, r) in missing.into_iter().zip(found) {
                current[i] = r;
            }
        }
        let (c, a) = current.split_at(count_deltas.len());
        let mut ops = counts::apply_ops(&count_deltas, c, false).map_err(AuditError::Write)?;
        ops.extend(access::apply_ops(&access_deltas, a).map_err(AuditError::Write)?);
        Ok(ops)
    }

    /// After a write of `derived` at `version`: what those records now hold.
    fn remember(&self, derived: &[WriteOp], version: u64) {
        let mut cache = self.derived.lock();
        if cache.len() + derived.len() > MAX_DERIVED_CACHE {
            cache.clear();
        }
        for op in derived {
            match op {
                WriteOp::Put {
                    collection,
                    id,
                    value,
                    ..
                } => {
                    cache.insert(
                        (*collection, id.clone()),
                        Record {
                            version,
                            value: value.as_slice().into(),
                        },
                    );
                }
                WriteOp::Delete { collection, id, .. } => {
                    cache.remove(&(*collection, id.clone()));
                }
            }
        }
    }

    /// Every secret `user_id` read successfully, with how many times (all
    /// time, retention included: the index keeps what the export holds).
    /// Reads the access index, plus the log before `indexed_from` for
    /// entries written before the index existed.
    pub fn secrets_read_by(
        &self,
        user_id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, AuditError> {
        let (_, head) = self.load_head()?;
        let mut read = access::read_by(self.store.as_ref(), user_id)?;
        let legacy_end = match head.indexed_from.as_deref() {
            Some("") => return Ok(read),
            Some(id) => Some(id.to_string()),
            // Nothing indexed yet: the whole log is from before the index.
            None if head.seq == 0 => return Ok(read),
            None => None,
        };
        let mut before = legacy_end;
        loop {
            let page = self.search(&SearchFilter {
                action: Some(access::SECRET_ACCESS.into()),
                actor: Some(user_id.to_string()),
                minutes: None,
                before: before.clone(),
                limit: MAX_SEARCH_LIMIT,
            })?;
            for e in &page.entries {
                if let Some((_, secret)) = access::read_of(e) {
                    *read.entry(secret.to_string()).or_insert(0) += 1;
                }
            }
            match page.next_before {
                Some(b) => before = Some(b),
                None => return Ok(read),
            }
        }
    }

    /// The newest `limit` entries matching the filter, oldest first, and how
    /// many match in all. Reads only the window (newest to oldest, stopping
    /// once the page is full), skipping, for an action filter, the minutes
    /// the counts show hold none of that action.
    pub fn search(&self, f: &SearchFilter) -> Result<SearchResult, AuditError> {
        self.search_bounded(f, usize::MAX)
    }

    /// `search` reading at most `max_scan` entries for the page (the HTTP
    /// API passes `SEARCH_SCAN_BUDGET`): when the budget runs out first, the
    /// page holds what was found and `next_before` continues below it.
    pub fn search_bounded(
        &self,
        f: &SearchFilter,
        max_scan: usize,
    ) -> Result<SearchResult, AuditError> {
        let limit = f.limit.clamp(1, MAX_SEARCH_LIMIT);
        let floor = f.minutes.map(|m| {
            let cutoff = (self.now)().saturating_sub(
                i64::try_from(m)
                    .unwrap_or(i64::MAX / 60_000_000)
                    .saturating_mul(60_000_000),
            );
            counts::time_key(cutoff)
        });
        let lo = floor.unwrap_or_default();
        let hi = f.before.as_deref();
        let (_, head) = self.load_head()?;
        let mut scan = Scan {
            store: self.store.as_ref(),
            filter: f,
            limit,
            budget: max_scan.max(1),
            entries: Vec::new(),
            matched: 0,
            of_action: 0,
            read: 0,
            next_before: None,
            done: false,
        };
        match (&f.action, head.indexed_from.as_deref()) {
            (Some(action), Some(indexed_from)) => {
                // Counted part: only the minutes holding the action.
                let counted_lo = lo.as_str().max(indexed_from).to_string();
                let mut to_us = hi
                    .and_then(counts::id_time)
                    .unwrap_or(head.timestamp_us.max((self.now)()));
                let from_us =
                    counts::floor_to(counts::id_time(&counted_lo).unwrap_or(0), counts::MINUTE_US);
                while !scan.done && to_us >= from_us {
                    let (minutes, next_to) =
                        counts::minutes_with(self.store.as_ref(), action, from_us, to_us, 256)?;
                    for m in minutes {
                        let start = counts::time_key(m).max(counted_lo.clone());
                        let end = counts::time_key(m + counts::MINUTE_US);
                        let end = match hi {
                            Some(h) if h < end.as_str() => h.to_string(),
                            _ => end,
                        };
                        scan.range(&start, Some(&end))?;
                        if scan.done {
                            break;
                        }
                    }
                    match next_to {
                        Some(t) => to_us = t,
                        None => break,
                    }
                }
                // Before the counts began (an upgraded log): read it all.
                if !scan.done && lo.as_str() < indexed_from {
                    let end = match hi {
                        Some(h) if h < indexed_from => h,
                        _ => indexed_from,
                    };
                    scan.range(&lo, Some(end))?;
                }
            }
            _ => scan.range(&lo, hi)?,
        }
        let complete = !scan.done;
        let (total, total_is_exact) = if complete {
            (scan.matched, true)
        } else {
            match head.indexed_from.as_deref() {
                // Nothing counted yet: what was seen is a lower bound.
                None => (scan.matched, false),
                Some(indexed_from) => {
                    let counted_lo = lo.as_str().max(indexed_from);
                    let mut t = counts::count_range(
                        self.store.as_ref(),
                        f.action.as_deref(),
                        counted_lo,
                        hi,
                        head.timestamp_us.max((self.now)()),
                    )?;
                    if lo.as_str() < indexed_from {
                        t.exact = false;
                    }
                    if f.actor.is_some() {
                        // The actor's share of the entries of the action read
                        // so far, applied to all of them.
                        if scan.of_action > 0 {
                            t.n = (t.n as f64 * scan.matched as f64 / scan.of_action as f64).round()
                                as u64;
                        }
                        t.exact = false;
                    }
                    (t.n.max(scan.matched), t.exact)
                }
            }
        };
        let mut entries = scan.entries;
        let next_before = scan.next_before;
        entries.reverse();
        Ok(SearchResult {
            truncated: next_before.is_some(),
            entries,
            total,
            total_is_exact,
            next_before,
        })
    }

    /// Walks the live chain: consecutive sequence numbers, each hash
    /// recomputed, each link to the previous hash, and the head record naming
    /// the last entry. It starts at the genesis hash, or, once retention
    /// removed the chain's beginning, at the anchor (the last removed entry).
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        const PAGE: usize = 1000;
        const MAX_PROBLEMS: usize = 20;
        let mut problems = Vec::new();
        let anchor = self.anchor()?;
        let mut prev_hash = anchor
            .as_ref()
            .map_or_else(|| GENESIS.to_string(), |a| a.hash.clone());
        let mut expected_seq = anchor.as_ref().map_or(1, |a| a.seq + 1);
        let mut checked = 0u64;
        let mut after: Option<String> = anchor.as_ref().map(|a| a.id.clone());
        if let Some(a) = &anchor {
            // Anything at or before the anchor should have been removed with it.
            let stale = self
                .store
                .list(
                    Collection::Audit,
                    &ListQuery {
                        start: Bound::Unbounded,
                        end: Bound::Included(a.id.as_str()),
                        reverse: false,
                        limit: 1,
                    },
                )
                .map_err(AuditError::Read)?;
            if let Some((id, _)) = stale.first() {
                problems.push(format!(
                    "entry {id} is at or before the retention anchor (seq {}, {}) but still stored",
                    a.seq, a.id
                ));
            }
        }
        loop {
            let page = self
                .store
                .list(Collection::Audit, &ListQuery::after(after.as_deref(), PAGE))
                .map_err(AuditError::Read)?;
            let n = page.len();
            for (id, record) in page {
                after = Some(id.clone());
                checked += 1;
                let e: AuditEntry = match decode(Collection::Audit, &id, &record) {
                    Ok(e) => e,
                    Err(err) => {
                        problems.push(format!("entry {id}: {err}"));
                        continue;
                    }
                };
                if e.seq != expected_seq {
                    problems.push(format!(
                        "entry {id}: sequence {} where {expected_seq} was expected (an entry is missing or reordered)",
                        e.seq
                    ));
                }
                if e.id != id {
                    problems.push(format!("entry {id}: stored under another id ({})", e.id));
                }
                if e.prev_hash != prev_hash {
                    problems.push(format!(
                        "entry {id} (seq {}): does not link to the previous entry's hash",
                        e.seq
                    ));
                }
                if entry_hash(&e) != e.hash {
                    problems.push(format!(
                        "entry {id} (seq {}): content does not match its hash (modified)",
                        e.seq
                    ));
                }
                prev_hash = e.hash.clone();
                expected_seq = e.seq + 1;
                if problems.len() >= MAX_PROBLEMS {
                    break;
                }
            }
            if n < PAGE || problems.len() >= MAX_PROBLEMS {
                break;
            }
        }
        let (_, head) = self.load_head()?;
        if head.seq != expected_seq - 1 || (head.seq > 0 && head.hash != prev_hash) {
            problems.push(format!(
                "chain head names seq {} but the log ends at seq {} (entries removed from the end?)",
                head.seq,
                expected_seq - 1
            ));
        }
        Ok(VerifyReport {
            ok: problems.is_empty(),
            entries_checked: checked,
            head_seq: head.seq,
            head_hash: head.hash,
            problems,
            anchor,
        })
    }
}

/// Sets the head's `indexed_from` when it has none: the batch's first entry
/// is the first counted and indexed (or all are, for a log that was empty).
fn mark_indexed(head: &mut ChainHead, seq_before: u64, entries: &[AuditEntry]) {
    if head.indexed_from.is_none() {
        head.indexed_from = Some(if seq_before == 0 {
            String::new()
        } else {
            entries.first().map(|e| e.id.clone()).unwrap_or_default()
        });
    }
}

/// The fields a search filters on, read without building the entry (its
/// details are skipped, not allocated): most entries a filtered search reads
/// are not kept.
#[derive(Deserialize)]
pub(crate) struct Probe<'a> {
    #[serde(borrow)]
    pub action: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub actor: std::borrow::Cow<'a, str>,
}

pub(crate) fn decode_probe<'a>(id: &str, record: &'a Record) -> Result<Probe<'a>, StoreError> {
    serde_json::from_slice(&record.value).map_err(|e| StoreError::Corrupt {
        collection: Collection::Audit.name(),
        id: id.to_string(),
        reason: e.to_string(),
    })
}

/// One search's walk over id ranges, newest first, until the page is full
/// (one match more than `limit`, to know there are more) or the budget is spent.
struct Scan<'a> {
    store: &'a dyn Store,
    filter: &'a SearchFilter,
    limit: usize,
    budget: usize,
    /// Matches kept, newest first.
    entries: Vec<AuditEntry>,
    matched: u64,
    /// Entries read that have the filter's action (all, without one).
    of_action: u64,
    read: usize,
    next_before: Option<String>,
    /// Stopped before the end of the ranges.
    done: bool,
}

impl Scan<'_> {
    /// Reads `[lo, hi)` newest first (`hi` None: no upper bound).
    fn range(&mut self, lo: &str, hi: Option<&str>) -> Result<(), AuditError> {
        const PAGE: usize = 1000;
        if hi.is_some_and(|h| h <= lo) {
            return Ok(());
        }
        let mut upper: Option<String> = hi.map(str::to_string);
        while !self.done {
            let want = (self.limit + 1).saturating_sub(self.entries.len());
            let page_size = want
                .clamp(16, PAGE)
                .min(self.budget.saturating_sub(self.read).max(1));
            let q = ListQuery {
                start: Bound::Included(lo),
                end: upper.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                reverse: true,
                limit: page_size,
            };
            let page = self
                .store
                .list(Collection::Audit, &q)
                .map_err(AuditError::Read)?;
            let n = page.len();
            for (id, record) in page {
                self.read += 1;
                let probe: Probe<'_> = decode_probe(&id, &record).map_err(AuditError::Read)?;
                if self
                    .filter
                    .action
                    .as_deref()
                    .is_none_or(|a| a == probe.action)
                {
                    self.of_action += 1;
                    if self
                        .filter
                        .actor
                        .as_deref()
                        .is_none_or(|a| a == probe.actor)
                    {
                        self.matched += 1;
                        if self.entries.len() < self.limit {
                            self.entries.push(
                                decode(Collection::Audit, &id, &record)
                                    .map_err(AuditError::Read)?,
                            );
                        } else {
                            self.next_before = self.entries.last().map(|l| l.id.clone());
                            self.done = true;
                            return Ok(());
                        }
                    }
                }
                if self.read >= self.budget {
                    self.next_before = Some(id);
                    self.done = true;
                    return Ok(());
                }
                upper = Some(id);
            }
            if n < page_size {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// `record_with` failed either in the caller's ops (a conflict to retry after
/// re-reading) or in the audit write itself.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0}")]
    Ops(StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

// The audit log's failures as service errors (here, so `error` depends on
// nothing above the store).
impl From<AuditError> for crate::error::ServiceError {
    fn from(e: AuditError) -> Self {
        match e {
            // The store refused the entry for load: the action was not
            // performed, and the client should back off (shown, 503).
            AuditError::Write(s @ StoreError::Unavailable(_)) => s.into(),
            other => crate::error::ServiceError::Backend(other.to_string()),
        }
    }
}

impl From<RecordError> for crate::error::ServiceError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Ops(s) => s.into(),
            RecordError::Audit(a) => a.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, Record};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the writes that reach the store.
    #[derive(Debug)]
    struct CountingStore {
        inner: EmbeddedStore,
        writes: AtomicUsize,
    }

    impl Store for CountingStore {
        fn backend(&self) -> &'static str {
            "counting"
        }
        fn get(&self, c: Collection, id: &str) -> Result<Option<Record>, StoreError> {
            self.inner.get(c, id)
        }
        fn get_many(&self, keys: &[(Collection, &str)]) -> Result<Vec<Option<Record>>, StoreError> {
            self.inner.get_many(keys)
        }
        fn list(
            &self,
            c: Collection,
            q: &ListQuery<'_>,
        ) -> Result<Vec<(String, Record)>, StoreError> {
            self.inner.list(c, q)
        }
        fn write(&self, ops: Vec<WriteOp>, d: Durability) -> Result<Receipt, StoreError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.inner.write(ops, d)
        }
        fn wait_durable(&self, r: Receipt) -> Result<(), StoreError> {
            self.inner.wait_durable(r)
        }
    }

    fn counting_log(dir: &std::path::Path) -> (Arc<CountingStore>, AuditLog) {
        let store = Arc::new(CountingStore {
            inner: EmbeddedStore::open(&dir.join("db"), [1; 32], [2; 32]).expect("open"),
            writes: AtomicUsize::new(0),
        });
        let log = AuditLog::new(store.clone());
        (store, log)
    }

    /// Events queued while another append held the head are written by the
    /// next holder in one batch, each in its own place in the chain.
    #[test]
    fn queued_events_are_written_in_one_batch_by_the_next_appender() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, log) = counting_log(dir.path());
        let waiting: Vec<_> = (0..5)
            .map(|i| {
                let outcome = Arc::new(Mutex::new(None));
                log.queue.lock().push(Queued {
                    event: AuditEvent::new("queued", format!("waiter-{i}"), Outcome::Success),
                    outcome: outcome.clone(),
                });
                outcome
            })
            .collect();
        let own = log
            .record(AuditEvent::new("own", "appender", Outcome::Success))
            .expect("append");
        assert_eq!(store.writes.load(Ordering::SeqCst), 1, "one write for six");
        assert_eq!(own.seq, 6, "the appender's event is last: it queued last");
        for (i, outcome) in waiting.iter().enumerate() {
            let (_, entry) = outcome.lock().take().expect("filled").expect("written");
            assert_eq!(entry.seq, i as u64 + 1);
            assert_eq!(entry.actor, format!("waiter-{i}"));
        }
        let report = log.verify().expect("verify");
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.entries_checked, 6);
    }

    /// A group never exceeds `MAX_GROUP` entries; the rest go in later writes.
    #[test]
    fn a_group_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, log) = counting_log(dir.path());
        let extra = MAX_GROUP + 10;
        for i in 0..extra {
            log.queue.lock().push(Queued {
                event: AuditEvent::new("queued", format!("waiter-{i}"), Outcome::Success),
                outcome: Arc::new(Mutex::new(None)),
            });
        }
        log.record(AuditEvent::new("own", "appender", Outcome::Success))
            .expect("append");
        assert_eq!(
            store.writes.load(Ordering::SeqCst),
            2,
            "{} queued entries take two batches",
            extra + 1
        );
        assert!(log.queue.lock().is_empty());
        let report = log.verify().expect("verify");
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.entries_checked, extra as u64 + 1);
    }

    /// Many threads appending at once: one chain, every entry once, and each
    /// caller gets back the entry that holds its event.
    #[test]
    fn concurrent_appends_keep_one_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, log) = counting_log(dir.path());
        let log = Arc::new(log);
        std::thread::scope(|s| {
            for t in 0..8 {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..40 {
                        let actor = format!("t{t}-{i}");
                        let entry = log
                            .record(AuditEvent::new(
                                "concurrent",
                                actor.clone(),
                                Outcome::Success,
                            ))
                            .expect("append");
                        assert_eq!(entry.actor, actor);
                    }
                });
            }
        });
        let report = log.verify().expect("verify");
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.entries_checked, 320);
    }
}
