//! The commit path: admission, per-project validation and apply, sequencing with
//! the WAL append, ordered publication, and schema/authorization changes. Denials
//! go through the authorization gate (`authz_gate`), audit rows are built by the
//! audit writer (`audit_writer`).

use std::panic::AssertUnwindSafe;

use super::audit_writer::{
    FailedAssertion, assertion_failed, authz_event, caller_name, global_admin_use,
};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::admission::QueueSlot;
use super::read::{ddl_name, ddl_need, ddl_project, validate_ddl};
use super::sequencer::CommitGuard;
use super::{AedbInstance, CommitResult};
use crate::audit::{AuditEvent, chain_rows, now_unix};
use crate::authz::{CallerContext, Decision};
use crate::config::CommitFinality;
use crate::error::AedbError;
use crate::metrics::{AlertKind, Counters};
use crate::record::{DdlOperation, WalRecord};
use crate::txn::write::{WriteTransaction, writes_digest};
use crate::wal::writer::{HARD_BUFFER_BYTES, SOFT_BUFFER_BYTES};

impl<M> AedbInstance<M> {
    pub(super) fn admit(&self) -> Result<QueueSlot<'_>, AedbError> {
        if self.inner.is_closed() {
            return Err(AedbError::Closed);
        }
        self.inner.admission.admit()
    }

    /// Takes the commit lock within the commit timeout. A timeout here guarantees
    /// the commit was not applied and never will be.
    pub(super) fn lock_commit(&self) -> Result<CommitGuard<'_>, AedbError> {
        self.inner.sequencer.lock()
    }

    pub(super) fn count_outcome(
        &self,
        caller: Option<&CallerContext>,
        r: &Result<CommitResult, AedbError>,
    ) {
        let c = &self.inner.counters;
        match r {
            Ok(res) if res.idempotent_replay => Counters::bump(&c.idempotent_replays),
            Ok(_) => Counters::bump(&c.commits),
            Err(AedbError::Conflict { .. }) => Counters::bump(&c.aborts_conflict),
            Err(AedbError::AssertionFailed { .. }) => {
                Counters::bump(&c.aborts_assertion);
                c.alert(caller_name(caller), AlertKind::AssertionFailure);
            }
            Err(AedbError::Overloaded { .. }) => Counters::bump(&c.aborts_admission),
            Err(AedbError::Timeout { .. }) => Counters::bump(&c.aborts_timeout),
            Err(AedbError::PermissionDenied { .. }) => Counters::bump(&c.aborts_permission),
            Err(_) => Counters::bump(&c.aborts_other),
        }
    }

    pub(super) fn commit_tx(
        &self,
        caller: Option<&CallerContext>,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        let started = Instant::now();
        let r = self.commit_tx_inner(caller, tx, finality);
        self.count_outcome(caller, &r);
        if r.as_ref().is_ok_and(|r| !r.idempotent_replay) {
            self.inner
                .counters
                .record_latency(finality, started.elapsed());
        }
        r
    }

    pub(super) fn commit_tx_inner(
        &self,
        caller: Option<&CallerContext>,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        if let Some(c) = caller
            && tx.caller_id() != Some(c.caller_id())
        {
            return Err(AedbError::InvalidArgument(format!(
                "transaction was begun by {:?}, committed by {:?}",
                tx.caller_id(),
                c.caller_id()
            )));
        }
        let _slot = self.admit()?;
        let tag = tx.idempotency_tag();
        let mut record = tx.to_record();
        let digest = tag.as_ref().and_then(|_| writes_digest(&record));
        // Encoding happens outside the commit lock: it does not depend on the LSN.
        let mut payload = record.encode()?;
        let limit = self.inner.config.limits.max_txn_bytes;
        if payload.len() > limit {
            return Err(AedbError::LimitExceeded {
                what: "encoded transaction bytes",
                limit,
                actual: payload.len(),
            });
        }

        // Phase A, under this project's lock only: commits to other projects run
        // their validation and apply in parallel; they meet only to take a sequence
        // number with the WAL append, and to publish in sequence order.
        let project_lock = self.inner.project_lock(tx.project());
        let project_guard = project_lock
            .try_lock_for(self.inner.config.commit_timeout)
            .ok_or(AedbError::Timeout {
                waited_ms: self.inner.config.commit_timeout.as_millis() as u64,
            })?;
        self.inner.wal.check_healthy()?;
        // The published state is current for this project: only holders of its lock
        // change it, and they publish before releasing the lock.
        let latest = self.inner.sequencer.load_full();
        let mut events = Vec::new();
        if let Some(c) = caller {
            for need in tx.required_permissions() {
                match latest.authz.decide(c, &need) {
                    Decision::Allowed => {}
                    Decision::AllowedAsGlobalAdmin => {
                        events.push(global_admin_use(
                            c,
                            &need,
                            &format!("commit to {}", tx.project()),
                        ));
                    }
                    Decision::Denied => {
                        let mut cs = self.lock_commit()?;
                        return self.deny(&mut cs, c, tx.project(), &need);
                    }
                }
            }
        }
        // A retry of a commit that went through replays its result before the
        // conflict and assertion checks: the first attempt's own writes would fail
        // them (a `key_absent` guard, a version check) and turn a retry after a
        // timeout into a spurious failure.
        if let Some(t) = &tag {
            let mut cs = self.lock_commit()?;
            if let Some(replayed) = cs.replayed(t, digest.as_ref()) {
                drop(cs);
                return self.finish(replayed?, finality, true);
            }
        }
        tx.check_conflicts(&latest)?;
        if let Err(e) = tx.check_assertions(&latest) {
            if let AedbError::AssertionFailed { index, description } = &e {
                let event = assertion_failed(FailedAssertion {
                    actor: caller_name(caller),
                    project: tx.project(),
                    index: *index,
                    snapshot_seq: tx.snapshot_seq(),
                    expected: description,
                    actual: tx.assertions[*index].actual_redacted(&latest, tx.project()),
                });
                let mut cs = self.lock_commit()?;
                self.write_audit_locked(&mut cs, &[event])?;
            }
            return Err(e);
        }

        // Phase B1, under the commit lock: idempotency, a final authorization check
        // if grants changed meanwhile, the sequence number and the WAL append.
        let mut cs = self.lock_commit()?;
        self.inner.wal.check_healthy()?;
        // Again: a first attempt to another project may have taken the key meanwhile.
        if let Some(t) = &tag
            && let Some(replayed) = cs.replayed(t, digest.as_ref())
        {
            drop(cs);
            return self.finish(replayed?, finality, true);
        }
        if let Some(c) = caller
            && cs.state().authz.generation != latest.authz.generation
        {
            for need in tx.required_permissions() {
                if cs.state().authz.decide(c, &need) == Decision::Denied {
                    return self.deny(&mut cs, c, tx.project(), &need);
                }
            }
        }
        if tx.is_empty() && events.is_empty() {
            let seq = cs.state().seq;
            drop(cs);
            return self.finish(seq, finality, false);
        }
        if !events.is_empty() {
            // Audit rows chain from the audit tables' tails: let every reserved
            // commit publish first so the tails are final.
            cs.drain();
            if let WalRecord::Commit { audit, .. } = &mut record {
                *audit = chain_rows(cs.state(), &events, cs.next_seq(), now_unix())?;
            }
            payload = record.encode()?;
            for _ in &events {
                self.inner
                    .counters
                    .alert(caller_name(caller), AlertKind::GlobalAdminUse);
            }
        }
        let seq = cs.next_seq();
        self.make_room(payload.len())?;
        // From here on the frame is in the log buffer: nothing below may fail
        // without poisoning, and `seq` is published whatever happens.
        let pending = self.inner.wal.append(seq, &payload)?;
        cs.reserve(seq);
        if let Some(tag) = tag {
            cs.remember(tag, seq, digest);
        }
        drop(cs);

        // Phase A2, back under the project lock only: apply to this project's state.
        let mut project = latest
            .projects
            .get(tx.project())
            .cloned()
            .unwrap_or_default();
        // A panic here is a bug, but it must not leave `seq` unpublished: every later
        // commit, drain and idempotent replay would wait for it forever.
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| match &record {
            WalRecord::Commit {
                project: name, ops, ..
            } => {
                #[cfg(test)]
                if super::failpoints::hit(super::failpoints::Failpoint::PanicInApply) {
                    panic!("failpoint: apply of commit {seq}");
                }
                project.apply_ops(name, ops, seq, &latest.tables)?;
                Ok(())
            }
            _ => Ok(()),
        }))
        .unwrap_or_else(|_| {
            Err(AedbError::Poisoned(format!(
                "applying commit {seq} panicked"
            )))
        });

        // Phase B2: publish in sequence order.
        let mut cs = self.inner.sequencer.lock_blocking();
        cs.wait_turn(seq);
        let applied = applied.and_then(|()| {
            let mut next = cs.state().clone();
            // A flush published since `latest`: the copy still holds what it evicted.
            if !Arc::ptr_eq(&next.tables, &latest.tables) {
                crate::lsm::evict_project(&mut project, next.tables.flushed_seq);
            }
            // Delete-heavy workloads would otherwise grow until a reopen. Here, not
            // while applying: only the published tables say how far a purge may go.
            project.purge_tombstones(next.tables.purge_cap(self.inner.tombstone_horizon()));
            next.projects.insert(tx.project().to_string(), project);
            if let WalRecord::Commit { audit, .. } = &record {
                next.append_audit(audit, seq)?;
            }
            Ok(next)
        });
        let (next, failed) = match applied {
            Ok(next) => (Some(next), None),
            // Validated above, so this is a bug or a table read that failed (a
            // write of a key only the tables hold reads it to keep the live count);
            // the frame is in the log buffer, the state is not: refuse everything
            // until a reopen (the poisoned writer starts no further write-out; one
            // already under way may carry it).
            Err(e) => {
                self.inner.wal.poison(&e);
                (None, Some(e))
            }
        };
        // Published even when it failed: later commits wait for this number.
        cs.publish_in_order(seq, next);
        drop(cs);
        // Published: the next commit to this project may start while this one
        // waits for its fsync, so concurrent durable commits share one (group commit).
        drop(project_guard);
        if let Some(e) = failed {
            return Err(match e {
                e @ AedbError::Poisoned(_) => e,
                e => AedbError::Poisoned(format!("commit {seq} did not apply: {e}")),
            });
        }
        self.bound_buffer(pending)?;
        self.finish(seq, finality, false)
    }

    /// Seals the active segment if the next frame does not fit, and records that
    /// in the manifest, before the frame is appended: a failure leaves no frame
    /// behind, and poisons (a manifest that may or may not be on disk, like a
    /// failed fsync, is never retried).
    fn make_room(&self, payload_len: usize) -> Result<(), AedbError> {
        self.inner.wal.make_room(payload_len)?;
        self.record_rotation()
            .inspect_err(|e| self.inner.wal.poison(e))
    }

    /// Records segments sealed by the last rotation in the manifest.
    fn record_rotation(&self) -> Result<(), AedbError> {
        #[cfg(test)]
        if super::failpoints::hit(super::failpoints::Failpoint::RecordRotation) {
            return Err(AedbError::io(
                self.inner.dir.join("MANIFEST"),
                std::io::Error::other("failpoint: manifest write after a rotation"),
            ));
        }
        self.inner.record_rotation()
    }

    /// Commits `record` as `seq` with every earlier commit published (the caller
    /// drained): applied to a clone first, so a record that does not apply never
    /// reaches the log; then appended, recorded in the manifest on rotation, and
    /// published.
    pub(super) fn commit_serial(
        &self,
        cs: &mut CommitGuard<'_>,
        record: &WalRecord,
        seq: u64,
    ) -> Result<(), AedbError> {
        debug_assert_eq!(
            seq,
            cs.state().seq + 1,
            "serial commits follow the published state"
        );
        self.inner.wal.check_healthy()?;
        let payload = record.encode()?;
        let mut next = cs.state().clone();
        next.apply(record, seq)?;
        self.make_room(payload.len())?;
        // Nothing after the append can fail: the frame and the state go together.
        self.inner.wal.append(seq, &payload)?;
        cs.publish_serial(next);
        Ok(())
    }

    /// Keeps the in-memory WAL buffer bounded when commits do not wait for fsync.
    pub(super) fn bound_buffer(&self, pending: usize) -> Result<(), AedbError> {
        if pending >= HARD_BUFFER_BYTES {
            self.inner.wal.write_out()?;
        } else if pending >= SOFT_BUFFER_BYTES {
            self.inner.kick_flusher();
        }
        Ok(())
    }

    pub(super) fn finish(
        &self,
        seq: u64,
        finality: CommitFinality,
        idempotent_replay: bool,
    ) -> Result<CommitResult, AedbError> {
        if finality == CommitFinality::Durable {
            self.inner.wal.wait_durable(seq)?;
        }
        Ok(CommitResult {
            commit_seq: seq,
            durable_head_seq: self.inner.wal.durable_lsn(),
            idempotent_replay,
        })
    }

    /// Validates names, authorizes, audits, and commits schema and authorization
    /// changes atomically in one record.
    pub(super) fn commit_ddl(
        &self,
        caller: Option<&CallerContext>,
        mut ops: Vec<DdlOperation>,
    ) -> Result<CommitResult, AedbError> {
        if ops.is_empty() {
            return Err(AedbError::InvalidArgument("no DDL operations given".into()));
        }
        let max = self.inner.config.limits.max_name_bytes;
        for op in &mut ops {
            validate_ddl(op, max)?;
            if let DdlOperation::CreateProject { owner, .. } = op
                && owner.is_none()
            {
                *owner = caller.map(|c| c.caller_id().to_string());
            }
        }
        let _slot = self.admit()?;
        // Schema changes to a project wait for its in-flight commits (sorted order:
        // no deadlock between batches touching several projects).
        let mut touched: Vec<&str> = ops.iter().filter_map(ddl_project).collect();
        touched.sort_unstable();
        touched.dedup();
        let locks: Vec<Arc<Mutex<()>>> =
            touched.iter().map(|p| self.inner.project_lock(p)).collect();
        let _guards: Vec<_> = locks.iter().map(|l| l.lock()).collect();
        let mut cs = self.lock_commit()?;
        cs.drain();
        self.inner.wal.check_healthy()?;
        let actor = caller_name(caller).to_string();
        let mut events = Vec::new();
        for op in &ops {
            if let Some(c) = caller {
                let decision = match op {
                    DdlOperation::GrantPermission { permission, .. }
                    | DdlOperation::RevokePermission { permission, .. } => (
                        cs.state().authz.may_delegate(c, permission),
                        permission.clone(),
                    ),
                    other => {
                        let need = ddl_need(other);
                        (cs.state().authz.decide(c, &need), need)
                    }
                };
                match decision {
                    (Decision::Allowed, _) => {}
                    (Decision::AllowedAsGlobalAdmin, need) => {
                        events.push(global_admin_use(c, &need, ddl_name(op)));
                    }
                    (Decision::Denied, need) => {
                        let project = need.project().unwrap_or("*").to_string();
                        let r = self.deny(&mut cs, c, &project, &need);
                        Counters::bump(&self.inner.counters.aborts_permission);
                        return r;
                    }
                }
            }
            if let Some(e) = authz_event(&actor, op) {
                events.push(e);
            }
        }
        let seq = cs.state().seq + 1;
        let record = WalRecord::Ddl {
            actor: caller.map(|c| c.caller_id().to_string()),
            audit: chain_rows(cs.state(), &events, seq, now_unix())?,
            ops,
        };
        self.commit_serial(&mut cs, &record, seq)?;
        drop(cs);
        for e in &events {
            let kind = match e {
                AuditEvent::Authz { action, .. } if action == "global_admin_use" => {
                    AlertKind::GlobalAdminUse
                }
                _ => AlertKind::PermissionChange,
            };
            self.inner.counters.alert(&actor, kind);
        }
        Counters::bump(&self.inner.counters.commits);
        // Schema and permission changes are rare and everything after depends on them.
        self.finish(seq, CommitFinality::Durable, false)
    }
}
