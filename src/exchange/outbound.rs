//! `GET /Patient/{id}/$signed-document`: the patient's records as a FHIR XML
//! document Bundle, signed by libxmlsec1 with ehrx's exchange key (enveloped
//! signature, exclusive c14n, the certificate in KeyInfo; RSA-SHA256, or
//! ECDSA-SHA256 with `signature=ecdsa-sha256`). With
//! `recipient=Organization/{id}`, the Patient resource (the identifying part)
//! is encrypted for that subscriber's newest valid RSA certificate before the
//! document is signed, so the signature also covers the ciphertext.
//!
//! The document holds what one page of `$everything` returns (at most
//! `max_count` resources).

use serde_json::{json, Value};

use super::inbound::Exchange;
use super::keys::{self, PublicKey};
use super::libxmlsec::SignatureAlgorithm;
use super::{dsig, xenc, ExchangeError};
use crate::error::{Error, Result};
use crate::fhir::codec;
use crate::interaction::{self, Env};
use crate::store::{Gate, Store};

/// The signed (and, with a recipient, partly encrypted) document, as XML:
/// the patient's record as far as the caller (`gate`) may see it.
pub async fn signed_document(
    gate: &Gate,
    store: &Store,
    env: &Env,
    ex: &Exchange,
    patient_id: &str,
    params: &[(String, String)],
) -> Result<String> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let recipient = param("recipient");
    let algorithm = match param("signature") {
        None => SignatureAlgorithm::RsaSha256,
        Some(name) => SignatureAlgorithm::parse(name).ok_or_else(|| {
            Error::invalid(format!(
                "parameter 'signature': unknown algorithm '{name}' (use rsa-sha256 or ecdsa-sha256)"
            ))
        })?,
    };
    let now = chrono::Utc::now();
    // The recipient's key first: a request for an unknown recipient fails early.
    let recipient_key = match recipient {
        None => None,
        Some(r) => {
            let org = r.trim_start_matches("Organization/");
            let all = keys::registered(store).await?;
            let key = all
                .iter()
                .filter(|c| c.organization_id == org && c.revoked.is_none())
                .filter(|c| c.cert.is_valid_at(now))
                .filter_map(|c| match &c.cert.key {
                    PublicKey::Rsa(k) => Some((c.cert.not_before, k.clone())),
                    PublicKey::P256(_) => None,
                })
                .max_by_key(|(t, _)| *t)
                .map(|(_, k)| k);
            Some(key.ok_or_else(|| {
                Error::Unprocessable(format!(
                    "Organization/{org} has no valid RSA certificate registered to encrypt for"
                ))
            })?)
        }
    };
    let everything = {
        let mut r = gate.reader().await?;
        let params = vec![("_count".to_string(), env.max_count.to_string())];
        interaction::bundle_value(
            interaction::everything(&mut r.view(), env, patient_id, &params).await?,
        )?
    };
    let resources: Vec<Value> = everything["entry"]
        .as_array()
        .map(|a| a.iter().map(|e| e["resource"].clone()).collect())
        .unwrap_or_default();
    let full_url = |r: &Value| {
        format!(
            "{}/{}/{}",
            env.base,
            r["resourceType"].as_str().unwrap_or(""),
            r["id"].as_str().unwrap_or("")
        )
    };
    // One section per resource type, in the order found.
    let mut sections: Vec<(String, Vec<Value>)> = Vec::new();
    for r in resources.iter().filter(|r| r["resourceType"] != "Patient") {
        let t = r["resourceType"].as_str().unwrap_or("").to_string();
        let reference = json!({"reference": full_url(r)});
        match sections.iter_mut().find(|(k, _)| *k == t) {
            Some((_, refs)) => refs.push(reference),
            None => sections.push((t, vec![reference])),
        }
    }
    let instant = crate::search::format_instant(now);
    let composition = json!({
        "resourceType": "Composition",
        "id": uuid::Uuid::new_v4().to_string(),
        "status": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5", "display": "Patient summary Document"}]},
        "subject": {"reference": format!("{}/Patient/{patient_id}", env.base)},
        "date": instant,
        "author": [{"display": "ehrx"}],
        "title": "Patient record",
        "section": sections.iter().map(|(t, refs)| json!({"title": t, "entry": refs})).collect::<Vec<_>>(),
    });
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{}", composition["id"].as_str().unwrap_or("")),
        "resource": composition,
    })];
    entries.extend(
        resources
            .iter()
            .map(|r| json!({"fullUrl": full_url(r), "resource": r})),
    );
    let bundle = json!({
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{}", uuid::Uuid::new_v4())},
        "type": "document",
        "timestamp": instant,
        "entry": entries,
    });
    let xml = codec::to_xml(&bundle)?;
    let mut xml =
        String::from_utf8(xml).map_err(|_| Error::invalid("serialised document is not UTF-8"))?;
    if let Some(key) = recipient_key {
        xml = encrypt_patient(&xml, &key)?;
    }
    let key = ex.key.clone();
    Ok(super::blocking(move || dsig::sign_enveloped(&xml, &key, algorithm)).await?)
}

/// Replaces the Patient resource element (`entry/resource/Patient`) by its
/// `xenc:EncryptedData`.
fn encrypt_patient(xml: &str, key: &openssl::pkey::PKey<openssl::pkey::Public>) -> Result<String> {
    let limits = super::xml::Limits {
        max_bytes: usize::MAX,
        ..Default::default()
    };
    let doc = super::xml::parse(xml, &limits)?;
    let patient = doc
        .descendants()
        .find(|n| {
            n.is_element()
                && n.tag_name().name() == "Patient"
                && n.parent_element().map(|p| p.tag_name().name()) == Some("resource")
        })
        .ok_or_else(|| {
            Error::Exchange(ExchangeError::xml(
                "the document has no Patient to encrypt",
                None,
            ))
        })?;
    let range = patient.range();
    // The element is encrypted with its namespace declared, so it stands alone.
    let element = &xml[range.clone()];
    let element = if element.starts_with("<Patient xmlns=") {
        element.to_string()
    } else {
        element.replacen("<Patient", "<Patient xmlns=\"http://hl7.org/fhir\"", 1)
    };
    let encrypted = xenc::encrypt_element(&element, key)?;
    Ok(format!(
        "{}{}{}",
        &xml[..range.start],
        encrypted,
        &xml[range.end..]
    ))
}
