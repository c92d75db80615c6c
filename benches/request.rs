//! Where the time of one FHIR read or search goes, stage by stage, on a
//! fresh SQLite database with the Synthea HIV patients and one of their
//! Observations pages:
//!
//! - `token/check_uncached`: RS256 signature, claims and the revocation
//!   lookup in the database — what every request paid before tokens were
//!   remembered; `token/check_cached`: the same token answered from memory.
//! - `access/from_scopes`: the caller's `Access` from a token's scopes.
//! - `sql/read_patient`: the caller-scoped read of one Patient (pool,
//!   conditions, SQL); `sql/search_observations`: a patient's Observations
//!   by code through the gate.
//! - `serialise/bundle_*`: a 50-entry searchset written with stored bodies
//!   spliced in, against parsing and re-serialising every resource.
//! - `circle/load_facts`: reading a practitioner's circle of trust (roles,
//!   care relationships, Consents naming them, their patients' Consents,
//!   break-the-glass grants), as every request of theirs does;
//!   `circle/compile`: turning it into the Observation condition;
//!   `sql/search_observations_consent`: the search above for that
//!   practitioner, whose patient's Consent has five provisions.
//!
//!     cargo bench --bench request
//!
//! Needs `../shared/data` beside the repository (or the repository's own
//! test data unpacked there).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ehrx::auth::token::{self, Grant};
use ehrx::auth::Auth;
use ehrx::fhir::bundle::{Bundle, Entry, Resource};
use ehrx::interaction::{self, Env};
use ehrx::policy::consent::{Circle, ConsentDefault};
use ehrx::policy::role::{Practitioner, Role};
use ehrx::policy::scope::{parse_scopes, Ops};
use ehrx::policy::{Access, Maintenance};
use ehrx::store::{circle, Store};
use serde_json::{json, Map, Value};

const BUNDLES: &str = "../shared/data/synthea/hiv-transaction-bundles";
const ISSUER: &str = "http://127.0.0.1:1/fhir";

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    auth: Auth,
    token: String,
    patient: String,
    code: String,
    env: Env,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("bench.db").display());
    let store = Store::open(&url, 4, Duration::from_secs(30)).await.unwrap();
    let mut files: Vec<_> =
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLES))
            .expect("../shared/data beside the repository")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
    // The shared Organization and Practitioner bundles first.
    files.sort_by_key(|f| {
        let n = f.file_name().unwrap().to_string_lossy().to_string();
        (
            !(n.starts_with("hospital") || n.starts_with("practitioner")),
            n,
        )
    });
    let config = ehrx::config::Config {
        base_url: Some(ISSUER.into()),
        ..Default::default()
    };
    let env = Env::from_config(&config);
    let gate = store.gate(Access::maintenance(Maintenance::Import));
    for f in files.iter().take(6) {
        let bundle: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        interaction::bundle::process(&gate, &env, bundle)
            .await
            .unwrap();
    }
    let (patient, code) = {
        let mut r = gate.reader().await.unwrap();
        let page = interaction::bundle_value(
            interaction::search(
                &mut r.view(),
                &env,
                "Observation",
                &[("_count".into(), "1".into())],
                true,
            )
            .await
            .unwrap(),
        )
        .unwrap();
        let o = &page["entry"][0]["resource"];
        let patient = o["subject"]["reference"]
            .as_str()
            .unwrap()
            .trim_start_matches("Patient/")
            .to_string();
        let c = &o["code"]["coding"][0];
        (
            patient,
            format!(
                "{}|{}",
                c["system"].as_str().unwrap(),
                c["code"].as_str().unwrap()
            ),
        )
    };
    let auth = Auth::open(store.clone(), ISSUER.into(), 3600, Duration::from_secs(1))
        .await
        .unwrap();
    auth.tokens.sync(&store).await.unwrap();
    let grant = Grant {
        grant_id: "bench".into(),
        client_id: "bench".into(),
        user_id: None,
        fhir_user: None,
        organization: None,
        insurer_role: None,
        scopes: parse_scopes("system/*.rs").unwrap(),
        patient: None,
        encounter: None,
        nonce: None,
        refresh: false,
    };
    let body = token::issue(&auth, &grant).await.unwrap();
    World {
        _dir: dir,
        store,
        auth,
        token: body["access_token"].as_str().unwrap().to_string(),
        patient,
        code,
        env,
    }
}

fn stages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let w = rt.block_on(world());
    // Keeps the remembered tokens usable, as `ehrx serve` does.
    rt.block_on(async { w.auth.tokens.spawn_sync(w.store.clone()) });

    let mut g = c.benchmark_group("token");
    g.bench_function("check_uncached", |b| {
        b.iter(|| {
            rt.block_on(token::verify_uncached(&w.auth, &w.token))
                .unwrap()
        })
    });
    g.bench_function("check_cached", |b| {
        b.iter(|| rt.block_on(token::verify(&w.auth, &w.token)).unwrap())
    });
    g.finish();

    let scopes = parse_scopes("patient/*.rs launch/patient openid fhirUser").unwrap();
    c.bench_function("access/from_scopes", |b| {
        b.iter(|| Access::from_scopes(&scopes, Some(&w.patient)))
    });

    let access = rt
        .block_on(token::verify(&w.auth, &w.token))
        .unwrap()
        .access
        .clone();
    let gate = w.store.gate(access);
    let mut g = c.benchmark_group("sql");
    g.bench_function("read_patient", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut r = gate.reader().await.unwrap();
                interaction::read(&mut r.view(), "Patient", &w.patient)
                    .await
                    .unwrap()
            })
        })
    });
    let params = vec![
        ("patient".to_string(), w.patient.clone()),
        ("code".to_string(), w.code.clone()),
    ];
    g.bench_function("search_observations", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut r = gate.reader().await.unwrap();
                interaction::search(&mut r.view(), &w.env, "Observation", &params, true)
                    .await
                    .unwrap()
            })
        })
    });
    g.finish();

    // A 50-entry page of the patient's Observations, as stored.
    let page = rt.block_on(async {
        let mut r = gate.reader().await.unwrap();
        let p = vec![
            ("patient".to_string(), w.patient.clone()),
            ("_count".to_string(), "50".to_string()),
        ];
        interaction::search(&mut r.view(), &w.env, "Observation", &p, true)
            .await
            .unwrap()
    });
    let stored: Vec<String> = page
        .entries()
        .iter()
        .filter_map(|e| match &e.resource {
            Some(Resource::Stored(s)) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let build = |parse: bool| {
        let entries = stored
            .iter()
            .map(|s| {
                let mut rest = Map::new();
                rest.insert("search".into(), json!({"mode": "match"}));
                Entry {
                    full_url: "http://x/Observation/1".into(),
                    resource: Some(if parse {
                        Resource::Value(serde_json::from_str(s).unwrap())
                    } else {
                        Resource::Stored(s.clone())
                    }),
                    rest,
                }
            })
            .collect();
        Bundle::new("searchset", Some(50), Vec::new(), entries)
    };
    let mut g = c.benchmark_group("serialise");
    g.bench_function("bundle_spliced", |b| b.iter(|| build(false).to_json()));
    g.bench_function("bundle_parsed_and_reserialised", |b| {
        b.iter(|| serde_json::to_vec(&build(true).into_value().unwrap()).unwrap())
    });
    g.finish();

    // A Consent of five provisions that lets Practitioner/bench in.
    rt.block_on(async {
        let labels = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
        let actor = |r: &str| json!([{"role": {"text": "x"}, "reference": {"reference": r}}]);
        let consent = json!({"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": format!("Patient/{}", w.patient)},
            "provision": {"type": "permit", "provision": [
                {"type": "permit", "actor": actor("Practitioner/bench")},
                {"type": "deny", "actor": actor("Practitioner/bench"), "securityLabel": [{"system": labels, "code": "PSY"}]},
                {"type": "deny", "actor": actor("Practitioner/bench"), "securityLabel": [{"system": labels, "code": "ETH"}]},
                {"type": "deny", "actor": actor("Organization/acme"), "securityLabel": [{"system": labels, "code": "HIV"}]}]}});
        let gate = w.store.gate(Access::maintenance(Maintenance::Import));
        let mut tx = gate.begin().await.unwrap();
        interaction::create(&mut tx, "Consent", consent, None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    let role = Role::Practitioner(Practitioner::Id("bench".into()));
    let now = chrono::Utc::now().timestamp();
    let mut g = c.benchmark_group("circle");
    // A circle is kept while the database's circle generation is unchanged:
    // after the first, each iteration reads the generation and finds it.
    g.bench_function("load_facts", |b| {
        b.iter(|| {
            rt.block_on(circle::facts(
                &w.store,
                &role,
                ConsentDefault::PermitTreatment,
                now,
            ))
            .unwrap()
        })
    });
    let facts = rt
        .block_on(circle::facts(
            &w.store,
            &role,
            ConsentDefault::PermitTreatment,
            now,
        ))
        .unwrap();
    assert!(facts.consents.contains_key(&w.patient));
    let circle = Circle::new(facts, ehrx::fhir::unix_instant(now), None);
    g.bench_function("compile", |b| {
        b.iter(|| circle.cond(Ops::READ, "Observation"))
    });
    g.finish();
    let user = parse_scopes("user/*.rs").unwrap();
    let gate = w
        .store
        .gate(Access::from_token(&user, None, role).with_circle(circle));
    c.bench_function("sql/search_observations_consent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut r = gate.reader().await.unwrap();
                interaction::search(&mut r.view(), &w.env, "Observation", &params, true)
                    .await
                    .unwrap()
            })
        })
    });
}

criterion_group!(benches, stages);
criterion_main!(benches);
