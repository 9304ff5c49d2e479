//! Counts of audit entries per action and time bucket, kept in
//! `Collection::AuditCounts` and written in the same batch as the entries they
//! count (and, by retention, in the same batch as the entries' removal), so they
//! cannot drift from the log. A search's `total` is a sum of a few bucket
//! records instead of a scan of its window.
//!
//! Buckets come in three sizes (a minute, an hour, a day), each entry counted
//! once in each size: a window is summed as whole days in its middle, whole
//! hours and minutes towards its ends, and the two partial minutes at its
//! edges are counted by reading their entries (or, when a minute holds more
//! entries than [`EDGE_SCAN_LIMIT`], estimated from its count).

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

use super::{AuditEntry, AuditError};
use crate::store::{Collection, Expect, ListQuery, Record, Store, StoreError, WriteOp, decode};

pub(crate) const MINUTE_US: i64 = 60_000_000;
const HOUR_US: i64 = 60 * MINUTE_US;
const DAY_US: i64 = 24 * HOUR_US;

/// Bucket sizes, largest first, each with the prefix of its record ids.
const LEVELS: [(char, i64); 3] = [('d', DAY_US), ('h', HOUR_US), ('m', MINUTE_US)];

/// Entries of a partial edge minute read to count it exactly; a minute with
/// more is estimated (and the total marked inexact), so a total never reads
/// more than two of these however busy the log.
pub const EDGE_SCAN_LIMIT: usize = 4_096;

/// Bucket records one total reads at most: a window of years is a few
/// thousand day records; beyond this the total is refused rather than read
/// without bound (not reachable with a retention under ~27 years).
const MAX_BUCKET_RECORDS: usize = 10_000;

/// One bucket: entries per action.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct BucketCounts {
    pub counts: BTreeMap<String, u64>,
}

impl BucketCounts {
    pub fn of(&self, action: Option<&str>) -> u64 {
        match action {
            Some(a) => self.counts.get(a).copied().unwrap_or(0),
            None => self.counts.values().sum(),
        }
    }
}

pub(crate) fn floor_to(us: i64, size: i64) -> i64 {
    us.max(0) - us.max(0).rem_euclid(size)
}

pub(crate) fn bucket_id(prefix: char, start_us: i64) -> String {
    format!("{prefix}{:016x}", start_us.max(0))
}

/// The id prefix of entries at `us` and later: ids start with the time.
pub(crate) fn time_key(us: i64) -> String {
    format!("{:016x}", us.max(0))
}

/// The time of an entry id (or a `time_key`), from its first 16 hex digits.
pub(crate) fn id_time(id: &str) -> Option<i64> {
    id.get(..16)
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .filter(|t| *t >= 0)
}

/// How many of `entries` fall in each bucket, per action: added to the
/// buckets when they are appended, taken away when retention removes them.
pub(crate) fn deltas<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for e in entries {
        for (prefix, size) in LEVELS {
            *out.entry(bucket_id(prefix, floor_to(e.timestamp_us, size)))
                .or_default()
                .entry(e.action.clone())
                .or_insert(0) += 1;
        }
    }
    out
}

/// The ops that apply `deltas` (added, or with `remove` taken away) to the
/// stored buckets `current` (as read, in the order of `deltas`' keys), each
/// with a compare-and-set on the version read: a concurrent change to a
/// bucket fails the whole batch, which the writer retries.
pub(crate) fn apply_ops(
    deltas: &BTreeMap<String, BTreeMap<String, u64>>,
    current: &[Option<Record>],
    remove: bool,
) -> Result<Vec<WriteOp>, StoreError> {
    debug_assert_eq!(deltas.len(), current.len());
    let mut ops = Vec::with_capacity(deltas.len());
    for ((id, delta), found) in deltas.iter().zip(current) {
        let (mut bucket, expect) = match found {
            Some(r) => (
                decode::<BucketCounts>(Collection::AuditCounts, id, r)?,
                Expect::Version(r.version),
            ),
            None => (BucketCounts::default(), Expect::Absent),
        };
        for (action, n) in delta {
            let slot = bucket.counts.entry(action.clone()).or_insert(0);
            if remove {
                // Removing more than was counted is a log and counts that
                // disagree: keep the counts at zero rather than wrap, and say so.
                if *slot < *n {
                    tracing::warn!(bucket = %id, action = %action, counted = *slot, removed = *n,
                        "audit counts held fewer entries than retention removed");
                }
                *slot = slot.saturating_sub(*n);
            } else {
                *slot = slot.saturating_add(*n);
            }
        }
        bucket.counts.retain(|_, n| *n > 0);
        if bucket.counts.is_empty() {
            if found.is_some() {
                ops.push(WriteOp::delete(Collection::AuditCounts, id.clone(), expect));
            }
        } else {
            ops.push(WriteOp::put_json(
                Collection::AuditCounts,
                id.clone(),
                &bucket,
                expect,
            )?);
        }
    }
    Ok(ops)
}

/// A count and whether it is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tally {
    pub n: u64,
    pub exact: bool,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.n = self.n.saturating_add(other.n);
        self.exact &= other.exact;
    }
}

/// Entries matching `action` whose ids are in `[lo, hi)` (`hi` None: no upper
/// bound), where every entry from `lo` on is counted in the buckets.
/// `end_us`: no entry is later than this (the head's time).
pub(crate) fn count_range(
    store: &dyn Store,
    action: Option<&str>,
    lo: &str,
    hi: Option<&str>,
    end_us: i64,
) -> Result<Tally, AuditError> {
    let lo_us = id_time(lo).unwrap_or(0);
    let lo_min = floor_to(lo_us, MINUTE_US);
    // Where whole buckets start: `lo`'s minute when `lo` is its first id.
    let lo_aligned = lo == time_key(lo_min) || lo.is_empty();
    let full_from = if lo_aligned {
        lo_min
    } else {
        lo_min + MINUTE_US
    };
    let mut tally = Tally { n: 0, exact: true };
    if hi.is_some_and(|h| h <= lo) {
        return Ok(tally);
    }
    // No entry is later than `end_us`: a bound past it (or one that is not
    // an id, from a client) is no bound, and never a walk to the far future.
    let cap = floor_to(end_us, MINUTE_US) + MINUTE_US;
    let hi = hi.filter(|h| *h < time_key(cap).as_str());
    let (hi_min, hi_aligned) = match hi {
        Some(h) => {
            let Some(t) = id_time(h) else {
                // Not an entry id: the scan's own count is all there is.
                return Ok(Tally { n: 0, exact: false });
            };
            let t = floor_to(t.min(cap), MINUTE_US);
            (t, h == time_key(t))
        }
        None => (cap, true),
    };
    if !lo_aligned && !hi_aligned && lo_min == hi_min {
        // Both edges in one minute: count that part of it.
        tally.add(edge(store, action, lo, hi, lo_min)?);
        return Ok(tally);
    }
    if !lo_aligned {
        let end = time_key(lo_min + MINUTE_US);
        let end = match hi {
            Some(h) if h < end.as_str() => h.to_string(),
            _ => end,
        };
        tally.add(edge(store, action, lo, Some(&end), lo_min)?);
    }
    if full_from < hi_min {
        tally.add(Tally {
            n: whole_buckets(store, action, full_from, hi_min)?,
            exact: true,
        });
    }
    if !hi_aligned && hi_min >= full_from {
        tally.add(edge(store, action, &time_key(hi_min), hi, hi_min)?);
    }
    Ok(tally)
}

/// The entries of `[lo, hi)`, all within the minute at `minute_us`, read and
/// counted when there are at most `EDGE_SCAN_LIMIT`; otherwise the minute's
/// count scaled by the part of the minute the range covers.
fn edge(
    store: &dyn Store,
    action: Option<&str>,
    lo: &str,
    hi: Option<&str>,
    minute_us: i64,
) -> Result<Tally, AuditError> {
    if hi.is_some_and(|h| h <= lo) {
        return Ok(Tally { n: 0, exact: true });
    }
    let q = ListQuery {
        start: Bound::Included(lo),
        end: hi.map_or(Bound::Unbounded, Bound::Excluded),
        reverse: false,
        limit: EDGE_SCAN_LIMIT + 1,
    };
    let page = store
        .list(Collection::Audit, &q)
        .map_err(AuditError::Read)?;
    if page.len() <= EDGE_SCAN_LIMIT {
        let mut n = 0;
        for (id, record) in &page {
            let e = super::decode_probe(id, record).map_err(AuditError::Read)?;
            if action.is_none_or(|a| a == e.action) {
                n += 1;
            }
        }
        return Ok(Tally { n, exact: true });
    }
    let bucket = store
        .get(Collection::AuditCounts, &bucket_id('m', minute_us))
        .map_err(AuditError::Read)?
        .map(|r| decode::<BucketCounts>(Collection::AuditCounts, "minute", &r))
        .transpose()
        .map_err(AuditError::Read)?
        .unwrap_or_default();
    let from = id_time(lo).unwrap_or(minute_us).max(minute_us);
    let to = hi
        .and_then(id_time)
        .unwrap_or(minute_us + MINUTE_US)
        .min(minute_us + MINUTE_US);
    let share = (to - from).max(0) as f64 / MINUTE_US as f64;
    Ok(Tally {
        n: (bucket.of(action) as f64 * share).round() as u64,
        exact: false,
    })
}

/// The sum over whole minutes `[from_us, to_us)` (minute-aligned), read as
/// the largest buckets that fit: minutes up to an hour, hours up to a day,
/// days, then back down.
fn whole_buckets(
    store: &dyn Store,
    action: Option<&str>,
    from_us: i64,
    to_us: i64,
) -> Result<u64, AuditError> {
    debug_assert_eq!(from_us % MINUTE_US, 0);
    debug_assert_eq!(to_us % MINUTE_US, 0);
    // The greedy cover (the largest aligned bucket that fits, each time),
    // merged into runs of one size: at most five range reads.
    // The cover walks the range a bucket at a time: ~20,000 days since the
    // epoch is the most a sane clock gives; refuse a range far beyond it.
    const MAX_DAYS: i64 = 1_000_000;
    if (to_us - from_us) / DAY_US > MAX_DAYS {
        return Err(AuditError::Read(StoreError::Backend(format!(
            "an audit total over more than {MAX_DAYS} days; narrow the window"
        ))));
    }
    let mut runs: Vec<(char, i64, i64)> = Vec::new();
    let mut t = from_us;
    while t < to_us {
        let (prefix, size) = LEVELS
            .iter()
            .copied()
            .find(|(_, size)| t % size == 0 && t + size <= to_us)
            .unwrap_or(('m', MINUTE_US));
        match runs.last_mut() {
            Some((p, _, end)) if *p == prefix && *end == t => *end = t + size,
            _ => runs.push((prefix, t, t + size)),
        }
        t += size;
    }
    let mut sum = 0u64;
    let mut read = 0usize;
    for (prefix, from, to) in runs {
        let (lo, hi) = (bucket_id(prefix, from), bucket_id(prefix, to));
        let mut after: Option<String> = None;
        loop {
            let q = ListQuery {
                start: after
                    .as_deref()
                    .map_or(Bound::Included(lo.as_str()), Bound::Excluded),
                end: Bound::Excluded(hi.as_str()),
                reverse: false,
                limit: 1000,
            };
            let page = store
                .list(Collection::AuditCounts, &q)
                .map_err(AuditError::Read)?;
            let n = page.len();
            read += n;
            if read > MAX_BUCKET_RECORDS {
                return Err(AuditError::Read(StoreError::Backend(format!(
                    "an audit total would read more than {MAX_BUCKET_RECORDS} count records; narrow the window"
                ))));
            }
            for (id, record) in page {
                let b: BucketCounts =
                    decode(Collection::AuditCounts, &id, &record).map_err(AuditError::Read)?;
                sum = sum.saturating_add(b.of(action));
                after = Some(id);
            }
            if n < 1000 {
                break;
            }
        }
    }
    Ok(sum)
}

/// Minute buckets in `[from_us, to_us]` holding entries of `action`, newest
/// first, reading at most `page` bucket records; and where to continue (the
/// `to_us` of the next call) when there may be more.
pub(crate) fn minutes_with(
    store: &dyn Store,
    action: &str,
    from_us: i64,
    to_us: i64,
    page: usize,
) -> Result<(Vec<i64>, Option<i64>), AuditError> {
    let lo = bucket_id('m', floor_to(from_us, MINUTE_US));
    let hi = bucket_id('m', floor_to(to_us, MINUTE_US));
    let q = ListQuery {
        start: Bound::Included(lo.as_str()),
        end: Bound::Included(hi.as_str()),
        reverse: true,
        limit: page,
    };
    let records = store
        .list(Collection::AuditCounts, &q)
        .map_err(AuditError::Read)?;
    let full = records.len() == page;
    let mut out = Vec::new();
    let mut oldest = None;
    for (id, record) in records {
        let Some(t) = id.get(1..).and_then(|h| i64::from_str_radix(h, 16).ok()) else {
            continue;
        };
        oldest = Some(t);
        let b: BucketCounts =
            decode(Collection::AuditCounts, &id, &record).map_err(AuditError::Read)?;
        if b.of(Some(action)) > 0 {
            out.push(t);
        }
    }
    let next = if full {
        oldest.map(|t| t - MINUTE_US)
    } else {
        None
    };
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_time() {
        assert_eq!(id_time(&time_key(123_456_789)), Some(123_456_789));
        assert_eq!(
            id_time("00000000075bcd15000000000000002a"),
            Some(123_456_789)
        );
        assert_eq!(id_time("zz"), None);
        assert_eq!(floor_to(DAY_US + 5, MINUTE_US), DAY_US);
    }
}
