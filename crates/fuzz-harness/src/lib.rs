//! The bodies of the fuzz targets, shared by the cargo-fuzz project (`fuzz/`, run
//! on nightly) and by the stable-toolchain test that replays every stored corpus
//! file (`tests/corpus_replay.rs`), so CI checks the corpora without nightly.
//!
//! Each body feeds arbitrary bytes to one decoder of bytes from disk or from the
//! network and panics only when an invariant breaks: a panic inside the decoder, an
//! error that is not the typed error the caller expects, or a round trip
//! (`decode(encode(x)) != x`) that does not hold. aedb's bodies live in
//! `aedb::fuzzing` (they need crate-internal decoders); aragora's are here (its
//! decoders are public).

use std::sync::{Arc, OnceLock};

use aragora::auth::jwt::JwtKeys;
use aragora::auth::{Credential, Principal, RequestMeta};
use aragora::crypto::{self, CryptoError, DataKey, MasterKey, WrappedKey};
use aragora::encryption::{Backup, KeyRecord};
use aragora::error::ServiceError;
use zeroize::Zeroizing;

/// A target's body: takes one input, panics only on a broken invariant.
pub type Body = fn(&[u8]);

/// Every fuzz target: its name (the file in `fuzz/fuzz_targets/` and the corpus
/// directory in `fuzz/corpus/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("wal_segment_header", aedb::fuzzing::wal_segment_header),
    ("wal_frames", aedb::fuzzing::wal_frames),
    ("wal_record", aedb::fuzzing::wal_record),
    ("wal_open", aedb::fuzzing::wal_open),
    ("checkpoint", aedb::fuzzing::checkpoint_file),
    ("manifest", aedb::fuzzing::manifest_file),
    ("backup_descriptor", aedb::fuzzing::backup_descriptor),
    ("envelope", envelope),
    ("keyring", keyring),
    ("jwt", jwt),
    ("bearer", bearer),
];

/// The body of target `name`.
pub fn target(name: &str) -> Option<Body> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

fn crypto_error_is_typed(e: &CryptoError) {
    let _ = e.to_string();
}

fn data_key(id: &str, version: u32, byte: u8) -> DataKey {
    DataKey::from_bytes(id, version, Zeroizing::new([byte; crypto::KEY_LEN]))
        .expect("a valid fuzz data key")
}

/// Splits off a selector byte and a record id (`u8` length) from the front.
fn split_id(data: &[u8]) -> (u8, String, &[u8]) {
    let (sel, rest) = data.split_first().map_or((0, data), |(s, r)| (*s, r));
    let n = rest
        .first()
        .map_or(0, |n| usize::from(*n % 64))
        .min(rest.len().saturating_sub(1));
    let id = rest.get(1..1 + n).unwrap_or_default();
    let rest = rest.get(1 + n..).unwrap_or_default();
    (sel, String::from_utf8_lossy(id).into_owned(), rest)
}

/// aragora's record envelope: header parsing and decryption of arbitrary bytes
/// under the key the header names (or another); and encrypt/decrypt round trips.
pub fn envelope(data: &[u8]) {
    let k1 = data_key("k1", 1, 0x11);
    let k2 = data_key("k2", 7, 0x22);
    let (sel, record_id, body) = split_id(data);
    let env = if sel & 1 == 0 {
        body.to_vec()
    } else {
        // Fuzz the ciphertext and header of a real envelope.
        let mut e = crypto::encrypt(&k1, &record_id, b"fuzz plaintext").expect("encrypt");
        for (i, b) in body.iter().enumerate().take(64) {
            let at = (usize::from(*b) * 7 + i) % e.len();
            e[at] ^= body.get(i + 1).copied().unwrap_or(1) | 1;
        }
        e
    };
    match crypto::parse_header(&env) {
        Ok(h) => assert!(!h.key_id.is_empty() && h.key_id.len() <= crypto::MAX_KEY_ID_LEN),
        Err(e) => crypto_error_is_typed(&e),
    }
    for k in [&k1, &k2] {
        if let Err(e) = crypto::decrypt(k, &record_id, &env) {
            crypto_error_is_typed(&e);
        }
    }
    let keys = [Arc::new(k1), Arc::new(k2)];
    let r = crypto::decrypt_with(&record_id, &env, |id, v| {
        keys.iter()
            .find(|k| k.key_id() == id && k.version() == v)
            .cloned()
    });
    if let Err(e) = r {
        crypto_error_is_typed(&e);
    }
    // Round trip under a key whose id and version come from the input.
    let id_len = 1 + usize::from(sel) % crypto::MAX_KEY_ID_LEN;
    let id: String = record_id
        .chars()
        .chain(std::iter::repeat('x'))
        .take(id_len)
        .collect();
    let Ok(k) = DataKey::from_bytes(
        id.clone(),
        u32::from(sel) << 8,
        Zeroizing::new([sel; crypto::KEY_LEN]),
    ) else {
        assert!(
            id.len() > crypto::MAX_KEY_ID_LEN,
            "a valid key id was refused"
        );
        return;
    };
    let sealed = crypto::encrypt(&k, &record_id, body).expect("encrypt");
    assert_eq!(sealed.len(), crypto::envelope_len(id.len(), body.len()));
    assert_eq!(crypto::parse_header(&sealed).expect("header"), k.header());
    assert_eq!(
        crypto::decrypt(&k, &record_id, &sealed).expect("round trip"),
        body
    );
}

fn master() -> MasterKey {
    MasterKey::from_bytes(Zeroizing::new([0x5a; crypto::KEY_LEN]))
}

/// Key-ring records as stored (JSON `KeyRecord`) and key-ring backup files
/// (`Backup`): decoding, unwrapping under the master key, and round trips.
pub fn keyring(data: &[u8]) {
    let m = master();
    let (sel, _, body) = split_id(data);
    let mut wrapped: Vec<WrappedKey> = Vec::new();
    match serde_json::from_slice::<KeyRecord>(body) {
        Ok(r) => {
            let json = serde_json::to_vec(&r).expect("encode record");
            let back: KeyRecord = serde_json::from_slice(&json).expect("decode re-encoded record");
            assert_eq!(back, r, "key record round trip");
            let _ = r.view();
            wrapped.extend(r.wrapped);
        }
        Err(_) => {
            if let Ok(b) = serde_json::from_slice::<Backup>(body) {
                wrapped.extend(b.keys.into_iter().filter_map(|k| k.wrapped));
            }
        }
    }
    if let Ok(w) = serde_json::from_slice::<WrappedKey>(body) {
        wrapped.push(w);
    }
    for w in &wrapped {
        match m.unwrap(w) {
            Ok(k) => assert_eq!((k.key_id(), k.version()), (w.key_id.as_str(), w.version)),
            Err(e) => crypto_error_is_typed(&e),
        }
    }
    // Wrap/unwrap round trip of a key named from the input.
    let id =
        String::from_utf8_lossy(body.get(..body.len().min(40)).unwrap_or_default()).into_owned();
    if let Ok(dek) = DataKey::from_bytes(id, u32::from(sel), Zeroizing::new([sel; crypto::KEY_LEN]))
    {
        let w = m.wrap(&dek).expect("wrap");
        let json = serde_json::to_string(&w).expect("encode wrapped");
        let back: WrappedKey = serde_json::from_str(&json).expect("decode wrapped");
        let k = m.unwrap(&back).expect("unwrap what was wrapped");
        assert_eq!((k.key_id(), k.version()), (dek.key_id(), dek.version()));
        let probe = crypto::encrypt(&dek, "r", b"p").expect("encrypt");
        assert_eq!(crypto::decrypt(&k, "r", &probe).expect("same key"), b"p");
    }
}

const JWT_SECRET: &str = "fuzz-jwt-secret-0123456789abcdef0123456789";
const JWT_PREVIOUS: &str = "fuzz-jwt-previous-0123456789abcdef012345678";

/// JWT verification of arbitrary strings (current and previous secret), and
/// issue/verify round trips with claims from the input.
pub fn jwt(data: &[u8]) {
    static KEYS: OnceLock<JwtKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| JwtKeys::new(JWT_SECRET, Some(JWT_PREVIOUS), 3600));
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    // Any outcome is typed (Claims or a TokenProblem); a forged token never passes.
    if let Ok(c) = keys.verify(token) {
        assert_eq!((c.iss.as_str(), c.aud.as_str()), ("aragora", "aragora-api"));
    }
    let mid = (0..=token.len() / 2)
        .rev()
        .find(|&i| token.is_char_boundary(i))
        .unwrap_or(0);
    let (sub, sid) = token.split_at(mid);
    let now = aragora::clock::now_us() / 1_000_000;
    let (t, claims) = keys.issue(sub, sid, now).expect("issue");
    assert_eq!(keys.verify(&t), Ok(claims), "issue/verify round trip");
}

struct Bearer {
    state: aragora::app::AppState,
    api_key: String,
    token: String,
    _dir: tempfile::TempDir,
}

fn bearer_state() -> &'static Bearer {
    static STATE: OnceLock<Bearer> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let hex32 = |b: u8| format!("{b:02x}").repeat(32);
        let mut vars = std::collections::BTreeMap::new();
        vars.insert(
            "ARAGORA_DATA_DIR".to_string(),
            dir.path().display().to_string(),
        );
        vars.insert("ARAGORA_LOG_LEVEL".into(), "error".into());
        vars.insert("AEDB_MANIFEST_KEY".into(), hex32(5));
        vars.insert("AEDB_CHECKPOINT_KEY".into(), hex32(6));
        vars.insert("ARAGORA_ENCRYPTION_KEY".into(), hex32(7));
        vars.insert("JWT_SECRET".into(), JWT_SECRET.into());
        let config = aragora::config::Config::from_vars(&vars).expect("config");
        let store: Arc<dyn aragora::store::Store> = Arc::new(
            aragora::store::embedded::EmbeddedStore::open(
                &dir.path().join("aedb"),
                [5; 32],
                [6; 32],
            )
            .expect("store"),
        );
        let state = aragora::app::AppState::new(config, store, JWT_SECRET).expect("state");
        let meta = RequestMeta::default();
        let admin = Principal {
            user_id: "fuzz".into(),
            email: "fuzz-harness@example.com".into(),
            roles: vec!["admin".into()],
            credential: Credential::ApiKey {
                key_id: "fuzz".into(),
            },
        };
        let user = state
            .auth
            .create_user(
                &admin,
                "fuzz@example.com",
                Some("fuzz password 123"),
                vec!["member".into()],
                &meta,
            )
            .expect("user");
        let (_, api_key) = state
            .auth
            .create_api_key(&admin, &user.id, "fuzz", &meta)
            .expect("api key");
        let (token, _, _) = state
            .auth
            .login("fuzz@example.com", "fuzz password 123", &meta)
            .expect("login");
        Bearer {
            state,
            api_key,
            token,
            _dir: dir,
        }
    })
}

/// `Authorization` header values through the whole authentication path (API-key
/// parsing and lookup, JWT verification, session lookup). Bad credentials must
/// be refused as unauthorized (401), never as a server error; the two real
/// credentials (the corpus seeds name them `@api_key@` / `@jwt@`) must pass.
pub fn bearer(data: &[u8]) {
    let b = bearer_state();
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let header = header
        .replace("@api_key@", &b.api_key)
        .replace("@jwt@", &b.token);
    let meta = RequestMeta::default();
    match b.state.auth.authenticate(Some(&header), &meta) {
        Ok(p) => assert_eq!(p.email, "fuzz@example.com"),
        Err(ServiceError::Unauthorized { .. }) => {}
        Err(e) => panic!("a bad credential was answered with {e:?}, not 401"),
    }
}
