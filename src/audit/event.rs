//! One AuditEvent, shaped after IHE Basic Audit Log Patterns (BALP): the
//! RESTful profiles (Create, Read, Update, Delete, Query and their Patient
//! variants, one event per patient touched), and the same shape for the
//! SMART events (sign-in, tokens) and exchanged documents.
//!
//! Agents: the client (DICOM "Source Role ID", with its network address),
//! the server (DICOM "Destination Role ID") and the user (the token's
//! `fhirUser`, the requestor). Entities: the patient (role 1), the data
//! (role 4), the query (role 24, `query` in base64). No bodies and no
//! secrets: a token appears only as its last characters.
//!
//! An [`Event`] becomes JSON with an empty `id`; the log sets it to the
//! entry's position when it appends it. [`Columns`] are the searchable
//! copies the log keeps beside the JSON, always derived from the JSON, so
//! that `ehrx audit verify` can check them.

use base64::Engine as _;
#[cfg(test)]
use serde_json::Map;
use serde_json::{json, Value};

/// A coding of a fixed code system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub system: &'static str,
    pub code: &'static str,
    pub display: &'static str,
}

impl Code {
    pub const fn new(system: &'static str, code: &'static str, display: &'static str) -> Code {
        Code {
            system,
            code,
            display,
        }
    }

    #[cfg(test)]
    fn json(&self) -> Value {
        json!({"system": self.system, "code": self.code, "display": self.display})
    }
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
/// ehrx's own subtypes, where no standard code names the event.
pub const EHRX_SUBTYPE: &str = "urn:ehrx:audit-subtype";
/// The code system of purposes of use (`BTG`, `ETREAT`, `TREAT`, …).
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";

/// The type and subtype of an event; add a constructor for a new kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventType {
    pub kind: Code,
    pub subtype: Code,
}

impl EventType {
    /// A RESTful interaction (`read`, `vread`, `search-type`, `create`, …,
    /// `operation`, `transaction`, `batch`).
    pub fn rest(interaction: &'static str) -> EventType {
        EventType {
            kind: Code::new(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
            subtype: Code::new(RESTFUL, interaction, interaction),
        }
    }

    fn user_authentication(subtype: Code) -> EventType {
        EventType {
            kind: Code::new(DCM, "110114", "User Authentication"),
            subtype,
        }
    }

    /// A user signed in (or tried to: the outcome tells).
    pub fn login() -> EventType {
        Self::user_authentication(Code::new(DCM, "110122", "Login"))
    }

    pub fn logout() -> EventType {
        Self::user_authentication(Code::new(DCM, "110123", "Logout"))
    }

    fn security(code: &'static str, display: &'static str) -> EventType {
        EventType {
            kind: Code::new(DCM, "110113", "Security Alert"),
            subtype: Code::new(EHRX_SUBTYPE, code, display),
        }
    }

    pub fn token_issued() -> EventType {
        Self::security("token-issued", "Access token issued")
    }

    pub fn token_refreshed() -> EventType {
        Self::security("token-refreshed", "Access token refreshed")
    }

    pub fn token_revoked() -> EventType {
        Self::security("token-revoked", "Token revoked")
    }

    pub fn token_introspected() -> EventType {
        Self::security("token-introspected", "Token introspected")
    }

    /// An EHR user created a launch context (SMART EHR launch) for a
    /// patient.
    pub fn launch_context() -> EventType {
        Self::security("launch-context", "EHR launch context created")
    }

    /// Consent to an app's access given on the authorization page.
    pub fn authorization_consent() -> EventType {
        Self::security("authorization-consent", "Access authorised by the user")
    }

    /// A signed document received from a subscriber.
    pub fn document_in() -> EventType {
        EventType {
            kind: Code::new(DCM, "110107", "Import"),
            subtype: Code::new(EHRX_SUBTYPE, "exchange-document-in", "Document received"),
        }
    }

    /// A signed document sent out (`$signed-document`).
    pub fn document_out() -> EventType {
        EventType {
            kind: Code::new(DCM, "110106", "Export"),
            subtype: Code::new(EHRX_SUBTYPE, "exchange-document-out", "Document sent"),
        }
    }

    /// A consent given, changed or withdrawn.
    pub fn consent_change() -> EventType {
        EventType {
            kind: Code::new(DCM, "110110", "Patient Record"),
            subtype: Code::new(EHRX_SUBTYPE, "consent-change", "Consent changed"),
        }
    }

    /// Access to a record under break-the-glass (record it with purpose of
    /// use `BTG` too, which `$access-log` marks).
    pub fn break_the_glass() -> EventType {
        EventType {
            kind: Code::new(DCM, "110113", "Security Alert"),
            subtype: Code::new(EHRX_SUBTYPE, "break-the-glass", "Break-the-glass access"),
        }
    }

    /// An amendment of a record proposed.
    pub fn amendment_proposed() -> EventType {
        EventType {
            kind: Code::new(DCM, "110110", "Patient Record"),
            subtype: Code::new(EHRX_SUBTYPE, "amendment-proposed", "Amendment proposed"),
        }
    }

    /// An amendment approved or refused (the outcome says which).
    pub fn amendment_decided() -> EventType {
        EventType {
            kind: Code::new(DCM, "110110", "Patient Record"),
            subtype: Code::new(EHRX_SUBTYPE, "amendment-decided", "Amendment decided"),
        }
    }

    /// Any other event: the audit module's users add theirs this way (or
    /// as a named constructor here).
    pub fn custom(kind: Code, subtype: Code) -> EventType {
        EventType { kind, subtype }
    }

    /// The BALP profile a successful event of this type conforms to.
    fn profile(&self, with_patient: bool) -> Option<String> {
        if self.kind.code != "rest" {
            return None;
        }
        let base = match self.subtype.code {
            "read" | "vread" => "Read",
            "search-type" | "search-system" | "history-instance" | "history-type"
            | "history-system" | "operation" => "Query",
            "create" => "Create",
            "update" | "patch" => "Update",
            "delete" => "Delete",
            _ => return None,
        };
        Some(if with_patient {
            format!("{BALP}Patient{base}")
        } else {
            format!("{BALP}{base}")
        })
    }
}

/// `AuditEvent.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// `AuditEvent.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Refused or invalid requests (4xx).
    MinorFailure,
    /// The server failed (5xx).
    SeriousFailure,
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
        }
    }

    /// The outcome an HTTP status stands for.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            0..=399 => Outcome::Success,
            400..=499 => Outcome::MinorFailure,
            _ => Outcome::SeriousFailure,
        }
    }
}

/// How many trailing characters of a token an event keeps.
pub const TOKEN_TAIL: usize = 6;

/// The last [`TOKEN_TAIL`] characters of a token (never more than a
/// quarter of it).
pub fn token_tail(token: &str) -> String {
    let n = TOKEN_TAIL.min(token.chars().count() / 4);
    let tail: String = token
        .chars()
        .rev()
        .take(n)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

/// One audit event, before it is appended to the log.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventType,
    pub action: Action,
    pub outcome: Outcome,
    /// Why it failed (status and reason; never a body).
    pub outcome_desc: Option<String>,
    /// FHIR instant.
    pub recorded: String,
    /// The user: the token's `fhirUser` (or the account name at sign-in).
    pub user: Option<String>,
    /// The OAuth client id.
    pub client: Option<String>,
    /// The caller's network address.
    pub address: Option<String>,
    /// Purposes of use (v3-ActReason codes, e.g. `TREAT`, `BTG`).
    pub purpose: Vec<String>,
    /// The patient (id) this event is about: one event per patient.
    pub patient: Option<String>,
    /// The resources concerned (`Type/id`).
    pub data: Vec<String>,
    /// The query as sent (path and query string).
    pub query: Option<String>,
    /// The last characters of a token concerned.
    pub token: Option<String>,
    /// The request's id (`X-Request-Id`).
    pub request_id: Option<String>,
    /// The server (its base URL).
    pub observer: String,
    /// The Organizations (ids) the caller acts for: the one an insurer's
    /// backend client was bound to at registration, or those of the
    /// practitioner's roles (at most [`MAX_ORGANIZATIONS`]).
    pub organizations: Vec<String>,
}

/// Organisations one event names at most; of a practitioner working for
/// more, the first by id.
pub const MAX_ORGANIZATIONS: usize = 8;

impl Event {
    pub fn new(kind: EventType, action: Action) -> Event {
        Event {
            kind,
            action,
            outcome: Outcome::Success,
            outcome_desc: None,
            recorded: now(),
            user: None,
            client: None,
            address: None,
            purpose: Vec::new(),
            patient: None,
            data: Vec::new(),
            query: None,
            token: None,
            request_id: None,
            observer: String::new(),
            organizations: Vec::new(),
        }
    }

    pub fn outcome(mut self, outcome: Outcome, desc: Option<String>) -> Event {
        self.outcome = outcome;
        self.outcome_desc = desc;
        self
    }

    pub fn user(mut self, user: Option<String>) -> Event {
        self.user = user;
        self
    }

    pub fn client(mut self, client: Option<String>) -> Event {
        self.client = client;
        self
    }

    pub fn organizations(mut self, organizations: Vec<String>) -> Event {
        self.organizations = organizations;
        self
    }

    pub fn patient(mut self, patient: Option<String>) -> Event {
        self.patient = patient;
        self
    }

    pub fn data(mut self, reference: impl Into<String>) -> Event {
        self.data.push(reference.into());
        self
    }

    pub fn purpose(mut self, code: impl Into<String>) -> Event {
        self.purpose.push(code.into());
        self
    }

    /// Keeps the last characters of `token` only.
    pub fn token(mut self, token: &str) -> Event {
        self.token = Some(token_tail(token));
        self
    }

    /// The AuditEvent as a `Value`, its `id` empty: the reference that
    /// [`Event::to_text`] (what the log stores) is checked against, in the
    /// tests only.
    #[cfg(test)]
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("resourceType".into(), json!("AuditEvent"));
        o.insert("id".into(), json!(""));
        let success = self.outcome == Outcome::Success;
        if let Some(p) = self
            .kind
            .profile(self.patient.is_some())
            .filter(|_| success)
        {
            o.insert("meta".into(), json!({"profile": [p]}));
        }
        o.insert("type".into(), self.kind.kind.json());
        o.insert("subtype".into(), json!([self.kind.subtype.json()]));
        o.insert("action".into(), json!(self.action.code()));
        o.insert("recorded".into(), json!(self.recorded));
        o.insert("outcome".into(), json!(self.outcome.code()));
        if let Some(d) = &self.outcome_desc {
            o.insert("outcomeDesc".into(), json!(d));
        }
        let purposes: Vec<Value> = self
            .purpose
            .iter()
            .map(|c| json!({"coding": [{"system": ACT_REASON, "code": c}]}))
            .collect();
        if !purposes.is_empty() {
            o.insert("purposeOfUse".into(), json!(purposes));
        }
        let mut agents = Vec::new();
        let mut client = json!({
            "type": {"coding": [Code::new(DCM, "110153", "Source Role ID").json()]},
            "who": match &self.client {
                Some(c) => json!({"identifier": {"system": "urn:ehrx:client", "value": c}}),
                None => json!({"display": "unauthenticated caller"}),
            },
            "requestor": self.user.is_none(),
        });
        if let Some(a) = &self.address {
            client["network"] = json!({"address": a, "type": "2"});
        }
        agents.push(client);
        agents.push(json!({
            "type": {"coding": [Code::new(DCM, "110152", "Destination Role ID").json()]},
            "who": {"display": self.observer},
            "requestor": false,
            "network": {"address": self.observer, "type": "5"},
        }));
        if let Some(u) = &self.user {
            let who = if u.contains('/') {
                json!({"reference": u})
            } else {
                json!({"identifier": {"system": "urn:ehrx:user", "value": u}})
            };
            let mut user = json!({
                "type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "IRCP", "display": "information recipient"
                }]},
                "who": who,
                "requestor": true,
            });
            if !purposes.is_empty() {
                user["purposeOfUse"] = json!(purposes);
            }
            agents.push(user);
        }
        for org in &self.organizations {
            agents.push(json!({
                "type": {"coding": [Code::new(PARTICIPATION, "RESP", "responsible party").json()]},
                "who": {"reference": format!("Organization/{org}")},
                "requestor": false,
            }));
        }
        o.insert("agent".into(), json!(agents));
        o.insert(
            "source".into(),
            json!({
                "observer": {"display": self.observer},
                "type": [{
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4", "display": "Application Server"
                }]
            }),
        );
        let mut entities = Vec::new();
        if let Some(p) = &self.patient {
            entities.push(json!({
                "what": {"reference": format!("Patient/{p}")},
                "type": Code::new(ENTITY_TYPE, "1", "Person").json(),
                "role": Code::new(OBJECT_ROLE, "1", "Patient").json(),
            }));
        }
        for d in &self.data {
            entities.push(json!({
                "what": {"reference": d},
                "type": Code::new(ENTITY_TYPE, "2", "System Object").json(),
                "role": Code::new(OBJECT_ROLE, "4", "Domain Resource").json(),
            }));
        }
        if let Some(q) = &self.query {
            entities.push(json!({
                "type": Code::new(ENTITY_TYPE, "2", "System Object").json(),
                "role": Code::new(OBJECT_ROLE, "24", "Query").json(),
                "query": base64::engine::general_purpose::STANDARD.encode(q.as_bytes()),
            }));
        }
        if let Some(t) = &self.token {
            entities.push(json!({
                "what": {"identifier": {"system": "urn:ehrx:token-tail", "value": t}},
                "type": Code::new(ENTITY_TYPE, "4", "Other").json(),
                "description": "token (last characters only)",
            }));
        }
        if let Some(id) = &self.request_id {
            entities.push(json!({
                "what": {"identifier": {"system": "urn:ehrx:request-id", "value": id}},
                "type": Code::new(ENTITY_TYPE, "4", "Other").json(),
                "description": "X-Request-Id",
            }));
        }
        if !entities.is_empty() {
            o.insert("entity".into(), json!(entities));
        }
        Value::Object(o)
    }
}

impl Event {
    /// The AuditEvent as JSON text, its `id` empty: the same text as
    /// `to_json().to_string()`, written straight out (no `Value` tree: the
    /// log serialises one event per patient touched by every request).
    pub fn to_text(&self) -> String {
        let mut j = Text(Vec::with_capacity(1536));
        j.raw("{\"resourceType\":\"AuditEvent\",\"id\":\"\"");
        let success = self.outcome == Outcome::Success;
        if let Some(p) = self
            .kind
            .profile(self.patient.is_some())
            .filter(|_| success)
        {
            j.raw(",\"meta\":{\"profile\":[");
            j.str(&p);
            j.raw("]}");
        }
        j.raw(",\"type\":");
        j.code(&self.kind.kind);
        j.raw(",\"subtype\":[");
        j.code(&self.kind.subtype);
        j.raw("],\"action\":");
        j.str(self.action.code());
        j.raw(",\"recorded\":");
        j.str(&self.recorded);
        j.raw(",\"outcome\":");
        j.str(self.outcome.code());
        if let Some(d) = &self.outcome_desc {
            j.raw(",\"outcomeDesc\":");
            j.str(d);
        }
        if !self.purpose.is_empty() {
            j.raw(",\"purposeOfUse\":");
            j.purposes(&self.purpose);
        }
        j.raw(",\"agent\":[{\"type\":{\"coding\":[");
        j.code(&Code::new(DCM, "110153", "Source Role ID"));
        j.raw("]},\"who\":");
        match &self.client {
            Some(c) => {
                j.raw("{\"identifier\":{\"system\":\"urn:ehrx:client\",\"value\":");
                j.str(c);
                j.raw("}}");
            }
            None => j.raw("{\"display\":\"unauthenticated caller\"}"),
        }
        j.raw(if self.user.is_none() {
            ",\"requestor\":true"
        } else {
            ",\"requestor\":false"
        });
        if let Some(a) = &self.address {
            j.raw(",\"network\":{\"address\":");
            j.str(a);
            j.raw(",\"type\":\"2\"}");
        }
        j.raw("},{\"type\":{\"coding\":[");
        j.code(&Code::new(DCM, "110152", "Destination Role ID"));
        j.raw("]},\"who\":{\"display\":");
        j.str(&self.observer);
        j.raw("},\"requestor\":false,\"network\":{\"address\":");
        j.str(&self.observer);
        j.raw(",\"type\":\"5\"}}");
        if let Some(u) = &self.user {
            j.raw(
                ",{\"type\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ParticipationType\",\
                 \"code\":\"IRCP\",\"display\":\"information recipient\"}]},\"who\":",
            );
            if u.contains('/') {
                j.raw("{\"reference\":");
                j.str(u);
                j.raw("}");
            } else {
                j.raw("{\"identifier\":{\"system\":\"urn:ehrx:user\",\"value\":");
                j.str(u);
                j.raw("}}");
            }
            j.raw(",\"requestor\":true");
            if !self.purpose.is_empty() {
                j.raw(",\"purposeOfUse\":");
                j.purposes(&self.purpose);
            }
            j.raw("}");
        }
        for org in &self.organizations {
            j.raw(",{\"type\":{\"coding\":[");
            j.code(&Code::new(PARTICIPATION, "RESP", "responsible party"));
            j.raw("]},\"who\":{\"reference\":");
            j.str(&format!("Organization/{org}"));
            j.raw("},\"requestor\":false}");
        }
        j.raw("],\"source\":{\"observer\":{\"display\":");
        j.str(&self.observer);
        j.raw(
            "},\"type\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/security-source-type\",\
             \"code\":\"4\",\"display\":\"Application Server\"}]}",
        );
        let mut first = true;
        let mut entity = |j: &mut Text| {
            j.raw(if first { ",\"entity\":[{" } else { ",{" });
            first = false;
        };
        if let Some(p) = &self.patient {
            entity(&mut j);
            j.raw("\"what\":{\"reference\":");
            j.str(&format!("Patient/{p}"));
            j.raw("},\"type\":");
            j.code(&Code::new(ENTITY_TYPE, "1", "Person"));
            j.raw(",\"role\":");
            j.code(&Code::new(OBJECT_ROLE, "1", "Patient"));
            j.raw("}");
        }
        for d in &self.data {
            entity(&mut j);
            j.raw("\"what\":{\"reference\":");
            j.str(d);
            j.raw("},\"type\":");
            j.code(&Code::new(ENTITY_TYPE, "2", "System Object"));
            j.raw(",\"role\":");
            j.code(&Code::new(OBJECT_ROLE, "4", "Domain Resource"));
            j.raw("}");
        }
        if let Some(q) = &self.query {
            entity(&mut j);
            j.raw("\"type\":");
            j.code(&Code::new(ENTITY_TYPE, "2", "System Object"));
            j.raw(",\"role\":");
            j.code(&Code::new(OBJECT_ROLE, "24", "Query"));
            j.raw(",\"query\":");
            j.str(&base64::engine::general_purpose::STANDARD.encode(q.as_bytes()));
            j.raw("}");
        }
        let others = [
            (
                &self.token,
                "urn:ehrx:token-tail",
                "token (last characters only)",
            ),
            (&self.request_id, "urn:ehrx:request-id", "X-Request-Id"),
        ];
        for (value, system, description) in others {
            if let Some(v) = value {
                entity(&mut j);
                j.raw("\"what\":{\"identifier\":{\"system\":");
                j.str(system);
                j.raw(",\"value\":");
                j.str(v);
                j.raw("}},\"type\":");
                j.code(&Code::new(ENTITY_TYPE, "4", "Other"));
                j.raw(",\"description\":");
                j.str(description);
                j.raw("}");
            }
        }
        if !first {
            j.raw("]");
        }
        j.raw("}");
        // Only `str` and `&'static str` pieces went in.
        String::from_utf8(j.0).unwrap_or_default()
    }

    /// The searchable copies of this event's fields: what
    /// [`Columns::of`] reads from its JSON.
    pub fn columns(&self) -> Columns {
        Columns {
            recorded: Some(self.recorded.clone()),
            kind: Some(self.kind.kind.code.to_string()),
            subtype: Some(self.kind.subtype.code.to_string()),
            action: Some(self.action.code().to_string()),
            outcome: Some(self.outcome.code().to_string()),
            patient: self.patient.as_ref().map(|p| format!("Patient/{p}")),
            agent: self.user.clone().or_else(|| self.client.clone()),
            client: self.client.clone(),
            entity: self.data.first().cloned(),
            purpose: (!self.purpose.is_empty()).then(|| self.purpose.join(",")),
            organizations: (!self.organizations.is_empty()).then(|| {
                self.organizations
                    .iter()
                    .map(|o| format!("Organization/{o}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
        }
    }
}

/// JSON text being written by [`Event::to_text`].
struct Text(Vec<u8>);

impl Text {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A JSON string, escaped.
    fn str(&mut self, s: &str) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.0, s);
    }

    fn code(&mut self, c: &Code) {
        self.raw("{\"system\":");
        self.str(c.system);
        self.raw(",\"code\":");
        self.str(c.code);
        self.raw(",\"display\":");
        self.str(c.display);
        self.raw("}");
    }

    fn purposes(&mut self, codes: &[String]) {
        self.raw("[");
        for (i, c) in codes.iter().enumerate() {
            self.raw(if i > 0 { ",{" } else { "{" });
            self.raw("\"coding\":[{\"system\":");
            self.str(ACT_REASON);
            self.raw(",\"code\":");
            self.str(c);
            self.raw("}]}");
        }
        self.raw("]");
    }
}

/// The current time as a FHIR instant (UTC, milliseconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The searchable copies of an AuditEvent's fields, kept beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    pub recorded: Option<String>,
    pub kind: Option<String>,
    pub subtype: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<String>,
    /// `Patient/{id}`.
    pub patient: Option<String>,
    /// The requestor: a reference (`Practitioner/x`) or an identifier value.
    pub agent: Option<String>,
    pub client: Option<String>,
    /// The first data entity (`Type/id`).
    pub entity: Option<String>,
    /// Purposes of use, comma-separated.
    pub purpose: Option<String>,
    /// The Organizations the caller acted for (`Organization/{id}`), in the
    /// event's order, space-separated.
    pub organizations: Option<String>,
}

/// The Organizations an AuditEvent's caller acted for (its responsible
/// party agents, `Organization/{id}`), in the event's order.
pub fn organizations_of(e: &Value) -> Vec<&str> {
    e["agent"]
        .as_array()
        .map(|agents| {
            agents
                .iter()
                .filter(|a| a["type"]["coding"][0]["code"] == "RESP")
                .filter_map(|a| a["who"]["reference"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// The searchable columns of `audit_entry` and `audit_outbox`, in the order
/// of [`Columns::named`], for the SQL that writes and reads them.
macro_rules! audit_columns {
    () => {
        "recorded, type, subtype, action, outcome, patient, agent, client, entity, purpose, \
         organizations"
    };
}
pub(crate) use audit_columns;
/// How many columns [`audit_columns!`] names.
pub const COLUMN_COUNT: usize = 11;

impl Columns {
    /// The columns of an AuditEvent.
    pub fn of(e: &Value) -> Columns {
        let s = |v: &Value| v.as_str().map(str::to_string);
        let who = |a: &Value| {
            a["who"]["reference"]
                .as_str()
                .or_else(|| a["who"]["identifier"]["value"].as_str())
                .map(str::to_string)
        };
        let none = Vec::new();
        let agents = e["agent"].as_array().unwrap_or(&none);
        let entities = e["entity"].as_array().unwrap_or(&none);
        let role = |x: &Value, code: &str| x["role"]["code"].as_str() == Some(code);
        let purpose: Vec<String> = e["purposeOfUse"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["coding"][0]["code"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Columns {
            recorded: s(&e["recorded"]),
            kind: s(&e["type"]["code"]),
            subtype: s(&e["subtype"][0]["code"]),
            action: s(&e["action"]),
            outcome: s(&e["outcome"]),
            patient: entities
                .iter()
                .find(|x| role(x, "1"))
                .and_then(|x| s(&x["what"]["reference"])),
            agent: agents
                .iter()
                .find(|a| a["requestor"] == json!(true))
                .and_then(who),
            client: agents
                .iter()
                .find(|a| a["type"]["coding"][0]["code"] == "110153")
                .and_then(|a| s(&a["who"]["identifier"]["value"])),
            entity: entities
                .iter()
                .find(|x| role(x, "4"))
                .and_then(|x| s(&x["what"]["reference"])),
            purpose: (!purpose.is_empty()).then(|| purpose.join(",")),
            organizations: {
                let orgs = organizations_of(e);
                (!orgs.is_empty()).then(|| orgs.join(" "))
            },
        }
    }

    /// The columns read back in the order of [`audit_columns!`], `get(i)`
    /// giving the `i`-th.
    pub fn read<E>(mut get: impl FnMut(usize) -> Result<Option<String>, E>) -> Result<Columns, E> {
        Ok(Columns {
            recorded: get(0)?,
            kind: get(1)?,
            subtype: get(2)?,
            action: get(3)?,
            outcome: get(4)?,
            patient: get(5)?,
            agent: get(6)?,
            client: get(7)?,
            entity: get(8)?,
            purpose: get(9)?,
            organizations: get(10)?,
        })
    }

    /// The columns in table order (for binding and comparing), named: the
    /// order of [`audit_columns!`].
    pub fn named(&self) -> [(&'static str, Option<&str>); COLUMN_COUNT] {
        [
            ("recorded", self.recorded.as_deref()),
            ("type", self.kind.as_deref()),
            ("subtype", self.subtype.as_deref()),
            ("action", self.action.as_deref()),
            ("outcome", self.outcome.as_deref()),
            ("patient", self.patient.as_deref()),
            ("agent", self.agent.as_deref()),
            ("client", self.client.as_deref()),
            ("entity", self.entity.as_deref()),
            ("purpose", self.purpose.as_deref()),
            ("organizations", self.organizations.as_deref()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_column_list_is_the_order_columns_are_bound_and_read_in() {
        let listed: Vec<&str> = audit_columns!().split(',').map(str::trim).collect();
        let named: Vec<&str> = Columns::default().named().iter().map(|(n, _)| *n).collect();
        assert_eq!(listed, named);
        assert_eq!(listed.len(), COLUMN_COUNT);
        let read = Columns::read(|i| Ok::<_, ()>(Some(named[i].to_string()))).unwrap();
        for (name, value) in read.named() {
            assert_eq!(Some(name), value);
        }
    }

    #[test]
    fn recorded_is_a_utc_instant_to_the_millisecond() {
        let t = now();
        assert_eq!(t.len(), "2026-01-01T00:00:00.000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
        let parsed = chrono::DateTime::parse_from_rfc3339(&t).expect(&t);
        let age = chrono::Utc::now() - parsed.with_timezone(&chrono::Utc);
        assert!(
            age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
            "{t}"
        );
    }

    /// Events of every shape `to_text` writes: with and without user,
    /// client, address, purposes, patient, data, query, token, request id,
    /// failure text, and characters JSON escapes.
    fn shapes() -> Vec<Event> {
        let mut all = Vec::new();
        let mut full = Event::new(EventType::rest("search-type"), Action::Execute)
            .user(Some("Practitioner/p\"1".into()))
            .client(Some("app\\x".into()))
            .patient(Some("pat".into()))
            .data("Observation/o1")
            .data("Observation/o2")
            .purpose("TREAT")
            .purpose("BTG")
            .token("eyJhbGciOi.token-value");
        full.address = Some("127.0.0.1".into());
        full.observer = "http://ehrx.example".into();
        full.query = Some("/Observation?code=a|b&name=Zoë\n".into());
        full.request_id = Some("req-1".into());
        all.push(full);
        all.push(
            Event::new(EventType::rest("read"), Action::Read)
                .outcome(Outcome::MinorFailure, Some("403 \"forbidden\"\t".into())),
        );
        all.push(Event::new(EventType::login(), Action::Execute).user(Some("alice".into())));
        all.push(
            Event::new(EventType::break_the_glass(), Action::Read)
                .client(Some("ward".into()))
                .patient(Some("p2".into()))
                .purpose("BTG"),
        );
        all.push(Event::new(EventType::rest("create"), Action::Create).data("Patient/x"));
        all.push(
            Event::new(EventType::rest("read"), Action::Read)
                .client(Some("claims-app".into()))
                .organizations(vec!["insurer".into()])
                .patient(Some("p3".into()))
                .data("Coverage/c1"),
        );
        all.push(
            Event::new(EventType::rest("read"), Action::Read)
                .user(Some("Practitioner/p2".into()))
                .client(Some("ward".into()))
                .organizations(vec!["hospital-a".into(), "hospital-b".into()])
                .patient(Some("p3".into()))
                .data("Observation/o2"),
        );
        all
    }

    #[test]
    fn the_text_written_straight_out_is_the_events_json() {
        for e in shapes() {
            let text = e.to_text();
            assert_eq!(text, e.to_json().to_string());
            let parsed: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(e.columns(), Columns::of(&parsed), "{text}");
            let orgs: Vec<String> = e
                .organizations
                .iter()
                .map(|o| format!("Organization/{o}"))
                .collect();
            assert_eq!(organizations_of(&parsed), orgs, "{text}");
        }
    }

    #[test]
    fn a_patient_read_has_the_balp_elements_and_its_columns() {
        let mut e = Event::new(EventType::rest("read"), Action::Read)
            .user(Some("Practitioner/p1".into()))
            .client(Some("app".into()))
            .patient(Some("pat".into()))
            .data("Observation/o1")
            .purpose("BTG");
        e.address = Some("127.0.0.1".into());
        e.observer = "http://ehrx.example".into();
        let v = e.to_json();
        assert_eq!(
            v["meta"]["profile"][0],
            format!("{BALP}PatientRead").as_str()
        );
        assert_eq!(v["agent"].as_array().unwrap().len(), 3);
        let c = Columns::of(&v);
        assert_eq!(c.patient.as_deref(), Some("Patient/pat"));
        assert_eq!(c.agent.as_deref(), Some("Practitioner/p1"));
        assert_eq!(c.client.as_deref(), Some("app"));
        assert_eq!(c.entity.as_deref(), Some("Observation/o1"));
        assert_eq!(c.purpose.as_deref(), Some("BTG"));
        assert_eq!(c.outcome.as_deref(), Some("0"));
    }

    #[test]
    fn a_token_keeps_only_its_last_characters() {
        assert_eq!(token_tail("abcdefghijklmnopqrstuvwxyz"), "…uvwxyz");
        assert_eq!(token_tail("abcd"), "…d");
    }
}
