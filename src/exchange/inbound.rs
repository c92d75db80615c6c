//! `POST /exchange/documents`: verify, decrypt, map and store one signed
//! document.
//!
//! The answer is a `Parameters` resource with two parts: `outcome`, an
//! OperationOutcome with what was not mapped (warnings, with XPaths) or an
//! information issue, and `result`, the transaction-response Bundle of the
//! store (absent when the document had been received before; then
//! `documentReference` names the earlier DocumentReference).

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use super::keys::{self, ExchangeKey};
use super::mapping::{self, Rules};
use super::ns::{FHIR, HL7};
use super::xml::{self, Limits};
use super::{dsig, xenc, ExchangeError};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fhir::{codec, operation_outcome, Issue};
use crate::interaction::{bundle, Env};
use crate::policy::Access;
use crate::store::exchange as db;
use crate::store::{Gate, Store};
use sha2::Digest as _;

/// Identifier system of received documents: the SHA-256 of their signed,
/// canonicalized content (the same document signed twice is one document).
pub const DOCUMENT_SYSTEM: &str = "urn:ehrx:exchange:sha256";
const EXT_SUBJECT: &str = "urn:ehrx:exchange:signer-certificate-subject";
const EXT_FINGERPRINT: &str = "urn:ehrx:exchange:signer-certificate-sha256";

/// What the exchange needs at run time: ehrx's key, the mapping rules, limits.
#[derive(Debug)]
pub struct Exchange {
    pub key: ExchangeKey,
    pub rules: Rules,
    pub limits: Limits,
}

impl Exchange {
    /// Loads (or on first start generates) the exchange key and reads the
    /// mapping rules.
    pub async fn load(store: &Store, config: &Config) -> Result<Exchange> {
        let key = keys::exchange_key(store).await?;
        // A configured folder must be there; `./mappings` is used when present.
        let dir = config
            .mappings_dir
            .clone()
            .or_else(|| Some(PathBuf::from("mappings")).filter(|d| d.is_dir()));
        let rules = Rules::load_default(dir.as_deref()).map_err(|e| {
            Error::Exchange(ExchangeError::Mapping {
                message: e,
                xpath: None,
            })
        })?;
        Ok(Exchange {
            key,
            rules,
            limits: Limits {
                max_bytes: config.exchange_max_document_bytes,
                max_depth: config.exchange_max_depth,
                ..Limits::default()
            },
        })
    }
}

/// The outcome of a receipt: HTTP status and the `Parameters` answer.
pub struct Receipt {
    pub created: bool,
    pub body: Value,
}

/// Verifies, decrypts, maps and stores one document. `client_cert` is the
/// certificate the TLS client presented, if any.
pub async fn receive(
    store: &Store,
    env: &Env,
    ex: &Arc<Exchange>,
    body: &[u8],
    client_cert: Option<&[u8]>,
) -> Result<Receipt> {
    let now = chrono::Utc::now();
    let text = xml::prescan(body, &ex.limits)?;
    let registered = keys::registered(store).await?;
    let limits = ex.limits;
    let (verified, unsigned_text, registered) = super::blocking(move || {
        let doc = xml::parse(&text, &limits)?;
        xml::refuse_split_text(&doc)?;
        let v = dsig::verify(&doc, &registered, now)?;
        // Take the signature out: what remains is exactly what was signed.
        let r = v.signature_range.clone();
        let rest = format!("{}{}", &text[..r.start], &text[r.end..]);
        Ok((v, rest, registered))
    })
    .await?;
    let org = format!("Organization/{}", verified.signer.organization_id);
    check_channel(store, &registered, &verified, client_cert, now).await?;
    // From here on the work runs in its own task: a client that disconnects
    // (or times out) cancels the request, and a request cancelled between
    // claiming the document and recording where it was stored would leave
    // the claim standing, refusing the document as "being stored" until the
    // claim times out. The task always finishes what it started.
    let (store, env) = (store.clone(), env.clone());
    let doc = Received {
        ex: Arc::clone(ex),
        body: body.to_vec(),
        now,
        verified,
        unsigned_text,
        org,
    };
    tokio::spawn(crate::audit::context::carry(async move {
        claim_and_store(&store, &env, doc).await
    }))
    .await
    .map_err(|e| ExchangeError::Worker(e.to_string()))?
}

/// A verified document on its way to the store.
struct Received {
    ex: Arc<Exchange>,
    /// The document as received (kept as the Binary).
    body: Vec<u8>,
    now: chrono::DateTime<chrono::Utc>,
    verified: dsig::Verified,
    /// The document without its signature: exactly what was signed.
    unsigned_text: String,
    /// The sending subscriber, `Organization/{id}`.
    org: String,
}

/// Claims a verified document's receipt, then maps and stores it (or answers
/// with where it was stored before).
async fn claim_and_store(store: &Store, env: &Env, doc: Received) -> Result<Receipt> {
    // The same content received before, or being stored right now?
    let digest = doc.verified.content_digest.clone();
    let query = format!("identifier={DOCUMENT_SYSTEM}|{digest}");
    // The subscriber adds to the record and sees only what it added.
    let source = source_of(env, &doc.org);
    let org_id = doc.org.trim_start_matches("Organization/");
    let gate = store.gate(Access::subscriber(&source, org_id));
    // The signer, verified, is the requestor of the audit record.
    crate::audit::context::identify(Some(&doc.org), &source, None, None);
    let key = db::ReceiptKey {
        subscriber: &source,
        digest: &digest,
    };
    match claim(store, &gate, key, &query, doc.now).await? {
        Claim::Stored(id) => {
            let outcome = operation_outcome(&[Issue::information(format!(
                "this document (SHA-256 {digest}) was received before and stored as \
                 DocumentReference/{id}; nothing was changed"
            ))]);
            return Ok(Receipt {
                created: false,
                body: json!({
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "outcome", "resource": outcome},
                        {"name": "documentReference", "valueReference": {"reference": format!("DocumentReference/{id}")}}
                    ]
                }),
            });
        }
        Claim::Busy => {
            return Err(Error::Conflict(format!(
                "this document (SHA-256 {digest}) is being stored by another request; \
                 send it again later to get its DocumentReference"
            )))
        }
        Claim::Claimed => {}
    }
    let result = map_and_store(&gate, env, doc, query).await;
    let mut tx = store.begin().await?;
    match &result {
        Ok((_, Some(id))) => {
            db::set_receipt_document(tx.conn(), key, id.as_str()).await?;
        }
        // Nothing was stored: the document may be sent again.
        _ => {
            db::delete_receipt(tx.conn(), key).await?;
        }
    }
    tx.commit().await?;
    result.map(|(receipt, _)| receipt)
}

/// The `meta.source` of what a subscriber stores: its Organization's URL.
fn source_of(env: &Env, org: &str) -> String {
    format!("{}/{org}", env.base)
}

fn gate_source(gate: &Gate) -> String {
    gate.access().source().unwrap_or_default().to_string()
}

/// A subscriber that requires mutual TLS must have sent the document over a
/// connection authenticated with one of its registered, valid certificates.
async fn check_channel(
    store: &Store,
    registered: &[keys::Registered],
    verified: &dsig::Verified,
    client_cert: Option<&[u8]>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    let org = &verified.signer.organization_id;
    if !keys::requires_mtls(store, org).await? {
        return Ok(());
    }
    let Some(der) = client_cert else {
        return Err(ExchangeError::Signer(format!(
            "Organization/{org} sends over mutual TLS only: this request came without a \
             client certificate"
        ))
        .into());
    };
    let fingerprint = hex::encode(sha2::Sha256::digest(der));
    let ok = registered.iter().any(|r| {
        r.organization_id == *org
            && r.cert.fingerprint == fingerprint
            && r.revoked.is_none()
            && r.cert.is_valid_at(now)
    });
    if !ok {
        return Err(ExchangeError::Signer(format!(
            "the TLS client certificate (SHA-256 {fingerprint}) is not a valid registered \
             certificate of Organization/{org}, which sends over mutual TLS only"
        ))
        .into());
    }
    Ok(())
}

/// The state of a document's receipt.
enum Claim {
    /// Stored before, as this DocumentReference.
    Stored(String),
    /// Another request is storing it now.
    Busy,
    /// This request may store it.
    Claimed,
}

/// A claim older than this is taken to belong to a request that died.
const CLAIM_TIMEOUT_SECS: i64 = 600;

async fn claim(
    store: &Store,
    gate: &Gate,
    key: db::ReceiptKey<'_>,
    query: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Claim> {
    let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut tx = store.begin().await?;
    if db::insert_receipt(tx.conn(), key, stamp.as_str()).await? {
        tx.commit().await?;
        return Ok(Claim::Claimed);
    }
    let db::ReceiptRow {
        claimed,
        document_reference: stored,
    } = db::receipt(tx.conn(), key).await?;
    if let Some(id) = stored {
        return Ok(Claim::Stored(id));
    }
    let age = chrono::DateTime::parse_from_rfc3339(&claimed)
        .map(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds())
        .unwrap_or(i64::MAX);
    if age < CLAIM_TIMEOUT_SECS {
        return Ok(Claim::Busy);
    }
    // A stale claim: the request may have stored the document and died
    // before recording it, so look before taking the claim over.
    let found = gate
        .reader()
        .await?
        .view()
        .find("DocumentReference", query)
        .await?;
    if let Some(existing) = found.first() {
        db::set_receipt_document(tx.conn(), key, existing.id.as_str()).await?;
        tx.commit().await?;
        return Ok(Claim::Stored(existing.id.clone()));
    }
    let taken = db::take_over_claim(tx.conn(), key, claimed.as_str(), stamp.as_str()).await?;
    tx.commit().await?;
    Ok(if taken { Claim::Claimed } else { Claim::Busy })
}

/// Decrypts, maps and stores a verified document; returns the answer and the
/// id of the DocumentReference. The CPU-bound part runs off the runtime.
async fn map_and_store(
    gate: &Gate,
    env: &Env,
    doc: Received,
    query: String,
) -> Result<(Receipt, Option<String>)> {
    let Received {
        ex,
        body,
        now,
        verified,
        unsigned_text,
        org,
    } = doc;
    let (transaction, mut warnings, verified) = tokio::task::spawn_blocking(move || {
        prepare(&ex, &body, now, &verified, unsigned_text, &org, query)
            .map(|(t, w)| (t, w, verified))
    })
    .await
    .map_err(|e| ExchangeError::Worker(e.to_string()))??;
    let mut transaction = transaction;
    let source = gate_source(gate);
    for e in transaction["entry"].as_array_mut().into_iter().flatten() {
        if let Some(r) = e.get_mut("resource").and_then(Value::as_object_mut) {
            let meta = r.entry("meta").or_insert_with(|| json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.insert("source".into(), json!(source));
            }
        }
    }
    let response = bundle::process(gate, env, transaction).await?;
    let n = all_len(&response);
    if warnings.is_empty() {
        warnings.push(Issue::information(format!(
            "document signed by '{}' verified and stored as {n} resources",
            verified.signer.cert.subject
        )));
    }
    // The DocumentReference is the entry before the Provenance, the last one.
    let docref_id = response["entry"]
        .as_array()
        .and_then(|e| e.iter().rev().nth(1))
        .and_then(|e| e["response"]["location"].as_str())
        .and_then(|l| l.strip_prefix("DocumentReference/"))
        .and_then(|l| l.split('/').next())
        .map(str::to_string);
    let receipt = Receipt {
        created: true,
        body: json!({
            "resourceType": "Parameters",
            "parameter": [
                {"name": "outcome", "resource": operation_outcome(&warnings)},
                {"name": "result", "resource": response}
            ]
        }),
    };
    Ok((receipt, docref_id))
}

/// The FHIR transaction that stores a verified document: the decrypted
/// document mapped onto resources, the original as Binary, its
/// DocumentReference and the Provenance, all validated as R4; with the
/// warnings of the mapping.
fn prepare(
    ex: &Exchange,
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
    verified: &dsig::Verified,
    unsigned_text: String,
    org: &str,
    query: String,
) -> Result<(Value, Vec<Issue>)> {
    let (plain, decrypted) = xenc::decrypt_all(unsigned_text, &ex.key, &ex.limits)?;
    let doc = xml::parse(&plain, &ex.limits)?;
    let root = doc.root_element();
    let (entries, mut warnings, patient, doc_type, title, master_id) =
        match (root.tag_name().namespace(), root.tag_name().name()) {
            (Some(HL7), "ClinicalDocument") => {
                let m = mapping::map_document(&doc, &ex.rules, org)?;
                let patient = m.keys.get("patient").and_then(|v| v.first()).cloned();
                let composition = m
                    .resources
                    .iter()
                    .find(|r| r.resource["resourceType"] == "Composition");
                let doc_type = composition.map(|c| c.resource["type"].clone());
                let title =
                    composition.and_then(|c| c.resource["title"].as_str().map(str::to_string));
                let master = composition.map(|c| c.resource["identifier"].clone());
                // Every mapped resource must be valid R4 before anything is written.
                for r in &m.resources {
                    codec::validate_json(r.resource.clone()).map_err(|f| {
                        Error::Exchange(ExchangeError::Mapping {
                            message: format!(
                                "the {} mapped from {} is not valid FHIR R4: {}{}",
                                r.resource["resourceType"].as_str().unwrap_or("resource"),
                                r.source,
                                f.message,
                                f.expression
                                    .map(|e| format!(" (at {e})"))
                                    .unwrap_or_default()
                            ),
                            xpath: Some(r.source.clone()),
                        })
                    })?;
                }
                let entries: Vec<Value> = m
                    .resources
                    .into_iter()
                    .map(|r| {
                        let mut req = json!({"method": "POST", "url": r.resource["resourceType"]});
                        if let Some(q) = &r.if_none_exist {
                            req["ifNoneExist"] = json!(q);
                        }
                        json!({"fullUrl": r.full_url, "resource": r.resource, "request": req})
                    })
                    .collect();
                (entries, m.warnings, patient, doc_type, title, master)
            }
            (Some(FHIR), "Bundle") => {
                let b = codec::parse_xml(plain.as_bytes())?;
                let (entries, patient) = fhir_bundle_entries(b)?;
                (entries, Vec::new(), patient, None, None, None)
            }
            (None, "ClinicalDocument") => {
                return Err(ExchangeError::xml(
                    "the ClinicalDocument element is not in the HL7 v3 namespace \
                     (xmlns=\"urn:hl7-org:v3\" is missing)",
                    Some(xml::xpath(root)),
                )
                .into())
            }
            (ns, name) => {
                return Err(ExchangeError::xml(
                    format!(
                        "the document element {{{}}}{name} is neither an HL7 CDA ClinicalDocument \
                         nor a FHIR Bundle",
                        ns.unwrap_or("")
                    ),
                    Some(xml::xpath(root)),
                )
                .into())
            }
        };
    if decrypted > 0 {
        warnings.push(Issue::information(format!(
            "{decrypted} encrypted element(s) decrypted with ehrx's exchange key"
        )));
    }
    // The original, the DocumentReference and the Provenance.
    let binary_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let docref_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let std = base64::engine::general_purpose::STANDARD;
    let recorded = crate::search::format_instant(now);
    let mut binary = json!({
        "resourceType": "Binary",
        "contentType": "application/xml",
        "data": std.encode(body),
    });
    let mut docref = json!({
        "resourceType": "DocumentReference",
        "identifier": [{"system": DOCUMENT_SYSTEM, "value": verified.content_digest}],
        "status": "current",
        "date": recorded,
        "author": [{"reference": org}],
        "content": [{"attachment": {
            "contentType": "application/xml",
            "url": binary_url,
            "size": body.len(),
        }}],
    });
    if let Some(p) = &patient {
        docref["subject"] = json!({"reference": p});
        binary["securityContext"] = json!({"reference": p});
    }
    if let Some(t) = doc_type.filter(|t| t.is_object()) {
        docref["type"] = t;
    }
    if let Some(t) = title {
        docref["description"] = json!(t);
    }
    if let Some(m) = master_id.filter(|m| m.is_object()) {
        docref["masterIdentifier"] = m;
    }
    let mut targets: Vec<Value> = entries
        .iter()
        .filter_map(|e| {
            e["fullUrl"]
                .as_str()
                .map(str::to_string)
                .or_else(|| e["request"]["url"].as_str().map(str::to_string))
        })
        // A conditional update names no single resource before it runs.
        .filter(|u| !u.contains('?'))
        .map(|u| json!({"reference": u}))
        .collect();
    targets.push(json!({"reference": docref_url}));
    targets.push(json!({"reference": binary_url}));
    let provenance = json!({
        "resourceType": "Provenance",
        "target": targets,
        "recorded": recorded,
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create"}]},
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author", "display": "Author"}]},
            "who": {"reference": org}
        }],
        "entity": [{"role": "source", "what": {"reference": docref_url}}],
        "signature": [{
            "extension": [
                {"url": EXT_SUBJECT, "valueString": verified.signer.cert.subject},
                {"url": EXT_FINGERPRINT, "valueString": verified.signer.cert.fingerprint}
            ],
            "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1", "display": "Author's Signature"}],
            "when": recorded,
            "who": {"reference": org, "display": verified.signer.cert.subject},
            "targetFormat": "application/xml",
            "sigFormat": "application/signature+xml",
            "data": std.encode(verified.signature_xml.as_bytes()),
        }],
    });
    let mut all = entries;
    all.push(json!({"fullUrl": binary_url, "resource": binary, "request": {"method": "POST", "url": "Binary"}}));
    all.push(json!({"fullUrl": docref_url, "resource": docref, "request": {"method": "POST", "url": "DocumentReference", "ifNoneExist": query}}));
    all.push(json!({"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()), "resource": provenance, "request": {"method": "POST", "url": "Provenance"}}));
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": all});
    // Everything mapped must be valid R4 before anything is written.
    let transaction = codec::validate_json(transaction).map_err(|f| {
        Error::Exchange(ExchangeError::Mapping {
            message: format!("the mapped resources are not valid FHIR R4: {}", f.message),
            xpath: f.expression.clone(),
        })
    })?;
    Ok((transaction, warnings))
}
fn all_len(bundle: &Value) -> usize {
    bundle["entry"].as_array().map(Vec::len).unwrap_or(0)
}

/// The entries a received FHIR Bundle contributes. A subscriber adds
/// resources; it never overwrites what is stored (which may have come from
/// someone else): a transaction may only create (POST, conditional creates
/// included), and a document's or collection's resources are all created
/// with new ids, every reference to them (by full URL or `Type/id`) rewritten.
fn fhir_bundle_entries(b: Value) -> Result<(Vec<Value>, Option<String>)> {
    let kind = b["type"].as_str().unwrap_or("").to_string();
    let entries = b["entry"].as_array().cloned().unwrap_or_default();
    if !matches!(kind.as_str(), "transaction" | "document" | "collection") {
        return Err(Error::invalid_at(
            format!(
                "a received Bundle must be a document, collection or transaction (found '{kind}')"
            ),
            "Bundle.type",
        ));
    }
    let mut renamed: std::collections::HashMap<String, String> = Default::default();
    let mut out = Vec::with_capacity(entries.len());
    let mut patient = None;
    for (i, e) in entries.into_iter().enumerate() {
        let method = e["request"]["method"].as_str().unwrap_or("");
        if kind == "transaction" && method != "POST" {
            return Err(Error::invalid_at(
                format!(
                    "a received transaction may only create resources (found {method}): \
                     subscribers add to the record, they do not change or remove what is stored"
                ),
                format!("Bundle.entry[{i}].request.method"),
            ));
        }
        let Some(mut res) = e.get("resource").cloned() else {
            return Err(Error::invalid_at(
                "entry has no resource",
                format!("Bundle.entry[{i}]"),
            ));
        };
        let rtype = res["resourceType"].as_str().unwrap_or("").to_string();
        let full_url = e["fullUrl"].as_str().map(str::to_string);
        let new_url = match &full_url {
            Some(u) if u.starts_with("urn:uuid:") => u.clone(),
            _ => format!("urn:uuid:{}", uuid::Uuid::new_v4()),
        };
        if let Some(u) = &full_url {
            renamed.insert(u.clone(), new_url.clone());
        }
        if let Some(id) = res["id"].as_str() {
            renamed.insert(format!("{rtype}/{id}"), new_url.clone());
        }
        if let Some(obj) = res.as_object_mut() {
            obj.remove("id");
            obj.remove("meta");
        }
        let mut request = json!({"method": "POST", "url": rtype});
        if let Some(q) = e["request"]["ifNoneExist"].as_str() {
            request["ifNoneExist"] = json!(q);
        }
        if rtype == "Patient" && patient.is_none() {
            patient = Some(new_url.clone());
        }
        out.push(json!({"fullUrl": new_url, "resource": res, "request": request}));
    }
    for e in &mut out {
        crate::fhir::reference::rewrite(&mut e["resource"], &renamed);
    }
    Ok((out, patient))
}
