//! Search over Synthea patients loaded as transactions: expected result sets
//! are computed from the bundles themselves (after the server's id
//! assignment), and compared with `$everything`, code searches,
//! `_revinclude` and compartment search, paged.

mod common;

use std::collections::{HashMap, HashSet};

use common::{data_dir, next_link, TestServer};
use serde_json::Value;

fn rewrite(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(n) = map.get(s.as_str()) {
                *s = n.clone();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, map)),
        Value::Object(o) => o.values_mut().for_each(|x| rewrite(x, map)),
        _ => {}
    }
}

fn mentions(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s == needle,
        Value::Array(a) => a.iter().any(|x| mentions(x, needle)),
        Value::Object(o) => o.values().any(|x| mentions(x, needle)),
        _ => false,
    }
}

/// Posts a transaction bundle; returns its resources with server ids and
/// rewritten references.
async fn load(s: &TestServer, file: &str) -> Vec<Value> {
    let path = data_dir()
        .join("synthea/hiv-transaction-bundles")
        .join(file);
    let bundle: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let r = s.post_json("", &bundle).await;
    assert_eq!(r.status(), 200, "{file}");
    let resp: Value = r.json().await.unwrap();
    let mut map = HashMap::new();
    let entries = bundle["entry"].as_array().unwrap();
    for (e, re) in entries.iter().zip(resp["entry"].as_array().unwrap()) {
        if let Some(loc) = re["response"]["location"].as_str() {
            let local: Vec<&str> = loc.split('/').collect();
            let n = local.len();
            // …/Type/id/_history/v
            let reference = format!("{}/{}", local[n - 4], local[n - 3]);
            if let Some(full) = e["fullUrl"].as_str() {
                map.insert(full.to_string(), reference);
            }
        }
    }
    entries
        .iter()
        .map(|e| {
            let mut r = e["resource"].clone();
            if let Some(full) = e["fullUrl"].as_str() {
                if let Some(reference) = map.get(full) {
                    r["id"] = Value::String(reference.split_once('/').unwrap().1.to_string());
                }
            }
            rewrite(&mut r, &map);
            r
        })
        .collect()
}

fn key(r: &Value) -> String {
    format!(
        "{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    )
}

/// Every `Type/id` over all pages, checking for empty pages and duplicates.
async fn collect(s: &TestServer, query: &str) -> (Vec<String>, usize) {
    let mut url = s.url(query);
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let r = s.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let page: Value = r.json().await.unwrap();
        pages += 1;
        let entries = page["entry"].as_array().cloned().unwrap_or_default();
        assert!(
            !entries.is_empty() || pages == 1,
            "empty page {pages} of {query}"
        );
        for e in entries {
            out.push(key(&e["resource"]));
        }
        match next_link(&page) {
            Some(n) => url = n,
            None => break,
        }
    }
    let unique: HashSet<&String> = out.iter().collect();
    assert_eq!(unique.len(), out.len(), "duplicates in {query}");
    (out, pages)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_everything_codes_and_revinclude() {
    let s = TestServer::start().await;
    load(&s, "hospitalInformation1633536936158.json").await;
    load(&s, "practitionerInformation1633536936158.json").await;
    let compartments: Value =
        serde_json::from_str(include_str!("../conformance/compartments.json")).unwrap();
    let patient_types: HashSet<String> = compartments["Patient"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for file in [
        "Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json",
        "Cecelia952_Romaguera67_f1731e33-dc55-4ee8-72d7-cece2e49bedd.json",
    ] {
        let resources = load(&s, file).await;
        let patient = resources
            .iter()
            .find(|r| r["resourceType"] == "Patient")
            .unwrap();
        let pid = patient["id"].as_str().unwrap().to_string();
        let pref = format!("Patient/{pid}");

        // $everything: the patient and every compartment resource naming it.
        let want: Vec<String> = resources
            .iter()
            .filter(|r| {
                r["resourceType"] == "Patient"
                    || patient_types.contains(r["resourceType"].as_str().unwrap())
                        && mentions(r, &pref)
            })
            .map(key)
            .collect();
        assert!(want.len() > 200, "{file}: {}", want.len());
        let (got, pages) = collect(&s, &format!("Patient/{pid}/$everything?_count=50")).await;
        assert!(pages > 4);
        assert_eq!(got[0], pref, "the patient comes first");
        assert_eq!(sorted(got), sorted(want.clone()), "{file}: $everything");
        let (got, _) = collect(
            &s,
            &format!("Patient/{pid}/$everything?_type=Observation,Encounter&_count=7"),
        )
        .await;
        let want_some: Vec<String> = want
            .iter()
            .filter(|k| k.starts_with("Observation/") || k.starts_with("Encounter/"))
            .cloned()
            .collect();
        assert_eq!(sorted(got), sorted(want_some), "{file}: $everything _type");

        // Observation?patient=P&code=C for every code the patient has.
        let mut by_code: HashMap<String, Vec<String>> = HashMap::new();
        for r in resources
            .iter()
            .filter(|r| r["resourceType"] == "Observation")
        {
            for c in r["code"]["coding"].as_array().unwrap() {
                let code = format!(
                    "{}|{}",
                    c["system"].as_str().unwrap(),
                    c["code"].as_str().unwrap()
                );
                by_code.entry(code).or_default().push(key(r));
            }
        }
        assert!(!by_code.is_empty());
        for (code, want) in by_code {
            let (got, _) = collect(
                &s,
                &format!("Observation?patient={pid}&code={}&_count=3", percent(&code)),
            )
            .await;
            assert_eq!(sorted(got), sorted(want), "{file}: code {code}");
        }

        // Encounter?patient=P&_revinclude=Observation:encounter
        let encounters: Vec<String> = resources
            .iter()
            .filter(|r| r["resourceType"] == "Encounter")
            .map(key)
            .collect();
        let mut want: Vec<String> = encounters.clone();
        want.extend(
            resources
                .iter()
                .filter(|r| {
                    r["resourceType"] == "Observation"
                        && encounters
                            .iter()
                            .any(|e| r["encounter"]["reference"] == e.as_str())
                })
                .map(key),
        );
        let (got, _) = collect(
            &s,
            &format!("Encounter?patient={pid}&_revinclude=Observation:encounter&_count=5"),
        )
        .await;
        assert_eq!(sorted(got), sorted(want), "{file}: _revinclude");

        // Compartment search equals the patient-param search.
        let (a, _) = collect(&s, &format!("Patient/{pid}/DiagnosticReport?_count=10")).await;
        let (b, _) = collect(&s, &format!("DiagnosticReport?patient={pid}&_count=10")).await;
        assert_eq!(sorted(a.clone()), sorted(b));
        let want: Vec<String> = resources
            .iter()
            .filter(|r| r["resourceType"] == "DiagnosticReport")
            .map(key)
            .collect();
        assert_eq!(sorted(a), sorted(want));
    }
    s.stop().await;
}

fn percent(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
