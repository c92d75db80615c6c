//! Bundle building: searchset, history and batch/transaction responses.
//!
//! Search, history and `$everything` pages are [`Bundle`]s whose resources
//! may stay as the stored JSON text: written out as JSON, the page splices
//! each stored body in as it is, without parsing and re-serialising it.
//! Only XML, `_pretty` and resources that must be shaped (`_summary`,
//! `_elements`) pay for a parsed value.

use serde_json::{json, Map, Value};

/// The resource of a Bundle entry.
#[derive(Debug, Clone)]
pub enum Resource {
    /// Compact FHIR JSON exactly as stored (written out as it is).
    Stored(String),
    /// A value built or shaped for this response.
    Value(Value),
}

impl Resource {
    fn into_value(self) -> Result<Value, serde_json::Error> {
        match self {
            Resource::Value(v) => Ok(v),
            Resource::Stored(s) => serde_json::from_str(&s),
        }
    }
}

/// A Bundle entry: `fullUrl`, the resource, and the other entry elements
/// (`search`, `request`, `response`) in `rest`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub full_url: String,
    pub resource: Option<Resource>,
    pub rest: Map<String, Value>,
}

/// A Bundle whose entries' resources may be stored JSON text.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Every element but `entry`, as [`bundle`] makes it.
    head: Map<String, Value>,
    entries: Vec<Entry>,
}

impl Bundle {
    pub fn new(
        kind: &str,
        total: Option<i64>,
        links: Vec<(&str, String)>,
        entries: Vec<Entry>,
    ) -> Bundle {
        let Value::Object(head) = bundle(kind, total, links, Vec::new()) else {
            unreachable!("bundle() makes an object")
        };
        Bundle { head, entries }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Compact FHIR JSON; stored resources are copied in as they are.
    pub fn to_json(&self) -> Vec<u8> {
        let stored: usize = self
            .entries
            .iter()
            .map(|e| match &e.resource {
                Some(Resource::Stored(s)) => s.len(),
                _ => 0,
            })
            .sum();
        let mut out = Vec::with_capacity(stored + 256 * (self.entries.len() + 2));
        out.push(b'{');
        let mut first = true;
        for (k, v) in &self.head {
            if !first {
                out.push(b',');
            }
            first = false;
            write_member(&mut out, k, v);
        }
        if !self.entries.is_empty() {
            out.extend_from_slice(b",\"entry\":[");
            for (i, e) in self.entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"fullUrl\":");
                write_value(&mut out, &Value::String(e.full_url.clone()));
                match &e.resource {
                    Some(Resource::Stored(s)) => {
                        out.extend_from_slice(b",\"resource\":");
                        out.extend_from_slice(s.as_bytes());
                    }
                    Some(Resource::Value(v)) => {
                        out.push(b',');
                        write_member(&mut out, "resource", v);
                    }
                    None => {}
                }
                for (k, v) in &e.rest {
                    out.push(b',');
                    write_member(&mut out, k, v);
                }
                out.push(b'}');
            }
            out.push(b']');
        }
        out.push(b'}');
        out
    }

    /// The Bundle as one JSON value (stored resources parsed; they were
    /// written by ehrx, so an error means the database was damaged).
    pub fn into_value(self) -> Result<Value, serde_json::Error> {
        let mut b = self.head;
        if !self.entries.is_empty() {
            let mut entries = Vec::with_capacity(self.entries.len());
            for e in self.entries {
                let mut m = Map::new();
                m.insert("fullUrl".into(), Value::String(e.full_url));
                if let Some(r) = e.resource {
                    m.insert("resource".into(), r.into_value()?);
                }
                m.extend(e.rest);
                entries.push(Value::Object(m));
            }
            b.insert("entry".into(), Value::Array(entries));
        }
        Ok(Value::Object(b))
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

fn write_member(out: &mut Vec<u8>, k: &str, v: &Value) {
    let _ = serde_json::to_writer(&mut *out, k);
    out.push(b':');
    write_value(out, v);
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        let mut search = Map::new();
        search.insert("search".into(), json!({"mode": "match"}));
        let stored = r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"2"},"name":[{"family":"Ünïcödé \"q\""}]}"#;
        Bundle::new(
            "searchset",
            Some(2),
            vec![("self", "http://x/Patient?name=a&b=\"c\"".into())],
            vec![
                Entry {
                    full_url: "http://x/Patient/a".into(),
                    resource: Some(Resource::Stored(stored.into())),
                    rest: search.clone(),
                },
                Entry {
                    full_url: "http://x/Patient/b".into(),
                    resource: Some(Resource::Value(
                        json!({"resourceType": "Patient", "id": "b"}),
                    )),
                    rest: search,
                },
                Entry {
                    full_url: "http://x/Patient/c".into(),
                    resource: None,
                    rest: Map::new(),
                },
            ],
        )
    }

    #[test]
    fn written_json_equals_the_parsed_bundle() {
        let b = sample();
        let written: Value = serde_json::from_slice(&b.to_json()).unwrap();
        assert_eq!(written, b.clone().into_value().unwrap());
        assert_eq!(
            written["entry"][0]["resource"]["name"][0]["family"],
            "Ünïcödé \"q\""
        );
        assert_eq!(written["entry"][1]["search"]["mode"], "match");
        assert!(written["entry"][2].get("resource").is_none());
        assert_eq!(written["total"], 2);
    }

    #[test]
    fn an_empty_page_has_no_entry_element() {
        let b = Bundle::new("searchset", Some(0), Vec::new(), Vec::new());
        let written: Value = serde_json::from_slice(&b.to_json()).unwrap();
        assert!(written.get("entry").is_none());
        assert_eq!(written["type"], "searchset");
    }
}
