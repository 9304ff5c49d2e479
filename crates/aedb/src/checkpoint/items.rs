//! The checkpoint's logical contents: a stream of length-prefixed postcard items in
//! state order (project, its scopes, each scope's keys, then its tables and rows),
//! closed by an `End` item with counts so a cut-short stream is detected.
//!
//! Variants are only ever appended to `Item` (postcard encodes the variant index):
//! version 1 files hold `Idempotency` records without a writes digest, version 2
//! files `IdempotencyRecord`s with it, and both read.

use std::io::{Read, Write};
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::authz::Grant;
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::state::{DbState, ProjectState, ScopeState, TableState, Versioned};
use crate::model::value::{Row, TableSchema};
use crate::record::IdempotencyTag;
use crate::txn::write::WritesDigest;
use crate::wal::reader::MAX_LSN;

/// Largest single item accepted when reading (a corrupt length must not allocate).
const MAX_ITEM: usize = 64 << 20;

#[derive(Serialize, Deserialize)]
enum Item {
    Project(String),
    Scope(String),
    Table {
        name: String,
        schema: TableSchema,
        created_seq: u64,
    },
    Kv {
        key: Bytes,
        version: u64,
        value: SharedBytes,
    },
    Row {
        key: Bytes,
        version: u64,
        row: Arc<Row>,
    },
    /// Version 1: no digest (read only).
    Idempotency {
        caller: String,
        key: String,
        seq: u64,
    },
    Grant {
        principal: String,
        grant: Grant,
    },
    Owner {
        project: String,
        owner: String,
    },
    Bootstrapped,
    End {
        seq: u64,
        keys: u64,
        rows: u64,
    },
    /// Version 2: the digest of what the commit wrote, so a retry with other writes
    /// is still refused after the log holding the commit is gone.
    IdempotencyRecord {
        caller: String,
        key: String,
        seq: u64,
        digest: Option<WritesDigest>,
    },
    /// Version 3: the live entries of the scope or table just opened (`Scope`,
    /// `Table`). The data is in table files, so the count cannot be read off
    /// the items that follow (there are none).
    LiveCount(u64),
}

/// One remembered idempotency key, in the order the commit path evicts them
/// (oldest first): the key, the commit it names, and what that commit wrote
/// (`None` for records read from a version 1 checkpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdempotencyEntry {
    pub tag: IdempotencyTag,
    pub seq: u64,
    pub digest: Option<WritesDigest>,
}

/// A scope or table being rebuilt: its name, its state, its entries in key order.
type Building<S, V> = Option<(String, S, Vec<(Bytes, Versioned<V>)>)>;
type ScopeBuild = Building<ScopeState, SharedBytes>;
type TableBuild = Building<TableState, Arc<Row>>;

pub(crate) struct LoadedState {
    pub state: DbState,
    pub idempotency: Vec<IdempotencyEntry>,
    /// The file recorded live counts (`LiveCount`): open need not count the
    /// entries of the tables.
    pub counts: bool,
}

fn put(w: &mut impl Write, item: &Item, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    let bytes = postcard::to_extend(item, std::mem::take(buf)).map_err(std::io::Error::other)?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)?;
    *buf = bytes;
    Ok(())
}

pub(crate) fn write_items(
    w: &mut impl Write,
    state: &DbState,
    idempotency: &[IdempotencyEntry],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    let (mut keys, mut rows) = (0u64, 0u64);
    for (pname, p) in &state.projects {
        put(w, &Item::Project(pname.clone()), &mut buf)?;
        for (sname, s) in &p.scopes {
            put(w, &Item::Scope(sname.clone()), &mut buf)?;
            put(w, &Item::LiveCount(s.live_keys as u64), &mut buf)?;
            // Tombstones only matter to transactions open now; none survive a reopen.
            for (k, e) in &s.kv {
                if let Some(v) = &e.value {
                    put(
                        w,
                        &Item::Kv {
                            key: k.clone(),
                            version: e.version,
                            value: v.clone(),
                        },
                        &mut buf,
                    )?;
                    keys += 1;
                }
            }
            for (tname, t) in &s.tables {
                put(
                    w,
                    &Item::Table {
                        name: tname.clone(),
                        schema: (*t.schema).clone(),
                        created_seq: t.created_seq,
                    },
                    &mut buf,
                )?;
                put(w, &Item::LiveCount(t.live_rows as u64), &mut buf)?;
                for (k, e) in &t.rows {
                    if let Some(r) = &e.value {
                        put(
                            w,
                            &Item::Row {
                                key: k.clone(),
                                version: e.version,
                                row: r.clone(),
                            },
                            &mut buf,
                        )?;
                        rows += 1;
                    }
                }
            }
        }
    }
    for e in idempotency {
        put(
            w,
            &Item::IdempotencyRecord {
                caller: e.tag.caller.clone(),
                key: e.tag.key.clone(),
                seq: e.seq,
                digest: e.digest,
            },
            &mut buf,
        )?;
    }
    for (principal, grants) in &state.authz.grants {
        for g in grants {
            let item = Item::Grant {
                principal: principal.clone(),
                grant: g.clone(),
            };
            put(w, &item, &mut buf)?;
        }
    }
    for (project, owner) in &state.authz.owners {
        let item = Item::Owner {
            project: project.clone(),
            owner: owner.clone(),
        };
        put(w, &item, &mut buf)?;
    }
    if state.authz.bootstrapped {
        put(w, &Item::Bootstrapped, &mut buf)?;
    }
    put(
        w,
        &Item::End {
            seq: state.seq,
            keys,
            rows,
        },
        &mut buf,
    )
}

/// Rebuilds the state; `lsn` is the header's LSN, which the `End` item must repeat.
pub(crate) fn read_items(r: &mut impl Read, lsn: u64) -> Result<LoadedState, String> {
    // The log continues at `lsn + 1`: no engine writes a checkpoint past this.
    if lsn > MAX_LSN {
        return Err(format!(
            "checkpoint LSN {lsn} is past the largest LSN {MAX_LSN}"
        ));
    }
    let mut state = DbState {
        seq: lsn,
        ..DbState::default()
    };
    let mut idempotency = Vec::new();
    let mut buf = Vec::new();
    // Items arrive in key order, so each map is built from a sorted run.
    let mut project: Option<(String, ProjectState)> = None;
    let mut scope: ScopeBuild = None;
    let mut table: TableBuild = None;
    let (mut keys, mut rows) = (0u64, 0u64);
    let mut counts = false;

    fn close_table(scope: &mut ScopeBuild, table: &mut TableBuild) -> Result<(), String> {
        if let Some((name, mut t, entries)) = table.take() {
            // A file with the data in it (version 1, 2) counts by its entries.
            if !entries.is_empty() {
                t.live_rows = entries.len();
            }
            t.rows = OrdMap::from_iter(entries);
            let (_, s, _) = scope.as_mut().ok_or("table outside a scope")?;
            s.tables.insert(name, t);
        }
        Ok(())
    }
    fn close_scope(
        project: &mut Option<(String, ProjectState)>,
        scope: &mut ScopeBuild,
        table: &mut TableBuild,
    ) -> Result<(), String> {
        close_table(scope, table)?;
        if let Some((name, mut s, entries)) = scope.take() {
            if !entries.is_empty() {
                s.live_keys = entries.len();
            }
            s.kv = OrdMap::from_iter(entries);
            let (_, p) = project.as_mut().ok_or("scope outside a project")?;
            p.scopes.insert(name, s);
        }
        Ok(())
    }

    loop {
        let mut lb = [0u8; 4];
        r.read_exact(&mut lb)
            .map_err(|e| format!("stream ends before its End item: {e}"))?;
        let n = u32::from_le_bytes(lb) as usize;
        if n > MAX_ITEM {
            return Err(format!("item length {n} exceeds the limit"));
        }
        buf.resize(n, 0);
        r.read_exact(&mut buf)
            .map_err(|e| format!("stream ends inside an item: {e}"))?;
        let item: Item = postcard::from_bytes(&buf).map_err(|e| format!("bad item: {e}"))?;
        match item {
            Item::Project(name) => {
                close_scope(&mut project, &mut scope, &mut table)?;
                if let Some((n, p)) = project.take() {
                    state.projects.insert(n, p);
                }
                project = Some((name, ProjectState::default()));
            }
            Item::Scope(name) => {
                close_scope(&mut project, &mut scope, &mut table)?;
                scope = Some((name, ScopeState::default(), Vec::new()));
            }
            Item::Table {
                name,
                schema,
                created_seq,
            } => {
                close_table(&mut scope, &mut table)?;
                table = Some((
                    name,
                    TableState {
                        schema: Arc::new(schema),
                        created_seq,
                        rows: OrdMap::new(),
                        live_rows: 0,
                    },
                    Vec::new(),
                ));
            }
            Item::Kv {
                key,
                version,
                value,
            } => {
                let (_, _, entries) = scope.as_mut().ok_or("key outside a scope")?;
                if table.is_some() {
                    return Err("key after a table in the same scope".into());
                }
                if entries.last().is_some_and(|(prev, _)| *prev >= key) {
                    return Err("keys out of order or repeated".into());
                }
                entries.push((
                    key,
                    Versioned {
                        version,
                        value: Some(value),
                    },
                ));
                keys += 1;
            }
            Item::Row { key, version, row } => {
                let (name, t, entries) = table.as_mut().ok_or("row outside a table")?;
                if entries.last().is_some_and(|(prev, _)| *prev >= key) {
                    return Err("rows out of order or repeated".into());
                }
                // Queries index rows by column: a row must fit its table.
                t.schema.check_row(name, &row).map_err(|e| e.to_string())?;
                if t.schema.row_key(&row).as_slice() != key.as_slice() {
                    return Err("row stored under a key that is not its primary key".into());
                }
                entries.push((
                    key,
                    Versioned {
                        version,
                        value: Some(row),
                    },
                ));
                rows += 1;
            }
            Item::Idempotency { caller, key, seq } => {
                idempotency.push(IdempotencyEntry {
                    tag: IdempotencyTag { caller, key },
                    seq,
                    digest: None,
                });
            }
            Item::IdempotencyRecord {
                caller,
                key,
                seq,
                digest,
            } => {
                idempotency.push(IdempotencyEntry {
                    tag: IdempotencyTag { caller, key },
                    seq,
                    digest,
                });
            }
            Item::Grant { principal, grant } => {
                state.authz.grants.entry(principal).or_default().push(grant);
            }
            Item::Owner { project, owner } => {
                state.authz.owners.insert(project, owner);
            }
            Item::Bootstrapped => state.authz.bootstrapped = true,
            Item::LiveCount(n) => {
                let n = usize::try_from(n).map_err(|_| "live count too large")?;
                counts = true;
                match (&mut table, &mut scope) {
                    (Some((_, t, _)), _) => t.live_rows = n,
                    (None, Some((_, s, _))) => s.live_keys = n,
                    (None, None) => return Err("live count outside a scope".into()),
                }
            }
            Item::End {
                seq,
                keys: k,
                rows: rw,
            } => {
                close_scope(&mut project, &mut scope, &mut table)?;
                if let Some((n, p)) = project.take() {
                    state.projects.insert(n, p);
                }
                if seq != lsn || k != keys || rw != rows {
                    return Err(format!(
                        "End item says seq {seq}, {k} keys, {rw} rows; read seq {lsn}, {keys} keys, {rows} rows"
                    ));
                }
                return Ok(LoadedState {
                    state,
                    idempotency,
                    counts,
                });
            }
        }
    }
}
