//! The audit trail of refused authentications, bounded.
//!
//! Every refusal is counted in `aragora_security_auth_failures_total`, but an
//! outsider decides how many refusals happen, so the audit log does not get one
//! entry per refusal. Within a window, the first refusal of each (source,
//! reason, actor, email) is written at once (`count: 1`), later ones of the
//! same key are counted in memory and written as one summary entry
//! (`aggregated: true, count: N`) when the window closes. At most
//! `MAX_KEYS_PER_WINDOW` keys are tracked per window; refusals beyond that, from
//! however many addresses, go into one overflow summary. So the audit state an
//! anonymous flood adds is bounded per window, whatever its size or spread.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

use super::details::{Aggregated, AuthFailure, FailureDetail, ManySources};
use crate::audit::{AuditEvent, Outcome};
use crate::clock;

/// Distinct keys written individually per window.
pub const MAX_KEYS_PER_WINDOW: usize = 100;
/// Longest email kept in an audit entry (login input is already limited to
/// this; other callers pass stored emails).
const MAX_EMAIL_BYTES: usize = 254;
/// Longest actor kept (user ids are short; anything else is cut).
const MAX_ACTOR_BYTES: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    source: Option<String>,
    reason: &'static str,
    actor: String,
    email: Option<String>,
}

#[derive(Debug)]
struct Pending {
    /// Refusals after the first, not yet written.
    suppressed: u64,
    first_suppressed_us: i64,
    last_us: i64,
}

#[derive(Debug, Default)]
struct Window {
    started_us: i64,
    keys: HashMap<Key, Pending>,
    overflow: u64,
    overflow_reasons: HashMap<&'static str, u64>,
    overflow_first_us: i64,
    overflow_last_us: i64,
}

/// What to do with one refusal.
#[derive(Debug)]
pub enum Decision {
    /// Write this entry now.
    Write(AuditEvent),
    /// Counted; it will be part of a summary.
    Counted,
}

#[derive(Debug)]
pub struct FailureAudit {
    window_us: i64,
    window: Mutex<Window>,
    /// When the current window started (read without the lock on the hot path).
    started_us: AtomicI64,
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl FailureAudit {
    pub fn new(window: std::time::Duration) -> Self {
        let window_us = i64::try_from(window.as_micros()).unwrap_or(i64::MAX).max(1);
        Self {
            window_us,
            window: Mutex::new(Window::default()),
            started_us: AtomicI64::new(0),
        }
    }

    /// Registers one refusal. `details` holds fixed keys and stored values;
    /// `email` and `actor` are cut here.
    pub(crate) fn refusal(
        &self,
        now_us: i64,
        source: Option<String>,
        reason: &'static str,
        actor: &str,
        email: Option<&str>,
        details: FailureDetail,
    ) -> (Decision, Vec<AuditEvent>) {
        let key = Key {
            source,
            reason,
            actor: cut(actor, MAX_ACTOR_BYTES),
            email: email.map(|e| cut(e, MAX_EMAIL_BYTES)),
        };
        let mut w = self.window.lock();
        let summaries = self.roll_if_due(&mut w, now_us);
        if let Some(p) = w.keys.get_mut(&key) {
            if p.suppressed == 0 {
                p.first_suppressed_us = now_us;
            }
            p.suppressed += 1;
            p.last_us = now_us;
            return (Decision::Counted, summaries);
        }
        if w.keys.len() >= MAX_KEYS_PER_WINDOW {
            if w.overflow == 0 {
                w.overflow_first_us = now_us;
            }
            w.overflow += 1;
            w.overflow_last_us = now_us;
            *w.overflow_reasons.entry(reason).or_insert(0) += 1;
            return (Decision::Counted, summaries);
        }
        let event = entry(&key, details, 1, None);
        w.keys.insert(
            key,
            Pending {
                suppressed: 0,
                first_suppressed_us: 0,
                last_us: now_us,
            },
        );
        (Decision::Write(event), summaries)
    }

    /// Whether `due` would roll the window (which may have summaries to write).
    pub fn is_due(&self, now_us: i64) -> bool {
        now_us - self.started_us.load(Ordering::Relaxed) >= self.window_us
    }

    /// The summaries of a window that has closed (empty when none has).
    pub fn due(&self, now_us: i64) -> Vec<AuditEvent> {
        if now_us - self.started_us.load(Ordering::Relaxed) < self.window_us {
            return Vec::new();
        }
        let mut w = self.window.lock();
        self.roll_if_due(&mut w, now_us)
    }

    /// Every pending summary, whatever the window (shutdown).
    pub fn drain(&self) -> Vec<AuditEvent> {
        let mut w = self.window.lock();
        summaries(std::mem::take(&mut *w))
    }

    fn roll_if_due(&self, w: &mut Window, now_us: i64) -> Vec<AuditEvent> {
        if now_us - w.started_us < self.window_us {
            return Vec::new();
        }
        let old = std::mem::take(w);
        w.started_us = now_us;
        self.started_us.store(now_us, Ordering::Relaxed);
        summaries(old)
    }
}

fn summaries(w: Window) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    for (key, p) in w.keys {
        if p.suppressed > 0 {
            out.push(entry(
                &key,
                FailureDetail::None {},
                p.suppressed,
                Some((p.first_suppressed_us, p.last_us)),
            ));
        }
    }
    if w.overflow > 0 {
        out.push(
            AuditEvent::new("auth_failure", "anonymous", Outcome::Failure).details(ManySources {
                reason: "many_sources",
                aggregated: true,
                count: w.overflow,
                reasons: w.overflow_reasons.into_iter().collect::<BTreeMap<_, _>>(),
                first_at: clock::format_us(w.overflow_first_us),
                last_at: clock::format_us(w.overflow_last_us),
                note: format!("more than {MAX_KEYS_PER_WINDOW} distinct sources/accounts refused in one window; see aragora_security_auth_failures_total"),
            }),
        );
    }
    out
}

fn entry(key: &Key, detail: FailureDetail, count: u64, span: Option<(i64, i64)>) -> AuditEvent {
    let details = AuthFailure {
        reason: key.reason,
        email: key.email.as_deref(),
        count,
        span: span.map(|(first, last)| Aggregated {
            aggregated: true,
            first_at: clock::format_us(first),
            last_at: clock::format_us(last),
        }),
        detail,
    };
    AuditEvent::new("auth_failure", key.actor.clone(), Outcome::Failure)
        .ip(key.source.clone())
        .details(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 10_000_000;

    fn audit() -> FailureAudit {
        FailureAudit::new(std::time::Duration::from_micros(W as u64))
    }

    #[test]
    fn first_written_rest_summarized() {
        let a = audit();
        let ip = Some("192.0.2.1".to_string());
        let (d, s) = a.refusal(
            W,
            ip.clone(),
            "bad_password",
            "anonymous",
            Some("x@y"),
            FailureDetail::None {},
        );
        assert!(matches!(d, Decision::Write(_)) && s.is_empty());
        for i in 0..499 {
            let (d, s) = a.refusal(
                W + i,
                ip.clone(),
                "bad_password",
                "anonymous",
                Some("x@y"),
                FailureDetail::None {},
            );
            assert!(matches!(d, Decision::Counted) && s.is_empty());
        }
        assert!(a.due(W + 1).is_empty(), "window still open");
        let s = a.due(2 * W);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].details["count"], 499);
        assert_eq!(s[0].details["email"], "x@y");
        assert_eq!(s[0].details["aggregated"], true);
        assert!(a.due(2 * W + 1).is_empty(), "written once");
    }

    #[test]
    fn many_sources_are_one_overflow_entry() {
        let a = audit();
        let mut written = 0;
        for i in 0..10_000u32 {
            let ip = Some(format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
            let (d, _) = a.refusal(
                W,
                ip,
                "rate_limited",
                "anonymous",
                Some(&format!("{i}@x")),
                FailureDetail::None {},
            );
            written += matches!(d, Decision::Write(_)) as usize;
        }
        assert_eq!(written, MAX_KEYS_PER_WINDOW);
        let s = a.drain();
        assert_eq!(s.len(), 1, "only the overflow summary");
        assert_eq!(s[0].details["count"], 10_000 - MAX_KEYS_PER_WINDOW as u64);
    }

    #[test]
    fn long_values_are_cut() {
        let a = audit();
        let long = "é".repeat(1000);
        let (d, _) = a.refusal(
            W,
            None,
            "malformed",
            &long,
            Some(&long),
            FailureDetail::None {},
        );
        let Decision::Write(e) = d else {
            panic!("first is written")
        };
        assert!(e.actor.len() <= MAX_ACTOR_BYTES);
        assert!(
            e.details["email"]
                .as_str()
                .is_some_and(|s| s.len() <= MAX_EMAIL_BYTES)
        );
    }
}
