//! A patient's record made from the R4 examples: for every type that can
//! carry a patient reference, an example with its patient references
//! pointed at one patient.

use std::collections::BTreeMap;

use serde_json::{json, Value};

pub fn compartments() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/compartments.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The types of the Patient compartment, each with its parameters.
///
/// AuditEvent is left out: the server records AuditEvents itself (they
/// cannot be written through the API) and their reach is tested in
/// `tests/audit.rs`.
pub fn compartment_types() -> Vec<(String, Vec<String>)> {
    compartments()["Patient"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.as_str() != "AuditEvent")
        .map(|(t, ps)| {
            let ps = ps
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            (t.clone(), ps)
        })
        .collect()
}

/// Whether a reference string names a Patient (`Patient/x`, absolute or
/// versioned).
pub fn is_patient_reference(r: &str) -> bool {
    r.match_indices("Patient/")
        .any(|(i, _)| i == 0 || r.as_bytes()[i - 1] == b'/')
}

pub fn refers_to_a_patient(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, x)| {
            (k == "reference" && x.as_str().is_some_and(is_patient_reference))
                || refers_to_a_patient(x)
        }),
        Value::Array(a) => a.iter().any(refers_to_a_patient),
        _ => false,
    }
}

/// Points every patient reference in `v` to `Patient/{patient}`.
pub fn point_patients_to(v: &mut Value, patient: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match x {
                    Value::String(r) if k == "reference" && is_patient_reference(r) => {
                        *r = format!("Patient/{patient}")
                    }
                    _ => point_patients_to(x, patient),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| point_patients_to(x, patient)),
        _ => {}
    }
}

/// The R4 examples by type, each type's in file-name order.
pub fn examples_by_type() -> BTreeMap<String, Vec<Value>> {
    let dir = super::data_dir().join("fhir-examples/r4-json");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in files {
        let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let t = v["resourceType"].as_str().unwrap().to_string();
        out.entry(t).or_default().push(v);
    }
    out
}

/// An example of `rtype` made `patient`'s: the first example that refers
/// to a patient, all its patient references pointing to `patient`; for a
/// type whose examples refer to none, the reference goes where the type
/// names its patient.
pub fn record_of(examples: &BTreeMap<String, Vec<Value>>, rtype: &str, patient: &str) -> Value {
    let of_type = &examples[rtype];
    let mut r = of_type
        .iter()
        .find(|e| refers_to_a_patient(e))
        .unwrap_or(&of_type[0])
        .clone();
    point_patients_to(&mut r, patient);
    let reference = json!({"reference": format!("Patient/{patient}")});
    // The chosen example refers to its patient only where the compartment
    // does not look.
    if rtype == "Provenance" {
        r["target"].as_array_mut().unwrap().push(reference.clone());
    }
    if !refers_to_a_patient(&r) {
        match rtype {
            "Schedule" => r["actor"] = json!([reference]),
            "SupplyDelivery" => r["patient"] = reference,
            "SupplyRequest" => r["deliverTo"] = reference,
            "Device" => r["patient"] = reference,
            "Linkage" => r["item"]
                .as_array_mut()
                .unwrap()
                .push(json!({"type": "alternate", "resource": reference})),
            "VerificationResult" => r["target"] = json!([reference]),
            "Binary" => r["securityContext"] = reference,
            "MessageHeader" => r["focus"] = json!([reference]),
            other => panic!("no R4 example of {other} refers to a patient"),
        }
    }
    r
}
