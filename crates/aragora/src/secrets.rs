//! Secrets: the values the encryption protects. Each is stored as an envelope
//! under the key ring's primary key with its record id as AAD, so a ciphertext
//! copied to another id does not decrypt. Every write, delete and read is
//! audited fail-closed: a read whose `secret_access` entry cannot be written
//! returns no value.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit::{AuditEvent, AuditLog, Outcome, RecordError};
use crate::auth::{CAS_RETRIES, Principal, RequestMeta};
use crate::clock::{format_us, now_us};
use crate::encryption::KeyRing;
use crate::error::ServiceError;
use crate::rbac::catalogue::is_sensitive;
use crate::rbac::grant::Grant;
use crate::rbac::{Rbac, roles_label};
use crate::store::{Collection, Expect, ListQuery, Store, WriteOp, get_json, list_json};

pub const MAX_ID_LEN: usize = 200;
pub const MAX_VALUE_BYTES: usize = 32 * 1024;
pub const MAX_PAGE: usize = 1000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretRecord {
    pub id: String,
    pub secret_type: String,
    pub owner: String,
    /// The envelope, hex.
    pub envelope: String,
    pub key_id: String,
    pub key_version: u32,
    pub created_at: String,
    pub created_at_us: i64,
    pub updated_at: String,
    pub updated_at_us: i64,
    /// Set by `aragora rotation --secrets-accessed-by`: the value may be
    /// exposed and must be replaced (the next PUT clears it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotation_required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_reason: Option<String>,
}

/// The secrets collection as the key ring and the migration see it.
pub fn encrypted_collection() -> Arc<dyn crate::encryption::EncryptedCollection> {
    Arc::new(crate::encryption::JsonEnveloped::<SecretRecord>::new(
        "secrets",
        Collection::Secrets,
    ))
}

impl crate::encryption::Enveloped for SecretRecord {
    fn envelope_hex(&self) -> &str {
        &self.envelope
    }

    fn set_envelope(&mut self, envelope: &[u8], key_id: &str, key_version: u32) {
        self.envelope = hex::encode(envelope);
        self.key_id = key_id.to_string();
        self.key_version = key_version;
    }
}

impl SecretRecord {
    /// Metadata only.
    pub fn view(&self) -> SecretView {
        SecretView {
            id: self.id.clone(),
            secret_type: self.secret_type.clone(),
            owner: self.owner.clone(),
            key_id: self.key_id.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            rotation_required: self.rotation_required,
            rotation_reason: self.rotation_reason.clone(),
        }
    }
}

/// A secret's metadata (never its value).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    pub id: String,
    pub secret_type: String,
    pub owner: String,
    /// The data key its envelope names.
    pub key_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub rotation_required: bool,
    pub rotation_reason: Option<String>,
}

/// What `aragora rotation` did (or, dry, would do) to one secret.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MarkedSecret {
    pub id: String,
    /// `None` when the secret no longer exists.
    pub secret_type: Option<String>,
    /// Successful reads by the user.
    pub reads: u64,
    /// `marked_for_rotation`, `would_mark_for_rotation`, `already_marked` or
    /// `not_found`.
    pub action: String,
}

/// `aragora rotation --secrets-accessed-by=USER_ID`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RotationMarks {
    pub user_id: String,
    pub dry_run: bool,
    pub secrets: Vec<MarkedSecret>,
}

#[derive(Debug)]
pub struct SecretsService {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    keyring: Arc<KeyRing>,
    rbac: Arc<Rbac>,
}

fn path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
}

/// Secret ids are paths (`team-a/db/password`): segments of A-Z a-z 0-9 . _ -
/// : separated by `/`, none empty, `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), ServiceError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && seg.bytes().all(path_char));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "secret id must be a path of 1 to {MAX_ID_LEN} characters: segments of A-Z a-z 0-9 . _ - : separated by /, none empty, . or .."
        )))
    }
}

/// A path scope of a grant (`secrets.read:team-a/`): the start of a secret
/// id, so the same characters, possibly ending in `/`.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let body = prefix.strip_suffix('/').unwrap_or(prefix);
    if validate_id(body).is_err() {
        return Err(format!(
            "must be the start of a secret id (segments of A-Z a-z 0-9 . _ - : separated by /), got {:?}",
            prefix.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

fn validate_type(t: &str) -> Result<(), ServiceError> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(
            "secret_type must be 1 to 64 characters of A-Z a-z 0-9 . _ -".into(),
        ))
    }
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("no secret {id}"))
}

impl SecretsService {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        keyring: Arc<KeyRing>,
        rbac: Arc<Rbac>,
    ) -> Self {
        Self {
            store,
            audit,
            keyring,
            rbac,
        }
    }

    /// Per-secret access: the caller's grants must cover `permission` on this
    /// path, either by owning the secret (an unscoped grant) or by a path grant
    /// (`secrets.read:team-a/`). Otherwise 403 naming `permission:id`, audited
    /// as `permission_denied` with the secret and its owner.
    fn authorize(
        &self,
        p: &Principal,
        permission: &'static str,
        id: &str,
        owner: Option<&str>,
        meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        let owned = owner == Some(p.user_id.as_str());
        if self.rbac.covers_path(&p.roles, permission, id, owned) {
            return Ok(());
        }
        let needed = format!("{permission}:{id}");
        let event = AuditEvent::new("permission_denied", p.user_id.clone(), Outcome::Denied)
            .ip(meta.ip_string())
            .details(PathDenied {
                permission: &needed,
                role: &roles_label(&p.roles),
                sensitive: is_sensitive(permission),
                reason: "secret_path",
                secret_id: id,
                secret_owner: owner,
            });
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "permission_denied could not be audited");
        }
        let ip = meta.ip_string();
        tracing::warn!(
            reason = "secret_path",
            permission = %needed,
            ip = %ip.as_deref().unwrap_or("-"),
            actor = %p.user_id,
            "permission_denied"
        );
        Err(ServiceError::Forbidden { permission: needed })
    }

    /// Creates or replaces a secret; `(metadata, created)`.
    pub fn put(
        &self,
        p: &Principal,
        id: &str,
        value: &str,
        secret_type: &str,
        owner: Option<&str>,
        meta: &RequestMeta,
    ) -> Result<(SecretView, bool), ServiceError> {
        validate_id(id)?;
        validate_type(secret_type)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(ServiceError::BadRequest(format!(
                "value is larger than {MAX_VALUE_BYTES} bytes"
            )));
        }
        for _ in 0..CAS_RETRIES {
            let existing = get_json::<SecretRecord>(self.store.as_ref(), Collection::Secrets, id)?;
            // Replacing needs a grant covering the secret (its owner's, or a
            // path grant); creating makes the caller the owner.
            let current_owner = existing.as_ref().map(|(_, r)| r.owner.as_str());
            self.authorize(
                p,
                "secrets.write",
                id,
                current_owner.or(Some(&p.user_id)),
                meta,
            )?;
            let owner = match owner {
                // Handing a secret to someone else is a path grant's power.
                Some(o) if o != p.user_id && Some(o) != current_owner => {
                    self.authorize(p, "secrets.write", id, None, meta)?;
                    o.to_string()
                }
                Some(o) => o.to_string(),
                None => current_owner.unwrap_or(&p.user_id).to_string(),
            };
            let now = now_us();
            let (expect, created_us) = match &existing {
                Some((v, r)) => (Expect::Version(*v), r.created_at_us),
                None => (Expect::Absent, now),
            };
            let result = self.keyring.seal_and_write(
                id,
                value.as_bytes(),
                |envelope, key_id, key_version| {
                    let rec = SecretRecord {
                        id: id.to_string(),
                        secret_type: secret_type.to_string(),
                        owner: owner.clone(),
                        envelope: hex::encode(envelope),
                        key_id: key_id.to_string(),
                        key_version,
                        created_at: format_us(created_us),
                        created_at_us: created_us,
                        updated_at: format_us(now),
                        updated_at_us: now,
                        rotation_required: false,
                        rotation_reason: None,
                    };
                    let op = WriteOp::put_json(Collection::Secrets, id, &rec, expect)
                        .map_err(|e| WriteFailure::Other(e.into()))?;
                    let event =
                        AuditEvent::new("secret_written", p.user_id.clone(), Outcome::Success)
                            .ip(meta.ip_string())
                            .details(SecretWritten {
                                secret_id: id,
                                secret_type,
                                key_id,
                                created: existing.is_none(),
                            });
                    match self.audit.record_with(event, vec![op]) {
                        Ok(_) => Ok(rec),
                        Err(RecordError::Ops(e)) if e.is_conflict() => Err(WriteFailure::Conflict),
                        Err(e) => Err(WriteFailure::Other(e.into())),
                    }
                },
            );
            match result {
                Ok(rec) => return Ok((rec.view(), existing.is_none())),
                Err(WriteFailure::Conflict) => continue,
                Err(WriteFailure::Other(e)) => return Err(e),
            }
        }
        Err(ServiceError::Conflict(format!(
            "secret {id} is being changed concurrently; retry"
        )))
    }

    /// Decrypts a secret for `p`. The `secret_access` entry is written before
    /// the value is returned; if it cannot be, no value is returned.
    pub fn get(
        &self,
        p: &Principal,
        id: &str,
        meta: &RequestMeta,
    ) -> Result<(SecretView, String), ServiceError> {
        validate_id(id)?;
        let found = get_json::<SecretRecord>(self.store.as_ref(), Collection::Secrets, id)?;
        // Authorized before "not found": without a grant covering the path,
        // whether a secret exists there is not the caller's to learn.
        self.authorize(
            p,
            "secrets.read",
            id,
            found.as_ref().map(|(_, r)| r.owner.as_str()),
            meta,
        )?;
        let Some((_, rec)) = found else {
            return Err(not_found(id));
        };
        let opened = hex::decode(&rec.envelope)
            .map_err(|_| crate::crypto::CryptoError::Malformed {
                reason: "stored envelope is not hex".into(),
            })
            .and_then(|env| self.keyring.decrypt(id, &env, Some(&p.user_id)));
        let base = SecretAccess {
            secret_id: id,
            secret_type: &rec.secret_type,
            key_id: &rec.key_id,
            error: None,
            reason: None,
        };
        match opened {
            Ok(plain) => {
                let value = String::from_utf8(plain)
                    .map_err(|_| ServiceError::Internal(format!("secret {id} is not UTF-8")))?;
                self.audit.record(
                    AuditEvent::new("secret_access", p.user_id.clone(), Outcome::Success)
                        .ip(meta.ip_string())
                        .details(base),
                )?;
                Ok((rec.view(), value))
            }
            Err(e) => {
                let error = e.to_string();
                let details = SecretAccess {
                    error: Some(&error),
                    reason: Some(e.reason()),
                    ..base
                };
                if let Err(a) = self.audit.record(
                    AuditEvent::new("secret_access", p.user_id.clone(), Outcome::Failure)
                        .ip(meta.ip_string())
                        .details(details),
                ) {
                    tracing::error!(error = %a, "failed secret_access could not be audited");
                }
                Err(match e {
                    crate::crypto::CryptoError::Sealed { .. } => e.into(),
                    _ => ServiceError::Internal(format!("secret {id} could not be decrypted: {e}")),
                })
            }
        }
    }

    pub fn delete(&self, p: &Principal, id: &str, meta: &RequestMeta) -> Result<(), ServiceError> {
        validate_id(id)?;
        for _ in 0..CAS_RETRIES {
            let found = get_json::<SecretRecord>(self.store.as_ref(), Collection::Secrets, id)?;
            self.authorize(
                p,
                "secrets.delete",
                id,
                found.as_ref().map(|(_, r)| r.owner.as_str()),
                meta,
            )?;
            let Some((version, rec)) = found else {
                return Err(not_found(id));
            };
            let op = WriteOp::delete(Collection::Secrets, id, Expect::Version(version));
            let event = AuditEvent::new("secret_deleted", p.user_id.clone(), Outcome::Success)
                .ip(meta.ip_string())
                .details(SecretDeleted {
                    secret_id: id,
                    secret_type: &rec.secret_type,
                });
            match self.audit.record_with(event, vec![op]) {
                Ok(_) => return Ok(()),
                Err(RecordError::Ops(e)) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Conflict(format!(
            "secret {id} is being changed concurrently; retry"
        )))
    }

    /// Metadata of the secrets `p` may list (its own, and those under its
    /// `secrets.list` path grants) after `after`, in id order;
    /// `(items, next_after)`. At most `MAX_SCAN` records are looked at per
    /// call: a sparse listing returns a short page with `next_after` set.
    pub fn list(
        &self,
        p: &Principal,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SecretView>, Option<String>), ServiceError> {
        const MAX_SCAN: usize = 10 * MAX_PAGE;
        let limit = limit.clamp(1, MAX_PAGE);
        let grants = self.rbac.grants_of(&p.roles);
        let visible = |r: &SecretRecord| {
            grants
                .iter()
                .any(|g| Grant::parse(g).covers_path("secrets.list", &r.id, r.owner == p.user_id))
        };
        let mut items = Vec::new();
        let mut cursor = after.map(str::to_string);
        let mut scanned = 0;
        loop {
            let page = list_json::<SecretRecord>(
                self.store.as_ref(),
                Collection::Secrets,
                &ListQuery::after(cursor.as_deref(), MAX_PAGE),
            )?;
            let n = page.len();
            for (id, _, r) in page {
                scanned += 1;
                cursor = Some(id);
                if visible(&r) {
                    items.push(r.view());
                    if items.len() == limit {
                        return Ok((items, cursor));
                    }
                }
                if scanned >= MAX_SCAN {
                    return Ok((items, cursor));
                }
            }
            if n < MAX_PAGE {
                return Ok((items, None));
            }
        }
    }

    /// `aragora rotation --secrets-accessed-by=USER_ID`: every secret the user
    /// read (successful `secret_access` entries, all time, per the audit
    /// log's access index) is marked
    /// `rotation_required` (no secret type has a rotation hook yet), each mark
    /// audited as `secret_rotation_marked` in the same write. `dry_run` only
    /// reports.
    pub fn mark_accessed_by(
        &self,
        user_id: &str,
        dry_run: bool,
        actor: &str,
    ) -> Result<RotationMarks, ServiceError> {
        if user_id.trim().is_empty() {
            return Err(ServiceError::BadRequest(
                "--secrets-accessed-by needs a user id".into(),
            ));
        }
        // The access index written with each `secret_access` entry: one
        // user's records, not a scan of the log.
        let read: BTreeMap<String, u64> = self.audit.secrets_read_by(user_id)?;
        let reason = format!("read by {user_id}, whose access is under investigation");
        let mut out = Vec::new();
        for (id, reads) in read {
            let mut entry = None;
            for _ in 0..CAS_RETRIES {
                let Some((version, mut rec)) =
                    get_json::<SecretRecord>(self.store.as_ref(), Collection::Secrets, &id)?
                else {
                    entry = Some(MarkedSecret {
                        id: id.clone(),
                        secret_type: None,
                        reads,
                        action: "not_found".into(),
                    });
                    break;
                };
                let view = |action: &str| MarkedSecret {
                    id: id.clone(),
                    secret_type: Some(rec.secret_type.clone()),
                    reads,
                    action: action.to_string(),
                };
                if rec.rotation_required {
                    entry = Some(view("already_marked"));
                    break;
                }
                if dry_run {
                    entry = Some(view("would_mark_for_rotation"));
                    break;
                }
                let marked = view("marked_for_rotation");
                rec.rotation_required = true;
                rec.rotation_reason = Some(reason.clone());
                let op =
                    WriteOp::put_json(Collection::Secrets, &id, &rec, Expect::Version(version))?;
                let event = AuditEvent::new("secret_rotation_marked", actor, Outcome::Success)
                    .details(RotationMarked {
                        secret_id: &id,
                        secret_type: &rec.secret_type,
                        accessed_by: user_id,
                        reason: &reason,
                    });
                match self.audit.record_with(event, vec![op]) {
                    Ok(_) => {
                        entry = Some(marked);
                        break;
                    }
                    Err(RecordError::Ops(e)) if e.is_conflict() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            out.push(entry.ok_or_else(|| {
                ServiceError::Conflict(format!("secret {id} is being changed concurrently; retry"))
            })?);
        }
        Ok(RotationMarks {
            user_id: user_id.to_string(),
            dry_run,
            secrets: out,
        })
    }
}

/// `permission_denied` for a secret path.
#[derive(Serialize)]
struct PathDenied<'a> {
    permission: &'a str,
    role: &'a str,
    sensitive: bool,
    reason: &'static str,
    secret_id: &'a str,
    secret_owner: Option<&'a str>,
}

/// `secret_written`.
#[derive(Serialize)]
struct SecretWritten<'a> {
    secret_id: &'a str,
    secret_type: &'a str,
    key_id: &'a str,
    created: bool,
}

/// `secret_access` (a failure adds the error and its reason).
#[derive(Clone, Copy, Serialize)]
struct SecretAccess<'a> {
    secret_id: &'a str,
    secret_type: &'a str,
    key_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// `secret_deleted`.
#[derive(Serialize)]
struct SecretDeleted<'a> {
    secret_id: &'a str,
    secret_type: &'a str,
}

/// `secret_rotation_marked`.
#[derive(Serialize)]
struct RotationMarked<'a> {
    secret_id: &'a str,
    secret_type: &'a str,
    accessed_by: &'a str,
    reason: &'a str,
}

enum WriteFailure {
    Conflict,
    Other(ServiceError),
}

impl From<crate::crypto::CryptoError> for WriteFailure {
    fn from(e: crate::crypto::CryptoError) -> Self {
        WriteFailure::Other(e.into())
    }
}
