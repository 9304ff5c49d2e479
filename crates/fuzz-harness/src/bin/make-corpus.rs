//! Writes the seed corpora of every fuzz target from real files: it creates
//! databases (development, and keyed + encrypted with the fuzz keys), commits,
//! checkpoints, takes backups, builds aragora envelopes, key-ring records and
//! tokens, and stores each as a seed in `<out>/<target>/<name>`.
//!
//! `cargo run -p fuzz-harness --bin make-corpus -- fuzz/corpus` (the default).

use std::fs;
use std::path::{Path, PathBuf};

use aedb::fuzzing::{FUZZ_CHECKPOINT_KEY, FUZZ_MANIFEST_KEY};
use aedb::{AedbConfig, AedbInstance, Column, ColumnType, DdlOperation, Permission, TableSchema};
use aragora::crypto::{self, DataKey, MasterKey};
use zeroize::Zeroizing;

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

struct Out {
    root: PathBuf,
    written: usize,
}

impl Out {
    fn seed(&mut self, target: &str, name: &str, bytes: &[u8]) -> Res {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(format!("seed-{name}")), bytes)?;
        self.written += 1;
        Ok(())
    }
}

fn with_selector(sel: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(rest);
    v
}

/// A segment without its zero-filled tail (plus one zero frame header).
fn trimmed(seg: &[u8]) -> Vec<u8> {
    let end = seg.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let mut v = seg[..end.max(128)].to_vec();
    v.extend_from_slice(&[0u8; 48]);
    v
}

/// The payloads of the frames of a segment buffer.
fn payloads(seg: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 128;
    while pos + 48 <= seg.len() {
        let word = u32::from_le_bytes([seg[pos], seg[pos + 1], seg[pos + 2], seg[pos + 3]]);
        let len = (word & !(1 << 31)) as usize;
        if len == 0 || pos + 48 + len > seg.len() {
            break;
        }
        out.push(seg[pos + 48..pos + 48 + len].to_vec());
        pos += 48 + len;
    }
    out
}

/// The item stream of an unencrypted checkpoint (chunks joined, zstd decoded).
fn item_stream(ckpt: &[u8]) -> Res<Vec<u8>> {
    let mut compressed = Vec::new();
    let mut pos = 256;
    while pos + 4 <= ckpt.len() {
        let n =
            u32::from_le_bytes([ckpt[pos], ckpt[pos + 1], ckpt[pos + 2], ckpt[pos + 3]]) as usize;
        compressed.extend_from_slice(&ckpt[pos + 4..pos + 4 + n]);
        pos += 4 + n;
    }
    Ok(zstd_decode(&compressed)?)
}

fn zstd_decode(b: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::decode_all(b)
}

fn files(dir: &Path) -> Res<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            v.push((
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path())?,
            ));
        }
    }
    v.sort();
    Ok(v)
}

/// `wal_open` inputs that add a checkpoint to the frames `pieces` (see
/// `aedb::fuzzing::wal_open` for the layout): below, inside, at the end of and past
/// the log, with a wrong chain head, without a manifest, and near the largest LSN.
fn wal_open_checkpoint_seeds(out: &mut Out, name: &str, pieces: &[u8], frames: usize) -> Res {
    const CKPT: u8 = 2;
    const ANY_FIRST: u8 = 4;
    const RIGHT_HEAD: u8 = 8;
    const MANIFEST: u8 = 16;
    const DURABLE: u8 = 32;
    const TABLES: u8 = 64;
    let n = u8::try_from(frames.min(255))?;
    let normal = CKPT | RIGHT_HEAD | MANIFEST | DURABLE;
    // (name, selector, first LSN field, mode, distance, raw LSN)
    let variants: [(&str, u8, u64, u8, u8, u64); 9] = [
        ("ckpt-inside", normal | TABLES, 0, 1, n / 2, 0),
        ("ckpt-at-end", normal, 0, 2, 0, 0),
        ("ckpt-past-end", normal, 0, 2, 3, 0),
        ("ckpt-before-start", normal | TABLES, 9, 0, 0, 0),
        ("ckpt-gap-before-start", normal | TABLES, 9, 0, 4, 0),
        ("ckpt-wrong-head", CKPT | MANIFEST | TABLES, 0, 1, n / 2, 0),
        (
            "ckpt-no-manifest",
            CKPT | RIGHT_HEAD | TABLES,
            0,
            1,
            n / 2,
            0,
        ),
        (
            "ckpt-near-max-lsn",
            normal | ANY_FIRST,
            (i64::MAX - 2) as u64,
            0,
            0,
            0,
        ),
        (
            "ckpt-raw-lsn",
            normal | ANY_FIRST,
            u64::MAX - 1,
            3,
            0,
            u64::MAX,
        ),
    ];
    for (variant, sel, first, mode, delta, raw) in variants {
        let mut v = vec![sel];
        if sel & ANY_FIRST != 0 {
            v.extend_from_slice(&first.to_le_bytes());
        } else {
            v.push(u8::try_from(first)?);
        }
        v.extend_from_slice(&[mode, delta]);
        v.extend_from_slice(&raw.to_le_bytes());
        v.extend_from_slice(pieces);
        out.seed("wal_open", &format!("{name}-{variant}"), &v)?;
    }
    Ok(())
}

fn populate(db: &AedbInstance<aedb::Dev>) -> Res {
    db.bootstrap_global_admin("admin")?;
    db.create_project("p")?;
    db.create_scope("p", "s")?;
    db.create_table(
        "p",
        "s",
        "t",
        TableSchema::new(
            vec![
                Column::new("id", ColumnType::Int),
                Column::new("label", ColumnType::Text),
            ],
            vec!["id".into()],
        ),
    )?;
    db.commit_ddl_batch(vec![DdlOperation::GrantPermission {
        grantee: "alice".into(),
        permission: Permission::KvRead {
            project: "p".into(),
            scope: Some("s".into()),
            prefix: Some(b"k".to_vec()),
        },
        delegable: false,
    }])?;
    for i in 0..12i64 {
        let mut tx = db.begin_write("p")?;
        tx.kv_set(
            "s",
            format!("k{i}").as_bytes(),
            format!("value {i}").as_bytes(),
        )?;
        tx.put_row(
            "s",
            "t",
            vec![aedb::Value::Int(i), aedb::Value::Text(format!("row {i}"))],
        )?;
        db.commit(tx)?;
    }
    db.kv_del("p", "s", b"k3")?;
    Ok(())
}

fn aedb_seeds(out: &mut Out, tmp: &Path) -> Res {
    for (tag, keyed) in [("dev", false), ("keyed", true)] {
        let config = if keyed {
            AedbConfig::production(FUZZ_MANIFEST_KEY).with_checkpoint_key(FUZZ_CHECKPOINT_KEY)
        } else {
            AedbConfig::development()
        }
        .with_segment_bytes(256 * 1024)
        .with_checkpoint_policy(None, None)
        .with_limits(aedb::Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 16 * 1024,
            ..Default::default()
        });
        let data = tmp.join(format!("db-{tag}"));
        let db = AedbInstance::open(config.clone(), &data)?;
        populate(&db)?;
        // Segments and payloads before the checkpoint removes them.
        let sel = u8::from(keyed);
        for (name, bytes) in files(&data)? {
            if name.ends_with(".seg") {
                let seg = trimmed(&bytes);
                out.seed("wal_segment_header", &format!("{tag}-{name}"), &seg[..128])?;
                out.seed(
                    "wal_frames",
                    &format!("{tag}-{name}"),
                    &with_selector(sel, &seg),
                )?;
                // A torn final frame.
                let cut = seg.len() - 48 - 7;
                out.seed(
                    "wal_frames",
                    &format!("{tag}-torn-{name}"),
                    &with_selector(sel, &seg[..cut]),
                )?;
                if !keyed {
                    let ps = payloads(&seg);
                    let mut open = vec![0u8];
                    for (i, p) in ps.iter().enumerate() {
                        out.seed("wal_record", &format!("{tag}-{name}-{i}"), p)?;
                        open.extend_from_slice(&(p.len() as u16).to_le_bytes());
                        open.extend_from_slice(p);
                    }
                    out.seed("wal_open", &format!("{tag}-{name}"), &open)?;
                    wal_open_checkpoint_seeds(out, &format!("{tag}-{name}"), &open[1..], ps.len())?;
                    let mut frames = vec![0u8];
                    frames.extend_from_slice(&1u64.to_le_bytes());
                    frames.extend_from_slice(&[0u8; 32]);
                    frames.extend_from_slice(&open[1..]);
                    out.seed("wal_frames", &format!("{tag}-pieces-{name}"), &frames)?;
                }
            }
        }
        db.checkpoint()?;
        db.kv_set("p", "s", b"after", b"checkpoint")?;
        let full = tmp.join(format!("full-{tag}"));
        db.backup_full(&full)?;
        db.kv_set("p", "s", b"after", b"backup")?;
        let inc = tmp.join(format!("inc-{tag}"));
        db.backup_incremental(&inc, &full)?;
        db.close()?;
        for (name, bytes) in files(&data)? {
            if name.ends_with(".ckpt") {
                out.seed(
                    "checkpoint",
                    &format!("{tag}-file"),
                    &with_selector(0, &bytes),
                )?;
                if !keyed {
                    let items = item_stream(&bytes)?;
                    let lsn = u64::from_le_bytes(bytes[16..24].try_into()?);
                    let mut v = vec![1u8];
                    v.extend_from_slice(&lsn.to_le_bytes());
                    v.extend_from_slice(&items);
                    out.seed("checkpoint", &format!("{tag}-items"), &v)?;
                }
            }
            if name == "MANIFEST" {
                out.seed(
                    "manifest",
                    &format!("{tag}-file"),
                    &with_selector(0, &bytes),
                )?;
                let body = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
                out.seed(
                    "manifest",
                    &format!("{tag}-body"),
                    &with_selector(1 | if keyed { 2 } else { 0 }, body),
                )?;
            }
        }
        for (kind, dir) in [("full", &full), ("inc", &inc)] {
            let desc = fs::read(dir.join("backup.json"))?;
            let k = if keyed { 2 } else { 0 };
            out.seed(
                "backup_descriptor",
                &format!("{tag}-{kind}-file"),
                &with_selector(k, &desc),
            )?;
            let body = desc.split(|&b| b == b'\n').next().unwrap_or_default();
            out.seed(
                "backup_descriptor",
                &format!("{tag}-{kind}-body"),
                &with_selector(1 | k | 4, body),
            )?;
        }
    }
    Ok(())
}

fn aragora_seeds(out: &mut Out) -> Res {
    let k1 = DataKey::from_bytes("k1", 1, Zeroizing::new([0x11; crypto::KEY_LEN]))?;
    let long = DataKey::from_bytes("x".repeat(255), u32::MAX, Zeroizing::new([3; 32]))?;
    for (name, key, record, plain) in [
        ("short", &k1, "rec-1", &b"secret value"[..]),
        ("empty", &k1, "r", &b""[..]),
        ("long-id", &long, "record-with-a-longer-id", &[7u8; 300][..]),
    ] {
        let env = crypto::encrypt(key, record, plain)?;
        let mut v = vec![0u8, record.len() as u8];
        v.extend_from_slice(record.as_bytes());
        v.extend_from_slice(&env);
        out.seed("envelope", name, &v)?;
    }
    out.seed(
        "envelope",
        "mutate",
        &[1, 5, b'r', b'e', b'c', b'-', b'1', 9, 200, 3],
    )?;

    let master = MasterKey::from_bytes(Zeroizing::new([0x5a; crypto::KEY_LEN]));
    let dek = DataKey::from_bytes("dek-0001", 1, Zeroizing::new([0x21; 32]))?;
    let wrapped = master.wrap(&dek)?;
    let record = aragora::encryption::KeyRecord {
        key_id: "dek-0001".into(),
        version: 1,
        status: aragora::encryption::KeyStatus::Active,
        primary: true,
        created_at: "2026-01-01T00:00:00Z".into(),
        created_at_us: 1_767_225_600_000_000,
        expires_at: "2026-04-01T00:00:00Z".into(),
        expires_at_us: 1_775_001_600_000_000,
        retired_at: None,
        retired_at_us: None,
        master_fingerprint: Some(master.fingerprint()),
        wrapped: Some(wrapped.clone()),
    };
    let json = serde_json::to_vec(&record)?;
    out.seed(
        "keyring",
        "record",
        &with_selector(0, &[&[0u8][..], &json].concat()),
    )?;
    let backup = aragora::encryption::Backup {
        created_at: "2026-01-01T00:00:00Z".into(),
        master_fingerprint: master.fingerprint(),
        keys: vec![record],
    };
    let json = serde_json::to_vec_pretty(&backup)?;
    out.seed(
        "keyring",
        "backup",
        &with_selector(1, &[&[0u8][..], &json].concat()),
    )?;
    let json = serde_json::to_vec(&wrapped)?;
    out.seed(
        "keyring",
        "wrapped",
        &with_selector(2, &[&[0u8][..], &json].concat()),
    )?;

    let keys =
        aragora::auth::jwt::JwtKeys::new("fuzz-jwt-secret-0123456789abcdef0123456789", None, 3600);
    let now = aragora::clock::now_us() / 1_000_000;
    let (t, _) = keys.issue("user-1", "user-1.session", now)?;
    out.seed("jwt", "valid", t.as_bytes())?;
    let (t, _) = keys.issue("user-1", "user-1.session", now - 7200)?;
    out.seed("jwt", "expired", t.as_bytes())?;
    let prev =
        aragora::auth::jwt::JwtKeys::new("fuzz-jwt-previous-0123456789abcdef012345678", None, 3600);
    let (t, _) = prev.issue("user-2", "user-2.s", now - 60)?;
    out.seed("jwt", "previous", t.as_bytes())?;
    out.seed(
        "jwt",
        "alg-none",
        b"eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1In0.",
    )?;

    for (name, h) in [
        ("api-key", "Bearer @api_key@"),
        ("jwt", "Bearer @jwt@"),
        ("api-key-lower", "bearer ara_0011223344556677_deadbeef"),
        ("api-key-noid", "Bearer ara__"),
        ("basic", "Basic dXNlcjpwYXNz"),
        ("jwt-garbage", "Bearer eyJ.eyJ.sig"),
    ] {
        out.seed("bearer", name, h.as_bytes())?;
    }
    Ok(())
}

fn main() -> Res {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("fuzz/corpus"));
    let tmp = tempfile::tempdir()?;
    let mut out = Out { root, written: 0 };
    aedb_seeds(&mut out, tmp.path())?;
    aragora_seeds(&mut out)?;
    for (name, _) in fuzz_harness::TARGETS {
        fs::create_dir_all(out.root.join(name))?;
        // An empty input is a seed of every target.
        fs::write(out.root.join(name).join("seed-empty"), b"")?;
    }
    println!("{} seeds written under {}", out.written, out.root.display());
    Ok(())
}
