//! The subset of FHIRPath that the R4 core search parameters use, compiled
//! once and evaluated over FHIR JSON with the R4 element table for types.
//!
//! Supported: paths, `|`, `(…)`, `x as T`, `.as(T)`, `.ofType(T)`,
//! `.where(resolve() is T)`, `.where(field = 'literal')`, `[n]`,
//! `.extension('url')`, `.exists()` and the boolean `and` / `!= false`
//! of `Patient.deceased`. Anything else fails to compile, so a parameter
//! cannot be left out silently.

use serde_json::{Map, Value};

use crate::fhir::validate::table;

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `Type` at the start of a path (or a field name in a relative path).
    Root(String),
    Field(Box<Expr>, String),
    As(Box<Expr>, String),
    WhereResolveIs(Box<Expr>, String),
    WhereEq(Box<Expr>, String, String),
    Index(Box<Expr>, usize),
    Extension(Box<Expr>, String),
    /// `x.exists() and x != false`: true when present and not `false`.
    ExistsNotFalse(Box<Expr>),
    Union(Vec<Expr>),
}

/// The FHIR type of a node: a named type, or an inline backbone element.
#[derive(Debug, Clone, Copy)]
pub enum Ty<'t> {
    Named(&'t str),
    Backbone(&'t Map<String, Value>),
    Unknown,
}

impl<'t> Ty<'t> {
    /// The type name, when it has one (`HumanName`, `dateTime`, …).
    pub fn name(&self) -> Option<&'t str> {
        match self {
            Ty::Named(n) => Some(n),
            _ => None,
        }
    }
}

/// One result of an evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Item<'v> {
    pub value: &'v Value,
    pub ty: Ty<'static>,
}

// ---------------------------------------------------------------- parsing

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(usize),
    Sym(&'static str),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '\'' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'\'' {
                    j += 1;
                }
                if j >= b.len() {
                    return Err(format!("unterminated string in '{src}'"));
                }
                out.push(Tok::Str(src[start..j].to_string()));
                i = j + 1;
            }
            '!' if b.get(i + 1) == Some(&b'=') => {
                out.push(Tok::Sym("!="));
                i += 2;
            }
            '.' | '|' | '(' | ')' | '[' | ']' | '=' => {
                out.push(Tok::Sym(match c {
                    '.' => ".",
                    '|' => "|",
                    '(' => "(",
                    ')' => ")",
                    '[' => "[",
                    ']' => "]",
                    _ => "=",
                }));
                i += 1;
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(Tok::Num(src[start..i].parse().map_err(|_| "bad number")?));
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == '%' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Tok::Ident(src[start..i].to_string()));
            }
            c => return Err(format!("unexpected '{c}' in '{src}'")),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    src: String,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn eat_ident(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, sym: &str) -> Result<(), String> {
        if self.eat(sym) {
            Ok(())
        } else {
            Err(format!("expected '{sym}' in '{}'", self.src))
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Ident(s)) => Ok(s),
            _ => Err(format!("expected a name in '{}'", self.src)),
        }
    }

    fn union(&mut self) -> Result<Expr, String> {
        let mut parts = vec![self.conj()?];
        while self.eat("|") {
            parts.push(self.conj()?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Expr::Union(parts)
        })
    }

    /// `a.exists() and a != false` — the one boolean form core uses.
    fn conj(&mut self) -> Result<Expr, String> {
        let left = self.term()?;
        if self.eat_ident("and") {
            let right = self.term()?;
            self.expect("!=")?;
            if !self.eat_ident("false") {
                return Err(format!("unsupported comparison in '{}'", self.src));
            }
            return match left {
                Expr::ExistsNotFalse(inner) if *inner == right => Ok(Expr::ExistsNotFalse(inner)),
                _ => Err(format!("unsupported boolean expression '{}'", self.src)),
            };
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut e = if self.eat("(") {
            let inner = self.union()?;
            self.expect(")")?;
            inner
        } else {
            Expr::Root(self.ident()?)
        };
        loop {
            if self.eat(".") {
                let name = self.ident()?;
                e = if self.eat("(") {
                    self.function(e, &name)?
                } else {
                    Expr::Field(Box::new(e), name)
                };
            } else if self.eat("[") {
                let n = match self.next() {
                    Some(Tok::Num(n)) => n,
                    _ => return Err(format!("expected an index in '{}'", self.src)),
                };
                self.expect("]")?;
                e = Expr::Index(Box::new(e), n);
            } else if self.eat_ident("as") {
                e = Expr::As(Box::new(e), self.ident()?);
            } else {
                return Ok(e);
            }
        }
    }

    fn function(&mut self, on: Expr, name: &str) -> Result<Expr, String> {
        let on = Box::new(on);
        let e = match name {
            "as" | "ofType" => Expr::As(on, self.ident()?),
            "exists" => Expr::ExistsNotFalse(on),
            "extension" => match self.next() {
                Some(Tok::Str(url)) => Expr::Extension(on, url),
                _ => return Err(format!("extension() needs a url in '{}'", self.src)),
            },
            "where" => {
                if self.eat_ident("resolve") {
                    self.expect("(")?;
                    self.expect(")")?;
                    if !self.eat_ident("is") {
                        return Err(format!("expected 'is' in '{}'", self.src));
                    }
                    Expr::WhereResolveIs(on, self.ident()?)
                } else {
                    let field = self.ident()?;
                    self.expect("=")?;
                    match self.next() {
                        Some(Tok::Str(v)) => Expr::WhereEq(on, field, v),
                        _ => return Err(format!("expected a literal in '{}'", self.src)),
                    }
                }
            }
            other => return Err(format!("unsupported function {other}() in '{}'", self.src)),
        };
        self.expect(")")?;
        Ok(e)
    }
}

/// Compiles an expression of the supported subset.
pub fn compile(src: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
        src: src.to_string(),
    };
    let e = p.union()?;
    if p.pos != p.toks.len() {
        return Err(format!(
            "unexpected text after position {} in '{src}'",
            p.pos
        ));
    }
    Ok(e)
}

/// The element paths an expression reads, as JSON names from the
/// resource down (`Claim.identifier` → `["identifier"]`, `Observation.value
/// as Quantity` → `["valueQuantity"]`): what a search on it can reveal.
pub fn element_paths(e: &Expr) -> Vec<Vec<String>> {
    match e {
        Expr::Root(name) if name.starts_with(|c: char| c.is_ascii_uppercase()) => vec![vec![]],
        Expr::Root(name) => vec![vec![name.clone()]],
        Expr::Field(inner, name) => element_paths(inner)
            .into_iter()
            .map(|mut p| {
                p.push(name.clone());
                p
            })
            .collect(),
        Expr::As(inner, ty) => element_paths(inner)
            .into_iter()
            .map(|mut p| {
                if let Some(last) = p.last_mut() {
                    let mut cs = ty.chars();
                    if let Some(first) = cs.next() {
                        last.push(first.to_ascii_uppercase());
                        last.push_str(cs.as_str());
                    }
                }
                p
            })
            .collect(),
        Expr::Extension(inner, _) => element_paths(inner)
            .into_iter()
            .map(|mut p| {
                p.push("extension".into());
                p
            })
            .collect(),
        Expr::WhereResolveIs(inner, _)
        | Expr::WhereEq(inner, _, _)
        | Expr::Index(inner, _)
        | Expr::ExistsNotFalse(inner) => element_paths(inner),
        Expr::Union(parts) => parts.iter().flat_map(element_paths).collect(),
    }
}

/// The parts of a (possibly multi-type) expression that apply to `rtype`,
/// e.g. `Observation.subject` out of `A.patient | Observation.subject`.
pub fn for_type(e: &Expr, rtype: &str) -> Option<Expr> {
    match e {
        Expr::Union(parts) => {
            let kept: Vec<Expr> = parts.iter().filter_map(|p| for_type(p, rtype)).collect();
            match kept.len() {
                0 => None,
                1 => kept.into_iter().next(),
                _ => Some(Expr::Union(kept)),
            }
        }
        _ => {
            let root = root_of(e);
            // A path starting with a field name is relative to the resource.
            let relative = root.starts_with(char::is_lowercase);
            (relative || root == rtype || root == "Resource" || root == "DomainResource")
                .then(|| e.clone())
        }
    }
}

fn root_of(e: &Expr) -> &str {
    match e {
        Expr::Root(r) => r,
        Expr::Field(i, _)
        | Expr::As(i, _)
        | Expr::WhereResolveIs(i, _)
        | Expr::WhereEq(i, _, _)
        | Expr::Index(i, _)
        | Expr::Extension(i, _)
        | Expr::ExistsNotFalse(i) => root_of(i),
        Expr::Union(parts) => parts.first().map(root_of).unwrap_or(""),
    }
}

// ------------------------------------------------------------- evaluation

/// The resource as the root item of an evaluation.
fn root_item(resource: &Value) -> Item<'_> {
    let rtype = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ty = table()
        .get(rtype)
        .and_then(Value::as_object)
        .map(Ty::Backbone)
        .unwrap_or(Ty::Unknown);
    Item {
        value: resource,
        ty,
    }
}

/// Evaluates `e` on a resource.
pub fn eval<'v>(e: &Expr, resource: &'v Value) -> Vec<Item<'v>> {
    let root = root_item(resource);
    eval_in(e, &[root], root)
}

/// Evaluates a relative expression (a composite component) on one item
/// of `resource` (which `%resource` denotes).
pub fn eval_relative<'v>(e: &Expr, item: Item<'v>, resource: &'v Value) -> Vec<Item<'v>> {
    eval_in(e, &[item], root_item(resource))
}

fn eval_in<'v>(e: &Expr, ctx: &[Item<'v>], root: Item<'v>) -> Vec<Item<'v>> {
    match e {
        Expr::Root(name) if name == "%resource" => vec![root],
        Expr::Root(name) => {
            if name.starts_with(char::is_uppercase) {
                ctx.iter()
                    .filter(|i| {
                        name == "Resource"
                            || name == "DomainResource"
                            || i.value.get("resourceType").and_then(Value::as_str)
                                == Some(name.as_str())
                    })
                    .copied()
                    .collect()
            } else {
                field(ctx, name)
            }
        }
        Expr::Field(inner, name) => field(&eval_in(inner, ctx, root), name),
        Expr::As(inner, t) => eval_in(inner, ctx, root)
            .into_iter()
            .filter(|i| match i.ty {
                Ty::Named(n) => n.eq_ignore_ascii_case(t),
                _ => true,
            })
            .collect(),
        Expr::WhereResolveIs(inner, t) => eval_in(inner, ctx, root)
            .into_iter()
            .filter(|i| {
                i.value
                    .get("reference")
                    .and_then(Value::as_str)
                    .and_then(reference_type)
                    == Some(t.as_str())
            })
            .collect(),
        Expr::WhereEq(inner, f, v) => eval_in(inner, ctx, root)
            .into_iter()
            .filter(|i| i.value.get(f).and_then(Value::as_str) == Some(v.as_str()))
            .collect(),
        Expr::Index(inner, n) => eval_in(inner, ctx, root)
            .into_iter()
            .nth(*n)
            .into_iter()
            .collect(),
        Expr::Extension(inner, url) => {
            let items = field(&eval_in(inner, ctx, root), "extension");
            items
                .into_iter()
                .filter(|i| i.value.get("url").and_then(Value::as_str) == Some(url.as_str()))
                .collect()
        }
        Expr::ExistsNotFalse(inner) => {
            let items = eval_in(inner, ctx, root);
            let truth = !items.is_empty() && !items.iter().any(|i| i.value == &Value::Bool(false));
            static TRUE: Value = Value::Bool(true);
            static FALSE: Value = Value::Bool(false);
            vec![Item {
                value: if truth { &TRUE } else { &FALSE },
                ty: Ty::Named("boolean"),
            }]
        }
        Expr::Union(parts) => parts.iter().flat_map(|p| eval_in(p, ctx, root)).collect(),
    }
}

/// The resource type named by a relative or absolute literal reference.
pub fn reference_type(r: &str) -> Option<&str> {
    let r = r.split(['?', '#']).next()?;
    let mut segs = r.rsplit('/');
    let first = segs.next()?;
    let second = segs.next()?;
    // `Type/id/_history/n`
    if second == "_history" {
        let _ = first;
        segs.next()?;
        return segs.next();
    }
    Some(second)
}

fn type_of(t: &'static Value) -> Ty<'static> {
    match t {
        Value::String(name) => Ty::Named(name.as_str()),
        Value::Object(m) => match m.get("$ref").and_then(Value::as_str) {
            Some(path) => {
                let mut parts = path.split('.');
                let mut node = parts.next().and_then(|t| table().get(t));
                for p in parts {
                    node = node.and_then(|n| n.get(p));
                }
                match node {
                    Some(Value::Object(d)) => Ty::Backbone(d),
                    _ => Ty::Unknown,
                }
            }
            None => Ty::Backbone(m),
        },
        _ => Ty::Unknown,
    }
}

fn defs_of(ty: Ty<'static>, value: &Value) -> Option<&'static Map<String, Value>> {
    match ty {
        Ty::Backbone(m) => Some(m),
        Ty::Named("Resource") => value
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(|t| table().get(t))
            .and_then(Value::as_object),
        Ty::Named(n) => table().get(n).and_then(Value::as_object),
        Ty::Unknown => None,
    }
}

fn field<'v>(ctx: &[Item<'v>], name: &str) -> Vec<Item<'v>> {
    let mut out = Vec::new();
    for item in ctx {
        let Value::Object(obj) = item.value else {
            continue;
        };
        let defs = defs_of(item.ty, item.value);
        let mut push = |v: &'v Value, ty: Ty<'static>| match v {
            Value::Array(a) => out.extend(a.iter().map(|value| Item { value, ty })),
            Value::Null => {}
            value => out.push(Item { value, ty }),
        };
        if let Some(v) = obj.get(name) {
            let ty = defs
                .and_then(|d| d.get(name))
                .map(type_of)
                .unwrap_or(Ty::Unknown);
            let ty = if name == "id" && item.value.get("resourceType").is_some() {
                Ty::Named("id")
            } else {
                ty
            };
            push(v, ty);
            continue;
        }
        // A choice element: `value` is `valueQuantity`, `valueString`, …
        for (key, v) in obj {
            if key.len() > name.len()
                && key.starts_with(name)
                && key[name.len()..].starts_with(char::is_uppercase)
            {
                let ty = defs
                    .and_then(|d| d.get(key.as_str()))
                    .map(type_of)
                    .unwrap_or(Ty::Unknown);
                push(v, ty);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(expr: &str, rtype: &str, r: &Value) -> Vec<(Value, Option<&'static str>)> {
        let e = for_type(&compile(expr).unwrap(), rtype).unwrap();
        eval(&e, r)
            .into_iter()
            .map(|i| (i.value.clone(), i.ty.name()))
            .collect()
    }

    #[test]
    fn every_core_expression_compiles() {
        let defs: Value =
            serde_json::from_str(include_str!("../../conformance/search-parameters.json")).unwrap();
        for p in defs.as_array().unwrap() {
            let expr = p["expression"].as_str().unwrap();
            if expr.is_empty() {
                continue;
            }
            compile(expr).unwrap_or_else(|e| panic!("{}: {e}", p["code"]));
            for c in p["component"].as_array().into_iter().flatten() {
                compile(c["expression"].as_str().unwrap()).unwrap();
            }
        }
    }

    #[test]
    fn choice_types_where_and_unions() {
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
            "valueQuantity": {"value": 5, "unit": "mg"},
            "component": [{"code": {"text": "c"}, "valueString": "s"}]});
        let v = values(
            "(Observation.value as Quantity) | (Observation.component.value as Quantity)",
            "Observation",
            &obs,
        );
        assert_eq!(
            v,
            vec![(json!({"value": 5, "unit": "mg"}), Some("Quantity"))]
        );
        let v = values(
            "Observation.component.value.as(string)",
            "Observation",
            &obs,
        );
        assert_eq!(v, vec![(json!("s"), Some("string"))]);
        let v = values(
            "Account.subject | Observation.subject.where(resolve() is Patient)",
            "Observation",
            &obs,
        );
        assert_eq!(v.len(), 1);
        assert!(values(
            "Observation.subject.where(resolve() is Group)",
            "Observation",
            &obs
        )
        .is_empty());
        let p = json!({"resourceType": "Patient", "deceasedBoolean": false});
        assert_eq!(
            values(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Patient",
                &p
            ),
            vec![(json!(false), Some("boolean"))]
        );
        let p = json!({"resourceType": "Patient", "deceasedDateTime": "2020-01-01"});
        assert_eq!(
            values(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Patient",
                &p
            ),
            vec![(json!(true), Some("boolean"))]
        );
        let p = json!({"resourceType": "Patient", "name": [{"family": "F"}],
            "telecom": [{"system": "email", "value": "a@b"}, {"system": "phone", "value": "1"}]});
        assert_eq!(
            values("Patient.telecom.where(system='email')", "Patient", &p)[0].0["value"],
            "a@b"
        );
        assert_eq!(
            values("Patient.name", "Patient", &p)[0].1,
            Some("HumanName")
        );
    }

    #[test]
    fn reference_types() {
        assert_eq!(reference_type("Patient/1"), Some("Patient"));
        assert_eq!(reference_type("http://x/fhir/Patient/1"), Some("Patient"));
        assert_eq!(reference_type("Patient/1/_history/2"), Some("Patient"));
        assert_eq!(reference_type("#c1"), None);
    }
}
