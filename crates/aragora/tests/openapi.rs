//! `/api/openapi.json` against the real server: every route the router serves
//! is documented, and every route's real answer validates against the schema
//! the document gives for its status (with `$ref`s resolved into
//! `components.schemas`, and objects closed: a field the document does not
//! name fails too).

use std::collections::BTreeSet;
use std::path::Path;

use aragora_testkit::{Request, Response, Server};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

fn server() -> Server {
    Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &[])
}

/// The document's operations as (METHOD, path template).
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            out.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    out
}

/// Closes every object schema: `additionalProperties: false`, or for an
/// `allOf` (a flattened struct) `unevaluatedProperties: false` on the whole,
/// leaving its members (and the components they name) open so the parts can
/// add up.
fn close(schema: &mut Value, in_all_of: bool) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("allOf") {
                map.entry("unevaluatedProperties").or_insert(json!(false));
                if let Some(Value::Array(parts)) = map.get_mut("allOf") {
                    for p in parts {
                        close(p, true);
                    }
                }
            }
            if !in_all_of && map.contains_key("properties") {
                map.entry("additionalProperties").or_insert(json!(false));
            }
            for (k, v) in map.iter_mut() {
                if k != "allOf" {
                    close(v, false);
                }
            }
        }
        Value::Array(items) => {
            for i in items {
                close(i, false);
            }
        }
        _ => {}
    }
}

/// Components named directly inside an `allOf` (flattened into another type).
fn flattened(doc: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(parts)) = m.get("allOf") {
                    for p in parts {
                        if let Some(r) = p["$ref"].as_str() {
                            out.insert(r.rsplit('/').next().unwrap_or_default().to_string());
                        }
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(doc, &mut out);
    out
}

/// The validator for (method, path, status) from the document.
struct Schemas {
    doc: Value,
    components: Value,
}

impl Schemas {
    fn new(doc: Value) -> Self {
        let open = flattened(&doc);
        let mut components = doc["components"]["schemas"].clone();
        for (name, schema) in components.as_object_mut().expect("schemas").iter_mut() {
            close(schema, open.contains(name));
        }
        Schemas { doc, components }
    }

    fn check(&self, method: &str, template: &str, r: &Response) {
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        let resp = &op["responses"][r.status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {template} answered {} (undocumented status): {}",
            r.status,
            r.body
        );
        let Some(content) = resp["content"].as_object() else {
            assert!(
                r.body.is_empty(),
                "{method} {template} {}: the document says no body, got {}",
                r.status,
                r.body
            );
            return;
        };
        let (ty, media) = content.iter().next().expect("one content type");
        let instance = if ty == "application/json" {
            serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("{method} {template}: not JSON ({e}): {}", r.body))
        } else {
            Value::String(r.body.clone())
        };
        let mut schema = media["schema"].clone();
        close(&mut schema, false);
        let root = json!({"allOf": [schema], "components": {"schemas": self.components}});
        let validator = jsonschema::draft202012::new(&root)
            .unwrap_or_else(|e| panic!("{method} {template}: schema does not compile: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {}: the body does not match the document:\n  {}\nbody: {}",
            r.status,
            errors.join("\n  "),
            r.body
        );
    }
}

/// One request, its route template and the status it must get.
struct Case {
    method: &'static str,
    template: &'static str,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    status: u16,
}

fn case(method: &'static str, template: &'static str, status: u16) -> Case {
    Case {
        method,
        template,
        path: template.to_string(),
        token: None,
        body: None,
        status,
    }
}

impl Case {
    fn at(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }
    fn as_(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }
    fn body(mut self, v: Value) -> Self {
        self.body = Some(v);
        self
    }
    fn run(&self, s: &Server, schemas: &Schemas, seen: &mut BTreeSet<(String, String)>) -> Value {
        let mut req = Request::new(self.method, &self.path);
        if let Some(t) = &self.token {
            req = req.bearer(t);
        }
        if let Some(b) = &self.body {
            req = req.json(b);
        }
        let r = s.send(req);
        assert_eq!(
            r.status, self.status,
            "{} {}: {}",
            self.method, self.path, r.body
        );
        schemas.check(self.method, self.template, &r);
        seen.insert((self.method.to_string(), self.template.to_string()));
        serde_json::from_str(&r.body).unwrap_or(Value::Null)
    }
}

#[test]
fn every_route_answers_with_the_documented_schema() {
    let s = server();
    let (_, admin) = s.bootstrap_admin("admin@openapi.test");
    let doc = s.send(Request::new("GET", "/api/openapi.json")).json();
    let schemas = Schemas::new(doc.clone());
    let mut seen = BTreeSet::new();
    let a = admin.as_str();
    let mut run = |c: Case| c.run(&s, &schemas, &mut seen);

    run(case("GET", "/api/health", 200));
    run(case("GET", "/metrics", 200));
    run(case("GET", "/api/routes", 200));
    run(case("GET", "/api/openapi.json", 200));

    // A user with a password session.
    let uid = run(case("POST", "/api/admin/users", 201)
        .as_(a)
        .body(json!({"email": "u@openapi.test", "password": PASSWORD, "roles": ["viewer"]})))["id"]
        .as_str()
        .expect("id")
        .to_string();
    let session = run(case("POST", "/api/auth/login", 200)
        .body(json!({"email": "u@openapi.test", "password": PASSWORD})))["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    run(case("GET", "/api/auth/me", 200).as_(&session));
    run(case("POST", "/api/auth/password", 204)
        .as_(&session)
        .body(json!({"current_password": PASSWORD, "new_password": format!("{PASSWORD}!")})));
    run(case("GET", "/api/auth/api-keys", 200).as_(a));
    let key = run(case("POST", "/api/auth/api-keys", 201)
        .as_(a)
        .body(json!({"name": "ci"})))["id"]
        .as_str()
        .expect("key id")
        .to_string();
    run(case("GET", "/api/auth/api-keys", 200).as_(a));
    run(case("DELETE", "/api/auth/api-keys/{key_id}", 200)
        .at(format!("/api/auth/api-keys/{key}"))
        .as_(a));
    run(case("POST", "/api/auth/logout", 204).as_(&session));

    // Account administration on the user.
    let u = |suffix: &str| format!("/api/admin/users/{uid}{suffix}");
    run(case("GET", "/api/admin/users", 200).as_(a));
    run(case("GET", "/api/admin/users/{id}", 200).at(u("")).as_(a));
    run(case("POST", "/api/admin/users/{id}/roles", 200)
        .at(u("/roles"))
        .as_(a)
        .body(json!({"role": "security_analyst"})));
    run(case("DELETE", "/api/admin/users/{id}/roles/{role}", 200)
        .at(u("/roles/security_analyst"))
        .as_(a));
    run(case("POST", "/api/admin/users/{id}/password", 204)
        .at(u("/password"))
        .as_(a)
        .body(json!({"password": PASSWORD})));
    run(case("POST", "/api/admin/users/{id}/disable", 200)
        .at(u("/disable"))
        .as_(a)
        .body(json!({"reason": "schema check"})));
    run(case("POST", "/api/admin/users/{id}/enable", 200)
        .at(u("/enable"))
        .as_(a));
    run(case("POST", "/api/admin/users/bulk-lock", 200)
        .as_(a)
        .body(json!({"emails": ["u@openapi.test", "nobody@openapi.test"], "duration": "1h"})));
    run(case("POST", "/api/admin/users/{id}/unlock", 200)
        .at(u("/unlock"))
        .as_(a));
    run(case("POST", "/api/admin/users/{id}/revoke-keys", 200)
        .at(u("/revoke-keys"))
        .as_(a));
    let user_key = run(case("POST", "/api/admin/users/{id}/api-keys", 201)
        .at(u("/api-keys"))
        .as_(a)
        .body(json!({"name": "viewer key"})))["token"]
        .as_str()
        .expect("token")
        .to_string();
    run(case("GET", "/api/admin/users/{id}/permissions", 200)
        .at(u("/permissions"))
        .as_(a));
    run(case("GET", "/api/admin/users/{id}/sessions", 200)
        .at(u("/sessions"))
        .as_(a));
    run(case("POST", "/api/admin/users/{id}/sessions/revoke", 200)
        .at(u("/sessions/revoke"))
        .as_(a));
    run(case("POST", "/api/admin/sessions/revoke-all", 200).as_(a));

    // The runtime maintenance mode (switched to what it is: nothing changes).
    run(case("POST", "/api/admin/maintenance", 200)
        .as_(a)
        .body(json!({"mode": "off"})));
    // The runtime admission rate (set to what it is: unlimited).
    run(case("POST", "/api/admin/admission", 200)
        .as_(a)
        .body(json!({"unlimited": true})));

    // IP blocks and roles.
    run(case("POST", "/api/admin/ratelimit/block", 201)
        .as_(a)
        .body(json!({"ip": "203.0.113.7", "duration": "1h", "reason": "schema check"})));
    run(case("GET", "/api/admin/ratelimit/blocks", 200).as_(a));
    run(case("DELETE", "/api/admin/ratelimit/blocks/{ip}", 204)
        .at("/api/admin/ratelimit/blocks/203.0.113.7")
        .as_(a));
    run(case("GET", "/api/admin/roles", 200).as_(a));
    run(case("POST", "/api/admin/roles", 201).as_(a).body(
        json!({"name": "auditor", "description": "reads the audit log", "permissions": ["audit.read"]}),
    ));
    run(case("DELETE", "/api/admin/roles/{name}", 204)
        .at("/api/admin/roles/auditor")
        .as_(a));

    // RBAC, with a denial to report.
    let denied = s.send(Request::new("GET", "/api/security/audit/search").bearer(&user_key));
    assert_eq!(denied.status, 403, "{}", denied.body);
    schemas.check("GET", "/api/security/audit/search", &denied);
    run(case("GET", "/api/security/rbac/permissions", 200).as_(a));
    run(case("GET", "/api/security/rbac/roles", 200).as_(a));
    run(case("GET", "/api/security/rbac/cache/stats", 200).as_(a));
    run(case("POST", "/api/security/rbac/cache/clear", 200).as_(a));
    run(case("POST", "/api/security/rbac/cache/warmup", 200).as_(a));
    let rows = run(case("GET", "/api/security/rbac/denials/recent", 200).as_(a));
    assert!(
        rows.as_array().is_some_and(|r| !r.is_empty()),
        "the denial is listed: {rows}"
    );

    // Secrets and the key ring.
    let secret = "/api/secrets/team/db/password";
    let put = json!({"value": "hunter2", "secret_type": "password"});
    run(case("PUT", "/api/secrets/{id}", 201)
        .at(secret)
        .as_(a)
        .body(put.clone()));
    run(case("PUT", "/api/secrets/{id}", 200)
        .at(secret)
        .as_(a)
        .body(put));
    run(case("GET", "/api/secrets/{id}", 200).at(secret).as_(a));
    run(case("GET", "/api/secrets", 200).as_(a));
    run(case("GET", "/api/security/encryption/health", 200));
    run(case("GET", "/api/security/encryption/stats", 200).as_(a));
    run(case("GET", "/api/security/encryption/keys", 200).as_(a));
    run(case("POST", "/api/security/encryption/rotate", 200)
        .as_(a)
        .body(json!({"reason": "schema check", "force": true})));
    run(case("POST", "/api/security/migration/run", 200)
        .as_(a)
        .body(json!({"store": "secrets", "dry_run": true})));
    let job = run(case("POST", "/api/security/migration/run", 202)
        .as_(a)
        .body(json!({"store": "secrets"})))["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    run(case("GET", "/api/security/jobs/{id}", 200)
        .at(format!("/api/security/jobs/{job}"))
        .as_(a));
    run(case("GET", "/api/security/migration/status", 200).as_(a));
    run(case("DELETE", "/api/secrets/{id}", 204).at(secret).as_(a));

    // Approval gates: the admin requests, an approver decides.
    s.create_user(
        a,
        "approver@openapi.test",
        "approver passphrase",
        &["approver"],
    );
    let ap = s.login("approver@openapi.test", "approver passphrase");
    let ask = |reason: &str| {
        case("POST", "/api/security/approvals", 202).as_(a).body(
            json!({"operation": "migration_run", "params": {"store": "secrets"}, "reason": reason}),
        )
    };
    let id_of = |v: Value| v["approval_id"].as_str().expect("approval id").to_string();
    let first = id_of(run(ask("schema check")));
    run(case("GET", "/api/security/approvals/pending", 200).as_(a));
    run(case("GET", "/api/security/approvals", 200).as_(a));
    run(case("GET", "/api/security/approvals/{id}", 200)
        .at(format!("/api/security/approvals/{first}"))
        .as_(a));
    run(case(
        "GET",
        "/api/security/approvals/{id}/eligible-approvers",
        200,
    )
    .at(format!(
        "/api/security/approvals/{first}/eligible-approvers"
    ))
    .as_(a));
    run(case("POST", "/api/security/approvals/{id}/approve", 200)
        .at(format!("/api/security/approvals/{first}/approve"))
        .as_(&ap)
        .body(json!({"checklist_confirmed": ["dry run reviewed", "change window agreed"]})));
    let second = id_of(run(ask("to reject")));
    run(case("POST", "/api/security/approvals/{id}/reject", 200)
        .at(format!("/api/security/approvals/{second}/reject"))
        .as_(&ap)
        .body(json!({"reason": "not needed"})));
    let third = id_of(run(ask("to bypass")));
    s.create_user(
        a,
        "lead@openapi.test",
        "lead passphrase here",
        &["security_lead"],
    );
    let lead = s.login("lead@openapi.test", "lead passphrase here");
    run(
        case("POST", "/api/security/approvals/{id}/emergency-bypass", 200)
            .at(format!("/api/security/approvals/{third}/emergency-bypass"))
            .as_(&lead)
            .body(json!({"reason": "incident", "incident_id": "INC-1"})),
    );

    // Gated calls: the admin's run at once, anyone else's wait (202).
    run(case("POST", "/api/security/encryption/rotate", 202)
        .as_(&lead)
        .body(json!({"reason": "schema check", "force": true})));
    let gone = s.create_user(a, "gone@openapi.test", "gone passphrase here", &["viewer"]);
    run(case("DELETE", "/api/admin/users/{id}", 200)
        .at(format!("/api/admin/users/{gone}"))
        .as_(a));
    s.create_user(a, "m@openapi.test", "member passphrase", &["member"]);
    let member = s.login("m@openapi.test", "member passphrase");
    run(case("PUT", "/api/secrets/{id}", 201)
        .at("/api/secrets/m-export")
        .as_(&member)
        .body(json!({"value": "v", "secret_type": "api_key"})));
    run(case("POST", "/api/security/secrets/export", 200)
        .as_(a)
        .body(json!({"ids": ["m-export"], "reason": "schema check"})));
    let export = id_of(run(case("POST", "/api/security/secrets/export", 202)
        .as_(&member)
        .body(json!({"ids": ["m-export"], "reason": "schema check"}))));
    run(case("POST", "/api/security/approvals/{id}/approve", 200)
        .at(format!("/api/security/approvals/{export}/approve"))
        .as_(&ap)
        .body(json!({"checklist_confirmed": ["destination approved", "data owner informed"]})));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while s
        .get(&format!("/api/security/approvals/{export}"), a)
        .json()["status"]
        != "executed"
    {
        assert!(std::time::Instant::now() < deadline, "export never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    run(case("GET", "/api/security/approvals/{id}/export", 200)
        .at(format!("/api/security/approvals/{export}/export"))
        .as_(&member));

    run(case("GET", "/api/security/audit/search", 200)
        .at("/api/security/audit/search?minutes=60")
        .as_(a));
    run(case("GET", "/api/security/audit/verify", 200).as_(a));
    run(case("DELETE", "/api/admin/users/{id}", 200)
        .at(u(""))
        .as_(a));

    let missing: Vec<_> = documented(&doc).difference(&seen).cloned().collect();
    assert!(
        missing.is_empty(),
        "documented routes this test did not check: {missing:?}"
    );
}

#[test]
fn every_route_the_router_serves_is_documented() {
    let s = server();
    let doc = s.send(Request::new("GET", "/api/openapi.json")).json();
    let documented = documented(&doc);
    let routes = s.send(Request::new("GET", "/api/routes")).json();
    let mut served = BTreeSet::new();
    for r in routes["routes"].as_array().expect("routes") {
        let method = r["method"].as_str().expect("method").to_string();
        let path = r["path"].as_str().expect("path");
        // The router answers it (not the 404 fallback "no route for ..."):
        // a request without credentials gets 401 where a permission is
        // required, and something other than the fallback otherwise.
        let concrete = path.replace("{*id}", "x").replace(['{', '}'], "");
        let mut req = Request::new(&method, &concrete);
        if method != "GET" && method != "DELETE" {
            req = req.json(&json!({}));
        }
        let answer = s.send(req);
        assert!(
            !answer.body.contains("no route for"),
            "{method} {path} is in /api/routes but the router does not serve it"
        );
        if !r["permission"].is_null() {
            assert_eq!(answer.status, 401, "{method} {path}: {}", answer.body);
        }
        served.insert((method, path.replace("{*", "{")));
    }
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /api/openapi.json: {undocumented:?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
    // The document names a schema for every success response with a body.
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("ops") {
            let ok = op["responses"]
                .as_object()
                .expect("responses")
                .iter()
                .filter(|(code, _)| code.starts_with('2'))
                .all(|(code, r)| code == "204" || r["content"].is_object());
            assert!(ok, "{method} {path}: a success response without a schema");
        }
    }
}

/// The query parameters the document gives an operation: name -> parameter.
fn query_params(op: &Value) -> std::collections::BTreeMap<String, Value> {
    op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "query")
        .map(|p| (p["name"].as_str().expect("name").to_string(), p.clone()))
        .collect()
}

/// The fields serde names in "unknown field `x`, expected one of `a`, `b`"
/// (or "expected `a`", or "there are no fields").
fn expected_fields(message: &str) -> Option<BTreeSet<String>> {
    let (_, rest) = message.split_once("unknown field `")?;
    let (_, rest) = rest.split_once('`')?;
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// A concrete path for a template (any value for each parameter).
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn every_query_parameter_is_documented() {
    let s = server();
    let (_, admin) = s.bootstrap_admin("admin@openapi-query.test");
    let doc = s.send(Request::new("GET", "/api/openapi.json")).json();

    // The runbook's filters, by name.
    let expect = [
        ("/api/security/approvals/pending", &["risk_level"][..]),
        ("/api/admin/users", &["role", "limit", "after"][..]),
        (
            "/api/security/audit/search",
            &["action", "actor", "minutes", "limit", "before"][..],
        ),
        ("/api/security/rbac/denials/recent", &["minutes"][..]),
    ];
    for (path, names) in expect {
        let params = query_params(&doc["paths"][path]["get"]);
        for name in names {
            assert!(
                params.contains_key(*name),
                "GET {path}: query parameter {name} is not documented: {params:?}"
            );
        }
    }

    // Every operation: the parameters its handler accepts are the documented
    // ones. The query structs refuse unknown fields, and serde's refusal lists
    // the fields there are; a handler without query parameters ignores the
    // query string. GETs first: the rest are probed without a body and with
    // `x` for every path parameter, so they stop at a 400 or 404.
    let mut ops: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            ops.push((method.to_ascii_uppercase(), path.clone(), op.clone()));
        }
    }
    ops.sort_by_key(|(method, _, _)| method != "GET");
    let mut with_query = 0;
    for (method, path, op) in &ops {
        let documented = query_params(op);
        for (name, p) in &documented {
            let description = p["description"].as_str().unwrap_or_default();
            assert!(
                !description.trim().is_empty(),
                "{method} {path}: query parameter {name} has no description"
            );
            assert!(
                p["required"].is_boolean(),
                "{method} {path}: query parameter {name} does not say whether it is required"
            );
            assert!(
                p["schema"].is_object(),
                "{method} {path}: query parameter {name} has no schema"
            );
        }
        let url = format!("{}?zz_not_a_parameter=1", concrete(path));
        let r = s.send(Request::new(method, &url).bearer(&admin));
        let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        let error = body["error"].as_str().unwrap_or_default();
        let accepted = (r.status == 400).then(|| expected_fields(error)).flatten();
        let names: BTreeSet<String> = documented.keys().cloned().collect();
        match accepted {
            Some(fields) => assert_eq!(
                fields, names,
                "{method} {path}: the handler accepts these query parameters, the document lists others ({error})"
            ),
            None => assert!(
                names.is_empty(),
                "{method} {path}: documents query parameters {names:?} but an unknown one was not refused: {} {}",
                r.status,
                r.body
            ),
        }
        if names.is_empty() {
            continue;
        }
        with_query += 1;
        // Each documented parameter is one the handler reads: a bad value
        // (given twice; not a number where a number is documented) answers
        // 400 naming it.
        for (name, p) in &documented {
            let mut bad = vec![format!("{name}=1&{name}=2")];
            let ty = &p["schema"]["type"];
            let numeric = |t: &Value| t == "integer" || t == "number";
            if numeric(ty) || ty.as_array().is_some_and(|ts| ts.iter().any(numeric)) {
                bad.push(format!("{name}=not-a-number"));
            }
            for q in bad {
                let url = format!("{}?{q}", concrete(path));
                let r = s.send(Request::new(method, &url).bearer(&admin));
                assert_eq!(r.status, 400, "{method} {url}: {}", r.body);
                assert!(
                    r.body.contains(name.as_str()),
                    "{method} {url}: the error does not name {name}: {}",
                    r.body
                );
            }
        }
    }
    assert!(
        with_query >= 7,
        "operations with query parameters: {with_query}"
    );
}
