//! How an entry's body is kept: compressed against a fixed dictionary.
//!
//! An AuditEvent is about 2 KB of JSON, most of it the same system URLs,
//! codes and displays in every entry; stored as it is, one entry filled
//! most of a 4 KB page, and every group commit wrote a page per entry to
//! the log's write-ahead log. Compressed (LZ4, block format) against a
//! dictionary holding those shared parts, an entry keeps only what is its
//! own (time, client, patient, request id), in a fifth of the space.
//!
//! The stored text is `~1` followed by the base64 of the uncompressed
//! length (4 bytes, little-endian) and the LZ4 block, so the column stays
//! text on both databases. Bodies stored as JSON (logs written before
//! this, entries put in by hand) start with `{` and are read as they are.
//! The digest, and with it the Merkle tree, is always of the JSON text;
//! the dictionary is part of the format, so it never changes: another
//! dictionary would be `~2`.

use std::borrow::Cow;

use base64::Engine as _;

/// The marker of version 1 of the packed form.
const V1: &str = "~1";
/// Largest body unpacked: an AuditEvent is a few KB; a larger claimed size
/// is a damaged or forged row, not an allocation to make.
const MAX_BODY: usize = 1 << 20;

/// Shared parts of AuditEvents as `Event::to_text` writes them: each
/// element shape once (read, query, refusal, a user, purposes, every
/// entity kind). Fixed forever: entries packed with it must stay readable.
const DICT_V1: &str = concat!(
    r#"{"resourceType":"AuditEvent","id":"","meta":{"profile":["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery"]},"#,
    r#""type":{"system":"http://terminology.hl7.org/CodeSystem/audit-event-type","code":"rest","display":"Restful Operation"},"#,
    r#""subtype":[{"system":"http://hl7.org/fhir/restful-interaction","code":"search-type","display":"search-type"}],"action":"E","#,
    r#""recorded":"2026-01-01T00:00:00.000Z","outcome":"4","outcomeDesc":"HTTP 403","#,
    r#""purposeOfUse":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActReason","code":"BTG"}]}],"#,
    r#""agent":[{"type":{"coding":[{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"110153","display":"Source Role ID"}]},"#,
    r#""who":{"display":"unauthenticated caller"},"requestor":false,"network":{"address":"127.0.0.1","type":"2"}},"#,
    r#"{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"IRCP","display":"information recipient"}]},"#,
    r#""who":{"reference":"Practitioner/"},"requestor":true},{"who":{"identifier":{"system":"urn:ehrx:user","value":""}},"#,
    r#""entity":[{"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"2","display":"System Object"},"#,
    r#""role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"24","display":"Query"},"query":""},"#,
    r#"{"what":{"identifier":{"system":"urn:ehrx:token-tail","value":""}},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"4","display":"Other"},"description":"token (last characters only)"}]}"#,
    r#"{"resourceType":"AuditEvent","id":"","meta":{"profile":["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"]},"#,
    r#""type":{"system":"http://terminology.hl7.org/CodeSystem/audit-event-type","code":"rest","display":"Restful Operation"},"#,
    r#""subtype":[{"system":"http://hl7.org/fhir/restful-interaction","code":"read","display":"read"}],"action":"R","recorded":"2026-01-01T00:00:00.000Z","outcome":"0","#,
    r#""agent":[{"type":{"coding":[{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"110153","display":"Source Role ID"}]},"#,
    r#""who":{"identifier":{"system":"urn:ehrx:client","value":""}},"requestor":true,"network":{"address":"127.0.0.1","type":"2"}},"#,
    r#"{"type":{"coding":[{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"110152","display":"Destination Role ID"}]},"#,
    r#""who":{"display":"https://"},"requestor":false,"network":{"address":"https://","type":"5"}}],"#,
    r#""source":{"observer":{"display":"https://"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4","display":"Application Server"}]},"#,
    r#""entity":[{"what":{"reference":"Patient/"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"1","display":"Person"},"#,
    r#""role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"1","display":"Patient"}},"#,
    r#"{"what":{"reference":"Observation/"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"2","display":"System Object"},"#,
    r#""role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"4","display":"Domain Resource"}},"#,
    r#"{"what":{"identifier":{"system":"urn:ehrx:request-id","value":""}},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"4","display":"Other"},"description":"X-Request-Id"}]}"#,
);

/// A body that is neither JSON nor a packed form this version reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged;

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stored body cannot be read")
    }
}

impl std::error::Error for Damaged {}

/// The stored form of `body` (an AuditEvent's JSON).
pub fn pack(body: &str) -> String {
    let block =
        lz4_flex::block::compress_prepend_size_with_dict(body.as_bytes(), DICT_V1.as_bytes());
    let mut out = String::with_capacity(V1.len() + block.len().div_ceil(3) * 4);
    out.push_str(V1);
    base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(&block, &mut out);
    out
}

/// The JSON of a stored body: packed bodies unpacked, JSON as it is.
pub fn unpack(stored: &str) -> Result<Cow<'_, str>, Damaged> {
    let Some(packed) = stored.strip_prefix(V1) else {
        return if stored.starts_with('{') {
            Ok(Cow::Borrowed(stored))
        } else {
            Err(Damaged)
        };
    };
    let block = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(packed)
        .map_err(|_| Damaged)?;
    let size = block
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(Damaged)?;
    if size > MAX_BODY {
        return Err(Damaged);
    }
    let bytes = lz4_flex::block::decompress_with_dict(&block[4..], size, DICT_V1.as_bytes())
        .map_err(|_| Damaged)?;
    if bytes.len() != size {
        return Err(Damaged);
    }
    String::from_utf8(bytes)
        .map(Cow::Owned)
        .map_err(|_| Damaged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{Action, Event, EventType, Outcome};

    fn typical() -> String {
        let mut e = Event::new(EventType::rest("read"), Action::Read)
            .client(Some("9864de6f-6250-4713-b448-3203ecb0cffd".into()))
            .patient(Some("0bdae47f-a1c1-4eb2-acce-1ecb7043449b".into()))
            .data("Patient/0bdae47f-a1c1-4eb2-acce-1ecb7043449b");
        e.address = Some("10.1.2.3".into());
        e.observer = "https://ehrx.example.org".into();
        e.request_id = Some("bf5af327-ceda-4d75-ac97-f33e89618d99".into());
        e.to_text()
    }

    #[test]
    fn a_packed_body_unpacks_to_the_same_json() {
        let mut refused = Event::new(EventType::rest("search-type"), Action::Execute)
            .outcome(Outcome::of_status(403), Some("HTTP 403".into()))
            .user(Some("Practitioner/p1".into()));
        refused.query = Some("/Observation?code=a|b&name=Zoë\n".into());
        refused.purpose = vec!["BTG".into()];
        for body in [typical(), refused.to_text(), String::new(), "{}".into()] {
            let stored = pack(&body);
            assert!(stored.starts_with("~1"), "{stored}");
            assert_eq!(unpack(&stored).unwrap(), body);
        }
    }

    #[test]
    fn a_typical_entry_is_kept_in_a_fraction_of_its_json() {
        let body = typical();
        let stored = pack(&body);
        assert!(
            stored.len() * 4 < body.len(),
            "{} bytes packed from {}",
            stored.len(),
            body.len()
        );
    }

    #[test]
    fn bodies_kept_as_json_are_read_as_they_are() {
        let body = typical();
        assert!(matches!(unpack(&body), Ok(Cow::Borrowed(b)) if b == body));
    }

    #[test]
    fn damaged_bodies_are_refused_not_guessed() {
        let stored = pack(&typical());
        let cut = &stored[..stored.len() - 7];
        assert_eq!(unpack(cut), Err(Damaged));
        assert_eq!(unpack("~1!!!"), Err(Damaged));
        assert_eq!(unpack("~2AAAA"), Err(Damaged));
        assert_eq!(unpack(""), Err(Damaged));
        // A claimed size past the cap is not allocated.
        let huge = {
            let mut b = (u32::MAX).to_le_bytes().to_vec();
            b.extend_from_slice(&[0u8; 8]);
            format!(
                "~1{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)
            )
        };
        assert_eq!(unpack(&huge), Err(Damaged));
    }
}
