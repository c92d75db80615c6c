//! The `ehrx` binary: `serve` with no configuration, `migrate`, `import` and `reindex`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::data_dir;
use serde_json::Value;

fn ehrx() -> Command {
    common::ehrx_bin()
}

#[tokio::test]
async fn serve_with_no_configuration_creates_the_database_and_answers_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Only the listen address is set (the default port may be taken on a test machine).
    let mut child = ehrx()
        .arg("serve")
        .current_dir(dir.path())
        .env("EHRX_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let cs: Value = loop {
        match client
            .get(format!("http://127.0.0.1:{port}/metadata"))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break r.json().await.unwrap(),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("server did not come up: {other:?}"),
        }
    };
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(
        cs["implementation"]["url"],
        format!("http://127.0.0.1:{port}")
    );
    assert!(dir.path().join("ehrx.db").exists(), "./ehrx.db created");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn serve_stops_with_a_clear_error_when_the_configured_mappings_folder_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-mappings");
    let mut child = ehrx()
        .arg("serve")
        .current_dir(dir.path())
        .env("EHRX_LISTEN", "127.0.0.1:0")
        .env("EHRX_MAPPINGS_DIR", &missing)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("ehrx serve kept running with a missing mappings folder");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("cannot read mappings directory") && err.contains("no-such-mappings"),
        "{err}"
    );
}

#[test]
fn config_file_and_environment_override() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ehrx.toml"),
        "database_url = \"sqlite:from-file.db\"\nmax_count = 500\n",
    )
    .unwrap();
    let out = ehrx()
        .arg("migrate")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("from-file.db").exists());
    let out = ehrx()
        .arg("migrate")
        .current_dir(dir.path())
        .env("EHRX_DATABASE_URL", "sqlite:from-env.db")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("from-env.db").exists());
    // An invalid setting is refused with a message.
    let out = ehrx()
        .arg("migrate")
        .current_dir(dir.path())
        .env("EHRX_MAX_COUNT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_count"));
}

#[test]
fn import_loads_a_directory_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let synthea = data_dir().join("synthea/hiv-transaction-bundles");
    // A patient bundle named so it sorts before the shared bundles it depends on:
    // the importer retries it after they load.
    std::fs::copy(
        synthea.join("Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json"),
        input.join("0-patient.json"),
    )
    .unwrap();
    std::fs::copy(
        synthea.join("hospitalInformation1633536936158.json"),
        input.join("1-hospitals.json"),
    )
    .unwrap();
    std::fs::copy(
        synthea.join("practitionerInformation1633536936158.json"),
        input.join("2-practitioners.json"),
    )
    .unwrap();
    // An official example Bundle of type collection, in XML.
    std::fs::copy(
        data_dir().join("fhir-examples/r4-xml/diagnosticreport-example-f001-bloodexam.xml"),
        input.join("3-collection.xml"),
    )
    .ok();
    let db = format!("sqlite:{}", dir.path().join("import.db").display());
    let out = ehrx()
        .args(["import", "--quiet"])
        .arg(&input)
        .env("EHRX_DATABASE_URL", &db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Patient"), "{stdout}");
    assert!(stdout.contains("Organization"), "{stdout}");
    assert!(stdout.contains("Observation"), "{stdout}");

    // A broken file and a non-Bundle: listed, and the exit code says so.
    std::fs::write(input.join("9-broken.json"), "{ not json").unwrap();
    std::fs::write(
        input.join("9-patient.json"),
        r#"{"resourceType":"Patient"}"#,
    )
    .unwrap();
    let out = ehrx()
        .args(["import", "--quiet"])
        .arg(&input)
        .env("EHRX_DATABASE_URL", &db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("2 file(s) failed"), "{stdout}");
    assert!(stdout.contains("9-broken.json: malformed JSON"), "{stdout}");
    assert!(stdout.contains("9-patient.json: not a Bundle"), "{stdout}");
}

async fn index_rows(db: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(db).await.unwrap();
    let mut n = 0;
    for t in ["idx_string", "idx_token", "idx_reference", "idx_date"] {
        let (c,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {t}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        n += c;
    }
    n
}

#[tokio::test]
async fn reindex_rebuilds_lost_index_rows() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bundle.xml");
    std::fs::copy(
        data_dir().join("fhir-examples/r4-xml/diagnosticreport-example-f001-bloodexam.xml"),
        &input,
    )
    .unwrap();
    let db = format!("sqlite:{}", dir.path().join("r.db").display());
    let out = ehrx()
        .args(["import", "--quiet"])
        .arg(&input)
        .env("EHRX_DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let before = index_rows(&db).await;
    assert!(before > 0);
    {
        let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
        for t in ["idx_string", "idx_token", "idx_reference", "idx_date"] {
            sqlx::query(&format!("DELETE FROM {t}"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    assert_eq!(index_rows(&db).await, 0);
    let out = ehrx()
        .arg("reindex")
        .env("EHRX_DATABASE_URL", &db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let count: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(count.first(), Some(&"reindexed"), "{stdout}");
    assert!(count[1].parse::<u64>().unwrap() >= 2, "{stdout}");
    assert_eq!(index_rows(&db).await, before);

    // explain prints the SQL and SQLite's plan, which uses the indexes.
    let out = ehrx()
        .args([
            "explain",
            "Observation?patient=f001&code=http://loinc.org|15074-8",
        ])
        .env("EHRX_DATABASE_URL", &db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("idx_reference") && stdout.contains("idx_token"),
        "{stdout}"
    );
    assert!(
        stdout.contains("USING INDEX") || stdout.contains("USING COVERING INDEX"),
        "{stdout}"
    );
    let out = ehrx()
        .args(["explain", "Observation?nonsense=1"])
        .env("EHRX_DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonsense"));
}
