//! Bundle building: searchset, history and batch/transaction responses.

use serde_json::{json, Map, Value};

/// A Bundle of `kind` with the given entries and links.
pub fn bundle(
    kind: &str,
    total: Option<i64>,
    links: Vec<(&str, String)>,
    entries: Vec<Value>,
) -> Value {
    let mut b = Map::new();
    b.insert("resourceType".into(), json!("Bundle"));
    b.insert("id".into(), json!(uuid::Uuid::new_v4().to_string()));
    b.insert(
        "meta".into(),
        json!({ "lastUpdated": crate::search::format_instant(chrono::Utc::now()) }),
    );
    b.insert("type".into(), json!(kind));
    if let Some(t) = total {
        b.insert("total".into(), json!(t));
    }
    if !links.is_empty() {
        b.insert(
            "link".into(),
            Value::Array(
                links
                    .into_iter()
                    .map(|(rel, url)| json!({"relation": rel, "url": url}))
                    .collect(),
            ),
        );
    }
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Value::Object(b)
}

/// A URL of `path` under `base` with the query `params`.
pub fn link(base: &str, path: &str, params: &[(String, String)]) -> String {
    let mut url = format!("{base}/{path}");
    if !params.is_empty() {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .finish();
        url.push('?');
        url.push_str(&q);
    }
    url
}

/// The `etag` form of a version id.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}
