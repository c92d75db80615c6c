//! The floor for `scripts/bench/peer.sh`: a bare axum server on the same
//! multi-threaded tokio runtime as ehrx, answering `GET /Patient/{id}` with a
//! fixed Patient of about 1 KB as `application/fhir+json`. No database, no
//! authorization, no parsing: what is left is HTTP/1.1 and routing.
//!
//!     cargo build --release --example bare_axum
//!     target/release/examples/bare_axum 127.0.0.1:18090

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;

/// A Synthea-like Patient (1,018 bytes), the same bytes for every id.
const PATIENT: &str = concat!(
    r#"{"resourceType":"Patient","id":"bare","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00Z","#,
    r#""profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},"#,
    r#""identifier":[{"system":"https://github.com/synthetichealth/synthea","value":"0724714f-947b-6cab-ee85-b0de7a9ad3f7"},"#,
    r#"{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR","display":"Medical Record Number"}],"text":"Medical Record Number"},"#,
    r#""system":"http://hospital.smarthealthit.org","value":"0724714f-947b-6cab-ee85-b0de7a9ad3f7"}],"#,
    r#""name":[{"use":"official","family":"Koelpin146","given":["Carolyne559"],"prefix":["Mrs."]}],"#,
    r#""telecom":[{"system":"phone","value":"555-716-2384","use":"home"}],"gender":"female","birthDate":"1961-04-26","#,
    r#""address":[{"line":["862 Hermann Grove"],"city":"Boston","state":"MA","postalCode":"02108","country":"US"}],"#,
    r#""maritalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"M","display":"M"}],"text":"M"},"#,
    r#""multipleBirthBoolean":false}"#
);

async fn patient() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(CONTENT_TYPE, "application/fhir+json")], PATIENT)
}

fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18090".into());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let app = Router::new().route("/Patient/{id}", get(patient));
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            axum::serve(listener, app).await
        })
}
