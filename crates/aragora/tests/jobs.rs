//! Long operations run as jobs: a start is atomic (a second start while one
//! runs is refused with 409 naming the running job), and a job interrupted by
//! a crash is persisted as interrupted and resumed (same job) by the next
//! start, to completion.

use std::path::Path;
use std::time::{Duration, Instant};

use aragora_testkit::{Request, Server};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");

fn seed_and_rotate(s: &Server, admin: &str, n: usize) {
    for i in 0..n {
        let r = s.send(
            Request::new("PUT", &format!("/api/secrets/j-{i:03}"))
                .bearer(admin)
                .json(&json!({"value": format!("value {i}"), "secret_type": "token"})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = s.post(
        "/api/security/encryption/rotate",
        admin,
        &json!({"reason": "jobs test", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Polls the job until it leaves `running` (the deadline only bounds a hang).
fn finished(s: &Server, admin: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = s.get(&format!("/api/security/jobs/{id}"), admin);
        assert_eq!(r.status, 200, "{}", r.body);
        let job = r.json();
        if job["state"] != "running" {
            return job;
        }
        assert!(Instant::now() < deadline, "job still running: {job}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_concurrent_starts_get_one_202_and_one_409_naming_the_running_job() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gate = tmp.path().join("open");
    let gate_env = gate.display().to_string();
    let s = Server::start(Path::new(BIN), &[("ARAGORA_TEST_JOB_GATE", &gate_env)]);
    let (_, admin) = s.bootstrap_admin("admin@jobs.test");
    seed_and_rotate(&s, &admin, 5);

    // Both starts race; the job that wins is held (the gate is closed) until
    // both have answered, so the loser always meets a running job.
    let answers: Vec<_> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    s.post(
                        "/api/security/migration/run",
                        &admin,
                        &json!({"store": "secrets"}),
                    )
                })
            })
            .collect();
        starts
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [202, 409],
        "{:?}",
        answers.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    let started = answers
        .iter()
        .find(|r| r.status == 202)
        .expect("202")
        .json();
    let refused = answers
        .iter()
        .find(|r| r.status == 409)
        .expect("409")
        .json();
    let id = started["job_id"].as_str().expect("job id");
    assert_eq!(refused["job_id"], id, "{refused}");
    assert_eq!(refused["kind"], "migration_run", "{refused}");
    assert_eq!(started["kind"], "migration_run", "{started}");

    // The control socket goes through the same slot.
    let out = s.cli(&["migration", "--store=secrets", "--json"]);
    assert!(
        !out.status.success(),
        "a CLI run while the job runs is refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(id) && err.contains("migration_run"), "{err}");
    // So does a rotation-by-accessor: one long operation at a time.
    let out = s.cli(&[
        "rotation",
        "--secrets-accessed-by=admin@jobs.test",
        "--json",
    ]);
    assert!(
        !out.status.success(),
        "a rotation while the job runs is refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(id), "{err}");

    std::fs::write(&gate, b"").expect("open the gate");
    let job = finished(&s, &admin, id);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["results"][0]["migrated"], 5, "{job}");
    // The slot is free again.
    let r = s.post(
        "/api/security/migration/run",
        &admin,
        &json!({"store": "secrets"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let second = r.json()["job_id"].as_str().expect("job id").to_string();
    assert_ne!(second, id);
    assert_eq!(finished(&s, &admin, &second)["state"], "completed");
    let out = s.cli(&[
        "rotation",
        "--secrets-accessed-by=admin@jobs.test",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_job_interrupted_by_a_crash_resumes_and_completes() {
    let mut s = Server::start(
        Path::new(BIN),
        &[
            ("ARAGORA_MIGRATION_BATCH_SIZE", "10"),
            ("ARAGORA_MIGRATION_STOP_AFTER_BATCHES", ""),
        ],
    );
    let (_, admin) = s.bootstrap_admin("admin@jobs.test");
    seed_and_rotate(&s, &admin, 45);
    // This server dies (abort, like kill -9) after 2 durable batches. The
    // job runs in the background, so on a fast machine it can get there
    // before the 202 is written: then the response is lost with the process
    // and the job is known by the id the resume answers with.
    s.restart_with(&[("ARAGORA_MIGRATION_STOP_AFTER_BATCHES", "2")]);
    let first = s
        .client()
        .try_send(
            &Request::new("POST", "/api/security/migration/run")
                .bearer(&admin)
                .json(&json!({"store": "secrets"})),
        )
        .ok()
        .map(|r| {
            assert_eq!(r.status, 202, "{}", r.body);
            r.json()["job_id"].as_str().expect("job id").to_string()
        });
    let exit = s.wait().expect("the server was running");
    assert!(
        !exit.success(),
        "the injected fault aborts the server: {exit:?}"
    );

    s.restart_with(&[("ARAGORA_MIGRATION_STOP_AFTER_BATCHES", "")]);
    if let Some(id) = &first {
        let job = s.get(&format!("/api/security/jobs/{id}"), &admin).json();
        assert_eq!(
            job["state"], "interrupted",
            "persisted across the crash: {job}"
        );
    }
    let status = s.get("/api/security/migration/status", &admin).json();
    assert_eq!(status["migrated"], 20, "two batches were durable: {status}");

    // The next start resumes the same job.
    let r = s.post(
        "/api/security/migration/run",
        &admin,
        &json!({"store": "secrets"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["job_id"].as_str().expect("job id").to_string();
    if let Some(first) = &first {
        assert_eq!(&id, first, "the same job resumes: {}", r.body);
    }
    let job = finished(&s, &admin, &id);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["resumed"], 1, "{job}");
    assert_eq!(job["results"][0]["migrated"], 45, "{job}");
    assert_eq!(job["results"][0]["resumed"], 1, "{job}");

    // The result is in the store, not only in memory.
    s.restart_with(&[]);
    let job = s.get(&format!("/api/security/jobs/{id}"), &admin).json();
    assert_eq!(job["state"], "completed", "{job}");
    let keys = s.get("/api/security/encryption/keys", &admin).json();
    let primary = keys["primary_key_id"].as_str().expect("primary");
    for i in [0, 19, 20, 44] {
        let v = s.get(&format!("/api/secrets/j-{i:03}"), &admin).json();
        assert_eq!(v["key_id"], primary, "{v}");
        assert_eq!(v["value"], format!("value {i}"), "{v}");
    }
}
