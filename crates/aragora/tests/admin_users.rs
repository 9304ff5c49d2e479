//! `GET /api/admin/users`: a top-level array (the runbook reads
//! `.[].last_active_at`), paginated with `?limit=&after=` and an RFC 8288
//! `Link: <...>; rel="next"` header, filtered with `?role=`.

use std::collections::BTreeSet;
use std::path::Path;

use aragora_testkit::{Server, Value, json};

fn ids(users: &[Value]) -> Vec<String> {
    users
        .iter()
        .map(|u| u["id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn users_are_a_top_level_array_paged_by_link_headers_and_filtered_by_role() {
    let s = Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &[]);
    let (admin_id, admin) = s.bootstrap_admin("admin@example.com");
    let mut approvers = BTreeSet::new();
    // No passwords: hashing is not what this test is about.
    for (i, role) in [
        "approver", "member", "approver", "member", "approver", "approver", "viewer",
    ]
    .iter()
    .enumerate()
    {
        let r = s.post(
            "/api/admin/users",
            &admin,
            &json!({"email": format!("user{i}@example.com"), "roles": [role]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        if *role == "approver" {
            approvers.insert(r.json()["id"].as_str().expect("id").to_string());
        }
    }

    // One page holding everyone: an array of users, in id order, no Link.
    let all = s.get("/api/admin/users?limit=1000", &admin);
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(
        all.next_link(),
        None,
        "a single page has no next: {}",
        all.body
    );
    let all = all.json();
    let all = all.as_array().expect("a top-level array");
    assert_eq!(all.len(), 8, "{all:?}");
    let all_ids = ids(all);
    assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "{all_ids:?}");
    assert!(all_ids.contains(&admin_id));
    for u in all {
        for field in ["id", "email", "roles", "disabled", "last_active_at"] {
            assert!(u.get(field).is_some(), "{field} in {u}");
        }
    }

    // Pages of 3 (3 + 3 + 2), following Link: every user once, nobody skipped,
    // each Link carrying the page size.
    let first = s.get("/api/admin/users?limit=3", &admin);
    let link = first.header("link").expect("Link on the first page");
    assert!(
        link.starts_with("</api/admin/users?after=") && link.ends_with("&limit=3>; rel=\"next\""),
        "{link}"
    );
    let pages = s.pages("/api/admin/users?limit=3", &admin);
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 3, 2],
        "{pages:?}"
    );
    let paged: Vec<String> = pages.iter().flat_map(|p| ids(p)).collect();
    assert_eq!(paged, all_ids, "pages in order, without duplicates or gaps");

    // A full last page has no Link to an empty one.
    let pages = s.pages("/api/admin/users?limit=4", &admin);
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [4, 4],
        "{pages:?}"
    );

    // ?role= filters, and the Link keeps the filter: 4 approvers, pages of 1.
    let only = s.get("/api/admin/users?role=approver&limit=1", &admin);
    let link = only.header("link").expect("Link");
    assert!(
        link.starts_with("</api/admin/users?role=approver&after=usr_"),
        "{link}"
    );
    let pages = s.pages("/api/admin/users?role=approver&limit=1", &admin);
    assert_eq!(pages.len(), 4, "{pages:?}");
    let paged: Vec<String> = pages.iter().flat_map(|p| ids(p)).collect();
    assert_eq!(
        paged.iter().cloned().collect::<BTreeSet<_>>(),
        approvers,
        "{paged:?}"
    );
    assert_eq!(paged.len(), approvers.len(), "no duplicates: {paged:?}");
    for page in &pages {
        for u in page {
            assert!(
                u["roles"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!("approver"))),
                "{u}"
            );
        }
    }
    // The runbook's approver availability check reads exactly this.
    let r = s.get("/api/admin/users?role=approver", &admin);
    assert_eq!(r.json().as_array().map(Vec::len), Some(4), "{}", r.body);
    // A role nobody holds (URL-encoded): an empty array.
    let r = s.get("/api/admin/users?role=no%20such%20role", &admin);
    assert_eq!((r.status, r.json()), (200, json!([])), "{}", r.body);
    assert_eq!(r.next_link(), None);
    // A cursor past everyone: an empty last page.
    let r = s.get("/api/admin/users?after=usr_zzzz", &admin);
    assert_eq!((r.status, r.json()), (200, json!([])), "{}", r.body);

    // Invalid paging parameters are 400 naming the parameter.
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("after=", "after"),
        ("after=usr_1%3E%3B%20rel%3D%22next%22", "after"),
        ("after=usr_1&after=usr_2", "after"),
    ] {
        let r = s.get(&format!("/api/admin/users?{query}"), &admin);
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.body.contains(param), "{query}: names {param}: {}", r.body);
    }
}
