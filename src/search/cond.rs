//! The condition model of search: what a query asks of the resources of
//! one type, independent of SQL. Search parameters parse into it
//! ([`crate::search::parse`]), the access policy adds the caller's limits in
//! it, and the store renders it to SQL (`store::search`).

/// A bound SQL value.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Text(String),
    Real(f64),
}

/// An index table (one per search parameter type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    String,
    Token,
    Reference,
    Date,
    Number,
    Quantity,
    Uri,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::String => "idx_string",
            Table::Token => "idx_token",
            Table::Reference => "idx_reference",
            Table::Date => "idx_date",
            Table::Number => "idx_number",
            Table::Quantity => "idx_quantity",
            Table::Uri => "idx_uri",
        }
    }
    /// The column a sort on this table orders by.
    pub fn sort_column(self) -> (&'static str, bool) {
        match self {
            Table::String => ("norm", false),
            Table::Token => ("code", false),
            Table::Reference => ("target_id", false),
            Table::Date => ("lo", false),
            Table::Number | Table::Quantity => ("value", true),
            Table::Uri => ("value", false),
        }
    }
}

/// A test on the columns of one index row (`t.col …`).
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// Any row of the parameter.
    Any,
    Eq(&'static str, Bind),
    Ne(&'static str, Bind),
    Lt(&'static str, Bind),
    Le(&'static str, Bind),
    Gt(&'static str, Bind),
    Ge(&'static str, Bind),
    /// Text starting with a prefix (an index range scan).
    Prefix(&'static str, String),
    /// Text containing a fragment.
    Contains(&'static str, String),
    /// Any of several texts.
    In(&'static str, Vec<String>),
    And(Vec<Test>),
    Or(Vec<Test>),
}

/// A condition on the resources of one type; conditions in a list are ANDed.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// `_id`
    Ids(Vec<String>),
    /// A test on the `last_updated` column of the resource row.
    LastUpdated(Test),
    /// Some row of `param` in `table` passes `test`.
    Index {
        table: Table,
        param: String,
        test: Test,
    },
    /// Refers to `target_type/id`, for one of `target_ids`, through any of
    /// `params` (compartment membership).
    RefersTo {
        params: Vec<String>,
        target_type: String,
        target_ids: Vec<String>,
    },
    /// Some composite value whose components all pass their tests.
    Composite(Vec<(Table, String, Test)>),
    /// A reference parameter pointing at a resource of one of `types`
    /// that meets `inner` (chaining).
    Chain {
        param: String,
        types: Vec<String>,
        inner: Vec<Cond>,
    },
    /// Referenced by a `source` resource, through `param`, that meets
    /// `inner` (`_has`).
    Has {
        source: String,
        param: String,
        inner: Vec<Cond>,
    },
    Not(Box<Cond>),
    Or(Vec<Cond>),
    /// Every one of several conditions (inside an `Or`).
    And(Vec<Cond>),
}

/// One sort key.
#[derive(Debug, Clone, PartialEq)]
pub enum SortBy {
    Id,
    LastUpdated,
    Index { table: Table, param: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sort {
    pub by: SortBy,
    pub descending: bool,
}

/// A search over one resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub rtype: String,
    pub conds: Vec<Cond>,
    pub sort: Vec<Sort>,
}

/// A position in a sorted result: the sort values and id of the last row.
pub type Cursor = (Vec<Bind>, String);

/// Simplifies `c`, a condition ANDed with `known` (a query's own
/// conditions), so that SQL does not test per row what the query already
/// guarantees: a patient-compartment test (`RefersTo Patient/P`) is true
/// when the query searches a reference parameter among its `params` for
/// `P`. Such a search term is made to name the target type as well
/// (`patient=P` becomes `patient=Patient/P`), which only narrows it, and
/// only for the caller being confined.
pub fn assume(c: Cond, rtype: &str, known: &mut [Cond]) -> Cond {
    match c {
        Cond::RefersTo {
            params,
            target_type,
            target_ids,
        } => {
            if implied(rtype, &params, &target_type, &target_ids, known) {
                Cond::And(Vec::new())
            } else {
                Cond::RefersTo {
                    params,
                    target_type,
                    target_ids,
                }
            }
        }
        Cond::And(all) => {
            let mut out = Vec::new();
            for c in all {
                match assume(c, rtype, known) {
                    Cond::And(inner) => out.extend(inner),
                    Cond::Or(alts) if alts.is_empty() => return Cond::Or(alts),
                    c => out.push(c),
                }
            }
            if out.len() == 1 {
                out.pop().expect("one")
            } else {
                Cond::And(out)
            }
        }
        Cond::Or(alts) => {
            let mut out = Vec::new();
            for c in alts {
                match assume(c, rtype, known) {
                    Cond::And(inner) if inner.is_empty() => return Cond::And(inner),
                    Cond::Or(inner) => out.extend(inner),
                    c => out.push(c),
                }
            }
            if out.len() == 1 {
                out.pop().expect("one")
            } else {
                Cond::Or(out)
            }
        }
        Cond::Not(inner) => match assume(*inner, rtype, known) {
            Cond::And(v) if v.is_empty() => Cond::Or(v),
            Cond::Or(v) if v.is_empty() => Cond::And(v),
            inner => Cond::Not(Box::new(inner)),
        },
        c => c,
    }
}

/// Whether a term of `known` guarantees a reference to one of `ids` of
/// `target_type` through one of `params`; a term that did not name the
/// type is made to.
fn implied(
    rtype: &str,
    params: &[String],
    target_type: &str,
    ids: &[String],
    known: &mut [Cond],
) -> bool {
    for k in known.iter_mut() {
        match k {
            Cond::RefersTo {
                params: kp,
                target_type: kt,
                target_ids: ki,
            } if kt == target_type
                && !kp.is_empty()
                && !ki.is_empty()
                && kp.iter().all(|p| params.contains(p))
                && ki.iter().all(|i| ids.contains(i)) =>
            {
                return true
            }
            Cond::Index {
                table: Table::Reference,
                param,
                test,
            } if params.iter().any(|p| within(rtype, param, p, target_type)) => {
                let (id, ty) = match &*test {
                    Test::Eq("target_id", Bind::Text(id)) => (id.clone(), None),
                    Test::And(ts) if ts.len() == 2 => match (&ts[0], &ts[1]) {
                        (
                            Test::Eq("target_id", Bind::Text(id)),
                            Test::Eq("target_type", Bind::Text(t)),
                        ) => (id.clone(), Some(t.clone())),
                        _ => continue,
                    },
                    _ => continue,
                };
                if !ids.contains(&id) {
                    continue;
                }
                match ty {
                    Some(t) if t == target_type => return true,
                    Some(_) => continue,
                    None => {
                        *test = Test::And(vec![
                            Test::Eq("target_id", Bind::Text(id)),
                            Test::Eq("target_type", Bind::Text(target_type.to_string())),
                        ]);
                        return true;
                    }
                }
            }
            _ => {}
        }
    }
    false
}

/// Whether every reference parameter `q` of `rtype` indexes to a
/// `target_type` is one `p` indexes too: the same parameter, or `p`
/// narrowed to that type (Observation's `patient` is
/// `subject.where(resolve() is Patient)`).
fn within(rtype: &str, q: &str, p: &str, target_type: &str) -> bool {
    use super::fhirpath::Expr;
    use super::registry::registry;
    if q == p {
        return true;
    }
    let reg = registry();
    match (
        reg.get(rtype, q).and_then(|q| q.expr.as_ref()),
        reg.get(rtype, p).and_then(|p| p.expr.as_ref()),
    ) {
        (Some(Expr::WhereResolveIs(inner, t)), Some(pe)) => **inner == *pe && t == target_type,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(ids: &[&str]) -> Cond {
        Cond::RefersTo {
            params: vec!["subject".into(), "performer".into()],
            target_type: "Patient".into(),
            target_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn search(param: &str, id: &str) -> Cond {
        Cond::Index {
            table: Table::Reference,
            param: param.into(),
            test: Test::Eq("target_id", Bind::Text(id.into())),
        }
    }

    fn label(code: &str) -> Cond {
        Cond::Not(Box::new(Cond::Index {
            table: Table::Token,
            param: "_security".into(),
            test: Test::Eq("code", Bind::Text(code.into())),
        }))
    }

    #[test]
    fn a_compartment_test_the_query_guarantees_is_dropped_and_the_query_names_the_type() {
        let mut known = vec![search("patient", "p")];
        let c = assume(
            Cond::And(vec![member(&["p"]), label("PSY")]),
            "Observation",
            &mut known,
        );
        assert_eq!(c, label("PSY"));
        assert_eq!(
            known[0],
            Cond::Index {
                table: Table::Reference,
                param: "patient".into(),
                test: Test::And(vec![
                    Test::Eq("target_id", Bind::Text("p".into())),
                    Test::Eq("target_type", Bind::Text("Patient".into())),
                ]),
            }
        );
    }

    #[test]
    fn another_patient_another_parameter_or_another_type_keeps_the_test() {
        for mut known in [
            vec![search("patient", "q")],
            vec![search("encounter", "p")],
            vec![Cond::Index {
                table: Table::Reference,
                param: "subject".into(),
                test: Test::And(vec![
                    Test::Eq("target_id", Bind::Text("p".into())),
                    Test::Eq("target_type", Bind::Text("Group".into())),
                ]),
            }],
        ] {
            let before = known.clone();
            assert_eq!(
                assume(member(&["p"]), "Observation", &mut known),
                member(&["p"])
            );
            assert_eq!(known, before, "an unused term is left as it was");
        }
    }

    #[test]
    fn true_and_false_fold_through_and_or_not() {
        let mut known = vec![search("subject", "p")];
        // Either patient: true once p is guaranteed.
        let c = Cond::Or(vec![member(&["q"]), Cond::And(vec![member(&["p"])])]);
        assert_eq!(assume(c, "Observation", &mut known), Cond::And(Vec::new()));
        let c = Cond::Not(Box::new(member(&["p"])));
        assert_eq!(assume(c, "Observation", &mut known), Cond::Or(Vec::new()));
        let c = Cond::And(vec![label("HIV"), Cond::Not(Box::new(member(&["p"])))]);
        assert_eq!(assume(c, "Observation", &mut known), Cond::Or(Vec::new()));
    }
}
