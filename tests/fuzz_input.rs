//! Property tests over what a caller controls: search parameter values,
//! JSON and XML bodies, JSON Patch documents and client assertions. Whatever
//! is generated, the server answers below 500 and keeps answering. Each
//! property runs a fixed number of cases (`PROPTEST_CASES` to change it)
//! against one real server, authorization on; the cases are the same on
//! every run unless `FUZZ_RANDOM` is set.

mod common;

use common::TestServer;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

/// Runs `property` over `strategy` against one server.
fn check<S: Strategy>(
    strategy: S,
    property: impl Fn(
        &TestServer,
        S::Value,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = u16> + '_>>,
) where
    S::Value: std::fmt::Debug,
{
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(async {
        let s = TestServer::start().await;
        let p = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Fuzz", "given": ["A"]}],
                       "birthDate": "1970-01-01"});
        assert!(s.put_json("Patient/p1", &p).await.status().is_success());
        s
    });
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    // The same cases on every run, so that CI is repeatable; set
    // `FUZZ_RANDOM=1` to explore new ones.
    let mut runner = if std::env::var_os("FUZZ_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    let result = runner.run(&strategy, |input| {
        let status = rt.block_on(property(&s, input));
        prop_assert!(status < 500, "status {}", status);
        let alive = rt.block_on(async { s.get("metadata").await.status().as_u16() });
        prop_assert_eq!(alive, 200);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Text with what hurts parsers: control characters, multi-byte
/// characters, separators, escapes and prefixes.
fn hostile_text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("\0".to_string()),
        Just("€".to_string()),
        Just(",".to_string()),
        Just("|".to_string()),
        Just("\\".to_string()),
        Just("$".to_string()),
        Just("ge".to_string()),
        Just("eb".to_string()),
        Just("%".to_string()),
        Just("_".to_string()),
        Just("2020-01-01T".to_string()),
        Just("1e309".to_string()),
        Just("-".to_string()),
        Just(":".to_string()),
        "[0-9]{1,4}",
        "[a-z]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

#[test]
fn search_values_never_cause_a_server_error() {
    let names = prop_oneof![
        Just("Patient?family"),
        Just("Patient?birthdate"),
        Just("Patient?name:contains"),
        Just("Patient?name:exact"),
        Just("Patient?_id"),
        Just("Patient?identifier"),
        Just("Patient?_lastUpdated"),
        Just("Patient?_sort"),
        Just("Patient?_count"),
        Just("Patient?_include"),
        Just("Patient?_revinclude"),
        Just("Patient?_has:Observation:subject:code"),
        Just("Patient?general-practitioner.name"),
        Just("Observation?value-quantity"),
        Just("Observation?date"),
        Just("Observation?code"),
        Just("Observation?subject"),
        Just("Observation?code-value-quantity"),
        Just("RiskAssessment?probability"),
        Just("Patient?_elements"),
        Just("Patient?_summary"),
    ];
    check((names, hostile_text()), |s, (name, value)| {
        Box::pin(async move {
            let v =
                percent_encoding::utf8_percent_encode(&value, percent_encoding::NON_ALPHANUMERIC);
            s.get(&format!("{name}={v}")).await.status().as_u16()
        })
    });
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        hostile_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((element_name(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn element_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name".to_string()),
        Just("family".to_string()),
        Just("given".to_string()),
        Just("_given".to_string()),
        Just("gender".to_string()),
        Just("birthDate".to_string()),
        Just("extension".to_string()),
        Just("url".to_string()),
        Just("valueString".to_string()),
        Just("telecom".to_string()),
        Just("text".to_string()),
        Just("div".to_string()),
        Just("contained".to_string()),
        Just("resourceType".to_string()),
        Just("reference".to_string()),
        Just("id".to_string()),
        "[a-zA-Z_]{1,8}",
    ]
}

#[test]
fn json_bodies_never_cause_a_server_error() {
    let body = (
        proptest::collection::vec((element_name(), json_value()), 0..5),
        any::<bool>(),
    );
    check(body, |s, (fields, as_bundle)| {
        Box::pin(async move {
            let mut m = Map::new();
            m.insert("resourceType".into(), json!("Patient"));
            for (k, v) in fields {
                m.insert(k, v);
            }
            let resource = Value::Object(m);
            if as_bundle {
                let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"fullUrl": "urn:uuid:0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f", "resource": resource,
                     "request": {"method": "POST", "url": "Patient"}}]});
                s.post_json("", &b).await.status().as_u16()
            } else {
                s.post_json("Patient", &resource).await.status().as_u16()
            }
        })
    });
}

fn xml_tree() -> impl Strategy<Value = String> {
    let leaf = (element_name(), hostile_text()).prop_map(|(n, v)| {
        let v = v
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('"', "&quot;")
            .replace('\0', "");
        format!(r#"<{n} value="{v}"/>"#)
    });
    leaf.prop_recursive(5, 40, 5, |inner| {
        (element_name(), proptest::collection::vec(inner, 0..5))
            .prop_map(|(n, kids)| format!("<{n}>{}</{n}>", kids.concat()))
    })
}

#[test]
fn xml_bodies_never_cause_a_server_error() {
    let body = (proptest::collection::vec(xml_tree(), 0..5), 0usize..4);
    check(body, |s, (kids, cut)| {
        Box::pin(async move {
            let mut xml = format!(
                r#"<Patient xmlns="http://hl7.org/fhir">{}</Patient>"#,
                kids.concat()
            );
            // Sometimes truncated mid-document.
            if cut == 0 && xml.len() > 10 {
                let mut end = xml.len() / 2;
                while !xml.is_char_boundary(end) {
                    end -= 1;
                }
                xml.truncate(end);
            }
            s.client
                .post(s.url("Patient"))
                .header("Content-Type", "application/fhir+xml")
                .body(xml)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
}

fn patch_op() -> impl Strategy<Value = Value> {
    let path = prop_oneof![
        Just("/name".to_string()),
        Just("/name/0".to_string()),
        Just("/name/-".to_string()),
        Just("/name/0/given".to_string()),
        Just("/name/0/given/-".to_string()),
        Just("/birthDate".to_string()),
        Just("/id".to_string()),
        Just("/resourceType".to_string()),
        Just("/meta".to_string()),
        Just("".to_string()),
        Just("/".to_string()),
        Just("/telecom".to_string()),
        "/[a-z~01]{0,6}(/[0-9-]{1,2})?",
    ];
    let op = prop_oneof![
        Just("add"),
        Just("remove"),
        Just("replace"),
        Just("copy"),
        Just("move"),
        Just("test"),
        Just("bogus")
    ];
    (op, path.clone(), path, json_value()).prop_map(
        |(op, path, from, value)| json!({"op": op, "path": path, "from": from, "value": value}),
    )
}

#[test]
fn json_patch_documents_never_cause_a_server_error() {
    check(proptest::collection::vec(patch_op(), 0..8), |s, ops| {
        Box::pin(async move {
            s.client
                .patch(s.url("Patient/p1"))
                .header("Content-Type", "application/json-patch+json")
                .body(Value::Array(ops).to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn client_assertions_never_cause_a_server_error() {
    let header = prop_oneof![
        Just(json!({"alg": "RS384", "kid": "k", "typ": "JWT"})),
        Just(json!({"alg": "none"})),
        Just(json!({"alg": "ES384", "kid": "€"})),
        json_value(),
    ];
    let claims = prop_oneof![
        Just(json!({"iss": "c", "sub": "c", "aud": "x", "exp": 1, "jti": "j"})),
        json_value(),
    ];
    let raw = proptest::collection::vec(any::<u8>(), 0..64);
    check(
        (header, claims, raw, any::<bool>()),
        |s, (h, c, sig, garbage)| {
            Box::pin(async move {
                let assertion = if garbage {
                    String::from_utf8_lossy(&sig).into_owned()
                } else {
                    format!(
                        "{}.{}.{}",
                        b64(h.to_string().as_bytes()),
                        b64(c.to_string().as_bytes()),
                        b64(&sig)
                    )
                };
                let r = reqwest::Client::new()
                    .post(s.url("auth/token"))
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("scope", "system/*.rs"),
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", assertion.as_str()),
                    ])
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            })
        },
    );
}
