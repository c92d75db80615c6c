//! The CPU side of receiving a signed document, stage by stage, on the CCD
//! sample (`Documents_CCD_CCD_2_CCD.xml`, 48 kB) with its first section
//! encrypted for ehrx: parse + signature check (libxmlsec1), decryption,
//! C-CDA → FHIR mapping, and FHIR R4 validation of what was mapped. Storing
//! is measured end to end by `scripts/bench/exchange.sh`.
//!
//!     cargo bench --bench exchange
//!
//! Needs `../shared/data` beside the repository.

use criterion::{criterion_group, criterion_main, Criterion};
use ehrx::exchange::keys::{generate_exchange_key, Registered};
use ehrx::exchange::libxmlsec::SignatureAlgorithm;
use ehrx::exchange::{dsig, mapping, xenc, xml};

const CCD: &str = "../shared/data/ccda/hl7-c-cda-examples/Documents_CCD_CCD_2_CCD.xml";

/// Replaces the first `section` element by its encryption for `ehrx`.
fn encrypt_first_section(text: &str, ehrx: &openssl::pkey::PKey<openssl::pkey::Public>) -> String {
    let limits = xml::Limits::default();
    let doc = xml::parse(text, &limits).expect("the sample parses");
    let section = doc
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "section")
        .expect("a section");
    let range = section.range();
    let element = text[range.clone()].replacen("<section", "<section xmlns=\"urn:hl7-org:v3\"", 1);
    let encrypted = xenc::encrypt_element(&element, ehrx).expect("encrypts");
    format!(
        "{}{}{}",
        &text[..range.start],
        encrypted,
        &text[range.end..]
    )
}

fn stages(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CCD);
    let source = std::fs::read_to_string(&path).expect("../shared/data beside the repository");
    let ehrx = generate_exchange_key("CN=ehrx bench", 1).expect("key");
    let sender = generate_exchange_key("CN=Bench Hospital", 1).expect("key");
    let public =
        openssl::pkey::PKey::public_key_from_der(&ehrx.private.public_key_to_der().expect("DER"))
            .expect("the public key");
    let encrypted = encrypt_first_section(&source, &public);
    let signed =
        dsig::sign_enveloped(&encrypted, &sender, SignatureAlgorithm::RsaSha256).expect("signs");
    let registered = vec![Registered {
        organization_id: "bench".into(),
        cert: sender.cert.clone(),
        revoked: None,
    }];
    let limits = xml::Limits::default();
    let rules = mapping::Rules::load_default(None).expect("mappings/");
    let now = chrono::Utc::now();

    let verify = |text: &str| {
        let doc = xml::parse(text, &limits).expect("parses");
        xml::refuse_split_text(&doc).expect("no split text");
        let v = dsig::verify(&doc, &registered, now).expect("verifies");
        let r = v.signature_range.clone();
        format!("{}{}", &text[..r.start], &text[r.end..])
    };
    let unsigned = verify(&signed);
    let (plain, n) = xenc::decrypt_all(unsigned.clone(), &ehrx, &limits).expect("decrypts");
    assert_eq!(n, 1);

    let mut group = c.benchmark_group("exchange");
    group.sample_size(30);
    group.bench_function(
        "verify (parse, structure checks, libxmlsec1 RSA-SHA256)",
        |b| b.iter(|| verify(&signed)),
    );
    group.bench_function("decrypt (AES-256-GCM section, RSA-OAEP key)", |b| {
        b.iter(|| xenc::decrypt_all(unsigned.clone(), &ehrx, &limits).expect("decrypts"))
    });
    group.bench_function("map (C-CDA rules to FHIR resources)", |b| {
        b.iter(|| {
            let doc = xml::parse(&plain, &limits).expect("parses");
            mapping::map_document(&doc, &rules, "Organization/bench").expect("maps")
        })
    });
    let doc = xml::parse(&plain, &limits).expect("parses");
    let mapped = mapping::map_document(&doc, &rules, "Organization/bench").expect("maps");
    group.bench_function("validate (every mapped resource as FHIR R4)", |b| {
        b.iter(|| {
            for r in &mapped.resources {
                ehrx::fhir::codec::validate_json(r.resource.clone()).expect("valid R4");
            }
        })
    });
    group.bench_function("all stages", |b| {
        b.iter(|| {
            let unsigned = verify(&signed);
            let (plain, _) = xenc::decrypt_all(unsigned, &ehrx, &limits).expect("decrypts");
            let doc = xml::parse(&plain, &limits).expect("parses");
            let m = mapping::map_document(&doc, &rules, "Organization/bench").expect("maps");
            for r in &m.resources {
                ehrx::fhir::codec::validate_json(r.resource.clone()).expect("valid R4");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
