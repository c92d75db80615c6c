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
        json!({ "lastUpdated": crate::fhir::format_instant(chrono::Utc::now()) }),
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

/// `self`, `first` (on later pages) and `next` links of a keyset-paged
/// Bundle: `base_params` are the query without a cursor.
pub fn paging_links(
    base: &str,
    path: &str,
    base_params: &[(String, String)],
    cursor: Option<String>,
    next: Option<String>,
) -> Vec<(&'static str, String)> {
    let with = |c: &str| {
        let mut p = base_params.to_vec();
        p.push(("_cursor".into(), c.to_string()));
        link(base, path, &p)
    };
    let mut links = vec![(
        "self",
        match &cursor {
            Some(c) => with(c),
            None => link(base, path, base_params),
        },
    )];
    if cursor.is_some() {
        links.push(("first", link(base, path, base_params)));
    }
    if let Some(n) = next {
        links.push(("next", with(&n)));
    }
    links
}

/// The `etag` form of a version id.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}
