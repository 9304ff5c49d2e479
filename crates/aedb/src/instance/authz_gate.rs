//! The authorization gate for reads and maintenance, and the one denial path
//! every operation takes: a denial is audited before the error is returned, and
//! an operation allowed only through GlobalAdmin is audited before it runs.

use crate::authz::{CallerContext, Decision, Permission};
use crate::error::AedbError;
use crate::metrics::{AlertKind, Counters};

use super::AedbInstance;
use super::audit_writer::{global_admin_use, maintenance_allowed, permission_denied};
use super::sequencer::CommitGuard;

impl<M> AedbInstance<M> {
    /// Checks a read against the current grants (so revokes apply at once, even to
    /// older snapshots); audits denials and GlobalAdmin use.
    pub(super) fn authorize_read(
        &self,
        caller: &CallerContext,
        project: &str,
        need: Permission,
    ) -> Result<(), AedbError> {
        // Every authorized read passes here, also those of read and write
        // transactions opened before a poison: none serves a state that may hold
        // commits that will never be durable.
        self.inner.wal.check_healthy()?;
        let decision = self.inner.sequencer.load().authz.decide(caller, &need);
        match decision {
            Decision::Allowed => Ok(()),
            Decision::AllowedAsGlobalAdmin => {
                let mut cs = self.lock_commit()?;
                self.record_global_admin_use(&mut cs, caller, &need, "read")
            }
            Decision::Denied => {
                let mut cs = self.lock_commit()?;
                Counters::bump(&self.inner.counters.aborts_permission);
                self.deny(&mut cs, caller, project, &need)
            }
        }
    }

    /// Authorizes an instance-wide maintenance operation (`Backup`, `Checkpoint`)
    /// and records it before it runs, so the operation's own durability wait covers
    /// its audit row (a backup then carries the row of the backup that made it).
    /// Allowed: an `authz_audit` row `operation`; through GlobalAdmin only: a
    /// `global_admin_use` row; denied: a `permission_denied` row and the error.
    pub(super) fn authorize_maintenance(
        &self,
        caller: &CallerContext,
        need: Permission,
        operation: &str,
        target: &str,
    ) -> Result<(), AedbError> {
        let decision = self.inner.sequencer.load().authz.decide(caller, &need);
        let mut cs = self.lock_commit()?;
        match decision {
            Decision::Allowed => {
                let event = maintenance_allowed(caller, &need, operation, target);
                self.write_audit_locked(&mut cs, &[event])
            }
            Decision::AllowedAsGlobalAdmin => self.record_global_admin_use(
                &mut cs,
                caller,
                &need,
                &format!("{operation} {target}"),
            ),
            Decision::Denied => {
                Counters::bump(&self.inner.counters.aborts_permission);
                self.deny(&mut cs, caller, "*", &need)
            }
        }
    }

    /// Audits an operation that only GlobalAdmin allowed (commit lock held) and
    /// raises its alert.
    pub(super) fn record_global_admin_use(
        &self,
        cs: &mut CommitGuard<'_>,
        caller: &CallerContext,
        need: &Permission,
        operation: &str,
    ) -> Result<(), AedbError> {
        self.write_audit_locked(cs, &[global_admin_use(caller, need, operation)])?;
        self.inner
            .counters
            .alert(caller.caller_id(), AlertKind::GlobalAdminUse);
        Ok(())
    }

    /// Records a permission denial in `assertion_audit` (commit lock held), raises
    /// its alert and returns the error. Counting the abort is the caller's: the
    /// commit path counts every outcome in one place.
    pub(super) fn deny<T>(
        &self,
        cs: &mut CommitGuard<'_>,
        caller: &CallerContext,
        project: &str,
        need: &Permission,
    ) -> Result<T, AedbError> {
        self.write_audit_locked(cs, &[permission_denied(caller, project, need)])?;
        self.inner
            .counters
            .alert(caller.caller_id(), AlertKind::PermissionDenial);
        Err(AedbError::PermissionDenied {
            caller: caller.caller_id().to_string(),
            permission: need.to_string(),
        })
    }
}
