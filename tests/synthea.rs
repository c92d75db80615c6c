//! Every Synthea bundle loads as a transaction (`POST /`), and every
//! resource reads back equal to what was sent — ids, rewritten references
//! and `meta` aside.

mod common;

use std::collections::HashMap;

use common::{data_dir, first_difference, TestServer};
use futures_util::stream::{self, StreamExt};
use serde_json::Value;

/// Replaces every string equal to a key of `map`, as the server must.
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

fn without_server_parts(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.shift_remove("id");
    if let Some(meta) = o.get_mut("meta").and_then(Value::as_object_mut) {
        meta.shift_remove("versionId");
        meta.shift_remove("lastUpdated");
        if meta.is_empty() {
            o.shift_remove("meta");
        }
    }
    v
}

fn conditional_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("reference", Value::String(s))
                        if s.split_once('?')
                            .map(|(t, _)| !t.contains('/'))
                            .unwrap_or(false) =>
                    {
                        out.push(s.clone())
                    }
                    _ => conditional_refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| conditional_refs(x, out)),
        _ => {}
    }
}

async fn load(s: &TestServer, file: &std::path::Path) -> (Value, Value) {
    let text = std::fs::read_to_string(file).unwrap();
    let sent: Value = serde_json::from_str(&text).unwrap();
    let r = s
        .client
        .post(s.url(""))
        .header("Content-Type", "application/fhir+json")
        .body(text)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let response: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{}: {}", file.display(), response);
    (sent, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_bundles_load_and_read_back() {
    let s = TestServer::start().await;
    let dir = data_dir().join("synthea/hiv-transaction-bundles");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // The shared Organization/Practitioner bundles load first.
    files.sort_by_key(|f| {
        let n = f.file_name().unwrap().to_string_lossy().to_string();
        !(n.starts_with("hospitalInformation") || n.starts_with("practitionerInformation"))
    });
    assert_eq!(files.len(), 29);

    let mut checked = 0usize;
    for file in &files {
        let (sent, response) = load(&s, file).await;
        let kind = sent["type"].as_str().unwrap();
        let entries = sent["entry"].as_array().unwrap();
        let results = response["entry"].as_array().unwrap();
        assert_eq!(entries.len(), results.len());
        assert_eq!(response["type"], format!("{kind}-response"));

        // fullUrl → assigned Type/id, from the response's locations.
        let mut map = HashMap::new();
        for (e, r) in entries.iter().zip(results) {
            let status = r["response"]["status"].as_str().unwrap();
            assert!(
                status.starts_with("201") || status.starts_with("200"),
                "{}: {status}",
                file.display()
            );
            let loc = r["response"]["location"]
                .as_str()
                .expect("location on every write");
            let parts: Vec<&str> = loc.split('/').collect();
            assert_eq!(parts.len(), 4, "Type/id/_history/n: {loc}");
            assert!(r["response"]["etag"].as_str().unwrap().starts_with("W/\""));
            map.insert(
                e["fullUrl"].as_str().unwrap().to_string(),
                format!("{}/{}", parts[0], parts[1]),
            );
        }
        // Conditional references resolve through search, as the server resolved them.
        let mut cond = Vec::new();
        for e in entries {
            conditional_refs(&e["resource"], &mut cond);
        }
        cond.sort();
        cond.dedup();
        for c in cond {
            let b: Value = s.get(&c).await.json().await.unwrap();
            assert_eq!(b["total"], 1, "{c}");
            let r = &b["entry"][0]["resource"];
            map.insert(
                c,
                format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap(),
                    r["id"].as_str().unwrap()
                ),
            );
        }

        let reads: Vec<(Value, String)> = entries
            .iter()
            .zip(results)
            .filter(|(_, r)| r["response"]["status"].as_str().unwrap().starts_with("201"))
            .map(|(e, r)| {
                let loc = r["response"]["location"].as_str().unwrap();
                let path = loc.split("/_history").next().unwrap().to_string();
                (e["resource"].clone(), path)
            })
            .collect();
        let mismatches: Vec<String> = stream::iter(reads)
            .map(|(sent, path)| {
                let map = &map;
                let s = &s;
                async move {
                    let r = s.get(&path).await;
                    assert_eq!(r.status(), 200, "{path}");
                    let got: Value = r.json().await.unwrap();
                    let text = got.to_string();
                    if text.contains("urn:uuid:") {
                        return Some(format!("{path}: an urn:uuid reference was left unresolved"));
                    }
                    let mut expected = sent;
                    rewrite(&mut expected, map);
                    let (e, g) = (without_server_parts(expected), without_server_parts(got));
                    (e != g).then(|| format!("{path} differs: {}", first_difference(&e, &g, &path)))
                }
            })
            .buffer_unordered(8)
            .filter_map(|x| async { x })
            .collect()
            .await;
        assert!(
            mismatches.is_empty(),
            "{}: {:?}",
            file.display(),
            &mismatches[..mismatches.len().min(5)]
        );
        checked += results.len();
    }
    assert!(checked >= 16_000, "checked {checked}");
    // Loading the shared bundles again matches everything (ifNoneExist): nothing new.
    let before = s.count("Organization").await;
    load(&s, &files[0]).await;
    assert_eq!(s.count("Organization").await, before);
    s.stop().await;
}
