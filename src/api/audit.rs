//! The audit at the HTTP seam: the middleware every FHIR, SMART and
//! exchange request passes (it records the request's AuditEvents and holds
//! the response until they are committed: no record, no answer), and the
//! log's own endpoints — AuditEvent search and read, `$access-log`, the
//! signed checkpoint, the audit key, inclusion and consistency proofs.
//!
//! Writes are recorded by the caller-scoped store in their own transaction
//! (`store::gate`, `store::audit`); what is left for the middleware is
//! reads, queries, refusals and failures, through the group-committing
//! writer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};

use super::request::{FhirRequest, FhirResponse};
use super::AppState;
use crate::audit::context::{self, Caller, Context};
use crate::audit::event::{self, Action, Event, EventType, Outcome};
use crate::error::Error;
use crate::store::audit::{AuditQuery, AuditReach};

/// The caller's address, set on every request by the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A caller may declare the purpose of use of a request (a v3-ActReason
/// code such as `TREAT` or `ETREAT`; `BTG` marks break-the-glass); it is
/// recorded with the request's events.
pub const PURPOSE_HEADER: &str = "x-purpose-of-use";

/// Largest form body the SMART middleware reads for its record.
const MAX_FORM: usize = 64 * 1024;
/// Largest SMART response body read back (token responses are small).
const MAX_TOKEN_RESPONSE: usize = 256 * 1024;

fn caller_of(s: &AppState, req: &Request) -> Caller {
    let purpose = req
        .headers()
        .get(PURPOSE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|c| {
                    !c.is_empty() && c.len() <= 32 && c.bytes().all(|b| b.is_ascii_alphanumeric())
                })
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Caller {
        address: req.extensions().get::<Peer>().map(|p| p.0.ip().to_string()),
        request_id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        observer: s.env.base.clone(),
        purpose,
        ..Caller::default()
    }
}

/// 503 with an OperationOutcome: the access could not be recorded, so
/// nothing of its answer leaves.
fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "audit log unavailable; request refused");
    super::request::render(
        Err(Error::AuditUnavailable(e.to_string())),
        crate::fhir::Format::Json,
        false,
    )
}

/// What a FHIR request is, by method and path.
#[derive(Debug, Clone)]
struct Interaction {
    code: &'static str,
    action: Action,
    /// `Type/id` named by the path, if any.
    target: Option<String>,
    /// The patient the path names (`Patient/{id}/…`).
    path_patient: Option<String>,
    write: bool,
    kind: EventType,
}

impl Interaction {
    fn of(method: &Method, path: &str) -> Interaction {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let get = method == Method::GET || method == Method::HEAD;
        let (code, action) = match (segs.as_slice(), get) {
            ([], true) => ("search-system", Action::Execute),
            ([], false) => ("transaction", Action::Execute),
            (["_history"], _) => ("history-system", Action::Read),
            ([_, "_search"], _) => ("search-type", Action::Execute),
            ([_, "_history"], _) => ("history-type", Action::Read),
            ([op], true) if op.starts_with('$') => ("operation", Action::Execute),
            ([_], true) => ("search-type", Action::Execute),
            ([_, op], true) if op.starts_with('$') => ("operation", Action::Execute),
            ([_, _], true) => ("read", Action::Read),
            ([_, _, "_history"], _) => ("history-instance", Action::Read),
            ([_, _, "_history", _], _) => ("vread", Action::Read),
            ([_, _, op], true) if op.starts_with('$') => ("operation", Action::Execute),
            ([_, _, _], true) => ("search-type", Action::Execute),
            (_, true) => ("read", Action::Read),
            (_, false) => match *method {
                Method::POST => ("create", Action::Create),
                Method::PUT => ("update", Action::Update),
                Method::PATCH => ("patch", Action::Update),
                Method::DELETE => ("delete", Action::Delete),
                _ => ("operation", Action::Execute),
            },
        };
        let target = match segs.as_slice() {
            [t, id, ..] if !t.starts_with('$') && !id.starts_with('$') && !id.starts_with('_') => {
                Some(format!("{t}/{id}"))
            }
            _ => None,
        };
        let path_patient = match segs.as_slice() {
            ["Patient", id, ..] if !id.starts_with('$') && !id.starts_with('_') => {
                Some(id.to_string())
            }
            _ => None,
        };
        let signed_document = segs.last() == Some(&"$signed-document");
        Interaction {
            code,
            action,
            target,
            path_patient,
            write: !get && code != "search-type",
            kind: if signed_document {
                EventType::document_out()
            } else {
                EventType::rest(code)
            },
        }
    }
}

/// The audit middleware of the FHIR API (outside authentication, so that
/// refused tokens are recorded too).
pub async fn fhir(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(log) = s.audit.clone() else {
        return next.run(req).await;
    };
    let _in_flight = log.enter();
    let caller = caller_of(&s, &req);
    let what = Interaction::of(req.method(), req.uri().path());
    let query = match req.uri().query() {
        Some(q) => format!("{}?{q}", req.uri().path()),
        None => req.uri().path().to_string(),
    };
    let ctx = Context::new(caller);
    let response = context::scope(ctx.clone(), next.run(req)).await;
    let status = response.status().as_u16();
    let events = request_events(&ctx, &what, &query, status);
    match log.record(events).await {
        Ok(()) => response,
        Err(e) => unavailable(e),
    }
}

/// The events of one FHIR request that were not recorded with its writes.
fn request_events(ctx: &Context, what: &Interaction, query: &str, status: u16) -> Vec<Event> {
    let caller = ctx.caller();
    let outcome = Outcome::of_status(status);
    let desc = (outcome != Outcome::Success).then(|| format!("HTTP {status}"));
    let base = |patient: Option<String>| {
        caller
            .event(what.kind, what.action)
            .outcome(outcome, desc.clone())
            .patient(patient)
    };
    if what.write && what.code != "transaction" {
        if outcome == Outcome::Success && ctx.recorded_writes() > 0 {
            return Vec::new();
        }
        // Refused or failed (its transaction rolled back), or a write that
        // stored nothing: one event naming what was asked.
        let mut patients: BTreeSet<Option<String>> = ctx
            .unrecorded_writes()
            .into_iter()
            .flat_map(|w| w.patients)
            .map(Some)
            .collect();
        if let Some(p) = &what.path_patient {
            patients.insert(Some(p.clone()));
        }
        if patients.is_empty() {
            patients.insert(None);
        }
        return patients
            .into_iter()
            .map(|p| {
                let mut e = base(p);
                if let Some(t) = &what.target {
                    e = e.data(t.clone());
                }
                e
            })
            .collect();
    }
    // Reads and queries: one event per patient touched, BALP's
    // PatientRead/PatientQuery; what belongs to no patient in one more.
    let read: BTreeMap<String, BTreeSet<String>> = ctx.read_by_patient();
    let is_read = matches!(what.code, "read" | "vread");
    let mut groups: Vec<(Option<String>, BTreeSet<String>)> = read
        .into_iter()
        .map(|(p, refs)| ((!p.is_empty()).then_some(p), refs))
        .collect();
    if let Some(p) = &what.path_patient {
        if !groups.iter().any(|(g, _)| g.as_deref() == Some(p)) {
            groups.push((Some(p.clone()), BTreeSet::new()));
        }
    }
    if groups.is_empty() {
        groups.push((None, BTreeSet::new()));
    }
    groups
        .into_iter()
        .map(|(p, refs)| {
            let mut e = base(p);
            if is_read {
                match &what.target {
                    Some(t) => e = e.data(t.clone()),
                    None => e.data.extend(refs),
                }
            } else {
                e.query = Some(query.to_string());
            }
            e
        })
        .collect()
}

/// The audit middleware of the exchange endpoint: a received document is
/// recorded (with the patients it was filed under) beside the resources it
/// created, which are recorded in their own transaction.
pub async fn exchange(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(log) = s.audit.clone() else {
        return next.run(req).await;
    };
    let _in_flight = log.enter();
    let ctx = Context::new(caller_of(&s, &req));
    let response = context::scope(ctx.clone(), next.run(req)).await;
    let status = response.status().as_u16();
    let outcome = Outcome::of_status(status);
    let caller = ctx.caller();
    let mut patients: BTreeSet<Option<String>> = ctx
        .all_writes()
        .into_iter()
        .flat_map(|w| w.patients)
        .map(Some)
        .collect();
    if patients.is_empty() {
        patients.insert(None);
    }
    let events = patients
        .into_iter()
        .map(|p| {
            caller
                .event(EventType::document_in(), Action::Create)
                .outcome(
                    outcome,
                    (outcome != Outcome::Success).then(|| format!("HTTP {status}")),
                )
                .patient(p)
        })
        .collect();
    match log.record(events).await {
        Ok(()) => response,
        Err(e) => unavailable(e),
    }
}

/// The claims of a JWT, read without checking it (only to name, in the
/// record, whom a request or issued token concerns).
fn jwt_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()
}

/// The client a token-endpoint request names: `client_id`, the client
/// assertion's issuer, HTTP Basic's user, or the client of the bearer token
/// it presents (introspection).
fn requesting_client(form: &[(String, String)], headers: &axum::http::HeaderMap) -> Option<String> {
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    field("client_id")
        .or_else(|| {
            field("client_assertion")
                .and_then(|a| jwt_claims(&a))
                .and_then(|c| c["iss"].as_str().map(str::to_string))
        })
        .or_else(|| {
            let bearer = headers
                .get(header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")?
                .trim()
                .to_string();
            jwt_claims(&bearer)?["client_id"]
                .as_str()
                .map(str::to_string)
        })
        .or_else(|| {
            let basic = headers
                .get(header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Basic ")?
                .trim()
                .to_string();
            let decoded = String::from_utf8(B64.decode(basic).ok()?).ok()?;
            let user = decoded.split(':').next()?;
            Some(
                percent_encoding::percent_decode_str(user)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
}

/// The audit middleware of the authorization server: sign-in, sign-out,
/// consent, and every token issued, refreshed, revoked or introspected.
pub async fn smart(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(log) = s.audit.clone() else {
        return next.run(req).await;
    };
    let _in_flight = log.enter();
    let path = req.uri().path().to_string();
    let kind = match (req.method(), path.as_str()) {
        (&Method::POST, "/auth/token") => None,
        (&Method::POST, "/auth/introspect") => Some(EventType::token_introspected()),
        (&Method::POST, "/auth/revoke") => Some(EventType::token_revoked()),
        (&Method::POST, "/auth/login") => Some(EventType::login()),
        (&Method::POST, "/auth/logout") => Some(EventType::logout()),
        (&Method::POST, "/auth/consent") => Some(EventType::authorization_consent()),
        (&Method::POST, "/auth/signup") => Some(EventType::login()),
        (&Method::POST, "/auth/launch") => Some(EventType::launch_context()),
        _ => return next.run(req).await,
    };
    let caller = caller_of(&s, &req);
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
        return super::request::render(
            Err(Error::PayloadTooLarge(MAX_FORM)),
            crate::fhir::Format::Json,
            false,
        );
    };
    // The patient and encounter a launch context is asked for (JSON), kept
    // whether or not it is granted; their ids only.
    let asked = (path == "/auth/launch")
        .then(|| serde_json::from_slice::<Value>(&bytes).ok())
        .flatten();
    let launch_for = |k: &str| -> Option<String> {
        let id = asked.as_ref()?[k].as_str()?;
        crate::interaction::check_id(id).ok()?;
        Some(id.to_string())
    };
    let (launch_patient, launch_encounter) = (launch_for("patient"), launch_for("encounter"));
    let form: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let client = requesting_client(&form, &parts.headers);
    let grant = field("grant_type");
    let headers = parts.headers.clone();
    let req = Request::from_parts(parts, Body::from(bytes.clone()));
    let ctx = Context::new(caller);
    let response = context::scope(ctx.clone(), next.run(req)).await;
    let status = response.status().as_u16();
    let outcome = Outcome::of_status(status);
    // Read the (small) JSON answers back for what they issued.
    let (parts, body) = response.into_parts();
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let (answer, bytes) = if is_json {
        match axum::body::to_bytes(body, MAX_TOKEN_RESPONSE).await {
            Ok(b) => (serde_json::from_slice::<Value>(&b).ok(), Body::from(b)),
            Err(_) => return unavailable("the token response could not be read for the audit"),
        }
    } else {
        (None, body)
    };
    let response = Response::from_parts(parts, bytes);
    let error = answer
        .as_ref()
        .and_then(|a| a["error"].as_str())
        .filter(|e| e.len() <= 64)
        .map(str::to_string);
    let desc = (outcome != Outcome::Success).then(|| match &error {
        Some(e) => format!("HTTP {status} {e}"),
        None => format!("HTTP {status}"),
    });
    let mut caller = ctx.caller();
    // The client the request names; /auth/launch names none, and its
    // handler identifies the caller from its token.
    caller.client = client.clone().or(caller.client);
    let mut e = match kind {
        Some(k) if path == "/auth/launch" => caller.event(k, Action::Create),
        Some(k) => caller.event(k, Action::Execute),
        None => {
            let k = if grant.as_deref() == Some("refresh_token") {
                EventType::token_refreshed()
            } else {
                EventType::token_issued()
            };
            caller.event(k, Action::Create)
        }
    };
    e = e.outcome(outcome, desc);
    match path.as_str() {
        "/auth/token" => {
            let access = answer
                .as_ref()
                .and_then(|a| a["access_token"].as_str())
                .map(str::to_string);
            if let Some(t) = &access {
                e = e.token(t);
                if let Some(c) = jwt_claims(t) {
                    e.user = c["fhirUser"].as_str().map(str::to_string);
                    e.client = c["client_id"].as_str().map(str::to_string).or(e.client);
                    e.patient = c["patient"].as_str().map(str::to_string);
                }
            } else if let Some(t) = field("refresh_token").or_else(|| field("code")) {
                e = e.token(&t);
            }
        }
        "/auth/introspect" | "/auth/revoke" => {
            if let Some(t) = field("token") {
                e = e.token(&t);
            }
        }
        "/auth/launch" => {
            e.patient = launch_patient;
            if let Some(enc) = launch_encounter {
                e = e.data(format!("Encounter/{enc}"));
            }
        }
        "/auth/login" | "/auth/signup" => {
            e.user = field("username");
            let _ = &headers;
        }
        _ => {}
    }
    match log.record(vec![e]).await {
        Ok(()) => response,
        Err(err) => unavailable(err),
    }
}

/// The search parameters of AuditEvent.
fn audit_query(req: &FhirRequest, max: usize, default: usize) -> crate::Result<AuditQuery> {
    let mut q = AuditQuery {
        count: default,
        ..AuditQuery::default()
    };
    let strip_system = |v: &str| v.rsplit('|').next().unwrap_or(v).to_string();
    for (k, v) in &req.params {
        match k.as_str() {
            "date" => {
                let (cmp, value) = match v.get(..2) {
                    Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => {
                        (p.to_string(), v[2..].to_string())
                    }
                    _ => ("eq".to_string(), v.clone()),
                };
                q.date.push((cmp, value));
            }
            "agent" => q.agent = Some(v.clone()),
            "entity" => q.entity = Some(v.clone()),
            "patient" => {
                q.patient = Some(if v.starts_with("Patient/") {
                    v.clone()
                } else {
                    format!("Patient/{v}")
                })
            }
            "type" => q.kind = Some(strip_system(v)),
            "subtype" => q.subtype = Some(strip_system(v)),
            "outcome" => q.outcome = Some(strip_system(v)),
            "purpose" => q.purpose = Some(strip_system(v)),
            "_count" => {
                q.count = v
                    .parse::<usize>()
                    .map_err(|_| Error::invalid("_count must be a number"))?
                    .min(max)
            }
            "_before" => {
                q.before = Some(
                    v.parse::<i64>()
                        .map_err(|_| Error::invalid("_before must be a number"))?,
                )
            }
            "_format" | "_pretty" => {}
            other if req.strict_handling() => {
                return Err(Error::UnknownParameter(format!(
                    "unknown search parameter '{other}' for AuditEvent (date, agent, entity, \
                     patient, type, subtype, outcome, purpose)"
                )))
            }
            _ => {}
        }
    }
    Ok(q)
}

/// `GET /AuditEvent`: the events this caller may see (an auditor: all; a
/// patient's token: those about the patient), newest first.
pub async fn search(State(s): State<AppState>, req: FhirRequest) -> Response {
    let result = async {
        let q = audit_query(&req, s.config.max_count, s.config.default_count)?;
        let found = req.gate.audit_search(&q).await?;
        let base = &s.env.base;
        let mut entries = Vec::with_capacity(found.len());
        for (seq, body) in &found {
            let resource: Value =
                serde_json::from_str(body).map_err(|e| Error::invalid(e.to_string()))?;
            entries.push(json!({
                "fullUrl": format!("{base}/AuditEvent/{seq}"),
                "resource": resource,
                "search": {"mode": "match"},
            }));
        }
        let own = req.raw_query.clone().unwrap_or_default();
        let mut links =
            vec![json!({"relation": "self", "url": format!("{base}/AuditEvent?{own}")})];
        if found.len() == q.count {
            if let Some((last, _)) = found.last() {
                let kept: Vec<String> = req
                    .params
                    .iter()
                    .filter(|(k, _)| k != "_before")
                    .map(|(k, v)| {
                        form_urlencoded::Serializer::new(String::new())
                            .append_pair(k, v)
                            .finish()
                    })
                    .collect();
                links.push(json!({
                    "relation": "next",
                    "url": format!("{base}/AuditEvent?{}&_before={last}", kept.join("&"))
                }));
            }
        }
        Ok(FhirResponse::new(StatusCode::OK).with_value(json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": entries,
        })))
    };
    req.respond(result.await)
}

/// `GET /AuditEvent/{id}`: one event, exactly as stored (its bytes are the
/// leaf data's preimage).
pub async fn read(Path(id): Path<String>, req: FhirRequest) -> Response {
    let result = async {
        let absent = || Error::NotFound(format!("AuditEvent/{id} is not known"));
        let seq: i64 = id.parse().map_err(|_| absent())?;
        match req.gate.audit_read(seq).await? {
            Some(body) => Ok(FhirResponse::new(StatusCode::OK).with_json(body)),
            None => Err(absent()),
        }
    };
    req.respond(result.await)
}

/// Any write of an AuditEvent: 405.
pub async fn not_writable(req: FhirRequest) -> Response {
    req.respond(Err(Error::MethodNotAllowed(
        "AuditEvents are recorded by the server and cannot be created, changed or deleted".into(),
    )))
}

/// `GET /Patient/{id}/$access-log`: who accessed the patient's record, per
/// accessor and day (with the client, and the organisations the accessor
/// acts for),
/// with break-the-glass accesses marked.
pub async fn access_log(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: FhirRequest,
) -> Response {
    let result = async {
        match crate::store::audit::reach(req.gate.access()) {
            AuditReach::All => {}
            AuditReach::Patient(p) if p == id => {}
            AuditReach::Patient(_) => {
                return Err(Error::NotFound(format!("Patient/{id} is not known")))
            }
            AuditReach::None => {
                return Err(Error::Forbidden(
                    "the granted scopes do not allow reading the access log".into(),
                ))
            }
        }
        let q = AuditQuery {
            patient: Some(format!("Patient/{id}")),
            count: 10_000,
            ..AuditQuery::default()
        };
        let found = req.gate.audit_search(&q).await?;
        let mut groups: BTreeMap<(String, String, String, Vec<String>), Group> = BTreeMap::new();
        for (_, body) in &found {
            let Ok(v) = serde_json::from_str::<Value>(body) else {
                continue;
            };
            let c = event::Columns::of(&v);
            let day = c
                .recorded
                .as_deref()
                .unwrap_or("")
                .get(..10)
                .unwrap_or("")
                .to_string();
            let who = c
                .agent
                .clone()
                .unwrap_or_else(|| "unauthenticated caller".into());
            let client = c.client.clone().unwrap_or_default();
            let orgs: Vec<String> = event::organizations_of(&v)
                .into_iter()
                .map(str::to_string)
                .collect();
            let g = groups.entry((day, who, client, orgs)).or_default();
            g.count += 1;
            if c.outcome.as_deref() != Some("0") {
                g.refused += 1;
            }
            let what = c.subtype.clone().unwrap_or_default();
            *g.what.entry(what).or_default() += 1;
            if c.purpose
                .as_deref()
                .is_some_and(|p| p.split(',').any(|x| x == "BTG"))
            {
                g.break_the_glass = true;
            }
        }
        let mut params = vec![
            json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}),
        ];
        for ((day, who, client, orgs), g) in groups.into_iter().rev() {
            let what: Vec<String> = g.what.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            let mut summary = format!(
                "{day} {who}{}{}: {} access(es) ({})",
                if client.is_empty() {
                    String::new()
                } else {
                    format!(" via {client}")
                },
                if orgs.is_empty() {
                    String::new()
                } else {
                    format!(" for {}", orgs.join(", "))
                },
                g.count,
                what.join(", ")
            );
            if g.refused > 0 {
                summary.push_str(&format!(", {} refused", g.refused));
            }
            if g.break_the_glass {
                summary.push_str(" — BREAK-THE-GLASS");
            }
            let mut part = vec![
                json!({"name": "day", "valueDate": day}),
                json!({"name": "who", "valueString": who}),
                json!({"name": "client", "valueString": client}),
                json!({"name": "what", "valueString": what.join(", ")}),
                json!({"name": "count", "valueInteger": g.count}),
                json!({"name": "refused", "valueInteger": g.refused}),
                json!({"name": "breakTheGlass", "valueBoolean": g.break_the_glass}),
                json!({"name": "summary", "valueString": summary}),
            ];
            for o in &orgs {
                part.push(json!({"name": "organization", "valueReference": {"reference": o}}));
            }
            params.push(json!({"name": "access", "part": part}));
        }
        let _ = &s;
        Ok(FhirResponse::new(StatusCode::OK)
            .with_value(json!({"resourceType": "Parameters", "parameter": params})))
    };
    req.respond(result.await)
}

#[derive(Default)]
struct Group {
    count: u64,
    refused: u64,
    what: BTreeMap<String, u64>,
    break_the_glass: bool,
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn problem(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    let body = crate::fhir::operation_outcome(&[crate::fhir::Issue::error(code, message.into())]);
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

fn store_failure(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "audit endpoint failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "transient",
        "the audit log is unavailable",
    )
}

/// `GET /audit/checkpoint`: the newest signed checkpoint. A caller with a
/// valid backend-services token (a client the operator registered, e.g. a
/// subscribed hospital's) is recorded as a witness of it.
pub async fn checkpoint(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let Some(log) = s.audit.clone() else {
        return switched_off();
    };
    let c = match log.latest_checkpoint().await {
        Ok(Some(c)) => Some(c),
        Ok(None) => match log.checkpoint().await {
            Ok(c) => c,
            Err(e) => return store_failure(e),
        },
        Err(e) => return store_failure(e),
    };
    let Some(c) = c else {
        return problem(StatusCode::NOT_FOUND, "not-found", "the audit log is empty");
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if let Some(token) = bearer {
        match crate::auth::token::verify(&s.auth, token).await {
            // Only a backend-services client (acting for no user, patient
            // or organisation: one the operator registered, such as a
            // subscribed hospital's) is a witness; anyone else may read
            // the checkpoint, but reading it lets no entry be pruned.
            Ok(v) if v.principal.role() == crate::policy::Role::System => {
                if let Err(e) = log.witnessed(&v.principal.claims.client_id, c.size).await {
                    return store_failure(e);
                }
            }
            Ok(_) => {}
            Err(_) => {
                return problem(
                    StatusCode::UNAUTHORIZED,
                    "login",
                    "the bearer token is not valid",
                )
            }
        }
    }
    json_response(StatusCode::OK, c.to_json())
}

/// `GET /audit/key`: the public key checkpoints are signed with.
pub async fn key(State(s): State<AppState>) -> Response {
    let Some(log) = s.audit.clone() else {
        return switched_off();
    };
    match log.public_key().await {
        Ok((id, pem)) => json_response(
            StatusCode::OK,
            json!({"key_id": id, "algorithm": crate::audit::checkpoint::ALGORITHM, "public_key": pem}),
        ),
        Err(e) => store_failure(e),
    }
}

/// `GET /audit/keys`: every public key checkpoints were signed with,
/// oldest first (a witness holding a checkpoint signed before a rotation
/// checks it with the key it names).
pub async fn keys(State(s): State<AppState>) -> Response {
    if s.audit.is_none() {
        return switched_off();
    }
    match crate::store::audit::public_keys(&s.store).await {
        Ok(keys) => json_response(
            StatusCode::OK,
            json!({"keys": keys
                .into_iter()
                .map(|(id, pem)| json!({
                    "key_id": id,
                    "algorithm": crate::audit::checkpoint::ALGORITHM,
                    "public_key": pem,
                }))
                .collect::<Vec<_>>()}),
        ),
        Err(e) => store_failure(e),
    }
}

fn number(q: &[(String, String)], k: &str) -> Option<u64> {
    q.iter()
        .find(|(n, _)| n == k)
        .and_then(|(_, v)| v.parse().ok())
}

fn hashes(h: &[[u8; 32]]) -> Vec<String> {
    h.iter().map(|x| B64.encode(x)).collect()
}

/// `GET /audit/proof/inclusion?index=N[&size=M]`: the audit path of entry
/// N in the tree of M entries (default: the newest checkpoint's size).
pub async fn inclusion(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let Some(log) = s.audit.clone() else {
        return switched_off();
    };
    let Some(index) = number(&q, "index") else {
        return problem(StatusCode::BAD_REQUEST, "required", "index is required");
    };
    let size = match number(&q, "size") {
        Some(n) => n,
        None => match log.latest_checkpoint().await {
            Ok(Some(c)) => c.size,
            Ok(None) => return problem(StatusCode::NOT_FOUND, "not-found", "no checkpoint yet"),
            Err(e) => return store_failure(e),
        },
    };
    match log.inclusion(index, size).await {
        Ok(Some((leaf, root, path))) => json_response(
            StatusCode::OK,
            json!({
                "index": index,
                "size": size,
                "leaf": hex::encode(leaf),
                "root": B64.encode(root),
                "proof": hashes(&path),
            }),
        ),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no entry {index} in a log of {size} entries"),
        ),
        Err(e) => store_failure(e),
    }
}

/// `GET /audit/proof/consistency?from=A&to=B`: that the log of A entries is
/// a prefix of the log of B entries.
pub async fn consistency(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let Some(log) = s.audit.clone() else {
        return switched_off();
    };
    let (Some(from), Some(to)) = (number(&q, "from"), number(&q, "to")) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "required",
            "from and to are required",
        );
    };
    match log.consistency(from, to).await {
        Ok(Some((a, b, path))) => json_response(
            StatusCode::OK,
            json!({
                "from": from,
                "to": to,
                "from_root": B64.encode(a),
                "to_root": B64.encode(b),
                "proof": hashes(&path),
            }),
        ),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no consistency proof from {from} to {to} entries"),
        ),
        Err(e) => store_failure(e),
    }
}

/// What every log endpoint answers when the audit log is off.
fn switched_off() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not-found",
        "the audit log is switched off",
    )
}
