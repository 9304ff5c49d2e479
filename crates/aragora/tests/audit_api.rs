//! `GET /api/security/audit/search` against the real server: `total` comes
//! with `total_is_exact`, and a `before` that is not an entry id is a 400
//! naming it.

use std::path::Path;

use aragora_testkit::Server;

fn start() -> Server {
    Server::start(
        Path::new(env!("CARGO_BIN_EXE_aragora")),
        &[("JWT_SECRET", "audit-api-test-secret-0123456789abcdef0123")],
    )
}

#[test]
fn search_says_whether_its_total_is_exact_and_refuses_a_bad_before() {
    let s = start();
    let (_, admin) = s.bootstrap_admin("root@audit-api.test");
    let r = s.get("/api/security/audit/search?minutes=15&limit=1", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    let page = r.json();
    assert_eq!(page["total_is_exact"], true, "{page}");
    assert!(page["total"].as_u64().is_some_and(|t| t >= 1), "{page}");
    if let Some(before) = page["next_before"].as_str() {
        let r = s.get(
            &format!("/api/security/audit/search?minutes=15&limit=1&before={before}"),
            &admin,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for bad in ["zz", "0123", "ABCDEF0123456789"] {
        let r = s.get(&format!("/api/security/audit/search?before={bad}"), &admin);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        let e = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains("before"), "{bad}: {e}");
    }
}
