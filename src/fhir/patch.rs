//! JSON Patch (RFC 6902) with bounded growth.
//!
//! A patch document is small, but each `copy` can double the resource
//! (forty of them make a terabyte) and each `copy` into its own subtree can
//! double its depth. Operations are applied one at a time while an upper
//! bound of the result's size and depth is kept, so a hostile document is
//! refused before the work it asks for is done. The bounds only grow
//! (removals are not subtracted): a legitimate patch stays far below them.

use json_patch::{Patch, PatchOperation};
use serde_json::Value;

/// Why a patch was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchFault {
    /// Not a JSON Patch document.
    Malformed(String),
    /// More operations, or a larger or deeper result, than the caps allow.
    TooCostly(String),
    /// An operation does not apply to the document (a `test` failed, a
    /// path does not exist).
    NotApplicable(String),
}

/// The caps on one application.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub operations: usize,
    /// Serialised size of the result, in bytes.
    pub bytes: usize,
    /// Nesting depth of the result.
    pub depth: usize,
}

/// Applies `patch_doc` to `doc`. On error `doc` may hold part of the
/// patch: callers apply it to a copy they discard.
pub fn apply(doc: &mut Value, patch_doc: &Value, caps: Caps) -> Result<(), PatchFault> {
    let ops = match patch_doc {
        Value::Array(ops) if ops.len() > caps.operations => {
            return Err(PatchFault::TooCostly(format!(
                "the patch has {} operations; at most {} are accepted",
                ops.len(),
                caps.operations
            )))
        }
        Value::Array(_) => serde_json::from_value::<Patch>(patch_doc.clone())
            .map_err(|e| PatchFault::Malformed(format!("invalid JSON Patch document: {e}")))?,
        _ => {
            return Err(PatchFault::Malformed(
                "a JSON Patch document is an array of operations".into(),
            ))
        }
    };
    let mut bytes = size_upto(doc, usize::MAX);
    let mut depth = depth_of(doc);
    for op in ops.0 {
        let (grow_bytes, grow_depth) = match &op {
            PatchOperation::Add(a) => (
                size_upto(&a.value, usize::MAX),
                segments(a.path.as_str()) + depth_of(&a.value),
            ),
            PatchOperation::Replace(r) => (
                size_upto(&r.value, usize::MAX),
                segments(r.path.as_str()) + depth_of(&r.value),
            ),
            PatchOperation::Copy(c) => {
                let Some(from) = doc.pointer(c.from.as_str()) else {
                    return Err(PatchFault::NotApplicable(format!(
                        "copy: '{}' does not exist",
                        c.from
                    )));
                };
                let room = caps.bytes.saturating_sub(bytes).saturating_add(1);
                (
                    size_upto(from, room),
                    segments(c.path.as_str()) + depth_of(from),
                )
            }
            PatchOperation::Move(m) => (0, segments(m.path.as_str()) + depth),
            PatchOperation::Remove(_) | PatchOperation::Test(_) => (0, 0),
        };
        bytes = bytes.saturating_add(grow_bytes);
        depth = depth.max(grow_depth);
        if bytes > caps.bytes {
            return Err(PatchFault::TooCostly(format!(
                "the patched resource would exceed {} bytes",
                caps.bytes
            )));
        }
        if depth > caps.depth {
            return Err(PatchFault::TooCostly(format!(
                "the patched resource would nest deeper than {} levels",
                caps.depth
            )));
        }
        json_patch::patch(doc, std::slice::from_ref(&op))
            .map_err(|e| PatchFault::NotApplicable(e.to_string()))?;
    }
    Ok(())
}

/// Segments of a JSON Pointer (`/a/b` → 2).
fn segments(pointer: &str) -> usize {
    pointer.matches('/').count()
}

/// The serialised size of `v`, counted up to `cap` (then `cap`).
fn size_upto(v: &Value, cap: usize) -> usize {
    struct Counter {
        n: usize,
        cap: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.n += buf.len();
            if self.n > self.cap {
                return Err(std::io::Error::other("cap reached"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter { n: 0, cap };
    let _ = serde_json::to_writer(&mut c, v);
    c.n.min(cap)
}

/// Nesting depth of `v` (a scalar is 0), without recursion.
fn depth_of(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CAPS: Caps = Caps {
        operations: 100,
        bytes: 1 << 20,
        depth: 32,
    };

    #[test]
    fn an_ordinary_patch_applies() {
        let mut doc = json!({"resourceType": "Patient", "name": [{"family": "A"}]});
        let p = json!([{"op": "copy", "from": "/name/0", "path": "/name/-"},
                       {"op": "replace", "path": "/name/1/family", "value": "B"}]);
        apply(&mut doc, &p, CAPS).unwrap();
        assert_eq!(doc["name"][1]["family"], "B");
    }

    #[test]
    fn self_copies_stop_at_the_size_cap() {
        let mut doc = json!({"a": ["x".repeat(100)]});
        let p = Value::Array(
            (0..40)
                .map(|_| json!({"op": "copy", "from": "/a", "path": "/a/-"}))
                .collect(),
        );
        let e = apply(&mut doc, &p, CAPS).unwrap_err();
        assert!(
            matches!(e, PatchFault::TooCostly(ref m) if m.contains("bytes")),
            "{e:?}"
        );
    }

    #[test]
    fn copies_into_their_own_subtree_stop_at_the_depth_cap() {
        let mut doc = json!({"a": {}});
        let p = Value::Array(
            (0..40)
                .map(|_| json!({"op": "copy", "from": "/a", "path": "/a/b"}))
                .collect(),
        );
        let e = apply(
            &mut doc,
            &p,
            Caps {
                bytes: usize::MAX,
                ..CAPS
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, PatchFault::TooCostly(ref m) if m.contains("deeper")),
            "{e:?}"
        );
    }

    #[test]
    fn a_missing_source_or_a_failed_test_is_not_applicable() {
        let mut doc = json!({"a": 1});
        let p = json!([{"op": "copy", "from": "/nope", "path": "/b"}]);
        assert!(matches!(
            apply(&mut doc, &p, CAPS),
            Err(PatchFault::NotApplicable(_))
        ));
        let p = json!([{"op": "test", "path": "/a", "value": 2}]);
        assert!(matches!(
            apply(&mut doc, &p, CAPS),
            Err(PatchFault::NotApplicable(_))
        ));
        assert!(matches!(
            apply(&mut doc, &json!({"op": "add"}), CAPS),
            Err(PatchFault::Malformed(_))
        ));
    }
}
