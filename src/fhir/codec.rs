//! The one place where FHIR resources cross between wire formats and ehrx's
//! internal form (a `serde_json::Value` holding FHIR JSON).
//!
//! Every resource that enters ehrx is parsed into fhirbolt's typed R4 model in
//! strict mode: that is the structural validation (unknown elements, wrong
//! types, invalid primitives are rejected). The generic fhirbolt code is
//! instantiated only here, behind plain functions, so the rest of the crate
//! never pays its compile cost again.

use fhirbolt::model::r4::Resource as R4Resource;
use fhirbolt::serde::{DeserializationConfig, DeserializationMode, SerializationConfig};
use serde_json::Value;

/// A structural fault found while parsing a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFault {
    /// What is wrong, in words.
    pub message: String,
    /// FHIRPath-like location of the fault when it can be determined.
    pub expression: Option<String>,
    /// Line and column in the source text, when the parser reports them.
    pub position: Option<(usize, usize)>,
}

fn strict() -> Option<DeserializationConfig> {
    Some(DeserializationConfig {
        mode: DeserializationMode::Strict,
    })
}

/// Validates a FHIR JSON value against the R4 model and returns it normalised
/// (the form the R4 model serialises to).
pub fn validate_json(value: Value) -> Result<Value, ParseFault> {
    let probe = value.clone();
    let typed: R4Resource = fhirbolt::json::from_json_value(value, strict()).map_err(|e| {
        let message = e.to_string();
        let expression = super::locate::locate_in_json(&probe, &message);
        ParseFault {
            message,
            expression,
            position: None,
        }
    })?;
    to_json(typed)
}

fn to_json(typed: R4Resource) -> Result<Value, ParseFault> {
    fhirbolt::json::to_json_value(typed, Some(SerializationConfig { always_sort: false })).map_err(
        |e| ParseFault {
            message: format!("cannot serialise resource: {e}"),
            expression: None,
            position: None,
        },
    )
}

/// Parses FHIR JSON text: syntax first (with line and column), then the R4 model.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ParseFault> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ParseFault {
        message: format!("malformed JSON: {e}"),
        expression: None,
        position: Some((e.line(), e.column())),
    })?;
    if !value.is_object() {
        return Err(ParseFault {
            message: "a FHIR resource must be a JSON object".into(),
            expression: None,
            position: None,
        });
    }
    validate_json(value)
}

/// Parses FHIR XML text into FHIR JSON.
pub fn parse_xml(bytes: &[u8]) -> Result<Value, ParseFault> {
    let typed: R4Resource = fhirbolt::xml::from_slice(bytes, strict()).map_err(|e| {
        let message = e.to_string();
        let expression = super::locate::locate_in_xml(bytes, &message);
        ParseFault {
            message: format!("invalid FHIR XML: {message}"),
            expression,
            position: None,
        }
    })?;
    to_json(typed)
}

/// Serialises FHIR JSON (already valid) to FHIR XML.
pub fn to_xml(value: &Value) -> Result<Vec<u8>, ParseFault> {
    let typed: R4Resource =
        fhirbolt::json::from_json_value(value.clone(), strict()).map_err(|e| ParseFault {
            message: format!("cannot convert to XML: {e}"),
            expression: None,
            position: None,
        })?;
    fhirbolt::xml::to_vec(&typed, None).map_err(|e| ParseFault {
        message: format!("cannot serialise XML: {e}"),
        expression: None,
        position: None,
    })
}
