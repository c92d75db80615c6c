//! The C-CDA → FHIR mapping engine. The rules are data: one JSON file per
//! C-CDA template in `mappings/`, read at start-up (see `mappings/README.md`
//! for the format). This module only interprets them.
//!
//! A rule is applied to every element that carries its templateId. Each of
//! its resources is built from paths relative to that element; references
//! between resources of one document go through `urn:uuid` full URLs, which
//! the transaction replaces by the assigned ids. Whatever a section holds
//! that no rule covers is reported, with its XPath, never dropped silently.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use roxmltree::{Document, Node, NodeId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::ns::{HL7, XSI};
use super::xml::{text_of, xpath};
use super::ExchangeError;
use crate::fhir::Issue;

/// One mapping file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The templateId root (OID) the rule applies to.
    pub template: String,
    pub name: String,
    /// Rules are tried in ascending order; an element is mapped by the first
    /// rule that matches it.
    #[serde(default)]
    pub order: i32,
    /// Applies to the document element whatever templateIds it carries
    /// (the header rule: many documents name only their document template).
    #[serde(default)]
    pub document: bool,
    pub resources: Vec<ResourceRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceRule {
    /// A name other rules' `ref` fields use (`patient`, `author`, …).
    #[serde(default)]
    pub key: Option<String>,
    /// Path from the matched element to the element(s) the resource is built
    /// from; one resource per element found.
    #[serde(default = "dot")]
    pub context: String,
    pub resource_type: String,
    /// Conditional create on the first identifier (`identifier=system|value`).
    #[serde(default)]
    pub if_none_exist: bool,
    #[serde(default)]
    pub fields: Vec<Field>,
    /// Elements merged into the resource as they are.
    #[serde(default)]
    pub fixed: Map<String, Value>,
    /// Build `Composition.section` from the document body.
    #[serde(default)]
    pub sections: bool,
}

fn dot() -> String {
    ".".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The FHIR element name; for `type: value`, the prefix of `value[x]`.
    pub target: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// A list (all matches) instead of the first match.
    #[serde(default)]
    pub many: bool,
    /// Emit a data-absent-reason extension when nothing is found.
    #[serde(default)]
    pub required: bool,
    /// Code translation for `code`/`string` values.
    #[serde(default)]
    pub map: Option<HashMap<String, Value>>,
    /// Value used when nothing is found (or a code is not in `map`).
    #[serde(default)]
    pub default: Option<Value>,
    /// For `Reference`: keys of resources of this document, first non-empty wins.
    #[serde(default)]
    pub r#ref: Vec<String>,
    /// For `object`: the fields of the nested element.
    #[serde(default)]
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    String,
    Code,
    Boolean,
    Integer,
    Date,
    DateTime,
    Period,
    Identifier,
    HumanName,
    Address,
    ContactPoint,
    Coding,
    CodeableConcept,
    Quantity,
    /// `value[x]` chosen by the element's `xsi:type`.
    Value,
    /// References: `ref` keys, or the resources mapped from `path`.
    Reference,
    Object,
}

/// The loaded rule set.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
    /// OID → FHIR code system URI.
    pub code_systems: HashMap<String, String>,
}

impl Rules {
    /// Loads every `*.json` rule in `dir`, and `code-systems.json` (an object
    /// OID → URI).
    pub fn load(dir: &Path) -> Result<Rules, String> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read mappings directory {}: {e}", dir.display()))?;
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        let mut files = Vec::new();
        for p in paths {
            if p.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            files.push((p.display().to_string(), text));
        }
        Rules::parse(files.iter().map(|(n, t)| (n.as_str(), t.as_str())))
    }

    /// The rules of the repository's `mappings/` folder, built into the
    /// binary so that an installed server needs no source tree.
    pub fn built_in() -> Result<Rules, String> {
        Rules::parse(BUILT_IN.iter().copied())
    }

    /// Parses rule files given as (name, text); `code-systems.json` is the
    /// OID → URI table.
    fn parse<'a>(files: impl Iterator<Item = (&'a str, &'a str)>) -> Result<Rules, String> {
        let mut rules = Vec::new();
        let mut code_systems = HashMap::new();
        for (name, text) in files {
            if Path::new(name).file_name().and_then(|n| n.to_str()) == Some("code-systems.json") {
                code_systems = serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))?;
                continue;
            }
            let rule: Rule = serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))?;
            rules.push(rule);
        }
        rules.sort_by_key(|r| r.order);
        Ok(Rules {
            rules,
            code_systems,
        })
    }

    /// The rules in `dir` when given, else the built-in ones.
    pub fn load_default(dir: Option<&Path>) -> Result<Rules, String> {
        match dir {
            Some(d) => Rules::load(d),
            None => Rules::built_in(),
        }
    }
}

/// The files of `mappings/` (a test checks that none is missing).
const BUILT_IN: &[(&str, &str)] = &[
    (
        "2.16.840.1.113883.10.20.22.1.1-us-realm-header.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.1.1-us-realm-header.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.1-result-organizer.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.1-result-organizer.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.12-procedure-activity-act.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.12-procedure-activity-act.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.13-procedure-activity-observation.json",
        include_str!(
            "../../mappings/2.16.840.1.113883.10.20.22.4.13-procedure-activity-observation.json"
        ),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.14-procedure-activity-procedure.json",
        include_str!(
            "../../mappings/2.16.840.1.113883.10.20.22.4.14-procedure-activity-procedure.json"
        ),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.16-medication-activity.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.16-medication-activity.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.2-result-observation.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.2-result-observation.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.27-vital-sign-observation.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.27-vital-sign-observation.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.38-social-history-observation.json",
        include_str!(
            "../../mappings/2.16.840.1.113883.10.20.22.4.38-social-history-observation.json"
        ),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.4-problem-observation.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.4-problem-observation.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.49-encounter-activity.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.49-encounter-activity.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.52-immunization-activity.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.52-immunization-activity.json"),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.7-allergy-intolerance-observation.json",
        include_str!(
            "../../mappings/2.16.840.1.113883.10.20.22.4.7-allergy-intolerance-observation.json"
        ),
    ),
    (
        "2.16.840.1.113883.10.20.22.4.78-smoking-status.json",
        include_str!("../../mappings/2.16.840.1.113883.10.20.22.4.78-smoking-status.json"),
    ),
    (
        "code-systems.json",
        include_str!("../../mappings/code-systems.json"),
    ),
];

/// One resource the document maps to.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub full_url: String,
    pub resource: Value,
    pub if_none_exist: Option<String>,
    /// The XPath of the element it came from.
    pub source: String,
}

/// The result of mapping a document.
#[derive(Debug, Default)]
pub struct Mapping {
    pub resources: Vec<Mapped>,
    pub warnings: Vec<Issue>,
    /// Full URLs of keyed resources (`patient`, `composition`, …).
    pub keys: HashMap<String, Vec<String>>,
}

/// Items a path selects.
#[derive(Debug, Clone, Copy)]
enum Item<'a, 'i> {
    Node(Node<'a, 'i>),
    Attr(&'a str),
}

/// Evaluates a path: `a/b[c/@d='v']/@e`, `..`, `.`, `sdtc:x`.
fn select<'a, 'i>(node: Node<'a, 'i>, path: &str) -> Vec<Item<'a, 'i>> {
    let mut current = vec![Item::Node(node)];
    for step in split_steps(path) {
        let mut next = Vec::new();
        for item in &current {
            let Item::Node(n) = item else { continue };
            if step == "." {
                next.push(Item::Node(*n));
            } else if let Some(pred) = step.strip_prefix(".[").and_then(|p| p.strip_suffix(']')) {
                if predicate(*n, pred) {
                    next.push(Item::Node(*n));
                }
            } else if step == ".." {
                if let Some(p) = n.parent_element() {
                    next.push(Item::Node(p));
                }
            } else if let Some(attr) = step.strip_prefix('@') {
                let local = attr.rsplit(':').next().unwrap_or(attr);
                if let Some(a) = n.attributes().find(|a| a.name() == local) {
                    next.push(Item::Attr(a.value()));
                }
            } else {
                let (name, pred) = match step.find('[') {
                    Some(i) => (&step[..i], Some(&step[i + 1..step.len() - 1])),
                    None => (step, None),
                };
                let (ns, local) = match name.split_once(':') {
                    Some(("sdtc", l)) => ("urn:hl7-org:sdtc", l),
                    Some((_, l)) => (HL7, l),
                    None => (HL7, name),
                };
                for c in n.children() {
                    if c.is_element()
                        && c.tag_name().name() == local
                        && c.tag_name().namespace() == Some(ns)
                        && pred.map(|p| predicate(c, p)).unwrap_or(true)
                    {
                        next.push(Item::Node(c));
                    }
                }
            }
        }
        current = next;
    }
    current
}

/// Splits on `/` outside brackets.
fn split_steps(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in path.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            '/' if depth == 0 => {
                out.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&path[start..]);
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// `path='value'`, `path!='value'`, `path` (exists) or `not(path)`.
fn predicate(node: Node, pred: &str) -> bool {
    if let Some(inner) = pred.strip_prefix("not(").and_then(|p| p.strip_suffix(')')) {
        return !predicate(node, inner);
    }
    if let Some((p, v)) = pred.split_once("!=") {
        let v = v.trim().trim_matches('\'');
        return !select(node, p.trim()).iter().any(|i| item_text(i) == v);
    }
    if let Some((p, v)) = pred.split_once('=') {
        let v = v.trim().trim_matches('\'');
        return select(node, p.trim()).iter().any(|i| item_text(i) == v);
    }
    !select(node, pred.trim()).is_empty()
}

fn item_text(item: &Item) -> String {
    match item {
        Item::Attr(v) => v.to_string(),
        Item::Node(n) => text_of(*n).trim().to_string(),
    }
}

fn has_template(node: Node, oid: &str) -> bool {
    node.children().any(|c| {
        c.is_element()
            && c.tag_name().name() == "templateId"
            && c.tag_name().namespace() == Some(HL7)
            && c.attribute("root") == Some(oid)
    })
}

fn null_flavor<'a>(node: Node<'a, '_>) -> Option<&'a str> {
    node.attribute("nullFlavor")
}

/// HL7 nullFlavor → FHIR data-absent-reason.
fn absent_reason(nf: Option<&str>) -> &'static str {
    match nf {
        Some("ASKU") => "asked-unknown",
        Some("NAV") => "temp-unknown",
        Some("NASK") => "not-asked",
        Some("MSK") => "masked",
        Some("NA") => "not-applicable",
        Some("NAVU") | Some("UNK") | Some("NI") | None => "unknown",
        Some(_) => "unknown",
    }
}

fn dar(nf: Option<&str>) -> Value {
    json!({"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "valueCode": absent_reason(nf)
    }]})
}

/// HL7 TS (`20150622`, `201506221030-0500`) → FHIR dateTime with the same
/// precision. A time without a zone cannot be a FHIR dateTime, so it is cut
/// to the date.
pub fn hl7_datetime(ts: &str, date_only: bool) -> Option<String> {
    let ts = ts.trim();
    let (main, zone) = match ts.find(['+', '-']) {
        Some(i) => (&ts[..i], Some(&ts[i..])),
        None => (ts, None),
    };
    let (digits, fraction) = match main.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (main, None),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| digits.get(r).and_then(|d| d.parse::<u32>().ok());
    if num(0..4) == Some(0)
        || num(4..6).is_some_and(|m| !(1..=12).contains(&m))
        || num(6..8).is_some_and(|d| !(1..=31).contains(&d))
    {
        return None;
    }
    let date = match digits.len() {
        4 => digits.to_string(),
        6 => format!("{}-{}", &digits[..4], &digits[4..6]),
        n if n >= 8 => format!("{}-{}-{}", &digits[..4], &digits[4..6], &digits[6..8]),
        _ => return None,
    };
    if date_only || digits.len() <= 8 {
        return Some(date);
    }
    let zone = match zone {
        Some(z)
            if z.len() == 5
                && z[1..].bytes().all(|b| b.is_ascii_digit())
                && z[1..3] <= *"14"
                && z[3..5] < *"60" =>
        {
            format!("{}:{}", &z[..3], &z[3..])
        }
        _ => return Some(date),
    };
    let hh = &digits[8..10.min(digits.len())];
    let mm = digits.get(10..12).unwrap_or("00");
    let ss = digits.get(12..14).unwrap_or("00");
    if hh.len() != 2 {
        return Some(date);
    }
    let frac = match fraction {
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) && digits.len() >= 14 => {
            format!(".{f}")
        }
        _ => String::new(),
    };
    Some(format!("{date}T{hh}:{mm}:{ss}{frac}{zone}"))
}

struct Ctx<'r, 'a, 'i> {
    rules: &'r Rules,
    /// Full URL of the resource mapped from an element.
    by_node: HashMap<NodeId, String>,
    keys: HashMap<String, Vec<String>>,
    warnings: Vec<Issue>,
    _doc: std::marker::PhantomData<(&'a (), &'i ())>,
}

impl Ctx<'_, '_, '_> {
    fn system(&self, oid: &str) -> String {
        match self.rules.code_systems.get(oid) {
            Some(uri) => uri.clone(),
            None if is_uuid(oid) => format!("urn:uuid:{}", oid.to_ascii_lowercase()),
            None => format!("urn:oid:{oid}"),
        }
    }

    fn coding(&self, n: Node) -> Option<Value> {
        let code = n.attribute("code").filter(|c| !c.trim().is_empty())?;
        let mut c = Map::new();
        if let Some(sys) = n.attribute("codeSystem").filter(|s| !s.trim().is_empty()) {
            c.insert("system".into(), json!(self.system(sys)));
        }
        c.insert("code".into(), json!(code.trim()));
        if let Some(d) = n.attribute("displayName").filter(|d| !d.trim().is_empty()) {
            c.insert("display".into(), json!(d.trim()));
        }
        Some(Value::Object(c))
    }

    fn codeable(&self, n: Node) -> Option<Value> {
        let mut codings: Vec<Value> = self.coding(n).into_iter().collect();
        for t in n
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "translation")
        {
            codings.extend(self.coding(t));
        }
        let mut cc = Map::new();
        if !codings.is_empty() {
            cc.insert("coding".into(), Value::Array(codings));
        }
        let text = n
            .children()
            .find(|c| c.is_element() && c.tag_name().name() == "originalText")
            .map(|t| text_of(t).trim().to_string())
            .filter(|t| !t.is_empty());
        if let Some(t) = text {
            cc.insert("text".into(), json!(t));
        } else if n.attribute("code").is_none() {
            // No code: a value given as text (e.g. `<value xsi:type="CD">` with text only).
            let t = text_of(n).trim().to_string();
            if !t.is_empty() {
                cc.insert("text".into(), json!(t));
            }
        }
        (!cc.is_empty()).then_some(Value::Object(cc))
    }

    fn quantity(&self, n: Node) -> Option<Value> {
        let v = n.attribute("value")?.trim();
        let num: serde_json::Number = v.parse().ok()?;
        let mut q = Map::new();
        q.insert("value".into(), Value::Number(num));
        if let Some(u) = n.attribute("unit").filter(|u| !u.is_empty() && *u != "1") {
            q.insert("unit".into(), json!(u));
            q.insert("system".into(), json!("http://unitsofmeasure.org"));
            q.insert("code".into(), json!(u));
        }
        Some(Value::Object(q))
    }

    fn identifier(&self, n: Node) -> Option<Value> {
        let root = n
            .attribute("root")
            .map(str::trim)
            .filter(|r| !r.is_empty())?;
        Some(
            match n
                .attribute("extension")
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                Some(ext) => json!({"system": self.system(root), "value": ext}),
                None => json!({
                    "system": "urn:ietf:rfc:3986",
                    "value": if is_uuid(root) { format!("urn:uuid:{}", root.to_ascii_lowercase()) } else { format!("urn:oid:{root}") }
                }),
            },
        )
    }

    fn human_name(&self, n: Node) -> Option<Value> {
        let mut name = Map::new();
        let parts = |local: &str| -> Vec<Value> {
            n.children()
                .filter(|c| c.is_element() && c.tag_name().name() == local)
                .map(|c| text_of(c).trim().to_string())
                .filter(|t| !t.is_empty())
                .map(Value::String)
                .collect()
        };
        if let Some(f) = parts("family").into_iter().next() {
            name.insert("family".into(), f);
        }
        for (k, l) in [
            ("given", "given"),
            ("prefix", "prefix"),
            ("suffix", "suffix"),
        ] {
            let v = parts(l);
            if !v.is_empty() {
                name.insert(k.into(), Value::Array(v));
            }
        }
        if name.is_empty() {
            let t = text_of(n).trim().to_string();
            if t.is_empty() {
                return None;
            }
            name.insert("text".into(), json!(t));
        }
        if let Some(u) = n.attribute("use") {
            let u = match u.split_whitespace().next().unwrap_or("") {
                "L" => Some("official"),
                "P" => Some("nickname"),
                "A" => Some("anonymous"),
                "C" => Some("old"),
                _ => None,
            };
            if let Some(u) = u {
                name.insert("use".into(), json!(u));
            }
        }
        Some(Value::Object(name))
    }

    fn address(&self, n: Node) -> Option<Value> {
        if null_flavor(n).is_some() && n.children().all(|c| !c.is_element()) {
            return None;
        }
        let mut a = Map::new();
        let get = |local: &str| -> Vec<String> {
            n.children()
                .filter(|c| c.is_element() && c.tag_name().name() == local)
                .map(|c| text_of(c).trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()
        };
        let lines = get("streetAddressLine");
        if !lines.is_empty() {
            a.insert("line".into(), json!(lines));
        }
        for (k, l) in [
            ("city", "city"),
            ("state", "state"),
            ("postalCode", "postalCode"),
            ("country", "country"),
            ("district", "county"),
        ] {
            if let Some(v) = get(l).into_iter().next() {
                a.insert(k.into(), json!(v));
            }
        }
        if let Some(u) = n.attribute("use") {
            let u = match u.split_whitespace().next().unwrap_or("") {
                "H" | "HP" | "HV" => Some("home"),
                "WP" | "DIR" | "PUB" => Some("work"),
                "TMP" => Some("temp"),
                "OLD" | "BAD" => Some("old"),
                _ => None,
            };
            if let Some(u) = u {
                a.insert("use".into(), json!(u));
            }
        }
        (!a.is_empty()).then_some(Value::Object(a))
    }

    fn contact_point(&self, n: Node) -> Option<Value> {
        let v = n.attribute("value")?.trim();
        let (system, value) = if let Some(t) = v.strip_prefix("tel:") {
            ("phone", t)
        } else if let Some(m) = v.strip_prefix("mailto:") {
            ("email", m)
        } else if let Some(f) = v.strip_prefix("fax:") {
            ("fax", f)
        } else if v.starts_with("http") {
            ("url", v)
        } else {
            ("other", v)
        };
        let mut c = Map::new();
        c.insert("system".into(), json!(system));
        c.insert("value".into(), json!(value.trim()));
        if let Some(u) = n.attribute("use") {
            let u = match u.split_whitespace().next().unwrap_or("") {
                "H" | "HP" | "HV" => Some("home"),
                "WP" | "DIR" | "PUB" => Some("work"),
                "MC" | "PG" => Some("mobile"),
                "TMP" => Some("temp"),
                "OLD" | "BAD" => Some("old"),
                _ => None,
            };
            if let Some(u) = u {
                c.insert("use".into(), json!(u));
            }
        }
        Some(Value::Object(c))
    }

    fn ts(&self, n: Node, date_only: bool) -> Option<String> {
        if let Some(v) = n.attribute("value") {
            return hl7_datetime(v, date_only);
        }
        let low = n
            .children()
            .find(|c| c.is_element() && c.tag_name().name() == "low")?;
        hl7_datetime(low.attribute("value")?, date_only)
    }

    fn period(&self, n: Node) -> Option<Value> {
        let mut p = Map::new();
        let at = |local: &str| {
            n.children()
                .find(|c| c.is_element() && c.tag_name().name() == local)
                .and_then(|c| c.attribute("value"))
                .and_then(|v| hl7_datetime(v, false))
        };
        if let Some(v) = n.attribute("value").and_then(|v| hl7_datetime(v, false)) {
            p.insert("start".into(), json!(v));
        }
        if let Some(l) = at("low") {
            p.insert("start".into(), json!(l));
        }
        if let Some(h) = at("high") {
            p.insert("end".into(), json!(h));
        }
        (!p.is_empty()).then_some(Value::Object(p))
    }

    /// `value[x]` by `xsi:type`: (suffix, value).
    fn value(&self, n: Node) -> Option<(&'static str, Value)> {
        let ty = n
            .attribute((XSI, "type"))
            .map(|t| t.rsplit(':').next().unwrap_or(t))
            .unwrap_or("");
        match ty {
            "PQ" => self.quantity(n).map(|q| ("Quantity", q)),
            "CD" | "CE" | "CV" | "CO" | "CS" => self.codeable(n).map(|c| ("CodeableConcept", c)),
            "ST" | "ED" => {
                let t = text_of(n).trim().to_string();
                (!t.is_empty()).then(|| ("String", json!(t)))
            }
            "INT" => n
                .attribute("value")
                .and_then(|v| v.trim().parse::<i64>().ok())
                .map(|v| ("Integer", json!(v))),
            "BL" => n
                .attribute("value")
                .and_then(|v| v.trim().parse::<bool>().ok())
                .map(|v| ("Boolean", json!(v))),
            "TS" => self.ts(n, false).map(|v| ("DateTime", json!(v))),
            "IVL_TS" => self.period(n).map(|v| ("Period", v)),
            "IVL_PQ" => {
                let low = n
                    .children()
                    .find(|c| c.is_element() && c.tag_name().name() == "low")
                    .and_then(|c| self.quantity(c));
                let high = n
                    .children()
                    .find(|c| c.is_element() && c.tag_name().name() == "high")
                    .and_then(|c| self.quantity(c));
                if low.is_none() && high.is_none() {
                    return None;
                }
                let mut r = Map::new();
                if let Some(l) = low {
                    r.insert("low".into(), l);
                }
                if let Some(h) = high {
                    r.insert("high".into(), h);
                }
                Some(("Range", Value::Object(r)))
            }
            _ => None,
        }
    }
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

/// Maps a C-CDA `ClinicalDocument`. `sender` is the subscriber Organization
/// (`Organization/{id}`), available to rules as the key `sender`.
pub fn map_document(doc: &Document, rules: &Rules, sender: &str) -> Result<Mapping, ExchangeError> {
    let root = doc.root_element();
    if root.tag_name().namespace() != Some(HL7) || root.tag_name().name() != "ClinicalDocument" {
        return Err(ExchangeError::Mapping {
            message: format!(
                "the document element is {{{}}}{}, not an HL7 CDA ClinicalDocument",
                root.tag_name().namespace().unwrap_or(""),
                root.tag_name().name()
            ),
            xpath: Some(xpath(root)),
        });
    }
    let mut ctx = Ctx {
        rules,
        by_node: HashMap::new(),
        keys: HashMap::new(),
        warnings: Vec::new(),
        _doc: std::marker::PhantomData,
    };
    ctx.keys.insert("sender".into(), vec![sender.to_string()]);
    // Pass 1: which rule maps which element, and the full URL of each resource.
    let mut plan: Vec<(&Rule, &ResourceRule, Node, String)> = Vec::new();
    let mut claimed: HashSet<NodeId> = HashSet::new();
    let elements: Vec<Node> = doc.descendants().filter(|n| n.is_element()).collect();
    for rule in &rules.rules {
        let applies = |e: &Node| has_template(*e, &rule.template) || (rule.document && *e == root);
        for el in elements.iter().filter(|e| applies(e)) {
            if !claimed.insert(el.id()) {
                continue;
            }
            for rr in &rule.resources {
                for item in select(*el, &rr.context) {
                    let Item::Node(n) = item else { continue };
                    let url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
                    ctx.by_node.entry(n.id()).or_insert_with(|| url.clone());
                    if let Some(k) = &rr.key {
                        ctx.keys.entry(k.clone()).or_default().push(url.clone());
                    }
                    plan.push((rule, rr, n, url));
                }
            }
        }
    }
    // Pass 2: build.
    let mut out = Vec::with_capacity(plan.len());
    let mut sections_of = None;
    for (_rule, rr, node, url) in &plan {
        let mut res = Map::new();
        res.insert("resourceType".into(), json!(rr.resource_type));
        for (k, v) in &rr.fixed {
            res.insert(k.clone(), v.clone());
        }
        apply_fields(&mut ctx, *node, &rr.fields, &mut res);
        if rr.sections {
            sections_of = Some((out.len(), *node));
        }
        let if_none_exist = if rr.if_none_exist {
            res.get("identifier")
                .and_then(|i| i.as_array().and_then(|a| a.first()).or(Some(i)))
                .and_then(|i| Some((i.get("system")?.as_str()?, i.get("value")?.as_str()?)))
                .map(|(s, v)| format!("identifier={}|{}", enc(s), enc(v)))
        } else {
            None
        };
        out.push(Mapped {
            full_url: url.clone(),
            resource: Value::Object(res),
            if_none_exist,
            source: xpath(*node),
        });
    }
    if let Some((i, node)) = sections_of {
        if let Some(body) = select(node, "component/structuredBody").into_iter().next() {
            let Item::Node(body) = body else {
                unreachable!()
            };
            let sections: Vec<Value> = select(body, "component/section")
                .into_iter()
                .filter_map(|s| match s {
                    Item::Node(s) => section(&ctx, s),
                    Item::Attr(_) => None,
                })
                .collect();
            if !sections.is_empty() {
                out[i].resource["section"] = Value::Array(sections);
            }
        }
        if let Some(Item::Node(nx)) = select(node, "component/nonXMLBody").into_iter().next() {
            ctx.warnings.push(
                Issue {
                    severity: "information",
                    code: "informational",
                    diagnostics: "the unstructured body (nonXMLBody) is kept only in the original \
                                  document (DocumentReference/Binary)"
                        .into(),
                    expression: None,
                }
                .at(Some(xpath(nx))),
            );
        }
    }
    // Report entries no rule covered.
    for entry in doc.descendants().filter(|n| {
        n.is_element() && n.tag_name().name() == "entry" && n.tag_name().namespace() == Some(HL7)
    }) {
        let covered = entry
            .descendants()
            .any(|d| ctx.by_node.contains_key(&d.id()));
        if !covered {
            let templates: Vec<&str> = entry
                .first_element_child()
                .map(|a| {
                    a.children()
                        .filter(|c| c.is_element() && c.tag_name().name() == "templateId")
                        .filter_map(|c| c.attribute("root"))
                        .collect()
                })
                .unwrap_or_default();
            ctx.warnings.push(
                Issue {
                    severity: "warning",
                    code: "not-supported",
                    diagnostics: format!(
                        "entry not mapped: no rule in mappings/ for its templateId(s) [{}]; \
                         it is kept in the original document and the section narrative",
                        templates.join(", ")
                    ),
                    expression: None,
                }
                .at(Some(xpath(entry))),
            );
        }
    }
    Ok(Mapping {
        resources: out,
        warnings: ctx.warnings,
        keys: ctx.keys,
    })
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn apply_fields(ctx: &mut Ctx, node: Node, fields: &[Field], res: &mut Map<String, Value>) {
    for f in fields {
        let (values, nf) = field_values(ctx, node, f);
        let (key, values) = match f.kind {
            Kind::Value => {
                let mut key = None;
                let mut vs = Vec::new();
                for (suffix, v) in values.into_iter().filter_map(|v| {
                    let s = v.get("__suffix")?.as_str()?.to_string();
                    Some((s, v.get("__value")?.clone()))
                }) {
                    key.get_or_insert_with(|| format!("{}{suffix}", f.target));
                    vs.push(v);
                }
                match key {
                    Some(k) => (k, vs),
                    None => (f.target.clone(), vs),
                }
            }
            _ => (f.target.clone(), values),
        };
        if values.is_empty() {
            if let Some(d) = &f.default {
                res.insert(key, if f.many { json!([d]) } else { d.clone() });
            } else if f.required {
                let primitive = matches!(
                    f.kind,
                    Kind::String
                        | Kind::Code
                        | Kind::Boolean
                        | Kind::Integer
                        | Kind::Date
                        | Kind::DateTime
                );
                if primitive {
                    res.insert(format!("_{key}"), dar(nf));
                } else {
                    res.insert(key, if f.many { json!([dar(nf)]) } else { dar(nf) });
                }
            }
            continue;
        }
        if f.many {
            res.insert(key, Value::Array(values));
        } else {
            res.insert(key, values.into_iter().next().expect("non-empty"));
        }
    }
}

/// The values one field yields, and the nullFlavor of the first element found.
fn field_values(ctx: &mut Ctx, node: Node, f: &Field) -> (Vec<Value>, Option<&'static str>) {
    if f.kind == Kind::Reference && !f.r#ref.is_empty() {
        let urls = f
            .r#ref
            .iter()
            .find_map(|k| ctx.keys.get(k).filter(|v| !v.is_empty()))
            .cloned()
            .unwrap_or_default();
        return (
            urls.into_iter().map(|u| json!({"reference": u})).collect(),
            None,
        );
    }
    let items = match &f.path {
        Some(p) => select(node, p),
        None => vec![Item::Node(node)],
    };
    let mut nf: Option<&'static str> = None;
    let mut out = Vec::new();
    for item in items {
        let v = match item {
            Item::Attr(a) => convert_text(f, a),
            Item::Node(n) => {
                if nf.is_none() {
                    nf = null_flavor(n).map(|s| match s {
                        "ASKU" => "ASKU",
                        "NAV" => "NAV",
                        "NASK" => "NASK",
                        "MSK" => "MSK",
                        "NA" => "NA",
                        _ => "UNK",
                    });
                }
                convert_node(ctx, f, n)
            }
        };
        if let Some(v) = v {
            out.push(v);
            if !f.many {
                break;
            }
        }
    }
    (out, nf)
}

fn mapped(f: &Field, raw: &str) -> Option<Value> {
    match &f.map {
        Some(m) => m.get(raw).cloned().or_else(|| f.default.clone()),
        None => Some(json!(raw)),
    }
}

fn convert_text(f: &Field, text: &str) -> Option<Value> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    match f.kind {
        Kind::String | Kind::Code => mapped(f, t),
        Kind::Boolean => t.parse::<bool>().ok().map(Value::Bool),
        Kind::Integer => t.parse::<i64>().ok().map(|i| json!(i)),
        Kind::Date => hl7_datetime(t, true).map(Value::String),
        Kind::DateTime => hl7_datetime(t, false).map(Value::String),
        _ => None,
    }
}

fn convert_node(ctx: &mut Ctx, f: &Field, n: Node) -> Option<Value> {
    match f.kind {
        Kind::String | Kind::Code => {
            let raw = n
                .attribute("code")
                .map(str::to_string)
                .unwrap_or_else(|| text_of(n).trim().to_string());
            if raw.is_empty() {
                return None;
            }
            mapped(f, &raw)
        }
        Kind::Boolean | Kind::Integer => convert_text(f, n.attribute("value").unwrap_or("")),
        Kind::Date => ctx.ts(n, true).map(Value::String),
        Kind::DateTime => ctx.ts(n, false).map(Value::String),
        Kind::Period => ctx.period(n),
        Kind::Identifier => ctx.identifier(n),
        Kind::HumanName => ctx.human_name(n),
        Kind::Address => ctx.address(n),
        Kind::ContactPoint => ctx.contact_point(n),
        Kind::Coding => ctx.coding(n),
        Kind::CodeableConcept => ctx.codeable(n),
        Kind::Quantity => ctx.quantity(n),
        Kind::Value => ctx
            .value(n)
            .map(|(suffix, v)| json!({"__suffix": suffix, "__value": v})),
        Kind::Reference => ctx.by_node.get(&n.id()).map(|u| json!({"reference": u})),
        Kind::Object => {
            let mut obj = Map::new();
            apply_fields(ctx, n, &f.fields, &mut obj);
            (!obj.is_empty()).then_some(Value::Object(obj))
        }
    }
}

/// One `Composition.section` from a CDA section: title, code, narrative and
/// references to the resources mapped from its entries.
fn section(ctx: &Ctx, s: Node) -> Option<Value> {
    let mut sec = Map::new();
    if let Some(Item::Node(t)) = select(s, "title").into_iter().next() {
        let t = text_of(t).trim().to_string();
        if !t.is_empty() {
            sec.insert("title".into(), json!(t));
        }
    }
    if let Some(Item::Node(c)) = select(s, "code").into_iter().next() {
        if let Some(cc) = ctx.codeable(c) {
            sec.insert("code".into(), cc);
        }
    }
    if let Some(Item::Node(text)) = select(s, "text").into_iter().next() {
        let div = narrative(text);
        if let Some(div) = div {
            sec.insert("text".into(), json!({"status": "generated", "div": div}));
        }
    }
    let mut refs = Vec::new();
    let mut seen = HashSet::new();
    for e in select(s, "entry") {
        let Item::Node(e) = e else { continue };
        for d in e.descendants() {
            if let Some(u) = ctx.by_node.get(&d.id()) {
                if seen.insert(u.clone()) {
                    refs.push(json!({"reference": u}));
                }
            }
        }
    }
    if !refs.is_empty() {
        sec.insert("entry".into(), Value::Array(refs));
    }
    let subs: Vec<Value> = select(s, "component/section")
        .into_iter()
        .filter_map(|c| match c {
            Item::Node(c) => section(ctx, c),
            _ => None,
        })
        .collect();
    if !subs.is_empty() {
        sec.insert("section".into(), Value::Array(subs));
    }
    if !sec.contains_key("text") && !sec.contains_key("entry") && !sec.contains_key("section") {
        if let Some(nf) = s.attribute("nullFlavor") {
            sec.insert(
                "emptyReason".into(),
                json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": if nf == "NI" { "unavailable" } else { "notasked" }}]}),
            );
        } else {
            sec.insert(
                "emptyReason".into(),
                json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "unavailable"}]}),
            );
        }
    }
    (!sec.is_empty()).then_some(Value::Object(sec))
}

/// CDA narrative block → XHTML `div` (element names translated, attributes
/// other than `ID` and `href` dropped, comments dropped).
pub fn narrative(text: Node) -> Option<String> {
    let mut body = String::new();
    for c in text.children() {
        narrative_node(c, &mut body);
    }
    if body.trim().is_empty() {
        return None;
    }
    Some(format!(
        "<div xmlns=\"http://www.w3.org/1999/xhtml\">{body}</div>"
    ))
}

fn narrative_node(n: Node, out: &mut String) {
    if n.is_text() {
        escape(n.text().unwrap_or(""), out);
        return;
    }
    if !n.is_element() {
        return;
    }
    let name = n.tag_name().name();
    let tag = match name {
        "table" | "thead" | "tbody" | "tfoot" | "tr" | "th" | "td" | "caption" | "col"
        | "colgroup" | "sub" | "sup" | "br" => name,
        "list" if n.attribute("listType") == Some("ordered") => "ol",
        "list" => "ul",
        "item" => "li",
        "paragraph" => "p",
        "linkHtml" => "a",
        "renderMultiMedia" => return,
        _ => "span",
    };
    out.push('<');
    out.push_str(tag);
    if let Some(id) = n.attribute("ID") {
        out.push_str(" id=\"");
        escape(id, out);
        out.push('"');
    }
    if tag == "a" {
        if let Some(h) = n
            .attribute("href")
            .filter(|h| h.starts_with("http") || h.starts_with('#'))
        {
            out.push_str(" href=\"");
            escape(h, out);
            out.push('"');
        }
    }
    if tag == "br" || tag == "col" {
        out.push_str("/>");
        return;
    }
    out.push('>');
    let is_list = tag == "ul" || tag == "ol";
    for c in n.children() {
        // A list's caption has no place inside <ul>: it goes before.
        if is_list && c.is_element() && c.tag_name().name() == "caption" {
            continue;
        }
        if is_list && c.is_text() {
            continue;
        }
        narrative_node(c, out);
    }
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
    if is_list {
        if let Some(cap) = n
            .children()
            .find(|c| c.is_element() && c.tag_name().name() == "caption")
        {
            let mut p = String::from("<p>");
            escape(&text_of(cap), &mut p);
            p.push_str("</p>");
            let start = out.rfind(&format!("<{tag}")).unwrap_or(out.len());
            out.insert_str(start, &p);
        }
    }
}

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_rules_are_every_file_of_the_mappings_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let built_in: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        assert_eq!(built_in, on_disk);
        let (a, b) = (Rules::built_in().unwrap(), Rules::load(&dir).unwrap());
        assert_eq!(a.rules.len(), b.rules.len());
        assert_eq!(a.code_systems, b.code_systems);
    }

    #[test]
    fn dates_keep_their_precision() {
        assert_eq!(hl7_datetime("2015", false).as_deref(), Some("2015"));
        assert_eq!(hl7_datetime("201506", false).as_deref(), Some("2015-06"));
        assert_eq!(
            hl7_datetime("20150622", false).as_deref(),
            Some("2015-06-22")
        );
        assert_eq!(
            hl7_datetime("20150622103026-0500", false).as_deref(),
            Some("2015-06-22T10:30:26-05:00")
        );
        assert_eq!(
            hl7_datetime("201506221030+0100", false).as_deref(),
            Some("2015-06-22T10:30:00+01:00")
        );
        // A time without a zone is cut to the date.
        assert_eq!(
            hl7_datetime("201506221030", false).as_deref(),
            Some("2015-06-22")
        );
        assert_eq!(
            hl7_datetime("20150622103026-0500", true).as_deref(),
            Some("2015-06-22")
        );
        assert_eq!(hl7_datetime("junk", false), None);
        assert_eq!(hl7_datetime("00000000", false), None);
        assert_eq!(
            hl7_datetime("201507222300-5000", false).as_deref(),
            Some("2015-07-22")
        );
        assert_eq!(hl7_datetime("20151301", false), None);
    }

    #[test]
    fn paths_with_predicates() {
        let xml = r#"<a xmlns="urn:hl7-org:v3"><b><templateId root="1"/><c code="x"/></b><b><templateId root="2"/><c code="y"/></b></a>"#;
        let doc = Document::parse(xml).unwrap();
        let r = select(doc.root_element(), "b[templateId/@root='2']/c/@code");
        assert_eq!(r.len(), 1);
        assert_eq!(item_text(&r[0]), "y");
        assert_eq!(select(doc.root_element(), ".[b/c/@code='x']").len(), 1);
        assert_eq!(select(doc.root_element(), ".[not(b/c/@code='x')]").len(), 0);
    }
}
