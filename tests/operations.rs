//! Operations: backup and restore while the server writes, damaged backups
//! refused, scheduled backups, `ehrx import` beside a running server, two
//! servers on one database, metrics (parsed by Prometheus's own Python
//! parser), health, request ids and log format, and SIGTERM under load.
//! Servers run as real `ehrx serve` processes wherever the behaviour is a
//! process's (signals, logs, metrics); on the database the suite runs on.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use common::smart;
use common::{data_dir, fresh_database, next_link, TestServer};
use serde_json::{json, Value};

/// Runs `ehrx` with `args` on `database_url`; returns (success, stdout JSON
/// or text, stderr).
fn ehrx(database_url: &str, args: &[&str]) -> (bool, Value, String) {
    let out = common::ehrx_bin()
        .args(args)
        .env("EHRX_DATABASE_URL", database_url)
        .env("EHRX_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::String(stdout)),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Every stored version, keyed `Type/id/version`, from the system history.
async fn all_versions(s: &TestServer) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut url = s.url("_history?_count=1000");
    loop {
        let b = s.get_json(&url).await;
        for e in b["entry"].as_array().into_iter().flatten() {
            let path = match e["request"]["method"].as_str() {
                Some("POST") => format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                ),
                _ => e["request"]["url"].as_str().unwrap().to_string(),
            };
            let etag = e["response"]["etag"].as_str().unwrap();
            let version = etag.trim_start_matches("W/").trim_matches('"');
            // The base URL differs between servers; the rest must not.
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("fullUrl");
            out.insert(format!("{path}/{version}"), e);
        }
        match next_link(&b) {
            Some(next) => url = next,
            None => return out,
        }
    }
}

/// A search's resources and total, without the server's base URL.
async fn search_result(s: &TestServer, query: &str) -> Value {
    let mut resources = Vec::new();
    let mut url = s.url(query);
    let mut total = Value::Null;
    loop {
        let b = s.get_json(&url).await;
        if total.is_null() {
            total = b["total"].clone();
        }
        for e in b["entry"].as_array().into_iter().flatten() {
            resources.push(json!([e["resource"], e["search"]]));
        }
        match next_link(&b) {
            Some(next) => url = next,
            None => return json!({"total": total, "entries": resources}),
        }
    }
}

/// When a write was acknowledged, relative to the backup.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// Creates, updates and deletes Observations of `Patient/writer` until
/// `stop`; records every acknowledged version (`Type/id/version`) with the
/// backup's phase at the time.
async fn write_until(
    s: Arc<TestServer>,
    n: usize,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, u8)>>>,
) {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let obs = json!({
            "resourceType": "Observation",
            "status": "preliminary",
            "code": {"coding": [{"system": "http://example.org/backup", "code": "marker"}]},
            "subject": {"reference": "Patient/writer"},
            "valueQuantity": {"value": i, "unit": "mg"},
            "note": [{"text": format!("writer {n} write {i}")}],
        });
        let r = s.post_json("Observation", &obs).await;
        assert_eq!(r.status(), 201);
        let created: Value = r.json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_string();
        acked
            .lock()
            .unwrap()
            .push((format!("Observation/{id}/1"), phase.load(Ordering::SeqCst)));
        let mut updated = created.clone();
        updated["status"] = json!("final");
        let r = s.put_json(&format!("Observation/{id}"), &updated).await;
        assert_eq!(r.status(), 200);
        acked
            .lock()
            .unwrap()
            .push((format!("Observation/{id}/2"), phase.load(Ordering::SeqCst)));
        if i % 3 == 0 {
            let r = s
                .client
                .delete(s.url(&format!("Observation/{id}")))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            acked
                .lock()
                .unwrap()
                .push((format!("Observation/{id}/3"), phase.load(Ordering::SeqCst)));
        }
    }
}

/// Searches over the examples, compared between the source and the restore.
const SEARCHES: &[&str] = &[
    "Patient?_sort=_id&_count=50",
    "Observation?code=http://loinc.org|29463-7&_sort=_id",
    "Observation?patient=example&_sort=-date&_count=7",
    "Condition?_sort=_id&_revinclude=Encounter:diagnosis",
    "Encounter?date=ge2013-01-01&_sort=_id",
    "Practitioner?name=adam&_sort=_id",
    "MedicationRequest?_include=MedicationRequest:medication&_sort=_id",
    "Observation?value-quantity=gt5&patient=example&_sort=_id",
    "Observation?code=http://example.org/backup|marker&_sort=_id&_count=200",
    "Observation?subject=Patient/writer&_sort=_lastUpdated&_count=200",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_during_writes_restores_exactly_the_acknowledged_data() {
    let s = TestServer::start().await;
    smart::load_r4_examples(&s, s.token.as_deref().unwrap()).await;
    let r = s
        .put_json(
            "Patient/writer",
            &json!({"resourceType": "Patient", "id": "writer", "name": [{"family": "Writer"}]}),
        )
        .await;
    assert!(r.status().is_success());
    let s = Arc::new(s);
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..3)
        .map(|n| {
            tokio::spawn(write_until(
                s.clone(),
                n,
                phase.clone(),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    while acked.lock().unwrap().len() < 30 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("during-writes.jsonl.gz");
    phase.store(DURING, Ordering::SeqCst);
    let (db, out) = (s.database_url.clone(), file.clone());
    let backup =
        tokio::task::spawn_blocking(move || ehrx(&db, &["backup", "--out", out.to_str().unwrap()]))
            .await
            .unwrap();
    phase.store(AFTER, Ordering::SeqCst);
    let after_backup = acked.lock().unwrap().len();
    while acked.lock().unwrap().len() < after_backup + 6 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    assert!(backup.0, "ehrx backup: {}", backup.2);
    let during = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| *p == DURING)
        .count();
    eprintln!("{during} writes acknowledged while the backup ran");

    // Restored into a fresh database.
    let target = fresh_database(dir.path()).await;
    let (ok, restored, err) = ehrx(&target, &["restore", file.to_str().unwrap()]);
    assert!(ok, "ehrx restore: {err}");
    let manifest = &restored["restored"]["manifest"];
    assert_eq!(manifest, &backup.1["written"]["manifest"]);

    let t = TestServer::start_authorized(|c| c.database_url = target.clone()).await;
    let source = all_versions(&s).await;
    let copy = all_versions(&t).await;
    // Every version restored is the source's, unchanged.
    for (key, entry) in &copy {
        let Some(original) = source.get(key) else {
            panic!("{key} restored but never written");
        };
        assert_eq!(
            entry,
            original,
            "{key}: {}",
            common::first_difference(original, entry, "")
        );
    }
    // Whatever was acknowledged before the backup began is in it, nothing
    // acknowledged after it ended is.
    for (key, phase) in acked.lock().unwrap().iter() {
        match *phase {
            BEFORE => assert!(copy.contains_key(key), "{key} acknowledged before, lost"),
            AFTER => assert!(!copy.contains_key(key), "{key} written after, restored"),
            _ => {}
        }
    }
    // A snapshot: each resource's versions are 1..n, with nothing missing.
    let mut by_resource: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for key in copy.keys() {
        let (resource, version) = key.rsplit_once('/').unwrap();
        by_resource
            .entry(resource.to_string())
            .or_default()
            .insert(version.parse().unwrap());
    }
    for (resource, versions) in &by_resource {
        let n = *versions.iter().max().unwrap();
        assert_eq!(
            versions.len() as i64,
            n,
            "{resource}: versions {versions:?}"
        );
    }
    let counted: i64 = manifest["resources"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["versions"].as_i64().unwrap())
        .sum();
    assert_eq!(copy.len() as i64, counted);

    // Searches over the examples answer the same; the writers' search sees
    // exactly the restored Observations that are current.
    for q in SEARCHES.iter().take(8) {
        assert_eq!(
            search_result(&s, q).await,
            search_result(&t, q).await,
            "{q}"
        );
    }
    let current: BTreeSet<String> = by_resource
        .iter()
        .filter(|(r, versions)| {
            !versions.contains(&3)
                && copy[&format!("{r}/1")]["resource"]["subject"]["reference"] == "Patient/writer"
        })
        .map(|(r, _)| r.trim_start_matches("Observation/").to_string())
        .collect();
    for q in &SEARCHES[8..] {
        let found: BTreeSet<String> = search_result(&t, q).await["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[0]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(found, current, "{q}");
    }
    t.stop().await;
}

/// A small backup of a server with a few resources.
async fn small_backup(dir: &std::path::Path) -> (TestServer, std::path::PathBuf) {
    let s = TestServer::start().await;
    for family in ["Alpha", "Beta", "Gamma"] {
        s.create(&json!({"resourceType": "Patient", "name": [{"family": family}]}))
            .await;
    }
    let file = dir.join("small.jsonl.gz");
    let (ok, _, err) = ehrx(
        &s.database_url,
        &["backup", "--out", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    (s, file)
}

#[tokio::test]
async fn truncated_or_bit_flipped_backups_are_refused_by_verify_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = small_backup(dir.path()).await;
    let (ok, verified, err) = ehrx(
        &s.database_url,
        &["backup", "verify", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert_eq!(
        verified["verified"]["manifest"]["resources"]["Patient"]["current"],
        3
    );
    assert!(verified["verified"]["manifest"]["audit_checkpoint"].is_null());

    let bytes = std::fs::read(&file).unwrap();
    let mut damaged: Vec<(String, Vec<u8>)> = vec![
        (
            "truncated by half".into(),
            bytes[..bytes.len() / 2].to_vec(),
        ),
        (
            "missing its last byte".into(),
            bytes[..bytes.len() - 1].to_vec(),
        ),
        ("empty".into(), Vec::new()),
    ];
    // One bit flipped at several places of the compressed stream.
    for at in [
        bytes.len() / 5,
        bytes.len() / 2,
        bytes.len() * 4 / 5,
        bytes.len() - 12,
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        damaged.push((format!("bit flipped at byte {at}"), b));
    }
    for (i, (what, content)) in damaged.into_iter().enumerate() {
        let bad = dir.path().join("bad.jsonl.gz");
        std::fs::write(&bad, &content).unwrap();
        let (ok, _, err) = ehrx(
            &s.database_url,
            &["backup", "verify", bad.to_str().unwrap()],
        );
        assert!(!ok, "verify accepted a backup {what}");
        assert!(err.contains("damaged backup, refused"), "{what}: {err}");
        let target = fresh_database(&dir.path().join(format!("target-{i}"))).await;
        if let Some(path) = target.strip_prefix("sqlite:") {
            std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        }
        let (ok, _, err) = ehrx(&target, &["restore", bad.to_str().unwrap()]);
        assert!(!ok, "restore accepted a backup {what}");
        assert!(err.contains("damaged backup, refused"), "{what}: {err}");
        // Nothing was written.
        let (ok, _, err) = ehrx(&target, &["restore", file.to_str().unwrap()]);
        assert!(ok, "{what}: the sound backup then restores: {err}");
    }
    s.stop().await;
}

#[tokio::test]
async fn restore_refuses_a_database_that_is_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = small_backup(dir.path()).await;
    let (ok, _, err) = ehrx(&s.database_url, &["restore", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("the database is not empty"), "{err}");
    assert_eq!(s.count("Patient").await, 3);
    s.stop().await;
}

#[tokio::test]
async fn an_embedded_databases_backup_restores_into_postgresql() {
    // Needs both databases: it runs with the PostgreSQL suite.
    if !std::env::var("EHRX_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite:{}", dir.path().join("embedded.db").display());
    let url = sqlite.clone();
    let s = TestServer::start_authorized(move |c| c.database_url = url).await;
    let mut ids = Vec::new();
    for family in ["Alpha", "Beta", "Gamma"] {
        let p = s
            .create(&json!({"resourceType": "Patient", "name": [{"family": family}]}))
            .await;
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert_eq!(s.get(&format!("Patient/{id}")).await.status(), 200);
    }
    let file = dir.path().join("embedded.jsonl.gz");
    let (ok, _, err) = ehrx(&sqlite, &["backup", "--out", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    s.stop().await;

    let target = fresh_database(dir.path()).await;
    assert!(target.starts_with("postgres"));
    let (ok, _, err) = ehrx(&target, &["restore", file.to_str().unwrap()]);
    assert!(ok, "ehrx restore into PostgreSQL: {err}");
    // The log moved whole: it verifies there, and the patients' reads are in
    // it.
    let (ok, report, err) = ehrx(&target, &["audit", "verify"]);
    assert!(ok && report["verified"] == true, "{report} {err}");
    assert!(report["size"].as_u64().unwrap() >= 6, "{report}");
    let pg = TestServer::start_authorized(move |c| c.database_url = target).await;
    assert_eq!(pg.count("Patient").await, 3);
    let b = pg
        .get_json(&format!("AuditEvent?patient=Patient/{}", ids[0]))
        .await;
    assert!(b["entry"].as_array().is_some_and(|e| !e.is_empty()), "{b}");
    pg.stop().await;
}

#[tokio::test]
async fn scheduled_backups_are_taken_verified_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let backups = dir.path().join("backups");
    let s = TestServer::spawn(
        &db,
        &[
            ("EHRX_BACKUP_INTERVAL", "1"),
            ("EHRX_BACKUP_DIR", backups.to_str().unwrap()),
            ("EHRX_BACKUP_KEEP", "2"),
        ],
    )
    .await;
    // Three or more taken (by the server's own count), two kept.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let taken = metric(
            &scrape(&s, "metrics").await,
            "ehrx_backups_total",
            &[("result", "ok")],
        );
        if taken >= 3.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", s.log());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Stopped first: the schedule would otherwise prune a file between
    // listing it and verifying it.
    s.stop().await;
    let mut files: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    files.sort();
    assert!(!files.is_empty() && files.len() <= 2, "{files:?}");
    for file in &files {
        let (ok, _, err) = ehrx(&db, &["backup", "verify", file.to_str().unwrap()]);
        assert!(ok, "{}: {err}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_beside_a_running_server_loads_everything() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let mut s = TestServer::spawn(&db, &[]).await;
    s.authorize(&smart::admin_token(&s).await);
    let s = Arc::new(s);
    // The server writes all along.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                s.create(&json!({"resourceType": "Basic", "code": {"text": "beside"}}))
                    .await;
                n += 1;
            }
            n
        })
    };
    let synthea = data_dir().join("synthea/hiv-transaction-bundles");
    let files: Vec<String> = [
        "hospitalInformation1633536936158.json",
        "practitionerInformation1633536936158.json",
        "Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json",
    ]
    .iter()
    .map(|f| synthea.join(f).to_string_lossy().to_string())
    .collect();
    let db2 = db.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::ehrx_bin()
            .arg("import")
            .arg("--quiet")
            .args(&files)
            .env("EHRX_DATABASE_URL", &db2)
            .env("EHRX_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let written = writer.await.unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains("loaded 3 file(s)"), "{summary}");
    assert!(!summary.contains("failed"), "{summary}");
    // Everything the bundles hold, and everything the server wrote.
    let bob: Value = serde_json::from_slice(
        &std::fs::read(synthea.join("Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json"))
            .unwrap(),
    )
    .unwrap();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for e in bob["entry"].as_array().unwrap() {
        *expected
            .entry(e["resource"]["resourceType"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for (rtype, n) in &expected {
        assert_eq!(s.count(rtype).await, *n, "{rtype}");
    }
    assert_eq!(s.count("Organization").await, 1191);
    assert_eq!(s.count("Practitioner").await, 1191);
    assert_eq!(s.count("Basic").await, written);
}

#[test]
fn cluster_mode_is_refused_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::ehrx_bin()
        .arg("serve")
        .current_dir(dir.path())
        .env("EHRX_CLUSTER", "true")
        .env("EHRX_DATABASE_URL", "sqlite:cluster.db")
        .env("EHRX_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster = true needs PostgreSQL"), "{err}");
    assert!(!dir.path().join("cluster.db").exists());
}

/// Two `ehrx serve` processes on one database with one public base URL, as
/// behind a load balancer; the client alternates between them.
#[tokio::test]
async fn two_servers_on_one_database_honour_each_others_tokens_and_single_use_codes() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let cluster = if db.starts_with("postgres") {
        "true"
    } else {
        "false"
    };
    // Revocations reach the other node within this delay.
    let delay_ms = 300;
    let delay = delay_ms.to_string();
    let a = TestServer::spawn(
        &db,
        &[
            ("EHRX_CLUSTER", cluster),
            ("EHRX_REVOCATION_MAX_DELAY_MS", &delay),
        ],
    )
    .await;
    let public = a.base.clone();
    let b = TestServer::spawn(
        &db,
        &[
            ("EHRX_CLUSTER", cluster),
            ("EHRX_BASE_URL", &public),
            ("EHRX_REVOCATION_MAX_DELAY_MS", &delay),
        ],
    )
    .await;
    let token_url = format!("{public}/auth/token");

    // A backend token from each, used at the other.
    let k = smart::client_key(jsonwebtoken::Algorithm::RS384);
    let client = smart::backend_client(&a, &k, "system/*.cruds");
    let mut tokens = Vec::new();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let assertion = smart::assertion(from, &client, &k, 240, Some(&token_url));
        let (st, t) = smart::assertion_grant(from, &assertion, "system/*.cruds").await;
        assert_eq!(st, 200, "{t}");
        let token = t["access_token"].as_str().unwrap().to_string();
        let (st, created) = smart::fhir(
            from,
            &token,
            reqwest::Method::POST,
            "Patient",
            Some(&json!({"resourceType": "Patient", "name": [{"family": "Shared"}]})),
        )
        .await;
        assert_eq!(st, 201, "{created}");
        let path = format!("Patient/{}", created["id"].as_str().unwrap());
        let (st, read) = smart::get(to, &token, &path).await;
        assert_eq!(st, 200, "the other server refused the token: {read}");
        tokens.push(token);
    }

    // An authorization code issued by A is redeemed at B, once.
    let practitioner = {
        let (st, p) = smart::fhir(
            &a,
            &tokens[0],
            reqwest::Method::POST,
            "Practitioner",
            Some(&json!({"resourceType": "Practitioner", "name": [{"family": "Node"}]})),
        )
        .await;
        assert_eq!(st, 201);
        p["id"].as_str().unwrap().to_string()
    };
    smart::practitioner_user(&a, "node-user", &practitioner);
    let app = smart::public_client(&a, "openid fhirUser user/*.rs");
    let (verifier, challenge) = smart::pkce();
    let params = smart::authorize_params(&a, &app, "openid fhirUser user/*.rs", &challenge, &[]);
    let back = smart::consent(
        &a,
        &smart::browser(),
        &params,
        Some(("node-user", "correct horse battery")),
        None,
    )
    .await;
    let code = smart::q(&back, "code").unwrap().to_string();
    let (st, t) = smart::exchange_code(&b, &app, &code, &verifier).await;
    assert_eq!(st, 200, "B refused A's code: {t}");
    let app_token = t["access_token"].as_str().unwrap();
    let practitioner_path = format!("Practitioner/{practitioner}");
    let (st, _) = smart::get(&a, app_token, &practitioner_path).await;
    assert_eq!(st, 200, "A refused the token B issued");
    // B remembers the token it checked.
    let (st, _) = smart::get(&b, app_token, &practitioner_path).await;
    assert_eq!(st, 200);
    // Replayed at A, the code is refused, and the grant B made from it is
    // withdrawn: at once on A, and on B within the revocation delay.
    let (st, again) = smart::exchange_code(&a, &app, &code, &verifier).await;
    assert_eq!(st, 400, "A redeemed a code B had used: {again}");
    assert_eq!(again["error"], "invalid_grant");
    let (st, _) = smart::get(&a, app_token, &practitioner_path).await;
    assert_eq!(st, 401, "A honours a token of the code replayed at A");
    tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
    for node in [&a, &b] {
        let (st, _) = smart::get(node, app_token, &practitioner_path).await;
        assert_eq!(
            st, 401,
            "{}: a token of a replayed code still honoured",
            node.base
        );
    }
}

/// GETs `path` on the server (or its ops address) and returns the text.
async fn scrape(s: &TestServer, path: &str) -> String {
    let r = reqwest::get(s.url(path)).await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

/// Parses exposition text with Prometheus's Python client; every sample.
fn parse_prometheus(text: &str) -> Vec<Value> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/parse_metrics.py");
    let mut py = std::process::Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of the sample `name` whose labels include `labels` (0 if none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_prometheus(text)
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_requests_by_route() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let mut s = TestServer::spawn(&db, &[]).await;
    let token = smart::admin_token(&s).await;
    s.authorize(&token);
    let before = scrape(&s, "metrics").await;
    let read = [
        ("method", "GET"),
        ("route", "/{rtype}/{id}"),
        ("status", "200"),
    ];
    let missing = [
        ("method", "GET"),
        ("route", "/{rtype}/{id}"),
        ("status", "404"),
    ];
    let p = s
        .create(&json!({"resourceType": "Patient", "name": [{"family": "Counted"}]}))
        .await;
    let id = p["id"].as_str().unwrap();
    for _ in 0..3 {
        s.get_json(&format!("Patient/{id}")).await;
    }
    assert_eq!(s.get("Patient/no-such-patient").await.status(), 404);
    s.get_json("Patient?name=Counted").await;
    let r = reqwest::Client::new()
        .get(s.url("Patient"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let after = scrape(&s, "metrics").await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    assert_eq!(delta("ehrx_http_requests_total", &read), 3.0);
    assert_eq!(delta("ehrx_http_requests_total", &missing), 1.0);
    assert_eq!(
        delta(
            "ehrx_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "/{rtype}/{id}")]
        ),
        4.0
    );
    assert_eq!(
        delta("ehrx_search_duration_seconds_count", &[("kind", "type")]),
        2.0
    );
    assert_eq!(
        delta(
            "ehrx_auth_failures_total",
            &[("endpoint", "api"), ("reason", "invalid_token")]
        ),
        1.0
    );
    assert!(metric(&after, "ehrx_db_pool_max_connections", &[]) >= 1.0);
    // Labels name routes, never resource ids.
    assert!(!after.contains(id), "a resource id in the metrics");
    assert!(!after.contains("no-such-patient"));
}

#[tokio::test]
async fn health_answers_live_and_ready_and_ops_listen_moves_it_off_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let s = TestServer::spawn(&db, &[]).await;
    let live: Value = reqwest::get(s.url("health/live"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(live["status"], "pass");
    let ready: Value = reqwest::get(s.url("health/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "pass");
    assert!(ready["schemaVersion"].as_i64().unwrap() >= 1);
    drop(s);

    let ops_port = common::free_port();
    let ops = format!("127.0.0.1:{ops_port}");
    let s = TestServer::spawn(&db, &[("EHRX_OPS_LISTEN", &ops)]).await;
    for path in ["metrics", "health/live", "health/ready"] {
        let r = reqwest::get(format!("http://{ops}/{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path} on the ops address");
        // On the API address the path is no operator endpoint (a FHIR URL
        // that needs a token).
        let r = reqwest::get(s.url(path)).await.unwrap();
        assert_ne!(r.status(), 200, "{path} still on the API address");
        assert!(!r.text().await.unwrap().contains("ehrx_"), "{path}");
    }
}

#[tokio::test]
async fn every_answer_and_log_line_of_a_request_carries_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let s = TestServer::spawn(&db, &[("EHRX_LOG_FORMAT", "json")]).await;
    let client = reqwest::Client::new();
    let r = client
        .get(s.url("Patient/x"))
        .header("X-Request-Id", "trace-4f2a.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"], "trace-4f2a.9");
    // An id that is not plain is replaced, not echoed.
    let r = client
        .get(s.url("metadata"))
        .header("X-Request-Id", "forged id\" level=error")
        .send()
        .await
        .unwrap();
    let fresh = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&fresh).is_ok(), "{fresh}");
    // Without one, each answer gets its own.
    let one = client.get(s.url("metadata")).send().await.unwrap();
    let two = client.get(s.url("metadata")).send().await.unwrap();
    assert_ne!(one.headers()["x-request-id"], two.headers()["x-request-id"]);

    let log = s.log();
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of_request: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["request_id"] == "trace-4f2a.9")
        .collect();
    assert!(!of_request.is_empty(), "{log}");
    assert!(of_request
        .iter()
        .any(|l| l["fields"]["message"] == "request" && l["fields"]["status"] == 401));
    assert!(lines
        .iter()
        .any(|l| l["span"]["request_id"] == fresh.as_str()));
}

#[tokio::test]
async fn text_logs_written_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let s = TestServer::spawn(&db, &[]).await;
    reqwest::get(s.url("metadata")).await.unwrap();
    let log = s.log();
    assert!(log.contains("request"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
}

/// Sends a POST's head with `Expect: 100-continue` on its own connection and
/// waits for `100 Continue`: the server has then accepted the request and is
/// reading its body.
async fn start_request(addr: &str, token: &str, body: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /Patient HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "connection closed");
        got.push(byte[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tcp
}

/// Sends the body and reads the whole answer.
async fn finish_request(mut tcp: tokio::net::TcpStream, body: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tcp.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_accepted_requests_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(dir.path()).await;
    let mut s = TestServer::spawn(&db, &[]).await;
    let token = smart::admin_token(&s).await;
    s.authorize(&token);
    let addr = s.base.trim_start_matches("http://").to_string();

    // Load: writers creating Patients until the server stops answering.
    let client = reqwest::Client::builder()
        .default_headers({
            let mut h = reqwest::header::HeaderMap::new();
            h.insert("authorization", format!("Bearer {token}").parse().unwrap());
            h
        })
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writers: Vec<_> = (0..4)
        .map(|n| {
            let (client, url, acked) = (client.clone(), s.url("Patient"), acked.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let body = json!({"resourceType": "Patient", "name": [{"family": format!("Load{n}x{i}")}]});
                    let Ok(r) = client
                        .post(&url)
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string())
                        .send()
                        .await
                    else {
                        return;
                    };
                    if r.status() != 201 {
                        return;
                    }
                    let Ok(created) = r.json::<Value>().await else {
                        return;
                    };
                    acked
                        .lock()
                        .unwrap()
                        .push(created["id"].as_str().unwrap().to_string());
                }
            })
        })
        .collect();
    while acked.lock().unwrap().len() < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Requests accepted (their heads read, bodies awaited) when SIGTERM comes.
    let body = json!({"resourceType": "Patient", "name": [{"family": "InFlight"}]}).to_string();
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        in_flight.push(start_request(&addr, &token, &body).await);
    }
    let pid = s.process.as_ref().unwrap().id();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut answers = Vec::new();
    for tcp in in_flight {
        answers.push(finish_request(tcp, &body).await);
    }
    let exit = s.process.as_mut().unwrap().wait().unwrap();
    s.process = None;
    for w in writers {
        w.await.unwrap();
    }
    assert!(exit.success(), "exit {exit}:\n{}", s.log());
    for a in &answers {
        assert!(
            a.starts_with("HTTP/1.1 201"),
            "an accepted request was dropped: {a}"
        );
    }

    // Started again on the same database: every acknowledged write is there.
    let mut t = TestServer::spawn(&db, &[]).await;
    t.authorize(&smart::admin_token(&t).await);
    let acked = acked.lock().unwrap().clone();
    for id in &acked {
        assert_eq!(
            t.get(&format!("Patient/{id}")).await.status(),
            200,
            "Patient/{id} lost"
        );
    }
    let in_flight = t.get_json("Patient?family=InFlight").await;
    assert_eq!(in_flight["total"], 3);
    eprintln!("{} writes acknowledged before SIGTERM", acked.len());
}
