//! The signed-XML exchange, end to end: keys made with `openssl`, documents
//! signed and encrypted by the `xmlsec1` command-line tool (libxmlsec1, an
//! independent implementation), subscribers registered with the `ehrx`
//! binary, documents posted to a real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{data_dir, TestServer};
use serde_json::Value;

const CCD: &str = "ccda/hl7-c-cda-examples/Documents_CCD_CCD_2_CCD.xml";
const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
const C14N: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A signing identity made with openssl: private key and self-signed certificate.
struct Signer {
    key: PathBuf,
    cert: PathBuf,
    ecdsa: bool,
}

/// A scratch folder for keys and documents.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        Work {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rsa(&self, name: &str) -> Signer {
        let (key, cert) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.pem")),
        );
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-subj", &format!("/CN={name}/O=Test Hospital")]));
        Signer {
            key,
            cert,
            ecdsa: false,
        }
    }

    fn ecdsa(&self, name: &str) -> Signer {
        let (key, cert) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.pem")),
        );
        run(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&key));
        run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-days", "30", "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-subj", &format!("/CN={name}/O=Test Lab")]));
        Signer {
            key,
            cert,
            ecdsa: true,
        }
    }

    /// An RSA certificate whose validity ended in 2021 (made with `openssl ca`).
    fn expired(&self, name: &str) -> Signer {
        let ca = self.path("ca");
        std::fs::create_dir_all(&ca).unwrap();
        std::fs::write(ca.join("index.txt"), "").unwrap();
        std::fs::write(ca.join("serial"), "01\n").unwrap();
        std::fs::write(
            ca.join("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
             default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
        )
        .unwrap();
        let key = self.path(&format!("{name}.key"));
        let cert = self.path(&format!("{name}.pem"));
        run(Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(ca.join("req.csr"))
            .args(["-subj", &format!("/CN={name}")]));
        run(Command::new("openssl")
            .current_dir(&ca)
            .args([
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-selfsign",
                "-keyfile",
            ])
            .arg(&key)
            .args(["-in", "req.csr", "-out"])
            .arg(&cert)
            .args([
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20210101000000Z",
            ]));
        Signer {
            key,
            cert,
            ecdsa: false,
        }
    }

    /// Signs `xml` with `xmlsec1`: an enveloped signature as the last child of
    /// the document element, over `reference` (`""` or `#id`).
    fn sign_with(&self, xml: &str, s: &Signer, c14n: &str, reference: &str) -> String {
        let alg = if s.ecdsa {
            "ecdsa-sha256"
        } else {
            "rsa-sha256"
        };
        let template = format!(
            "<ds:Signature xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\"><ds:SignedInfo>\
             <ds:CanonicalizationMethod Algorithm=\"{c14n}\"/>\
             <ds:SignatureMethod Algorithm=\"http://www.w3.org/2001/04/xmldsig-more#{alg}\"/>\
             <ds:Reference URI=\"{reference}\"><ds:Transforms>\
             <ds:Transform Algorithm=\"http://www.w3.org/2000/09/xmldsig#enveloped-signature\"/>\
             <ds:Transform Algorithm=\"{c14n}\"/></ds:Transforms>\
             <ds:DigestMethod Algorithm=\"http://www.w3.org/2001/04/xmlenc#sha256\"/>\
             <ds:DigestValue/></ds:Reference></ds:SignedInfo><ds:SignatureValue/>\
             <ds:KeyInfo><ds:X509Data/></ds:KeyInfo></ds:Signature>"
        );
        let close = xml.rfind("</").unwrap();
        let doc = format!("{}{template}{}", &xml[..close], &xml[close..]);
        let (input, output) = (self.path("to-sign.xml"), self.path("signed.xml"));
        std::fs::write(&input, doc).unwrap();
        let mut cmd = Command::new("xmlsec1");
        cmd.arg("--sign")
            .arg("--privkey-pem")
            .arg(format!("{},{}", s.key.display(), s.cert.display()))
            .args(["--id-attr:ID", "ClinicalDocument", "--output"])
            .arg(&output)
            .arg(&input);
        run(&mut cmd);
        std::fs::read_to_string(output).unwrap()
    }

    fn sign(&self, xml: &str, s: &Signer) -> String {
        self.sign_with(xml, s, EXC_C14N, "")
    }

    /// Encrypts the element `xpath` of `xml` with `xmlsec1` for `cert`
    /// (AES-128-GCM content key, RSA-OAEP key transport).
    fn encrypt(&self, xml: &str, xpath: &str, cert: &Path, aes: &str) -> String {
        let element = "http://www.w3.org/2001/04/xmlenc#Element";
        self.encrypt_with(xml, xpath, cert, aes, element)
    }

    /// As [`Work::encrypt`], with the EncryptedData `Type` (Element or Content).
    fn encrypt_with(&self, xml: &str, xpath: &str, cert: &Path, aes: &str, ty: &str) -> String {
        let template = format!(
            "<xenc:EncryptedData xmlns:xenc=\"http://www.w3.org/2001/04/xmlenc#\" Type=\"{ty}\">\
             <xenc:EncryptionMethod Algorithm=\"http://www.w3.org/2009/xmlenc11#{aes}-gcm\"/>\
             <ds:KeyInfo xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\"><xenc:EncryptedKey>\
             <xenc:EncryptionMethod Algorithm=\"http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p\"/>\
             <xenc:CipherData><xenc:CipherValue/></xenc:CipherData></xenc:EncryptedKey></ds:KeyInfo>\
             <xenc:CipherData><xenc:CipherValue/></xenc:CipherData></xenc:EncryptedData>"
        );
        let (tmpl, data, out) = (
            self.path("enc-tmpl.xml"),
            self.path("enc-data.xml"),
            self.path("encrypted.xml"),
        );
        std::fs::write(&tmpl, template).unwrap();
        std::fs::write(&data, xml).unwrap();
        let key_size = if aes == "aes128" {
            "aes-128"
        } else {
            "aes-256"
        };
        run(Command::new("xmlsec1")
            .arg("--encrypt")
            .arg("--pubkey-cert-pem")
            .arg(cert)
            .args(["--session-key", key_size, "--xml-data"])
            .arg(&data)
            .args(["--node-xpath", xpath, "--output"])
            .arg(&out)
            .arg(&tmpl));
        std::fs::read_to_string(out).unwrap()
    }
}

/// The `ehrx` binary against the test server's database.
fn ehrx(server: &TestServer) -> Command {
    server.ehrx()
}

/// `ehrx subscriber add`; returns its JSON answer.
fn add_subscriber(server: &TestServer, name: &str, kind: &str, s: &Signer) -> Value {
    add_subscriber_with(server, name, kind, s, &[])
}

fn add_subscriber_with(
    server: &TestServer,
    name: &str,
    kind: &str,
    s: &Signer,
    extra: &[&str],
) -> Value {
    let out = run(ehrx(server)
        .args([
            "subscriber",
            "add",
            "--name",
            name,
            "--kind",
            kind,
            "--cert",
        ])
        .arg(&s.cert)
        .args(["--endpoint", "https://example.org/exchange"])
        .args(extra));
    serde_json::from_str(&out).unwrap()
}

fn ccd() -> String {
    std::fs::read_to_string(data_dir().join(CCD)).unwrap()
}

async fn post_xml(server: &TestServer, body: &str) -> (u16, Value) {
    let r = server
        .client
        .post(server.url("exchange/documents"))
        .header("Content-Type", "application/xml")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn part<'a>(params: &'a Value, name: &str) -> &'a Value {
    params["parameter"]
        .as_array()
        .unwrap_or_else(|| panic!("not Parameters: {params}"))
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no part {name} in {params}"))
}

/// Posts `body`, expects a refusal with `status` whose diagnostics contain
/// `says`, and checks nothing was stored.
async fn assert_refused(server: &TestServer, body: &str, status: u16, says: &str) -> Value {
    let before = server.history_len().await;
    let (got, outcome) = post_xml(server, body).await;
    assert_eq!(got, status, "{outcome}");
    let issue = common::first_issue(&outcome);
    assert_eq!(issue["severity"], "error", "{outcome}");
    let diagnostics = issue["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains(says),
        "expected '{says}' in '{diagnostics}'"
    );
    assert_eq!(server.history_len().await, before, "nothing stored");
    outcome
}

async fn search(server: &TestServer, query: &str) -> Value {
    let r = server.get(query).await;
    assert_eq!(r.status(), 200, "{query}");
    r.json().await.unwrap()
}

fn total(bundle: &Value) -> i64 {
    bundle["total"].as_i64().unwrap()
}

/// Entries of the source document whose template the rules map.
fn count_template(xml: &str, oid: &str) -> i64 {
    xml.matches(&format!("templateId root=\"{oid}\"")).count() as i64
}

#[tokio::test]
async fn rsa_signed_ccda_is_verified_mapped_and_stored_once() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("General Hospital signing");
    let added = add_subscriber(&server, "General Hospital", "hospital", &signer);
    let org = added["organization"].as_str().unwrap().to_string();
    assert!(added["endpoint"].as_str().unwrap().starts_with("Endpoint/"));
    // An entry of a template no rule maps, in the first section.
    let mut source = ccd();
    let body = source.find("<structuredBody>").unwrap();
    let at = body + source[body..].find("</text>").unwrap() + "</text>".len();
    source.insert_str(
        at,
        "<entry><act classCode=\"ACT\" moodCode=\"EVN\">\
         <templateId root=\"2.16.840.1.113883.10.20.22.4.999\"/><code nullFlavor=\"UNK\"/></act></entry>",
    );
    let signed = work.sign(&source, &signer);

    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    let result = &part(&answer, "result")["resource"];
    assert_eq!(result["type"], "transaction-response");
    let outcome = &part(&answer, "outcome")["resource"];
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    // What no rule maps is reported with its XPath, not dropped.
    let warnings: Vec<&Value> = outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["severity"] == "warning")
        .collect();
    assert_eq!(warnings.len(), 1, "{outcome}");
    assert_eq!(
        warnings[0]["expression"][0],
        "/ClinicalDocument/component/structuredBody/component[1]/section/entry[1]"
    );
    let d = warnings[0]["diagnostics"].as_str().unwrap();
    assert!(
        d.contains("entry not mapped") && d.contains("2.16.840.1.113883.10.20.22.4.999"),
        "{d}"
    );

    // The patient of the header.
    let patients = search(&server, "Patient?family=Jones&birthdate=1950-12-19").await;
    assert_eq!(total(&patients), 1, "{patients}");
    let patient = &patients["entry"][0]["resource"];
    assert_eq!(patient["name"][0]["given"][0], "Isabella");
    assert_eq!(patient["gender"], "female");
    let pid = patient["id"].as_str().unwrap();

    // The entries, by template, as FHIR resources of the patient.
    let count = |rtype: &'static str, extra: &'static str| {
        let q = format!("{rtype}?patient={pid}{extra}&_count=0");
        let server = &server;
        async move { total(&search(server, &q).await) }
    };
    let p = "2.16.840.1.113883.10.20.22.4.";
    assert_eq!(
        count("Condition", "").await,
        count_template(&source, &format!("{p}4"))
    );
    assert_eq!(
        count("AllergyIntolerance", "").await,
        count_template(&source, &format!("{p}7"))
    );
    assert_eq!(
        count("Observation", "&category=vital-signs").await,
        count_template(&source, &format!("{p}27"))
    );
    assert_eq!(
        count("Observation", "&category=laboratory").await,
        count_template(&source, &format!("{p}2"))
    );
    assert_eq!(
        count("MedicationStatement", "").await,
        count_template(&source, &format!("{p}16"))
    );
    assert_eq!(
        count("Immunization", "").await,
        count_template(&source, &format!("{p}52"))
    );
    assert!(count("Procedure", "").await >= 1);
    let compositions = search(&server, &format!("Composition?patient={pid}")).await;
    assert_eq!(total(&compositions), 1);
    let composition = &compositions["entry"][0]["resource"];
    let sections = composition["section"].as_array().unwrap();
    assert!(sections.len() >= 5);
    assert!(sections
        .iter()
        .any(|s| s["text"]["div"].as_str().unwrap_or("").contains("<table")));

    // The original, its DocumentReference and the Provenance of it all.
    let docs = search(&server, &format!("DocumentReference?patient={pid}")).await;
    assert_eq!(total(&docs), 1);
    let docref = &docs["entry"][0]["resource"];
    let binary_ref = docref["content"][0]["attachment"]["url"].as_str().unwrap();
    assert!(binary_ref.starts_with("Binary/"), "{docref}");
    let binary: Value = server
        .client
        .get(server.url(binary_ref))
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    use base64::Engine as _;
    let original = base64::engine::general_purpose::STANDARD
        .decode(binary["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(original, signed.as_bytes(), "the signed original is kept");
    let provenances = search(&server, "Provenance?_count=10").await;
    assert_eq!(total(&provenances), 1);
    let prov = &provenances["entry"][0]["resource"];
    assert_eq!(prov["agent"][0]["who"]["reference"], org);
    let targets: Vec<&str> = prov["target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reference"].as_str().unwrap())
        .collect();
    assert!(targets.contains(&format!("Patient/{pid}").as_str()));
    assert!(targets.iter().any(|t| t.starts_with("DocumentReference/")));
    assert!(targets.iter().any(|t| t.starts_with("Binary/")));
    assert!(targets.iter().all(|t| !t.starts_with("urn:")));
    let sig = &prov["signature"][0];
    assert!(sig["who"]["display"]
        .as_str()
        .unwrap()
        .contains("General Hospital signing"));
    let fingerprint = added["certificate"]["fingerprint"].as_str().unwrap();
    assert!(sig["extension"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["valueString"] == fingerprint));

    // Resubmission: nothing new.
    let before = server.history_len().await;
    let (status, again) = post_xml(&server, &signed).await;
    assert_eq!(status, 200, "{again}");
    assert!(
        part(&again, "documentReference")["valueReference"]["reference"]
            .as_str()
            .unwrap()
            .starts_with("DocumentReference/")
    );
    assert_eq!(server.history_len().await, before);
    server.stop().await;
}

#[tokio::test]
async fn ecdsa_signed_with_inclusive_c14n_and_id_reference_is_accepted() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.ecdsa("Central Lab signing");
    add_subscriber(&server, "Central Lab", "lab", &signer);
    let source = ccd().replacen("<ClinicalDocument ", "<ClinicalDocument ID=\"ccd2\" ", 1);
    let signed = work.sign_with(&source, &signer, C14N, "#ccd2");
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(total(&search(&server, "Patient?family=Jones").await), 1);
    // Exclusive c14n with ECDSA too: another document of the same patient.
    let signed = work.sign(&ccd().replace("<title>", "<title>Second "), &signer);
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(server.count("Composition").await, 2);
    assert_eq!(
        server.count("Patient").await,
        1,
        "the patient is matched by identifier"
    );
    server.stop().await;
}

#[tokio::test]
async fn element_encrypted_for_ehrx_is_decrypted_and_mapped() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Radiology signing");
    add_subscriber(&server, "Radiology Centre", "radiology", &signer);
    // ehrx's exchange certificate, as `ehrx exchange-cert` prints it.
    let pem = run(ehrx(&server).arg("exchange-cert"));
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let ehrx_cert = work.path("ehrx.pem");
    std::fs::write(&ehrx_cert, &pem).unwrap();
    // The same certificate every time (generated once, kept in the database).
    assert_eq!(run(ehrx(&server).arg("exchange-cert")), pem);
    let x = "/*/*[local-name()='recordTarget']";
    let encrypted = work.encrypt(&ccd(), x, &ehrx_cert, "aes128");
    assert!(encrypted.contains("EncryptedData") && !encrypted.contains("Isabella"));
    let signed = work.sign(&encrypted, &signer);
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    let patients = search(&server, "Patient?given=Isabella").await;
    assert_eq!(total(&patients), 1);
    let outcome = part(&answer, "outcome")["resource"].to_string();
    assert!(
        outcome.contains("1 encrypted element(s) decrypted"),
        "{outcome}"
    );

    // AES-256-GCM, a section encrypted.
    let x = "(//*[local-name()='section'])[1]";
    let encrypted = work.encrypt(
        &ccd().replace("<title>", "<title>Second "),
        x,
        &ehrx_cert,
        "aes256",
    );
    let signed = work.sign(&encrypted, &signer);
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(server.count("Composition").await, 2);

    // Type Content: the children of an element.
    let content = work.encrypt_with(
        &ccd().replace("<title>", "<title>Content "),
        "/*/*[local-name()='recordTarget']",
        &ehrx_cert,
        "aes256",
        "http://www.w3.org/2001/04/xmlenc#Content",
    );
    assert!(
        content.contains("<recordTarget><xenc:EncryptedData"),
        "{content}"
    );
    let (status, answer) = post_xml(&server, &work.sign(&content, &signer)).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(server.count("Composition").await, 3);

    // RSA-OAEP with SHA-256 digest and MGF1-SHA-256 (XML-Enc 1.1), which
    // Debian's xmlsec1 1.2 cannot make: encrypted by Python's `cryptography`.
    let source = ccd().replace("<title>", "<title>OAEP-256 ");
    let start = source.find("<recordTarget").unwrap();
    let end = source.find("</recordTarget>").unwrap() + "</recordTarget>".len();
    let element = source[start..end].replacen(
        "<recordTarget",
        "<recordTarget xmlns=\"urn:hl7-org:v3\" xmlns:sdtc=\"urn:hl7-org:sdtc\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"",
        1,
    );
    let element_file = work.path("element.xml");
    std::fs::write(&element_file, element).unwrap();
    let encrypted_data = run(Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/xenc_oaep_sha256.py"))
        .arg(&ehrx_cert)
        .arg(&element_file));
    assert!(encrypted_data.contains("mgf1sha256"), "{encrypted_data}");
    let encrypted = format!("{}{}{}", &source[..start], encrypted_data, &source[end..]);
    assert!(!encrypted.contains("Isabella"));
    let (status, answer) = post_xml(&server, &work.sign(&encrypted, &signer)).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(server.count("Composition").await, 4);
    let patients = search(&server, "Patient?given=Isabella").await;
    assert_eq!(
        total(&patients),
        1,
        "the decrypted patient is matched, not duplicated"
    );

    // Encrypted for a key ehrx does not hold: refused, nothing stored.
    let other = work.rsa("Somebody else");
    let encrypted = work.encrypt(
        &ccd().replace("<title>", "<title>Third "),
        x,
        &other.cert,
        "aes128",
    );
    let signed = work.sign(&encrypted, &signer);
    let outcome = assert_refused(
        &server,
        &signed,
        422,
        "was not encrypted for ehrx's exchange certificate",
    )
    .await;
    assert!(outcome["issue"][0]["expression"][0]
        .as_str()
        .unwrap()
        .contains("EncryptedKey"));
    server.stop().await;
}

#[tokio::test]
async fn unsigned_and_unregistered_documents_are_refused() {
    let server = TestServer::start().await;
    let work = Work::new();
    let registered = work.rsa("Registered");
    add_subscriber(&server, "Registered Hospital", "hospital", &registered);
    assert_refused(&server, &ccd(), 403, "the document is not signed").await;
    let stranger = work.rsa("Stranger");
    let signed = work.sign(&ccd(), &stranger);
    assert_refused(
        &server,
        &signed,
        403,
        "is not registered for any subscriber",
    )
    .await;
    // Without KeyInfo, the signer is not named: refused, even though the
    // signature was made with a registered key.
    let by_registered = work.sign(&ccd(), &registered);
    let start = by_registered.find("<ds:KeyInfo>").unwrap();
    let end = by_registered.find("</ds:KeyInfo>").unwrap() + "</ds:KeyInfo>".len();
    let bare = format!("{}{}", &by_registered[..start], &by_registered[end..]);
    assert_refused(
        &server,
        &bare,
        403,
        "ds:KeyInfo must carry the signer's certificate",
    )
    .await;
    // Two signatures.
    let good = work.sign(&ccd(), &registered);
    let sig_start = good.find("<ds:Signature").unwrap();
    let sig_end = good.find("</ds:Signature>").unwrap() + "</ds:Signature>".len();
    let sig = &good[sig_start..sig_end];
    let twice = format!("{}{sig}{}", &good[..sig_end], &good[sig_end..]);
    assert_refused(&server, &twice, 403, "carries 2 ds:Signature elements").await;
    server.stop().await;
}

#[tokio::test]
async fn expired_and_revoked_certificates_are_refused() {
    let server = TestServer::start().await;
    let work = Work::new();
    let expired = work.expired("Expired Clinic");
    add_subscriber(&server, "Expired Clinic", "hospital", &expired);
    let signed = work.sign(&ccd(), &expired);
    assert_refused(&server, &signed, 403, "not now").await;

    let signer = work.ecdsa("Pharmacy signing");
    let added = add_subscriber(&server, "Corner Pharmacy", "pharmacy", &signer);
    let fingerprint = added["certificate"]["fingerprint"].as_str().unwrap();
    let signed = work.sign(&ccd(), &signer);
    run(ehrx(&server).args(["subscriber", "revoke-cert", "--fingerprint", fingerprint]));
    assert_refused(&server, &signed, 403, "was revoked").await;

    // A rotated-in certificate signs for the same organisation.
    let org = added["organization"].as_str().unwrap();
    let next = work.rsa("Pharmacy signing 2");
    run(ehrx(&server)
        .args(["subscriber", "rotate-cert", "--organization", org, "--cert"])
        .arg(&next.cert));
    let list: Value =
        serde_json::from_str(&run(ehrx(&server).args(["subscriber", "list"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let (status, answer) = post_xml(&server, &work.sign(&ccd(), &next)).await;
    assert_eq!(status, 201, "{answer}");
    let prov = search(&server, "Provenance").await;
    assert_eq!(
        prov["entry"][0]["resource"]["agent"][0]["who"]["reference"],
        org
    );
    server.stop().await;
}

#[tokio::test]
async fn a_changed_character_in_a_signed_element_is_refused() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Tamper test");
    add_subscriber(&server, "Hospital", "hospital", &signer);
    let signed = work.sign(&ccd(), &signer);
    let tampered = signed.replacen(
        "<family qualifier=\"SP\">Jones</family>",
        "<family qualifier=\"SP\">Jonas</family>",
        1,
    );
    assert_ne!(tampered, signed);
    let outcome = assert_refused(&server, &tampered, 403, "does not match its signature").await;
    assert!(outcome["issue"][0]["expression"][0]
        .as_str()
        .unwrap()
        .ends_with("ds:DigestValue"));
    // An attribute value changed.
    let tampered = signed.replacen("value=\"19501219\"", "value=\"19501218\"", 1);
    assert_ne!(tampered, signed);
    assert_refused(&server, &tampered, 403, "does not match its signature").await;
    // The signature value changed.
    let i = signed.find("<ds:SignatureValue>").unwrap() + "<ds:SignatureValue>".len();
    let mut bytes = signed.clone().into_bytes();
    bytes[i + 5] = if bytes[i + 5] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_refused(&server, &tampered, 403, "signature value does not verify").await;
    server.stop().await;
}

#[tokio::test]
async fn a_comment_in_a_signed_text_node_is_refused() {
    // c14n without comments (what XML-DSig references to the same document
    // use) does not see comments, so the signature still verifies; a parser
    // that stops at the comment would read "Jo". ehrx refuses the document.
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Comment test");
    add_subscriber(&server, "Hospital", "hospital", &signer);
    let signed = work.sign(&ccd(), &signer);
    let commented = signed.replacen(
        "<family qualifier=\"SP\">Jones</family>",
        "<family qualifier=\"SP\">Jo<!---->nes</family>",
        1,
    );
    assert_ne!(commented, signed);
    let before = total(&search(&server, "Patient?_summary=count").await);
    let (status, answer) = post_xml(&server, &commented).await;
    assert_eq!(status, 403, "{answer}");
    let text = answer.to_string();
    assert!(text.contains("comment splits the text"), "{answer}");
    assert!(
        text.contains("family"),
        "the OperationOutcome names where: {answer}"
    );
    assert_eq!(
        total(&search(&server, "Patient?_summary=count").await),
        before,
        "nothing stored"
    );
    // The same document without the comment is accepted.
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn xml_signature_wrapping_variants_are_refused() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("XSW test");
    add_subscriber(&server, "Hospital", "hospital", &signer);
    let source = ccd().replacen("<ClinicalDocument ", "<ClinicalDocument ID=\"orig\" ", 1);
    let by_uri = work.sign(&source, &signer);
    let by_id = work.sign_with(&source, &signer, EXC_C14N, "#orig");
    let split = |signed: &str| {
        let open = signed.find("<ClinicalDocument ").unwrap();
        let body = signed[open..].to_string();
        let s = body.find("<ds:Signature").unwrap();
        let e = body.find("</ds:Signature>").unwrap() + "</ds:Signature>".len();
        let signature = body[s..e].to_string();
        let unsigned = format!("{}{}", &body[..s], &body[e..]);
        (body, signature, unsigned)
    };
    let close = |xml: &str| xml.rfind("</ClinicalDocument>").unwrap();
    let (orig_id, sig_id, unsigned_id) = split(&by_id);
    let (orig_uri, _sig_uri, _) = split(&by_uri);
    // A document of the attacker's own making, to be passed off as signed.
    let ev = "<ClinicalDocument xmlns=\"urn:hl7-org:v3\" xmlns:sdtc=\"urn:hl7-org:sdtc\" ID=\"evil\">\
              <recordTarget><patientRole><id root=\"1.2.3\" extension=\"666\"/><patient><name>\
              <family>Evil</family></name></patient></patientRole></recordTarget></ClinicalDocument>"
        .to_string();
    let variants: Vec<(&str, String, &str)> = vec![
        (
            // The signed original moved into the signature's ds:Object; an
            // evil document around it names it by ID.
            "XSW1 original in ds:Object",
            {
                let sig = sig_id.replace(
                    "</ds:Signature>",
                    &format!("<ds:Object>{unsigned_id}</ds:Object></ds:Signature>"),
                );
                format!("{}{sig}{}", &ev[..close(&ev)], &ev[close(&ev)..])
            },
            "ds:Object is not accepted",
        ),
        (
            "XSW2 signed original nested in an evil document",
            format!("{}{orig_id}{}", &ev[..close(&ev)], &ev[close(&ev)..]),
            "ds:Signature must be a child of the document element",
        ),
        (
            "XSW3 evil document with the same ID carrying the signature",
            {
                let ev_same = unsigned_id.replace(
                    "<family qualifier=\"SP\">Jones</family>",
                    "<family qualifier=\"SP\">Evil</family>",
                );
                format!(
                    "{}{sig_id}<component>{unsigned_id}</component>{}",
                    &ev_same[..close(&ev_same)],
                    &ev_same[close(&ev_same)..]
                )
            },
            "is used by more than one element",
        ),
        (
            "XSW4 evil document carrying the signature, the original elsewhere inside",
            format!(
                "{}{sig_id}<component>{}</component>{}",
                &ev[..close(&ev)],
                unsigned_id,
                &ev[close(&ev)..]
            ),
            "does not name the document element",
        ),
        (
            "XSW5 signature copied into an evil document whose ID differs",
            format!("{}{sig_id}{}", &ev[..close(&ev)], &ev[close(&ev)..]),
            "does not name the document element",
        ),
        (
            "XSW6 original inside ds:Object, signature carried by the evil root",
            {
                let sig = sig_id.replace(
                    "</ds:SignatureValue>",
                    &format!("</ds:SignatureValue><ds:Object>{unsigned_id}</ds:Object>"),
                );
                let e2 = unsigned_id.replace(
                    "<family qualifier=\"SP\">Jones</family>",
                    "<family qualifier=\"SP\">Evil</family>",
                );
                format!("{}{sig}{}", &e2[..close(&e2)], &e2[close(&e2)..])
            },
            "is used by more than one element",
        ),
        (
            "XSW7 original wrapped in an extension element of the evil document",
            format!(
                "{}<sdtc:extension>{unsigned_id}</sdtc:extension>{sig_id}{}",
                &ev[..close(&ev)],
                &ev[close(&ev)..]
            ),
            "does not name the document element",
        ),
        (
            "XSW8 URI=\"\" signature, the evil content after the signed document",
            {
                let (head, tail) = orig_uri.split_at(close(&orig_uri));
                format!("{head}<component><section><title>Evil</title></section></component>{tail}")
            },
            "does not match its signature",
        ),
    ];
    for (name, body, says) in variants {
        let before = server.history_len().await;
        let (status, outcome) = post_xml(&server, &body).await;
        assert_eq!(status, 403, "{name}: {outcome}");
        let d = common::first_issue(&outcome)["diagnostics"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(d.contains(says), "{name}: expected '{says}' in '{d}'");
        assert_eq!(server.history_len().await, before, "{name}: nothing stored");
    }
    assert_eq!(server.count("Patient").await, 0);
    server.stop().await;
}

#[tokio::test]
async fn dtds_entities_and_oversize_documents_are_refused() {
    let server = TestServer::start_authorized(|c| c.exchange_max_document_bytes = 40_000).await;
    let xxe = "<?xml version=\"1.0\"?>\n<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>\
               <ClinicalDocument xmlns=\"urn:hl7-org:v3\"><title>&xxe;</title></ClinicalDocument>";
    let o = assert_refused(&server, xxe, 400, "<!DOCTYPE").await;
    assert_eq!(o["issue"][0]["code"], "security");
    let laughs = "<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [<!ENTITY lol \"lol\">\
                  <!ENTITY lol2 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">\
                  <!ENTITY lol3 \"&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;\">]>\
                  <lolz>&lol3;</lolz>";
    assert_refused(&server, laughs, 400, "<!DOCTYPE").await;
    // An undeclared entity without a DTD.
    let undeclared =
        "<ClinicalDocument xmlns=\"urn:hl7-org:v3\"><title>&ent;</title></ClinicalDocument>";
    assert_refused(&server, undeclared, 400, "undeclared entity").await;
    // Nesting too deep.
    let deep = format!("{}{}", "<a>".repeat(1000), "</a>".repeat(1000));
    assert_refused(&server, &deep, 400, "deeper than the limit").await;
    // Over the configured limit (the CCD is about 48 kB).
    let o = assert_refused(
        &server,
        &ccd(),
        413,
        "exceeds the exchange limit of 40000 bytes",
    )
    .await;
    assert_eq!(o["issue"][0]["code"], "too-costly");
    server.stop().await;
}

/// Elements of `doc` carrying templateId `oid` (an element with the template
/// twice, e.g. with two versions, counts once).
fn elements_with_template(doc: &roxmltree::Document, oid: &str) -> usize {
    doc.descendants()
        .filter(|n| {
            n.children().any(|c| {
                c.is_element()
                    && c.tag_name().name() == "templateId"
                    && c.attribute("root") == Some(oid)
            })
        })
        .count()
}

#[tokio::test]
async fn every_sample_ccda_maps_to_valid_resources_or_is_refused_as_not_namespace_well_formed() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Sample sender");
    add_subscriber(&server, "Sample sender", "hospital", &signer);
    let mut files: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(data_dir().join("ccda/hl7-c-cda-examples")).unwrap() {
        files.push(e.unwrap().path());
    }
    files.sort();
    assert_eq!(files.len(), 30);
    let p = "2.16.840.1.113883.10.20.22.4.";
    let mut mapped = 0;
    for (i, file) in files.iter().enumerate() {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let source = std::fs::read_to_string(file).unwrap();
        // Exclusive and inclusive c14n in turn: both interoperate with libxmlsec1.
        let c14n = if i % 2 == 0 { EXC_C14N } else { C14N };
        let signed = work.sign_with(&source, &signer, c14n, "");
        let (status, answer) = post_xml(&server, &signed).await;
        if std::env::var("EXCHANGE_SAMPLES_REPORT").is_ok() && status != 201 {
            eprintln!(
                "{name}: {status} {}",
                common::first_issue(&answer)["diagnostics"]
            );
            continue;
        }
        let parsed = roxmltree::Document::parse(&source);
        let Ok(doc) = parsed else {
            // Published with the `xsi:` prefix undeclared: not namespace-well-formed.
            assert_eq!(status, 400, "{name}: {answer}");
            let d = common::first_issue(&answer)["diagnostics"].to_string();
            assert!(
                d.contains("not well-formed") && d.contains("xsi"),
                "{name}: {d}"
            );
            continue;
        };
        if doc.root_element().tag_name().namespace().is_none() {
            // Guide fragments without the CDA namespace.
            assert_eq!(status, 400, "{name}: {answer}");
            let d = common::first_issue(&answer)["diagnostics"].to_string();
            assert!(d.contains("not in the HL7 v3 namespace"), "{name}: {d}");
            continue;
        }
        assert_eq!(status, 201, "{name}: {answer}");
        mapped += 1;
        let result = &part(&answer, "result")["resource"];
        let created = |rtype: &str| {
            result["entry"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| {
                    e["response"]["location"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with(&format!("{rtype}/"))
                })
                .count()
        };
        for (rtype, oid, what) in [
            ("Condition", "4", "problems"),
            ("AllergyIntolerance", "7", "allergies"),
            ("Immunization", "52", "immunizations"),
        ] {
            assert_eq!(
                created(rtype),
                elements_with_template(&doc, &format!("{p}{oid}")),
                "{name}: {what}"
            );
        }
        // Medication activities: taken (MedicationStatement) or intended (MedicationRequest).
        assert_eq!(
            created("MedicationStatement") + created("MedicationRequest"),
            elements_with_template(&doc, &format!("{p}16")),
            "{name}: medications"
        );
        // Results: one DiagnosticReport per result organizer, one Observation
        // per result, vital sign, social history and smoking status entry.
        assert_eq!(
            created("DiagnosticReport"),
            elements_with_template(&doc, &format!("{p}1")),
            "{name}: result organizers"
        );
        let observations = elements_with_template(&doc, &format!("{p}2"))
            + elements_with_template(&doc, &format!("{p}27"))
            + elements_with_template(&doc, &format!("{p}38"))
            + elements_with_template(&doc, &format!("{p}78"));
        assert_eq!(created("Observation"), observations, "{name}: observations");
        // The patient: name and birth date as in the header.
        let patient_el = doc.descendants().find(|n| {
            n.tag_name().name() == "patient"
                && n.parent().map(|p| p.tag_name().name()) == Some("patientRole")
        });
        let location = result["entry"]
            .as_array()
            .unwrap()
            .iter()
            // A patient matched by identifier to one stored before keeps its data.
            .filter(|e| {
                e["response"]["status"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("201")
            })
            .filter_map(|e| e["response"]["location"].as_str())
            .find(|l| l.starts_with("Patient/"))
            .map(|l| l.split("/_history").next().unwrap().to_string());
        let (Some(patient_el), Some(location)) = (patient_el, location) else {
            continue;
        };
        let patient: Value = server.get(&location).await.json().await.unwrap();
        let family = patient_el
            .descendants()
            .find(|n| n.tag_name().name() == "family")
            .and_then(|n| n.text())
            .map(str::trim);
        if let Some(family) = family.filter(|f| !f.is_empty()) {
            assert!(
                patient["name"].to_string().contains(family),
                "{name}: family {family} in {}",
                patient["name"]
            );
        }
        let birth = patient_el
            .descendants()
            .find(|n| n.tag_name().name() == "birthTime")
            .and_then(|n| n.attribute("value"));
        if let Some(b) = birth.filter(|b| b.len() >= 8) {
            assert_eq!(
                patient["birthDate"],
                format!("{}-{}-{}", &b[..4], &b[4..6], &b[6..8]),
                "{name}"
            );
        }
    }
    assert_eq!(mapped, 20, "documents mapped");
    server.stop().await;
}

#[tokio::test]
async fn signed_document_out_verifies_and_decrypts_with_xmlsec1() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Outbound test sender");
    add_subscriber(&server, "Sender", "hospital", &signer);
    let (status, answer) = post_xml(&server, &work.sign(&ccd(), &signer)).await;
    assert_eq!(status, 201, "{answer}");
    let patients = search(&server, "Patient?family=Jones").await;
    let pid = patients["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ehrx_cert = work.path("ehrx.pem");
    std::fs::write(&ehrx_cert, run(ehrx(&server).arg("exchange-cert"))).unwrap();

    let r = server.get(&format!("Patient/{pid}/$signed-document")).await;
    if r.status() != 200 {
        panic!("{}", r.text().await.unwrap());
    }
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/fhir+xml"));
    let xml = r.text().await.unwrap();
    assert!(xml.contains("<Bundle xmlns=\"http://hl7.org/fhir\">") && xml.contains("Isabella"));
    let out = work.path("out.xml");
    std::fs::write(&out, &xml).unwrap();
    let verify = |path: &Path| {
        Command::new("xmlsec1")
            .arg("--verify")
            .arg("--pubkey-cert-pem")
            .arg(&ehrx_cert)
            .arg(path)
            .output()
            .unwrap()
    };
    let v = verify(&out);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // A changed byte no longer verifies.
    let tampered = work.path("tampered.xml");
    std::fs::write(&tampered, xml.replacen("Isabella", "Isabelle", 1)).unwrap();
    assert!(!verify(&tampered).status.success());

    // For a recipient: the Patient is encrypted for its certificate, and the
    // signature covers the ciphertext.
    let recipient = work.rsa("Recipient");
    let added = add_subscriber(&server, "Recipient Clinic", "hospital", &recipient);
    let org = added["organization"].as_str().unwrap();
    let r = server
        .get(&format!("Patient/{pid}/$signed-document?recipient={org}"))
        .await;
    assert_eq!(r.status(), 200);
    let xml = r.text().await.unwrap();
    assert!(xml.contains("EncryptedData") && !xml.contains("Isabella"));
    std::fs::write(&out, &xml).unwrap();
    let v = verify(&out);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let decrypted = run(Command::new("xmlsec1")
        .arg("--decrypt")
        .arg("--privkey-pem")
        .arg(&recipient.key)
        .arg(&out));
    assert!(decrypted.contains("Isabella"), "{decrypted}");
    // An organisation without a certificate to encrypt for.
    let r = server
        .get(&format!(
            "Patient/{pid}/$signed-document?recipient=Organization/nope"
        ))
        .await;
    assert_eq!(r.status(), 422);

    // Signed with ehrx's EC key: verifies with its EC certificate only.
    let r = server
        .get(&format!(
            "Patient/{pid}/$signed-document?signature=ecdsa-sha256"
        ))
        .await;
    assert_eq!(r.status(), 200);
    let xml = r.text().await.unwrap();
    assert!(xml.contains("xmldsig-more#ecdsa-sha256") && xml.contains("Isabella"));
    std::fs::write(&out, &xml).unwrap();
    assert!(
        !verify(&out).status.success(),
        "not with the RSA certificate"
    );
    let ec_cert = work.path("ehrx-ec.pem");
    std::fs::write(
        &ec_cert,
        run(ehrx(&server).args(["exchange-cert", "--ecdsa"])),
    )
    .unwrap();
    let v = Command::new("xmlsec1")
        .arg("--verify")
        .arg("--pubkey-cert-pem")
        .arg(&ec_cert)
        .arg(&out)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    std::fs::write(&tampered, xml.replacen("Isabella", "Isabelle", 1)).unwrap();
    let v = Command::new("xmlsec1")
        .arg("--verify")
        .arg("--pubkey-cert-pem")
        .arg(&ec_cert)
        .arg(&tampered)
        .output()
        .unwrap();
    assert!(!v.status.success(), "a changed byte no longer verifies");
    // An unknown algorithm is a clear 400.
    let r = server
        .get(&format!("Patient/{pid}/$signed-document?signature=md5"))
        .await;
    assert_eq!(r.status(), 400);
    let outcome: Value = r.json().await.unwrap();
    assert!(common::first_issue(&outcome)["diagnostics"]
        .as_str()
        .unwrap()
        .contains("unknown algorithm 'md5'"));
    server.stop().await;
}

#[tokio::test]
async fn signed_fhir_xml_document_bundle_is_accepted() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.ecdsa("FHIR sender");
    let added = add_subscriber(&server, "FHIR Hospital", "hospital", &signer);
    let source = std::fs::read_to_string(
        data_dir().join("fhir-examples/r4-xml/document-example-dischargesummary.xml"),
    )
    .unwrap();
    let signed = work.sign(&source, &signer);
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 201, "{answer}");
    // Created with new ids; references by full URL or `Type/id` follow them.
    let patients = search(&server, "Patient?_count=10").await;
    assert_eq!(total(&patients), 1, "{patients}");
    let pid = patients["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(pid, "d1");
    let comps = search(&server, &format!("Composition?subject=Patient/{pid}")).await;
    assert_eq!(total(&comps), 1, "{comps}");
    let encounter = comps["entry"][0]["resource"]["encounter"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(encounter.starts_with("Encounter/") && encounter != "Encounter/doc-example");
    assert_eq!(server.get(&encounter).await.status(), 200);
    let prov = search(&server, "Provenance").await;
    let prov = &prov["entry"][0]["resource"];
    assert_eq!(prov["agent"][0]["who"]["reference"], added["organization"]);
    assert!(prov["target"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["reference"] == format!("Patient/{pid}")));
    // A signed transaction Bundle too.
    let source =
        std::fs::read_to_string(data_dir().join("fhir-examples/r4-xml/bundle-transaction.xml"))
            .unwrap();
    let (status, answer) = post_xml(&server, &work.sign(&source, &signer)).await;
    // The example transaction also updates, deletes and reads: refused, subscribers only add.
    assert_eq!(status, 400, "{answer}");
    let d = common::first_issue(&answer)["diagnostics"].to_string();
    assert!(d.contains("may only create resources"), "{d}");
    let transaction = "<Bundle xmlns=\"http://hl7.org/fhir\"><type value=\"transaction\"/>\
        <entry><fullUrl value=\"urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a\"/><resource><Patient>\
        <name><family value=\"Transactional\"/></name></Patient></resource>\
        <request><method value=\"POST\"/><url value=\"Patient\"/></request></entry>\
        <entry><resource><Observation><status value=\"final\"/><code><text value=\"note\"/></code>\
        <subject><reference value=\"urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a\"/></subject>\
        </Observation></resource><request><method value=\"POST\"/><url value=\"Observation\"/></request></entry>\
        </Bundle>";
    let (status, answer) = post_xml(&server, &work.sign(transaction, &signer)).await;
    assert_eq!(status, 201, "{answer}");
    let obs = search(&server, "Observation?subject:Patient.family=Transactional").await;
    assert_eq!(total(&obs), 1, "{obs}");
    server.stop().await;
}

/// Distinct documents (the 48 kB CCD, one section encrypted) posted one
/// after another are each verified, decrypted, mapped and stored, each once.
#[tokio::test]
async fn documents_in_a_row_are_each_stored() {
    let n = 3;
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Regular sender");
    add_subscriber(&server, "Regular", "hospital", &signer);
    let ehrx_cert = work.path("ehrx.pem");
    std::fs::write(&ehrx_cert, run(ehrx(&server).arg("exchange-cert"))).unwrap();
    let x = "(//*[local-name()='section'])[1]";
    let docs: Vec<String> = (0..n)
        .map(|i| {
            let source = ccd().replace("<title>", &format!("<title>{i} "));
            let encrypted = work.encrypt(&source, x, &ehrx_cert, "aes128");
            work.sign(&encrypted, &signer)
        })
        .collect();
    for d in &docs {
        let (status, answer) = post_xml(&server, d).await;
        assert_eq!(status, 201, "{answer}");
    }
    assert_eq!(server.count("DocumentReference").await, n);
    assert_eq!(server.count("Composition").await, n);
    server.stop().await;
}

/// A subscriber's document matches (by its patient's identifiers and its
/// conditional creates) only what that subscriber sent itself: the same
/// document from a second hospital neither finds nor changes the first
/// hospital's records, and its answer says nothing about them.
#[tokio::test]
async fn a_subscribers_document_never_matches_another_subscribers_records() {
    let server = TestServer::start().await;
    let work = Work::new();
    let (first, second) = (work.rsa("First Hospital"), work.rsa("Second Hospital"));
    let org1 = add_subscriber(&server, "First Hospital", "hospital", &first)["organization"]
        .as_str()
        .unwrap()
        .to_string();
    let org2 = add_subscriber(&server, "Second Hospital", "hospital", &second)["organization"]
        .as_str()
        .unwrap()
        .to_string();
    let source = ccd();
    let (status, one) = post_xml(&server, &work.sign(&source, &first)).await;
    assert_eq!(status, 201, "{one}");
    let patients = search(&server, "Patient?family=Jones&birthdate=1950-12-19").await;
    assert_eq!(total(&patients), 1, "{patients}");
    let firsts = patients["entry"][0]["resource"].clone();
    assert!(
        firsts["meta"]["source"].as_str().unwrap().ends_with(&org1),
        "{firsts}"
    );
    let counts_before = {
        let mut c = Vec::new();
        for t in [
            "Condition",
            "Observation",
            "AllergyIntolerance",
            "Composition",
        ] {
            c.push(server.count(t).await);
        }
        c
    };

    // The same document, signed by the second hospital.
    let (status, two) = post_xml(&server, &work.sign(&source, &second)).await;
    assert_eq!(status, 201, "{two}");
    let statuses = |answer: &Value| -> Vec<String> {
        part(answer, "result")["resource"]["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["response"]["status"].as_str().unwrap().to_string())
            .collect()
    };
    // Every entry was created anew, exactly as for the first hospital:
    // nothing of the first hospital's was matched.
    assert_eq!(statuses(&two), statuses(&one));
    assert!(statuses(&two).iter().all(|s| s.starts_with("201")), "{two}");
    let patients = search(&server, "Patient?family=Jones&birthdate=1950-12-19").await;
    assert_eq!(total(&patients), 2, "{patients}");
    let seconds = patients["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["id"] != firsts["id"])
        .unwrap();
    assert!(
        seconds["meta"]["source"].as_str().unwrap().ends_with(&org2),
        "{seconds}"
    );
    let first_id = firsts["id"].as_str().unwrap();
    assert_eq!(
        server.get_json(&format!("Patient/{first_id}")).await,
        firsts,
        "the first hospital's patient is unchanged"
    );
    for (t, before) in [
        "Condition",
        "Observation",
        "AllergyIntolerance",
        "Composition",
    ]
    .into_iter()
    .zip(counts_before)
    {
        assert_eq!(server.count(t).await, 2 * before, "{t}");
    }
    server.stop().await;
}

#[tokio::test]
async fn subscriber_commands_refuse_bad_input() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("CLI test");
    let fail = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = fail(
        ehrx(&server)
            .args([
                "subscriber",
                "add",
                "--name",
                "X",
                "--kind",
                "bakery",
                "--cert",
            ])
            .arg(&signer.cert),
    );
    assert!(e.contains("unknown subscriber kind 'bakery'"), "{e}");
    let e = fail(
        ehrx(&server)
            .args([
                "subscriber",
                "add",
                "--name",
                "X",
                "--kind",
                "lab",
                "--cert",
            ])
            .arg(&signer.key),
    );
    assert!(e.contains("no '-----BEGIN CERTIFICATE-----' block"), "{e}");
    add_subscriber(&server, "Lab", "lab", &signer);
    let e = fail(
        ehrx(&server)
            .args([
                "subscriber",
                "add",
                "--name",
                "Other",
                "--kind",
                "lab",
                "--cert",
            ])
            .arg(&signer.cert),
    );
    assert!(e.contains("is already registered for Organization/"), "{e}");
    let e = fail(ehrx(&server).args(["subscriber", "revoke-cert", "--fingerprint", "00ff"]));
    assert!(e.contains("no unrevoked certificate"), "{e}");
    let e = fail(
        ehrx(&server)
            .args([
                "subscriber",
                "rotate-cert",
                "--organization",
                "Organization/nope",
                "--cert",
            ])
            .arg(&work.rsa("Next").cert),
    );
    assert!(e.contains("does not exist"), "{e}");
    // The organisation and its endpoint are FHIR resources.
    assert_eq!(server.count("Organization").await, 1);
    assert_eq!(server.count("Endpoint").await, 1);
    server.stop().await;
}

#[tokio::test]
async fn the_same_document_sent_concurrently_is_stored_once() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.ecdsa("Concurrent sender");
    add_subscriber(&server, "Concurrent", "lab", &signer);
    let signed = work.sign(&ccd(), &signer);
    let posts = (0..4).map(|_| post_xml(&server, &signed));
    let answers = futures_util::future::join_all(posts).await;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    for (status, answer) in &answers {
        assert!([200, 201, 409].contains(status), "{answer}");
    }
    assert_eq!(server.count("Composition").await, 1);
    assert_eq!(server.count("DocumentReference").await, 1);
    // Afterwards, every resubmission names the stored document.
    let (status, answer) = post_xml(&server, &signed).await;
    assert_eq!(status, 200, "{answer}");
    // A refused document leaves no receipt behind: sent again, it is
    // examined again (not answered with 409 or 200).
    let bad = work.sign(
        "<ClinicalDocument><title>No namespace</title></ClinicalDocument>",
        &signer,
    );
    for _ in 0..2 {
        let (status, answer) = post_xml(&server, &bad).await;
        assert_eq!(status, 400, "{answer}");
        let d = common::first_issue(&answer)["diagnostics"].to_string();
        assert!(d.contains("not in the HL7 v3 namespace"), "{d}");
    }
    server.stop().await;
}

/// A sender that hangs up while its document is being stored (a client
/// timeout, a dropped connection) must not leave the document half-received:
/// whatever stage the request had reached, the document is stored once and
/// sending it again answers with where it is, not with "being stored".
#[tokio::test]
async fn a_document_whose_sender_hangs_up_is_stored_all_the_same() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Impatient sender");
    add_subscriber(&server, "Impatient", "hospital", &signer);
    // Hang-ups at different stages: before, during and after verification,
    // mapping and storing.
    let waits = [1u64, 3, 10, 30, 60, 100, 200, 400];
    let docs: Vec<String> = (0..waits.len())
        .map(|i| work.sign(&ccd().replace("<title>", &format!("<title>{i} ")), &signer))
        .collect();
    let mut hung_up = 0;
    for (doc, ms) in docs.iter().zip(waits) {
        let impatient = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(ms))
            .build()
            .unwrap();
        let sent = impatient
            .post(server.url("exchange/documents"))
            .header("Content-Type", "application/xml")
            .body(doc.clone())
            .send()
            .await;
        if sent.is_err() {
            hung_up += 1;
        }
    }
    assert!(
        hung_up > 0,
        "no request was cut short; the test proves nothing"
    );
    let mut created = 0;
    for doc in &docs {
        // A request cut short may still be storing: 409 until it is done.
        let mut tries = 0;
        let (status, answer) = loop {
            let (status, answer) = post_xml(&server, doc).await;
            if status != 409 || tries == 300 {
                break (status, answer);
            }
            tries += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert!([200, 201].contains(&status), "{status}: {answer}");
        created += (status == 201) as usize;
    }
    assert_eq!(server.count("DocumentReference").await, docs.len() as i64);
    assert_eq!(server.count("Composition").await, docs.len() as i64);
    eprintln!(
        "{hung_up} of {} senders hung up; {created} documents first stored by the resubmission",
        docs.len()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_requiring_mutual_tls_must_connect_with_its_certificate() {
    let work = Work::new();
    // The server's own TLS certificate.
    let (server_key, server_cert) = (work.path("tls.key"), work.path("tls.pem"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .arg("-keyout")
        .arg(&server_key)
        .arg("-out")
        .arg(&server_cert)
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ]));
    let server = TestServer::start_with(|c| {
        c.tls_cert_file = Some(server_cert.clone());
        c.tls_key_file = Some(server_key.clone());
    })
    .await;
    let https = server.base.replace("http://", "https://");
    let signer = work.rsa("mTLS hospital");
    let added = add_subscriber_with(
        &server,
        "mTLS Hospital",
        "hospital",
        &signer,
        &["--require-mtls"],
    );
    assert_eq!(added["requireMutualTls"], true);
    let client = |identity: Option<&Signer>| {
        let mut b = reqwest::Client::builder().danger_accept_invalid_certs(true);
        if let Some(s) = identity {
            let mut pem = std::fs::read(&s.cert).unwrap();
            pem.extend(std::fs::read(&s.key).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    let post = |client: reqwest::Client, body: String| {
        let url = format!("{https}/exchange/documents");
        async move {
            let r = client
                .post(url)
                .header("Content-Type", "application/xml")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let signed = work.sign(&ccd(), &signer);
    let (status, answer) = post(client(None), signed.clone()).await;
    assert_eq!(status, 403, "{answer}");
    let d = common::first_issue(&answer)["diagnostics"].to_string();
    assert!(d.contains("came without a client certificate"), "{d}");
    let stranger = work.rsa("Stranger");
    let (status, answer) = post(client(Some(&stranger)), signed.clone()).await;
    assert_eq!(status, 403, "{answer}");
    let d = common::first_issue(&answer)["diagnostics"].to_string();
    assert!(d.contains("is not a valid registered certificate"), "{d}");
    let (status, answer) = post(client(Some(&signer)), signed.clone()).await;
    assert_eq!(status, 201, "{answer}");
    // A subscriber without the requirement may send over server-only TLS.
    let other = work.ecdsa("Plain lab");
    add_subscriber(&server, "Plain Lab", "lab", &other);
    let doc = work.sign(&ccd().replace("<title>", "<title>Lab "), &other);
    let (status, answer) = post(client(None), doc).await;
    assert_eq!(status, 201, "{answer}");
    // Turning the requirement off for the hospital.
    let org = added["organization"].as_str().unwrap();
    run(ehrx(&server).args(["subscriber", "require-mtls", "--organization", org, "--off"]));
    let doc = work.sign(&ccd().replace("<title>", "<title>Again "), &signer);
    let (status, answer) = post(client(None), doc).await;
    assert_eq!(status, 201, "{answer}");
    server.stop().await;
}

/// The stored private keys of the exchange and of token signing.
async fn stored_private_keys(database_url: &str) -> Vec<String> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(database_url).await.unwrap();
    let mut keys: Vec<String> = sqlx::query_scalar("SELECT private_key_pem FROM exchange_key")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    keys.extend(
        sqlx::query_scalar::<_, String>("SELECT private_pem FROM auth_key")
            .fetch_all(&mut conn)
            .await
            .unwrap(),
    );
    keys
}

#[tokio::test]
async fn private_keys_are_sealed_at_rest_with_a_key_encryption_key() {
    let work = Work::new();
    let database_url = common::fresh_database(work.dir.path()).await;
    let kek = work.path("kek");
    let other_kek = work.path("other-kek");
    for path in [&kek, &other_kek] {
        let key = run(Command::new("openssl").args(["rand", "-base64", "32"]));
        std::fs::write(path, key).unwrap();
    }
    let cli = |kek: Option<&Path>| {
        let mut c = common::ehrx_bin();
        c.env("EHRX_DATABASE_URL", &database_url)
            .env("EHRX_LOG", "error");
        if let Some(k) = kek {
            c.env("EHRX_KEY_ENCRYPTION_KEY_FILE", k);
        }
        c
    };
    // Keys made without a key-encryption key are stored as PEM.
    let cert = run(cli(None).arg("exchange-cert"));
    run(cli(None).args(["keys", "rotate"]));
    let stored = stored_private_keys(&database_url).await;
    assert_eq!(stored.len(), 3, "RSA and EC exchange keys, one signing key");
    assert!(stored.iter().all(|k| k.contains("BEGIN PRIVATE KEY")));

    // A server with the key seals every one of them as it loads it, and
    // keeps working with them.
    let url = database_url.clone();
    let path = kek.clone();
    let server = TestServer::start_with(move |c| {
        c.database_url = url;
        c.key_encryption_key_file = Some(path);
    })
    .await;
    let jwks: Value = server.get("auth/jwks").await.json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(run(cli(Some(&kek)).arg("exchange-cert")), cert, "same key");
    run(cli(Some(&kek)).args(["keys", "rotate"]));
    let stored = stored_private_keys(&database_url).await;
    assert_eq!(stored.len(), 4);
    for k in &stored {
        assert!(
            k.starts_with("sealed:v1:") && !k.contains("PRIVATE KEY"),
            "{k}"
        );
    }
    server.stop().await;

    // Without the key, or with another one: a clear refusal.
    for (kek, says) in [
        (None, "set key_encryption_key_file"),
        (
            Some(other_kek.as_path()),
            "does not open with the configured key-encryption key",
        ),
    ] {
        let out = cli(kek).arg("exchange-cert").output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        let config = ehrx::config::Config {
            listen: "127.0.0.1:0".into(),
            database_url: database_url.clone(),
            key_encryption_key_file: kek.map(Path::to_path_buf),
            ..Default::default()
        };
        let refused = ehrx::server::Server::bind(config).await;
        let err = refused
            .err()
            .expect("the server does not start")
            .to_string();
        assert!(err.contains(says), "{err}");
    }
    // Nothing was changed by the refusals.
    assert_eq!(stored_private_keys(&database_url).await, stored);

    // Moved to another key-encryption key in one step: the old key no
    // longer opens them, the new one does, and the keys are the same.
    let out = run(cli(Some(&kek))
        .args(["keys", "reseal", "--new-key-file"])
        .arg(&other_kek));
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["keys"], 4, "{answer}");
    let resealed = stored_private_keys(&database_url).await;
    assert!(resealed.iter().all(|k| k.starts_with("sealed:v1:")));
    assert!(resealed.iter().all(|k| !stored.contains(k)));
    let out = cli(Some(&kek)).arg("exchange-cert").output().unwrap();
    assert!(!out.status.success());
    assert_eq!(run(cli(Some(&other_kek)).arg("exchange-cert")), cert);
    // And back to PEM.
    run(cli(Some(&other_kek)).args(["keys", "reseal"]));
    assert!(stored_private_keys(&database_url)
        .await
        .iter()
        .all(|k| k.starts_with("-----BEGIN PRIVATE KEY-----")));
    assert_eq!(run(cli(None).arg("exchange-cert")), cert);
}

/// A received document is audited (an Import event per patient it was filed
/// under, its sender the requestor), and so is a refused one.
#[tokio::test]
async fn received_and_refused_documents_are_audited() {
    let server = TestServer::start().await;
    let work = Work::new();
    let signer = work.rsa("Audited sender");
    let sub = add_subscriber(&server, "Audited Hospital", "hospital", &signer);
    let (status, answer) = post_xml(&server, &work.sign(&ccd(), &signer)).await;
    assert_eq!(status, 201, "{answer}");
    assert_refused(&server, &ccd(), 403, "the document is not signed").await;
    let found = server
        .get_json("AuditEvent?subtype=exchange-document-in&_count=100")
        .await;
    let events: Vec<&Value> = found["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let accepted = events
        .iter()
        .find(|e| e["outcome"] == "0")
        .expect("the received document is audited");
    assert_eq!(accepted["type"]["code"], "110107");
    let patient = accepted["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["role"]["code"] == "1")
        .expect("filed under a patient");
    assert!(patient["what"]["reference"]
        .as_str()
        .unwrap()
        .starts_with("Patient/"));
    let requestor = accepted["agent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["requestor"] == true)
        .unwrap();
    assert_eq!(requestor["who"]["reference"], sub["organization"]);
    assert!(events.iter().any(|e| e["outcome"] == "4"));
    server.stop().await;
}
