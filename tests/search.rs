//! Search over the official R4 examples (all 866 loaded with their ids):
//! every parameter type with its modifiers and prefixes, chaining, `_has`,
//! `_include`/`_revinclude`, `_sort`, `_total`, `_summary`, `_elements`,
//! compartments, system search and errors. Expected result sets were read
//! off the example files in the test data (`tests/data/`, `fhir-examples/`).

mod common;

use std::collections::HashSet;

use common::{first_issue, next_link, TestServer};
use serde_json::Value;

async fn load_examples(s: &TestServer) {
    common::smart::load_r4_examples(s, s.token.as_deref().expect("a token")).await;
}

/// `(mode, Type/id)` of every entry on every page of a search.
async fn all_entries(s: &TestServer, query: &str) -> Vec<(String, String)> {
    let token = s.token.as_deref().expect("a token");
    let (status, entries) = common::smart::all_pages(s, token, query).await;
    assert_eq!(status, 200, "{query}");
    entries
}

/// The ids of the matches of a search, sorted.
async fn ids(s: &TestServer, query: &str) -> Vec<String> {
    let mut v: Vec<String> = all_entries(s, query)
        .await
        .into_iter()
        .filter(|(m, _)| m == "match")
        .map(|(_, r)| r.split_once('/').unwrap().1.to_string())
        .collect();
    v.sort();
    v
}

/// Ids in result order (for `_sort`).
async fn ordered(s: &TestServer, query: &str) -> Vec<String> {
    all_entries(s, query)
        .await
        .into_iter()
        .filter(|(m, _)| m == "match")
        .map(|(_, r)| r.split_once('/').unwrap().1.to_string())
        .collect()
}

fn set(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

const VITALS_1999: &[&str] = &[
    "bmi",
    "bmi-using-related",
    "body-height",
    "body-length",
    "body-temperature",
    "head-circumference",
    "heart-rate",
    "mbp",
    "respiratory-rate",
    "vitals-panel",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_over_the_r4_examples() {
    let s = TestServer::start().await;
    load_examples(&s).await;
    let failures = std::cell::RefCell::new(Vec::new());
    let check = |query: &str, got: Vec<String>, want: Vec<String>| {
        if got != want {
            failures
                .borrow_mut()
                .push(format!("{query}\n   got  {got:?}\n   want {want:?}"));
        }
    };
    macro_rules! expect {
        ($q:expr, $want:expr) => {{
            let q: &str = $q;
            let got = ids(&s, q).await;
            check(q, got, set($want));
        }};
    }

    // string: starts-with, case- and accent-insensitive; :exact; :contains; OR; AND
    expect!("Patient?family=everywoman", &["genetics-example1", "mom"]);
    expect!("Patient?family=EVERY", &["genetics-example1", "mom"]);
    expect!(
        "Patient?family:exact=Everywoman",
        &["genetics-example1", "mom"]
    );
    expect!("Patient?family:exact=everywoman", &[]);
    expect!(
        "Patient?name:contains=olo",
        &["infant-mom", "infant-twin-1", "infant-twin-2"]
    );
    expect!("Patient?given=peter,jacen", &["example", "infant-twin-2"]);
    expect!("Patient?family=solo&given=jaina", &["infant-twin-1"]);
    // token: code, system|code, |code, system|, :not, :text, :of-type, boolean
    expect!(
        "Patient?gender=female",
        &[
            "animal",
            "genetics-example1",
            "infant-mom",
            "infant-twin-1",
            "mom",
            "pat4",
            "proband"
        ]
    );
    expect!(
        "Patient?gender:not=male",
        &[
            "animal",
            "genetics-example1",
            "ihe-pcd",
            "infant-mom",
            "infant-twin-1",
            "mom",
            "pat2",
            "pat4",
            "proband"
        ]
    );
    expect!(
        "Patient?identifier=urn:oid:0.1.2.3.4.5.6.7|123456",
        &["pat2"]
    );
    expect!("Patient?identifier=|AB60001", &["ihe-pcd"]);
    expect!(
        "Patient?identifier=urn:oid:0.1.2.3.4.5.6.7|",
        &["pat1", "pat2", "pat3", "pat4"]
    );
    expect!(
        "Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|12345",
        &["example", "xcda"]
    );
    expect!("Observation?code=http://loinc.org|29463-7", &["example"]);
    expect!("Observation?code=29463-7", &["example"]);
    expect!("Observation?code:text=weight", &["example", "vitals-panel"]);
    expect!("Patient?active=false&gender=male", &[]);
    expect!("Patient?deceased=true", &["pat3", "pat4"]);
    let alive = ids(&s, "Patient?deceased=false").await;
    if alive.len() != 20 || alive.contains(&"pat3".to_string()) {
        failures
            .borrow_mut()
            .push(format!("deceased=false: {alive:?}"));
    }
    // reference: id, Type/id, :Type, absolute URL of this server, chained
    let subject_example = ids(&s, "Observation?subject=Patient/example").await;
    assert_eq!(subject_example.len(), 30, "{subject_example:?}");
    for q in [
        "Observation?subject=example".to_string(),
        "Observation?subject:Patient=example".to_string(),
        "Observation?patient=example".to_string(),
        format!("Observation?subject={}", s.url("Patient/example")),
    ] {
        let got = ids(&s, &q).await;
        check(&q, got, subject_example.clone());
    }
    expect!(
        "Observation?subject=Patient/f001",
        &["ekg", "f001", "f002", "f003", "f004", "f005", "unsat"]
    );
    expect!(
        "Condition?subject:Patient.name=peter",
        &["example", "example2", "family-history", "stroke"]
    );
    expect!(
        "Condition?subject:Patient.organization.name=gastro",
        &["example", "example2", "family-history", "stroke"]
    );
    expect!(
        "Condition?patient.family=bor",
        &["f201", "f202", "f203", "f204", "f205"]
    );
    // 100 OR values in a chained parameter
    let mut many: Vec<String> = (0..99).map(|i| format!("nobody{i}")).collect();
    many.push("roelof".into());
    expect!(
        &format!("Condition?subject:Patient.name={}", many.join(",")),
        &["f201", "f202", "f203", "f204", "f205"]
    );
    // reference :identifier (a logical reference by identifier)
    let r = s
        .put_json(
            "Observation/by-identifier",
            &serde_json::json!({"resourceType": "Observation", "id": "by-identifier", "status": "final",
                "code": {"text": "x"},
                "subject": {"identifier": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}}}),
        )
        .await;
    assert!(r.status().is_success());
    expect!(
        "Observation?subject:identifier=urn:oid:1.2.36.146.595.217.0.1|12345",
        &["by-identifier"]
    );
    expect!("Observation?subject:identifier=12345", &["by-identifier"]);
    // _has (reverse chaining)
    expect!(
        "Patient?_has:Observation:patient:code=http://loinc.org|29463-7",
        &["example"]
    );
    expect!("Patient?_has:Observation:patient:code=none-such", &[]);
    // date prefixes, with precision as a range (Patient/example's observations)
    let ex = "Observation?patient=example&date=";
    expect!(&format!("{ex}1999-07-02"), VITALS_1999);
    expect!(
        &format!("{ex}2012"),
        &[
            "blood-pressure",
            "blood-pressure-cancel",
            "blood-pressure-dar"
        ]
    );
    expect!(
        &format!("{ex}ge2018"),
        &["abdo-tender", "clinical-gender", "map-sitting"]
    );
    expect!(
        &format!("{ex}gt2018-04-02"),
        &["abdo-tender", "map-sitting"]
    );
    expect!(&format!("{ex}lt1999-07-02"), &[]);
    expect!(&format!("{ex}le1999-07-02"), VITALS_1999);
    expect!(&format!("{ex}eb2000"), VITALS_1999);
    expect!(
        &format!("{ex}sa2016-12-31"),
        &["abdo-tender", "clinical-gender", "map-sitting"]
    );
    expect!(&format!("{ex}ap1999-07-02"), VITALS_1999);
    let ne = ids(&s, &format!("{ex}ne1999-07-02")).await;
    if ne.iter().any(|i| VITALS_1999.contains(&i.as_str()))
        || !ne.contains(&"blood-pressure".to_string())
    {
        failures.borrow_mut().push(format!("date ne: {ne:?}"));
    }
    expect!("Patient?birthdate=1974-12-25", &["ch-example", "example"]);
    expect!(
        "Patient?birthdate=ge2017",
        &["infant-twin-1", "infant-twin-2", "newborn"]
    );
    expect!("Patient?birthdate=lt1940", &["glossy", "xcda"]);
    // number
    expect!("RiskAssessment?probability=gt0.01", &["cardiac"]);
    expect!("RiskAssessment?probability=0.02", &["cardiac"]);
    expect!(
        "RiskAssessment?probability=lt0.001",
        &["genetic", "riskexample"]
    );
    expect!("RiskAssessment?probability=ap0.02", &["cardiac"]);
    expect!("RiskAssessment?probability=ge0.02", &["cardiac"]);
    expect!("RiskAssessment?probability=le0.000168", &["genetic"]);
    expect!("RiskAssessment?probability=sa0.01", &["cardiac"]);
    expect!("RiskAssessment?probability=eb0.0002", &["genetic"]);
    expect!(
        "RiskAssessment?probability=ne0.02",
        &["genetic", "riskexample"]
    );
    // quantity
    expect!(
        "Observation?value-quantity=gt100",
        &["656", "example", "f204"]
    );
    expect!(
        "Observation?value-quantity=185|http://unitsofmeasure.org|[lb_av]",
        &["example"]
    );
    expect!("Observation?value-quantity=185||kg", &[]);
    expect!(
        "Observation?value-quantity=lt1",
        &["1minute-apgar-score", "bmd", "herd1"]
    );
    // composite: both components from the same component element
    expect!(
        "Observation?component-code-value-quantity=http://loinc.org|8480-6$gt100",
        &["blood-pressure", "blood-pressure-dar"]
    );
    expect!(
        "Observation?component-code-value-quantity=http://loinc.org|8462-4$gt100",
        &[]
    );
    expect!(
        "Observation?code-value-quantity=http://loinc.org|29463-7$185",
        &["example"]
    );
    // uri: exact, :below, :above
    expect!(
        "ValueSet?url=http://hl7.org/fhir/ValueSet/inactive",
        &["inactive"]
    );
    expect!(
        "ValueSet?url:below=http://hl7.org/fhir/ValueSet/example",
        &[
            "example-expansion",
            "example-extensional",
            "example-filter",
            "example-hierarchical",
            "example-intensional"
        ]
    );
    expect!(
        "ValueSet?url:above=http://hl7.org/fhir/ValueSet/inactive/sub",
        &["inactive"]
    );
    // :missing
    expect!(
        "Patient?birthdate:missing=true",
        &["dicom", "ihe-pcd", "infant-fetal", "pat1", "pat2"]
    );
    expect!(
        "Patient?family:missing=true",
        &["animal", "ch-example", "infant-fetal", "newborn", "proband"]
    );
    expect!("Patient?gender:missing=true", &["ihe-pcd"]);
    expect!(
        "Patient?organization:missing=true",
        &[
            "animal",
            "ihe-pcd",
            "infant-fetal",
            "infant-mom",
            "infant-twin-1",
            "infant-twin-2",
            "newborn",
            "proband"
        ]
    );
    expect!("ValueSet?url:missing=true", &[]);
    let with_value = ids(&s, "Observation?value-quantity:missing=false").await;
    if with_value.len() != 30 {
        failures
            .borrow_mut()
            .push(format!("value-quantity:missing=false: {with_value:?}"));
    }
    let present = ids(&s, "Patient?birthdate:missing=false").await;
    if present.len() != 17 {
        failures
            .borrow_mut()
            .push(format!("birthdate:missing=false: {present:?}"));
    }
    // _id, _lastUpdated
    expect!("Patient?_id=pat1,pat2,nope", &["pat1", "pat2"]);
    expect!("Patient?_id=pat1&_lastUpdated=ge2000", &["pat1"]);
    expect!("Patient?_id=pat1&_lastUpdated=lt2000", &[]);

    // _sort: ascending, descending, several keys, missing values last
    let got = ordered(
        &s,
        "Patient?birthdate:missing=false&_sort=birthdate&_count=5",
    )
    .await;
    check(
        "_sort=birthdate",
        got,
        [
            "glossy",
            "xcda",
            "f001",
            "xds",
            "f201",
            "proband",
            "genetics-example1",
            "mom",
            "ch-example",
            "example",
            "pat3",
            "pat4",
            "infant-mom",
            "animal",
            "infant-twin-1",
            "infant-twin-2",
            "newborn",
        ]
        .map(String::from)
        .to_vec(),
    );
    let got = ordered(
        &s,
        "Patient?birthdate:missing=false&_sort=-birthdate&_count=4",
    )
    .await;
    check(
        "_sort=-birthdate",
        got,
        [
            "newborn",
            "infant-twin-1",
            "infant-twin-2",
            "animal",
            "infant-mom",
            "pat4",
            "pat3",
            "ch-example",
            "example",
            "genetics-example1",
            "mom",
            "proband",
            "f201",
            "xds",
            "f001",
            "glossy",
            "xcda",
        ]
        .map(String::from)
        .to_vec(),
    );
    let got = ordered(&s, "Patient?_sort=family,_id&_count=3").await;
    check(
        "_sort=family,_id",
        got,
        [
            "f201",
            "ihe-pcd",
            "example",
            "xds",
            "pat1",
            "pat2",
            "genetics-example1",
            "mom",
            "glossy",
            "xcda",
            "dicom",
            "pat3",
            "pat4",
            "infant-mom",
            "infant-twin-1",
            "infant-twin-2",
            "f001",
            "animal",
            "ch-example",
            "infant-fetal",
            "newborn",
            "proband",
        ]
        .map(String::from)
        .to_vec(),
    );

    // _include, _include:iterate, _revinclude
    let got = all_entries(
        &s,
        "Observation?_id=blood-pressure&_include=Observation:subject",
    )
    .await;
    check(
        "_include",
        got.iter().map(|(m, r)| format!("{m} {r}")).collect(),
        vec![
            "match Observation/blood-pressure".into(),
            "include Patient/example".into(),
        ],
    );
    let got = all_entries(
        &s,
        "Observation?_id=blood-pressure&_include=Observation:subject&_include:iterate=Patient:organization",
    )
    .await;
    check(
        "_include:iterate",
        got.iter().map(|(m, r)| format!("{m} {r}")).collect(),
        vec![
            "match Observation/blood-pressure".into(),
            "include Patient/example".into(),
            "include Organization/1".into(),
        ],
    );
    let got = all_entries(
        &s,
        "Encounter?patient=example&_revinclude=Observation:encounter",
    )
    .await;
    let mut got: Vec<String> = got.iter().map(|(m, r)| format!("{m} {r}")).collect();
    got.sort();
    check(
        "_revinclude",
        got,
        set(&[
            "match Encounter/emerg",
            "match Encounter/example",
            "match Encounter/home",
            "include Observation/abdo-tender",
            "include Observation/clinical-gender",
            "include Observation/example",
            "include Observation/map-sitting",
        ]),
    );

    // _include with a wildcard
    let got = all_entries(&s, "Observation?_id=blood-pressure&_include=Observation:*").await;
    if !got.contains(&("include".to_string(), "Patient/example".to_string())) {
        failures
            .borrow_mut()
            .push(format!("_include=Observation:*: {got:?}"));
    }
    // $everything: _since in the future leaves nothing
    let got = all_entries(&s, "Patient/example/$everything?_since=2999-01-01").await;
    if !got.is_empty() {
        failures
            .borrow_mut()
            .push(format!("$everything _since: {got:?}"));
    }
    // compartment search
    expect!(
        "Patient/f001/Observation",
        &["ekg", "f001", "f002", "f003", "f004", "f005", "unsat"]
    );
    expect!(
        "Patient/f001/Observation?code=http://loinc.org|15074-8",
        &["f001", "unsat"]
    );
    expect!(
        "Patient/f201/Condition",
        &["f201", "f202", "f203", "f204", "f205"]
    );

    // system search with _type
    let got = all_entries(&s, "?_type=Patient,Organization&_id=1,pat1&_count=1").await;
    check(
        "_type",
        got.into_iter().map(|(_, r)| r).collect(),
        vec!["Patient/pat1".into(), "Organization/1".into()],
    );

    let failures = failures.into_inner();
    assert!(
        failures.is_empty(),
        "{} searches differ:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // _total, _summary=count, _summary=true/data/text, _elements
    let b: Value = s
        .get("Patient?gender=female&_total=none")
        .await
        .json()
        .await
        .unwrap();
    assert!(b.get("total").is_none());
    let b: Value = s
        .get("Patient?gender=female&_summary=count")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["total"], 7);
    assert!(b.get("entry").is_none());
    let b: Value = s
        .get("Patient?_id=example&_summary=true")
        .await
        .json()
        .await
        .unwrap();
    let p = &b["entry"][0]["resource"];
    assert!(p.get("name").is_some() && p.get("contact").is_none() && p.get("text").is_none());
    assert!(p["meta"]["tag"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["code"] == "SUBSETTED"));
    let b: Value = s
        .get("Patient?_id=example&_summary=data")
        .await
        .json()
        .await
        .unwrap();
    let p = &b["entry"][0]["resource"];
    assert!(p.get("text").is_none() && p.get("contact").is_some());
    let b: Value = s
        .get("Patient?_id=example&_summary=text")
        .await
        .json()
        .await
        .unwrap();
    let p = &b["entry"][0]["resource"];
    assert!(p.get("text").is_some() && p.get("name").is_none());
    let b: Value = s
        .get("Observation?_id=example&_elements=valueQuantity")
        .await
        .json()
        .await
        .unwrap();
    let o = &b["entry"][0]["resource"];
    assert!(o.get("valueQuantity").is_some() && o.get("subject").is_none());
    assert!(
        o.get("status").is_some() && o.get("code").is_some(),
        "mandatory elements stay: {o}"
    );
    let self_link = b["link"][0]["url"].as_str().unwrap();
    assert!(self_link.contains("_id=example") && self_link.contains("_elements=valueQuantity"));

    // POST _search with a form body
    let r = s
        .client
        .post(s.url("Patient/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=everywoman")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 2);

    // Errors: unknown parameter (strict default) names it; lenient drops it
    // from the self link; bad values say what is wrong.
    let r = s.get("Patient?nonsense=1").await;
    assert_eq!(r.status(), 400);
    let o: Value = r.json().await.unwrap();
    assert!(first_issue(&o)["diagnostics"]
        .as_str()
        .unwrap()
        .contains("nonsense"));
    let r = s
        .client
        .get(s.url("Patient?nonsense=1&family=everywoman"))
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 2);
    let self_link = b["link"][0]["url"].as_str().unwrap();
    assert!(!self_link.contains("nonsense") && self_link.contains("family=everywoman"));
    for bad in [
        "Patient?birthdate=yesterday",
        "RiskAssessment?probability=high",
        "Patient?birthdate:missing=maybe",
        "Observation?component-code-value-quantity=http://loinc.org|8480-6",
        "Patient?_sort=nonsense",
        "Patient?_count=-1",
        "Patient?_include=Nope:x",
        "Condition?subject:Patient.nonsense=1",
        "Patient?_cursor=%%%",
    ] {
        let r = s.get(bad).await;
        assert!(
            r.status() == 400 || r.status() == 404,
            "{bad}: {}",
            r.status()
        );
        let o: Value = r.json().await.unwrap();
        assert_eq!(o["resourceType"], "OperationOutcome", "{bad}");
    }
    let r = s.get("Location?near=42.256500|-83.694710|11.20|km").await;
    assert_eq!(
        r.status(),
        400,
        "special parameters are refused, not ignored"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_stays_correct_while_others_insert() {
    let s = TestServer::start().await;
    let patient = s
        .create(&serde_json::json!({"resourceType": "Patient", "name": [{"family": "Pager"}]}))
        .await;
    let pid = patient["id"].as_str().unwrap().to_string();
    let obs = |n: usize| {
        serde_json::json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": format!("Patient/{pid}")},
            "effectiveDateTime": format!("2020-01-{:02}", n % 28 + 1),
            "valueQuantity": {"value": n, "unit": "/min"}})
    };
    let mut before = HashSet::new();
    for n in 0..60 {
        let o = s.create(&obs(n)).await;
        before.insert(o["id"].as_str().unwrap().to_string());
    }
    for query in [
        format!("Observation?patient={pid}&_count=7"),
        format!("Observation?patient={pid}&_sort=-date,value-quantity&_count=7"),
    ] {
        let mut seen = Vec::new();
        let mut url = s.url(&query);
        let mut n = 100;
        loop {
            let page = s.get_json(&url).await;
            let entries = page["entry"].as_array().cloned().unwrap_or_default();
            assert!(
                !entries.is_empty() || seen.is_empty(),
                "empty page at {url}"
            );
            for e in entries {
                seen.push(e["resource"]["id"].as_str().unwrap().to_string());
            }
            // Another client writes between pages.
            s.create(&obs(n)).await;
            n += 1;
            match next_link(&page) {
                Some(next) => url = next,
                None => break,
            }
        }
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "duplicates across pages of {query}"
        );
        assert!(
            before.is_subset(&unique),
            "{query} lost resources that existed throughout"
        );
    }
    s.stop().await;
}
