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
