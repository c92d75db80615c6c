//! OperationOutcome building.

use serde_json::{json, Map, Value};

/// One issue of an OperationOutcome.
#[derive(Debug, Clone)]
pub struct Issue {
    pub severity: &'static str,
    pub code: &'static str,
    pub diagnostics: String,
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: "error",
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn information(diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: "information",
            code: "informational",
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn at(mut self, expression: Option<String>) -> Self {
        self.expression = expression;
        self
    }

    fn to_json(&self) -> Value {
        let mut issue = Map::new();
        issue.insert("severity".into(), json!(self.severity));
        issue.insert("code".into(), json!(self.code));
        issue.insert("diagnostics".into(), json!(self.diagnostics));
        if let Some(expr) = &self.expression {
            issue.insert("location".into(), json!([expr]));
            issue.insert("expression".into(), json!([expr]));
        }
        Value::Object(issue)
    }
}

/// An OperationOutcome resource holding `issues`.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
    })
}
