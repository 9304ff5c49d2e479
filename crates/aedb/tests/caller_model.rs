//! The authenticated caller model: least-privilege grants, audit tables with hash
//! chains, GlobalAdmin auditing, bootstrap, admission control and alert metrics.

use std::sync::Arc;

use std::ops::Bound;

use aedb::{
    AedbConfig, AedbError, AedbInstance, AuditVerifyError, CallerContext, Column, ColumnType,
    CommitError, ConsistencyMode, DdlOperation, Limits, Permission, Query, ReadError, ReadTx,
    Secure, TableSchema, Value, WriteTransaction, verify_audit_export,
};

const MK: [u8; 32] = [5; 32];

fn admin() -> CallerContext {
    CallerContext::new("root-admin").expect("caller id")
}

/// A secure instance with project p (scopes s, t; table s/users) owned by `owner`.
fn secure(dir: &std::path::Path) -> AedbInstance<Secure> {
    let db = AedbInstance::open_secure(
        AedbConfig::production(MK).with_bootstrap_admin("root-admin"),
        dir,
    )
    .expect("open_secure");
    let a = admin();
    db.commit_ddl_as(
        &a,
        vec![
            DdlOperation::CreateProject {
                project: "p".into(),
                owner: Some("owner".into()),
            },
            DdlOperation::CreateProject {
                project: "q".into(),
                owner: Some("owner".into()),
            },
        ],
    )
    .expect("projects");
    db.commit_ddl_as(
        &a,
        vec![DdlOperation::GrantPermission {
            grantee: "auditor".into(),
            permission: Permission::AuditRead,
            delegable: false,
        }],
    )
    .expect("auditor");
    let owner = CallerContext::new("owner").expect("caller id");
    for (p, s) in [("p", "s"), ("p", "t"), ("q", "s")] {
        db.create_scope_as(&owner, p, s).expect("scope");
    }
    db.commit_ddl_as(
        &owner,
        vec![DdlOperation::CreateTable {
            project: "p".into(),
            scope: "s".into(),
            table: "users".into(),
            schema: TableSchema::new(
                vec![
                    Column::new("id", ColumnType::Int),
                    Column::new("name", ColumnType::Text),
                ],
                vec!["id".into()],
            ),
        }],
    )
    .expect("table");
    db.kv_set_as(&owner, "p", "s", b"user/1", b"alice")
        .expect("seed kv");
    let mut tx = db.begin_write_as(&owner, "p").expect("tx");
    tx.put_row(
        "s",
        "users",
        vec![Value::Int(1), Value::Text("alice".into())],
    )
    .expect("row");
    db.commit_as(&owner, tx).expect("seed row");
    db
}

fn grant(db: &AedbInstance<Secure>, who: &str, p: Permission) {
    db.commit_ddl_as(
        &CallerContext::new("owner").expect("caller id"),
        vec![DdlOperation::GrantPermission {
            grantee: who.into(),
            permission: p,
            delegable: false,
        }],
    )
    .or_else(|_| {
        db.commit_ddl_as(
            &admin(),
            vec![DdlOperation::GrantPermission {
                grantee: who.into(),
                permission: Permission::GlobalAdmin,
                delegable: false,
            }],
        )
    })
    .expect("grant");
}

fn audit_rows(db: &AedbInstance<Secure>, table: &str) -> Vec<Arc<Vec<Value>>> {
    // Read as a plain auditor: a GlobalAdmin read would itself add audit rows.
    db.query_as(
        &CallerContext::new("auditor").expect("caller id"),
        "_system",
        "audit",
        table,
        &Query::all(100_000),
    )
    .expect("audit query")
    .rows
}

fn count_kind(rows: &[Arc<Vec<Value>>], col: usize, kind: &str) -> usize {
    rows.iter()
        .filter(|r| r[col] == Value::Text(kind.into()))
        .count()
}

#[derive(Clone, Copy, Debug)]
enum Op {
    KvWrite,
    KvRead,
    KvScan,
    TableWrite,
    TableRead,
    TableDdl,
}

fn run(db: &AedbInstance<Secure>, who: &CallerContext, op: Op) -> Result<(), AedbError> {
    match op {
        Op::KvWrite => db.kv_set_as(who, "p", "s", b"user/2", b"bob").map(|_| ())?,
        Op::KvRead => db.kv_get(who, "p", "s", b"user/1").map(|_| ())?,
        Op::KvScan => db.kv_scan_prefix(who, "p", "s", b"user/", 10).map(|_| ())?,
        Op::TableWrite => {
            let mut tx = db.begin_write_as(who, "p")?;
            tx.put_row("s", "users", vec![Value::Int(2), Value::Text("bob".into())])?;
            db.commit_as(who, tx).map(|_| ())?
        }
        Op::TableRead => db
            .query_as(who, "p", "s", "users", &Query::all(10))
            .map(|_| ())?,
        Op::TableDdl => db
            .commit_ddl_as(
                who,
                vec![DdlOperation::CreateTable {
                    project: "p".into(),
                    scope: "s".into(),
                    table: format!("t{}", who.caller_id().len()),
                    schema: TableSchema::new(
                        vec![Column::new("id", ColumnType::Int)],
                        vec!["id".into()],
                    ),
                }],
            )
            .map(|_| ())?,
    }
    Ok(())
}

#[test]
fn permission_matrix_allows_exactly_what_is_granted_and_audits_every_deny() {
    let kv = |kind: &str, project: &str, scope: Option<&str>, prefix: Option<&[u8]>| {
        let (project, scope, prefix) = (
            project.to_string(),
            scope.map(Into::into),
            prefix.map(<[u8]>::to_vec),
        );
        if kind == "r" {
            Permission::KvRead {
                project,
                scope,
                prefix,
            }
        } else {
            Permission::KvWrite {
                project,
                scope,
                prefix,
            }
        }
    };
    let tw = |project: &str, scope: &str, table: &str| Permission::TableWrite {
        project: project.into(),
        scope: Some(scope.into()),
        table: Some(table.into()),
    };
    let tr = |table: &str| Permission::TableRead {
        project: "p".into(),
        scope: Some("s".into()),
        table: Some(table.into()),
    };
    // (shape name, grants, ops allowed)
    let shapes: Vec<(&str, Vec<Permission>, Vec<&str>)> = vec![
        ("none", vec![], vec![]),
        (
            "wrong project",
            vec![
                kv("r", "q", None, None),
                kv("w", "q", None, None),
                Permission::ProjectAdmin {
                    project: "q".into(),
                },
            ],
            vec![],
        ),
        (
            "wrong scope",
            vec![
                kv("r", "p", Some("t"), None),
                kv("w", "p", Some("t"), None),
                Permission::TableDdl {
                    project: "p".into(),
                    scope: Some("t".into()),
                },
            ],
            vec![],
        ),
        (
            "wrong table",
            vec![tw("p", "s", "orders"), tr("orders")],
            vec![],
        ),
        (
            "prefix mismatch",
            vec![
                kv("r", "p", Some("s"), Some(b"admin/")),
                kv("w", "p", Some("s"), Some(b"admin/")),
            ],
            vec![],
        ),
        (
            "kv read-only",
            vec![kv("r", "p", Some("s"), Some(b"user/"))],
            vec!["KvRead", "KvScan"],
        ),
        (
            "kv write-only",
            vec![kv("w", "p", Some("s"), Some(b"user/"))],
            vec!["KvWrite"],
        ),
        ("table read-only", vec![tr("users")], vec!["TableRead"]),
        (
            "table write + ddl",
            vec![
                tw("p", "s", "users"),
                Permission::TableDdl {
                    project: "p".into(),
                    scope: Some("s".into()),
                },
            ],
            vec!["TableWrite", "TableDdl"],
        ),
        (
            "scope admin",
            vec![Permission::ScopeAdmin {
                project: "p".into(),
                scope: "s".into(),
            }],
            vec![
                "KvWrite",
                "KvRead",
                "KvScan",
                "TableWrite",
                "TableRead",
                "TableDdl",
            ],
        ),
        (
            "global admin",
            vec![Permission::GlobalAdmin],
            vec![
                "KvWrite",
                "KvRead",
                "KvScan",
                "TableWrite",
                "TableRead",
                "TableDdl",
            ],
        ),
    ];
    let ops = [
        Op::KvWrite,
        Op::KvRead,
        Op::KvScan,
        Op::TableWrite,
        Op::TableRead,
        Op::TableDdl,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    for (i, (shape, grants, allowed)) in shapes.iter().enumerate() {
        let who =
            CallerContext::new(format!("caller-{i:02}-{}", "x".repeat(i))).expect("caller id");
        for g in grants {
            grant(&db, who.caller_id(), g.clone());
        }
        for op in ops {
            let denials_before =
                count_kind(&audit_rows(&db, "assertion_audit"), 5, "permission_denied");
            let ga_before = count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use");
            let expect_allowed = allowed.contains(&format!("{op:?}").as_str());
            let r = run(&db, &who, op);
            match (&r, expect_allowed) {
                (Ok(()), true) => {}
                (Err(AedbError::PermissionDenied { caller, permission }), false) => {
                    assert_eq!(caller, who.caller_id());
                    assert!(
                        !permission.contains("alice") && !permission.contains("bob"),
                        "no data in {permission}"
                    );
                }
                _ => panic!("{shape} / {op:?}: expected allowed={expect_allowed}, got {r:?}"),
            }
            let denials = count_kind(&audit_rows(&db, "assertion_audit"), 5, "permission_denied")
                - denials_before;
            let ga = count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use") - ga_before;
            assert_eq!(
                denials,
                usize::from(!expect_allowed),
                "{shape} / {op:?}: denial audit rows"
            );
            let is_global = *shape == "global admin";
            assert_eq!(
                ga > 0,
                is_global,
                "{shape} / {op:?}: GlobalAdmin use audit rows ({ga})"
            );
        }
    }
    db.verify_audit_chains().expect("audit chains intact");
    let m = db.operational_metrics();
    assert!(m.permission_denials >= 30, "{}", m.permission_denials);
    assert!(m.global_admin_uses >= 6);
    assert!(
        m.per_caller
            .iter()
            .any(|c| c.caller.starts_with("caller-00") && c.permission_denials_5m == 6)
    );
}

/// Every read a write transaction offers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TxRead {
    Get,
    ScanPrefix,
    ScanRange,
    GetRow,
}

const TX_READS: [TxRead; 4] = [
    TxRead::Get,
    TxRead::ScanPrefix,
    TxRead::ScanRange,
    TxRead::GetRow,
];

/// `read` through a write transaction on project p, returning what it saw.
fn tx_read(tx: &WriteTransaction, read: TxRead) -> Result<String, ReadError> {
    Ok(match read {
        TxRead::Get => format!("{:?}", tx.kv_get("s", b"user/1")?),
        TxRead::ScanPrefix => format!("{:?}", tx.kv_scan_prefix("s", b"user/", 10)?),
        TxRead::ScanRange => format!(
            "{:?}",
            tx.kv_scan_range("s", Bound::Included(b"a"), Bound::Unbounded, 10)?
        ),
        TxRead::GetRow => format!("{:?}", tx.get_row("s", "users", &[Value::Int(1)])?),
    })
}

/// The same read through a `ReadTx`, the reference for what a read may see.
fn read_tx_read(rt: &ReadTx<'_, Secure>, read: TxRead) -> Result<String, ReadError> {
    Ok(match read {
        TxRead::Get => format!("{:?}", rt.kv_get("p", "s", b"user/1")?),
        TxRead::ScanPrefix => format!("{:?}", rt.kv_scan_prefix("p", "s", b"user/", 10)?),
        TxRead::ScanRange => format!(
            "{:?}",
            rt.kv_scan_range("p", "s", Bound::Included(b"a"), Bound::Unbounded, 10)?
        ),
        TxRead::GetRow => format!("{:?}", rt.get_row("p", "s", "users", &[Value::Int(1)])?),
    })
}

fn denial_rows(db: &AedbInstance<Secure>) -> Vec<Arc<Vec<Value>>> {
    audit_rows(db, "assertion_audit")
        .into_iter()
        .filter(|r| r[5] == Value::Text("permission_denied".into()))
        .collect()
}

#[test]
fn write_transaction_reads_are_authorized_and_audited_like_read_tx_reads() {
    let kv_read = |project: &str, scope: Option<&str>, prefix: Option<&[u8]>| Permission::KvRead {
        project: project.into(),
        scope: scope.map(Into::into),
        prefix: prefix.map(<[u8]>::to_vec),
    };
    let table_read = |project: &str, scope: &str| Permission::TableRead {
        project: project.into(),
        scope: Some(scope.into()),
        table: Some("users".into()),
    };
    use TxRead::*;
    // (shape, grants, reads allowed)
    let shapes: Vec<(&str, Vec<Permission>, Vec<TxRead>)> = vec![
        ("no grant", vec![], vec![]),
        (
            "write-only",
            vec![
                Permission::KvWrite {
                    project: "p".into(),
                    scope: None,
                    prefix: None,
                },
                Permission::TableWrite {
                    project: "p".into(),
                    scope: None,
                    table: None,
                },
            ],
            vec![],
        ),
        (
            "other project",
            vec![kv_read("q", None, None), table_read("q", "s")],
            vec![],
        ),
        (
            "other scope",
            vec![kv_read("p", Some("t"), None), table_read("p", "t")],
            vec![],
        ),
        (
            "other prefix",
            vec![kv_read("p", Some("s"), Some(b"admin/"))],
            vec![],
        ),
        (
            // A range is not a prefix: like ReadTx, a range scan needs the whole scope.
            "prefix read",
            vec![kv_read("p", Some("s"), Some(b"user/"))],
            vec![Get, ScanPrefix],
        ),
        (
            "scope read",
            vec![kv_read("p", Some("s"), None)],
            vec![Get, ScanPrefix, ScanRange],
        ),
        ("table read", vec![table_read("p", "s")], vec![GetRow]),
        (
            "scope admin",
            vec![Permission::ScopeAdmin {
                project: "p".into(),
                scope: "s".into(),
            }],
            TX_READS.to_vec(),
        ),
        (
            "global admin",
            vec![Permission::GlobalAdmin],
            TX_READS.to_vec(),
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    for (i, (shape, grants, allowed)) in shapes.iter().enumerate() {
        let who = CallerContext::new(format!("wtx-reader-{i:02}")).expect("caller id");
        for g in grants {
            grant(&db, who.caller_id(), g.clone());
        }
        let tx = db.begin_write_as(&who, "p").expect("begin_write_as");
        let rt = db
            .begin_read_tx_as(&who, ConsistencyMode::AtLatest)
            .expect("read tx");
        for read in TX_READS {
            let denials_before = denial_rows(&db);
            let ga_before = count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use");
            let got = tx_read(&tx, read);
            let denials = denial_rows(&db);
            let ga = count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use") - ga_before;
            let reference = read_tx_read(&rt, read);
            match (&got, allowed.contains(&read)) {
                (Ok(seen), true) => {
                    assert_eq!(
                        denials.len(),
                        denials_before.len(),
                        "{shape} / {read:?}: an allowed read records no denial"
                    );
                    assert_eq!(
                        Some(seen),
                        reference.as_ref().ok(),
                        "{shape} / {read:?}: sees what a ReadTx sees"
                    );
                    assert!(seen.contains("alice") || seen.contains("97, 108"), "{seen}");
                }
                (Err(ReadError::PermissionDenied { caller, permission }), false) => {
                    assert_eq!(caller, who.caller_id(), "{shape} / {read:?}");
                    match &reference {
                        Err(ReadError::PermissionDenied {
                            caller: c,
                            permission: p,
                        }) => assert_eq!(
                            (c, p),
                            (caller, permission),
                            "{shape} / {read:?}: the same error as a ReadTx read"
                        ),
                        other => panic!("{shape} / {read:?}: ReadTx got {other:?}"),
                    }
                    assert_eq!(
                        denials.len(),
                        denials_before.len() + 1,
                        "{shape} / {read:?}: one denial audit row"
                    );
                    let row = denials.last().expect("denial row");
                    assert_eq!(row[3], Value::Text(who.caller_id().to_string()), "actor");
                    assert_eq!(row[4], Value::Text("p".into()), "project");
                    assert_eq!(row[7], Value::Text(permission.clone()), "needed");
                }
                (got, allowed) => {
                    panic!("{shape} / {read:?}: expected allowed={allowed}, got {got:?}")
                }
            }
            assert_eq!(
                ga > 0,
                *shape == "global admin" && got.is_ok(),
                "{shape} / {read:?}: GlobalAdmin use is audited ({ga} rows)"
            );
        }
    }
    db.verify_audit_chains().expect("audit chains intact");
}

#[test]
fn reading_your_own_writes_still_needs_read_permission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let writer = CallerContext::new("writer-only").expect("caller id");
    grant(
        &db,
        "writer-only",
        Permission::KvWrite {
            project: "p".into(),
            scope: Some("s".into()),
            prefix: Some(b"user/".to_vec()),
        },
    );
    grant(
        &db,
        "writer-only",
        Permission::TableWrite {
            project: "p".into(),
            scope: Some("s".into()),
            table: Some("users".into()),
        },
    );
    let mut tx = db.begin_write_as(&writer, "p").expect("tx");
    tx.kv_set("s", b"user/7", b"mine").expect("set");
    tx.put_row(
        "s",
        "users",
        vec![Value::Int(7), Value::Text("mine".into())],
    )
    .expect("row");
    let before = denial_rows(&db).len();
    assert!(
        matches!(
            tx.kv_get("s", b"user/7"),
            Err(ReadError::PermissionDenied { .. })
        ),
        "a key written in this transaction is still a read"
    );
    assert!(
        matches!(
            tx.kv_scan_prefix("s", b"user/", 10),
            Err(ReadError::PermissionDenied { .. })
        ),
        "writing user/7 must not open a scan over user/1"
    );
    assert!(matches!(
        tx.get_row("s", "users", &[Value::Int(7)]),
        Err(ReadError::PermissionDenied { .. })
    ));
    assert_eq!(denial_rows(&db).len(), before + 3, "each denial is audited");
    db.commit_as(&writer, tx)
        .expect("a denied read does not spoil the writes");

    // With read permission too, reads see the transaction's own writes first.
    grant(
        &db,
        "writer-only",
        Permission::KvRead {
            project: "p".into(),
            scope: Some("s".into()),
            prefix: Some(b"user/".to_vec()),
        },
    );
    let mut tx = db.begin_write_as(&writer, "p").expect("tx");
    tx.kv_set("s", b"user/1", b"changed").expect("set");
    assert_eq!(
        tx.kv_get("s", b"user/1").expect("read").as_deref(),
        Some(&b"changed"[..])
    );
}

#[test]
fn a_revoke_applies_to_write_transactions_already_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let read = Permission::KvRead {
        project: "p".into(),
        scope: Some("s".into()),
        prefix: None,
    };
    grant(&db, "reader", read.clone());
    let reader = CallerContext::new("reader").expect("caller id");
    let tx = db.begin_write_as(&reader, "p").expect("tx");
    assert!(tx.kv_get("s", b"user/1").expect("allowed").is_some());
    db.commit_ddl_as(
        &CallerContext::new("owner").expect("caller id"),
        vec![DdlOperation::RevokePermission {
            grantee: "reader".into(),
            permission: read,
        }],
    )
    .expect("revoke");
    assert!(matches!(
        tx.kv_get("s", b"user/1"),
        Err(ReadError::PermissionDenied { .. })
    ));
}

#[test]
fn anonymous_write_transactions_on_a_dev_instance_read_without_grants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = AedbInstance::open(AedbConfig::development(), dir.path()).expect("open");
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    db.kv_set("p", "s", b"k", b"v").expect("set");
    let mut tx = db.begin_write("p").expect("tx");
    tx.kv_set("s", b"k2", b"v2").expect("set");
    assert_eq!(
        tx.kv_get("s", b"k").expect("get").as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(tx.kv_scan_prefix("s", b"k", 10).expect("scan").len(), 2);
    // The authenticated API on a dev instance checks permissions like a secure one.
    let tx = db
        .begin_write_as(&CallerContext::new("nobody").expect("caller id"), "p")
        .expect("tx");
    assert!(matches!(
        tx.kv_get("s", b"k"),
        Err(ReadError::PermissionDenied { .. })
    ));
}

fn authz_rows_of(db: &AedbInstance<Secure>, actor: &str, action: &str) -> Vec<Arc<Vec<Value>>> {
    audit_rows(db, "authz_audit")
        .into_iter()
        .filter(|r| r[3] == Value::Text(actor.into()) && r[4] == Value::Text(action.into()))
        .collect()
}

fn assert_denied<T: std::fmt::Debug, E: Into<AedbError>>(r: Result<T, E>, who: &str, needed: &str) {
    match r.map_err(Into::into) {
        Err(AedbError::PermissionDenied { caller, permission }) => {
            assert_eq!((caller.as_str(), permission.as_str()), (who, needed));
        }
        other => panic!("{who}: expected PermissionDenied for {needed}, got {other:?}"),
    }
}

#[test]
fn backup_and_checkpoint_need_their_own_permission_and_are_audited() {
    let root = tempfile::tempdir().expect("tempdir");
    let db = secure(&root.path().join("data"));
    let backups = root.path().join("backups");
    let (full, inc) = (backups.join("full"), backups.join("inc"));
    let operator = CallerContext::new("operator").expect("caller id");
    let owner = CallerContext::new("owner").expect("caller id");

    // Neither a caller without grants nor a project owner may: backups copy every
    // project, and checkpoints are instance-wide.
    for who in [&operator, &owner] {
        let id = who.caller_id();
        let before = denial_rows(&db).len();
        assert_denied(db.checkpoint_as(who), id, "Checkpoint");
        assert_denied(db.backup_full_as(who, &full), id, "Backup");
        assert_denied(
            db.backup_full_as_with_progress(who, &full, &mut |_| {}),
            id,
            "Backup",
        );
        // Decided before the parent is looked at (it does not exist yet).
        assert_denied(db.backup_incremental_as(who, &inc, &full), id, "Backup");
        assert_denied(
            db.backup_incremental_as_with_progress(who, &inc, &full, &mut |_| {}),
            id,
            "Backup",
        );
        assert!(!full.exists() && !inc.exists(), "a denial writes nothing");
        let denials = denial_rows(&db);
        assert_eq!(denials.len(), before + 5, "{id}: every denial is audited");
        for row in &denials[before..] {
            assert_eq!(row[3], Value::Text(id.into()));
        }
    }

    // Granted through the normal grant DDL, each permission allows only its operation.
    let grant_to_operator = |permission: Permission| {
        db.commit_ddl_as(
            &admin(),
            vec![DdlOperation::GrantPermission {
                grantee: "operator".into(),
                permission,
                delegable: false,
            }],
        )
        .expect("grant")
    };
    grant_to_operator(Permission::Checkpoint);
    assert_eq!(
        authz_rows_of(&db, "root-admin", "grant")
            .last()
            .map(|r| r[5].clone()),
        Some(Value::Text("Checkpoint".into()))
    );
    let info = db
        .checkpoint_as(&operator)
        .expect("checkpoint with the grant");
    assert!(info.file.exists());
    let rows = authz_rows_of(&db, "operator", "checkpoint");
    assert_eq!(rows.len(), 1, "the checkpoint is audited");
    assert_eq!(rows[0][5], Value::Text("Checkpoint".into()));
    assert_eq!(rows[0][8], Value::Text("allowed".into()));
    assert_denied(db.backup_full_as(&operator, &full), "operator", "Backup");

    grant_to_operator(Permission::Backup);
    let ga_before = count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use");
    let mut progressed = 0;
    let r = db
        .backup_full_as_with_progress(&operator, &full, &mut |_| progressed += 1)
        .expect("full backup with the grant");
    assert!(progressed > 0 && r.end_lsn > 0);
    db.kv_set_as(&owner, "p", "s", b"user/3", b"carol")
        .expect("more writes");
    db.backup_incremental_as(&operator, &inc, &full)
        .expect("incremental backup with the grant");
    let full_rows = authz_rows_of(&db, "operator", "backup_full");
    let inc_rows = authz_rows_of(&db, "operator", "backup_incremental");
    assert_eq!(
        (full_rows.len(), inc_rows.len()),
        (1, 1),
        "each backup is audited"
    );
    assert_eq!(full_rows[0][5], Value::Text("Backup".into()));
    assert!(
        matches!(&full_rows[0][6], Value::Text(t) if t.contains(&full.display().to_string())),
        "the audit row names where the copy went: {:?}",
        full_rows[0][6]
    );
    assert_eq!(
        count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use"),
        ga_before,
        "an explicit grant is not a GlobalAdmin use"
    );
    let cfg = AedbConfig::production(MK);
    aedb::verify_backup_chain(&cfg, &[full.clone(), inc.clone()]).expect("the chain verifies");

    // The copy carries the audit row of the backup that made it.
    let restored = root.path().join("restored");
    aedb::restore_from_backup_chain(&cfg, std::slice::from_ref(&full), &restored).expect("restore");
    let copy = AedbInstance::open_secure(cfg, &restored).expect("open the restore");
    assert_eq!(authz_rows_of(&copy, "operator", "backup_full").len(), 1);
    copy.close().expect("close");

    // GlobalAdmin may, and that use is audited as such.
    db.checkpoint_as(&admin()).expect("GlobalAdmin checkpoint");
    assert_eq!(
        count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use"),
        ga_before + 1
    );

    // A revoke applies to the next call.
    db.commit_ddl_as(
        &admin(),
        vec![DdlOperation::RevokePermission {
            grantee: "operator".into(),
            permission: Permission::Backup,
        }],
    )
    .expect("revoke");
    assert_denied(
        db.backup_full_as(&operator, &backups.join("again")),
        "operator",
        "Backup",
    );
    db.verify_audit_chains().expect("audit chains intact");
}

#[test]
fn anonymous_api_is_not_reachable_on_a_secure_instance() {
    // Compile-time separation: `AedbInstance<Secure>` has no `snapshot`, `begin_write`,
    // `commit` or `kv_set`; the doc tests on `AedbInstance` prove it with
    // `compile_fail`. Here: the authenticated path works end to end.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let owner = CallerContext::new("owner").expect("caller id");
    assert_eq!(
        db.kv_get(&owner, "p", "s", b"user/1")
            .expect("get")
            .as_deref(),
        Some(&b"alice"[..])
    );
    assert!(
        matches!(
            db.begin_write_as(&owner, "_system"),
            Err(CommitError::NotFound { .. })
        ),
        "nobody writes the audit tables directly"
    );
}

#[test]
fn grants_are_audited_one_row_each_and_revokes_apply_to_open_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let owner = CallerContext::new("owner").expect("caller id");
    let r = Permission::KvRead {
        project: "p".into(),
        scope: Some("s".into()),
        prefix: None,
    };
    let w = Permission::KvWrite {
        project: "p".into(),
        scope: Some("s".into()),
        prefix: None,
    };
    db.commit_ddl_as(
        &owner,
        vec![
            DdlOperation::GrantPermission {
                grantee: "reader".into(),
                permission: r.clone(),
                delegable: true,
            },
            DdlOperation::GrantPermission {
                grantee: "reader".into(),
                permission: w.clone(),
                delegable: false,
            },
        ],
    )
    .expect("two grants in one commit");
    let rows = audit_rows(&db, "authz_audit");
    let grants: Vec<_> = rows
        .iter()
        .filter(|r| r[4] == Value::Text("grant".into()) && r[6] == Value::Text("reader".into()))
        .collect();
    assert_eq!(grants.len(), 2, "one row per grant");
    assert_eq!(grants[0][7], Value::Bool(true));
    assert_eq!(grants[1][7], Value::Bool(false));
    assert_eq!(grants[0][2], grants[1][2], "same commit");

    let reader = CallerContext::new("reader").expect("caller id");
    // Delegation: reader may pass on the delegable read, not the write.
    db.commit_ddl_as(
        &reader,
        vec![DdlOperation::GrantPermission {
            grantee: "friend".into(),
            permission: r.clone(),
            delegable: false,
        }],
    )
    .expect("delegable grant passes on");
    assert!(matches!(
        db.commit_ddl_as(
            &reader,
            vec![DdlOperation::GrantPermission {
                grantee: "friend".into(),
                permission: w,
                delegable: false
            }]
        ),
        Err(CommitError::PermissionDenied { .. })
    ));

    let tx = db
        .begin_read_tx_as(&reader, aedb::ConsistencyMode::AtLatest)
        .expect("read tx");
    assert!(tx.kv_get("p", "s", b"user/1").expect("allowed").is_some());
    db.commit_ddl_as(
        &owner,
        vec![DdlOperation::RevokePermission {
            grantee: "reader".into(),
            permission: r,
        }],
    )
    .expect("revoke");
    assert!(
        matches!(
            tx.kv_get("p", "s", b"user/1"),
            Err(ReadError::PermissionDenied { .. })
        ),
        "a revoke applies to snapshots opened before it"
    );
    let churn = db
        .operational_metrics()
        .per_caller
        .into_iter()
        .find(|c| c.caller == "owner")
        .expect("owner counters");
    assert_eq!(churn.permission_changes, 3);
}

#[test]
fn bootstrap_is_one_time_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = secure(dir.path());
        assert!(matches!(
            db.bootstrap_global_admin("intruder"),
            Err(CommitError::AlreadyExists { .. })
        ));
        db.checkpoint_as(&admin()).expect("checkpoint keeps grants");
        db.close().expect("close");
    }
    let db = AedbInstance::open_secure(
        AedbConfig::production(MK).with_bootstrap_admin("someone-else"),
        dir.path(),
    )
    .expect("reopen");
    let rows = audit_rows(&db, "authz_audit");
    let boots: Vec<_> = rows
        .iter()
        .filter(|r| r[4] == Value::Text("bootstrap".into()))
        .collect();
    assert_eq!(boots.len(), 1);
    assert_eq!(boots[0][6], Value::Text("root-admin".into()));
    assert!(matches!(
        db.create_project_as(&CallerContext::new("someone-else").expect("caller id"), "z"),
        Err(CommitError::PermissionDenied { .. })
    ));
    db.create_project_as(&admin(), "z")
        .expect("the bootstrapped admin still works");
}

#[test]
fn failed_assertions_are_audited_with_redacted_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let owner = CallerContext::new("owner").expect("caller id");
    let mut tx = db.begin_write_as(&owner, "p").expect("tx");
    tx.assert(aedb::ReadAssertion::KeyEquals {
        scope: "s".into(),
        key: b"user/1".to_vec(),
        value: b"mallory".to_vec(),
    });
    tx.kv_set("s", b"user/1", b"x").expect("set");
    assert!(matches!(
        db.commit_as(&owner, tx),
        Err(CommitError::AssertionFailed { index: 0, .. })
    ));
    let rows = audit_rows(&db, "assertion_audit");
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| r[5] == Value::Text("assertion_failed".into()))
        .collect();
    assert_eq!(failed.len(), 1);
    let text = format!("{:?}", failed[0]);
    assert!(
        !text.contains("alice") && !text.contains("mallory"),
        "values are redacted: {text}"
    );
    assert!(text.contains("version"), "{text}");
    assert_eq!(db.operational_metrics().aborts_assertion, 1);
}

#[test]
fn audit_export_verification_catches_removed_edited_and_reordered_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    for i in 0..5 {
        grant(
            &db,
            &format!("u{i}"),
            Permission::KvRead {
                project: "p".into(),
                scope: None,
                prefix: None,
            },
        );
    }
    let exports = db.export_audit_as(&admin(), 1).expect("export");
    let authz = exports
        .iter()
        .find(|e| e.table == "authz_audit")
        .expect("authz export")
        .clone();
    assert!(authz.rows.len() >= 6);
    verify_audit_export(&authz).expect("untouched export verifies");
    let json = serde_json::to_string(&authz).expect("export serialises");
    assert!(json.contains("chain_head"));

    let mut removed = authz.clone();
    removed.rows.remove(2);
    assert!(matches!(
        verify_audit_export(&removed),
        Err(AuditVerifyError::Gap { .. })
    ));
    let mut tail_cut = authz.clone();
    tail_cut.rows.pop();
    assert!(matches!(
        verify_audit_export(&tail_cut),
        Err(AuditVerifyError::HeadMismatch { .. })
    ));
    let mut edited = authz.clone();
    edited.rows[3][3] = Value::Text("someone-else".into());
    assert!(matches!(
        verify_audit_export(&edited),
        Err(AuditVerifyError::Altered { .. })
    ));
    let mut reordered = authz.clone();
    reordered.rows.swap(1, 2);
    assert!(verify_audit_export(&reordered).is_err());
    assert!(matches!(
        db.export_audit_as(&CallerContext::new("u1").expect("caller id"), 1),
        Err(ReadError::PermissionDenied { .. })
    ));
}

#[test]
fn overload_fails_fast_and_the_queue_bound_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_queued_commits: 4,
        ..Limits::default()
    };
    let db = Arc::new(
        AedbInstance::open(AedbConfig::development().with_limits(limits), dir.path())
            .expect("open"),
    );
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(db.operational_metrics().queued_commits);
            }
            max
        })
    };
    let writers: Vec<_> = (0..16)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                let (mut ok, mut overloaded) = (0, 0);
                for i in 0..200u32 {
                    match db.kv_set("p", "s", &[t, (i >> 8) as u8, i as u8], b"v") {
                        Ok(_) => ok += 1,
                        Err(CommitError::Overloaded { .. }) => overloaded += 1,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                (ok, overloaded)
            })
        })
        .collect();
    let (mut ok, mut overloaded) = (0, 0);
    for w in writers {
        let (o, v) = w.join().expect("writer");
        ok += o;
        overloaded += v;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_queued = sampler.join().expect("sampler");
    assert!(max_queued <= 4, "queue bound of 4 held: {max_queued}");
    assert!(
        overloaded > 0,
        "16 writers against a queue of 4 must be turned away sometimes"
    );
    assert_eq!(ok + overloaded, 16 * 200);
    let m = db.operational_metrics();
    assert_eq!(m.admission_rejections, overloaded);
    assert_eq!(m.commits, ok + 2);
    assert!(m.commit_latency_durable.count >= ok);
    assert!(m.commit_latency_durable.p99_us >= m.commit_latency_durable.p50_us);

    // An admission rate turns bursts away too.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_commits_per_sec: Some(5),
        ..Limits::default()
    };
    let db = AedbInstance::open(AedbConfig::development().with_limits(limits), dir2.path())
        .expect("open");
    db.create_project("p").ok();
    let rejected = (0..50)
        .filter(|_| {
            matches!(
                db.create_scope("p", "s"),
                Err(CommitError::Overloaded { .. })
            )
        })
        .count();
    assert!(rejected >= 40, "{rejected}");
}

#[test]
fn caller_contexts_are_validated_and_roles_carry_their_grants() {
    for bad in ["", "has space", "tab\there", "role:readers"] {
        assert!(
            matches!(CallerContext::new(bad), Err(AedbError::InvalidArgument(_))),
            "{bad:?} must be refused"
        );
    }
    assert!(CallerContext::new("x".repeat(257)).is_err());
    assert!(
        CallerContext::builder("ok")
            .role("bad role")
            .build()
            .is_err()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    grant(
        &db,
        "role:readers",
        Permission::KvRead {
            project: "p".into(),
            scope: Some("s".into()),
            prefix: None,
        },
    );
    let member = CallerContext::builder("carol")
        .role("readers")
        .build()
        .expect("caller with role");
    assert_eq!(member.caller_id(), "carol");
    assert_eq!(member.roles(), ["readers".to_string()]);
    assert_eq!(
        db.kv_get(&member, "p", "s", b"user/1")
            .expect("read through the role's grant")
            .as_deref(),
        Some(&b"alice"[..])
    );
    let outsider = CallerContext::new("carol").expect("caller id");
    assert!(matches!(
        db.kv_get(&outsider, "p", "s", b"user/1"),
        Err(ReadError::PermissionDenied { .. })
    ));
}

#[test]
fn project_exists_answers_only_callers_with_access_and_audits_global_admin_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let owner = CallerContext::new("owner").expect("caller id");
    let outsider = CallerContext::new("outsider").expect("caller id");
    let narrow = CallerContext::new("narrow").expect("caller id");
    grant(
        &db,
        "narrow",
        Permission::KvRead {
            project: "p".into(),
            scope: Some("t".into()),
            prefix: Some(b"x/".to_vec()),
        },
    );
    let denials = audit_rows(&db, "assertion_audit").len();
    let ga_uses = count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use");

    assert!(db.project_exists_as(&owner, "p").expect("owner, p"));
    assert!(db.project_exists_as(&narrow, "p").expect("narrow grant, p"));
    assert!(!db.project_exists_as(&narrow, "q").expect("narrow grant, q"));
    assert!(!db.project_exists_as(&owner, "nope").expect("owner, absent"));
    // Existing and absent look the same to a caller without access.
    assert!(!db.project_exists_as(&outsider, "p").expect("outsider, p"));
    assert!(
        !db.project_exists_as(&outsider, "nope")
            .expect("outsider, absent")
    );
    assert_eq!(
        audit_rows(&db, "assertion_audit").len(),
        denials,
        "asking is not a denial"
    );
    let auditor = CallerContext::new("auditor").expect("caller id");
    assert!(db.project_exists_as(&auditor, "_system").expect("auditor"));
    assert!(!db.project_exists_as(&owner, "_system").expect("owner"));

    assert!(db.project_exists_as(&admin(), "q").expect("admin, q"));
    assert!(
        !db.project_exists_as(&admin(), "nope")
            .expect("admin, absent")
    );
    assert_eq!(
        count_kind(&audit_rows(&db, "authz_audit"), 4, "global_admin_use"),
        ga_uses + 2,
        "each GlobalAdmin answer is audited"
    );
}

#[test]
fn versioned_scans_are_authorized_like_plain_scans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = secure(dir.path());
    let narrow = CallerContext::new("narrow").expect("caller id");
    grant(
        &db,
        "narrow",
        Permission::KvRead {
            project: "p".into(),
            scope: Some("s".into()),
            prefix: Some(b"user/".to_vec()),
        },
    );
    let rt = db
        .begin_read_tx_as(&narrow, ConsistencyMode::AtLatest)
        .expect("read tx");
    let listed = rt
        .kv_scan_prefix_versioned("p", "s", b"user/", 10)
        .expect("prefix scan within the grant");
    assert_eq!(listed.len(), 1);
    let (key, (version, value)) = &listed[0];
    assert_eq!(key.as_slice(), b"user/1");
    assert_eq!(&value[..], b"alice");
    assert_eq!(
        rt.kv_get_versioned("p", "s", b"user/1")
            .expect("point read")
            .map(|(v, _)| v),
        Some(*version)
    );
    assert_denied(
        rt.kv_scan_range_versioned("p", "s", Bound::Unbounded, Bound::Unbounded, 10),
        "narrow",
        "KvRead(p/s)",
    );
    assert_denied(
        db.kv_scan_prefix_versioned(&narrow, "p", "s", b"admin/", 10),
        "narrow",
        "KvRead(p/s, prefix 0x61646d696e2f)",
    );
}
