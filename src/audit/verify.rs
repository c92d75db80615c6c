//! Checking the log: recompute the tree from the stored rows and compare
//! it with what was recorded and signed, naming the first entry that was
//! changed, inserted, removed or moved.
//!
//! What each check catches:
//! - a row's body no longer hashes to its digest, or a searchable column
//!   disagrees with the body: that entry was changed;
//! - a position is missing: that entry was removed;
//! - a row's body names another position (its `id`): entries were moved,
//!   inserted before it or removed before it; the lower of the two
//!   positions is the first bad one;
//! - more or fewer rows than the log's recorded size: entries inserted at,
//!   or removed from, the end;
//! - a signed checkpoint whose root differs from the recomputed root of
//!   that size: an entry up to that size was rewritten together with its
//!   digest (or removed, when the log is now shorter than the checkpoint).

use serde::Serialize;

use super::checkpoint::Checkpoint;
use super::event::Columns;
use super::tree::{self, Tree};

/// One stored entry, as read back.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: i64,
    /// `None` once pruned by retention.
    pub body: Option<String>,
    /// Hex SHA-256 of the body.
    pub digest: String,
    pub columns: Columns,
}

/// What is wrong at one entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The first entry concerned.
    pub entry: u64,
    pub what: String,
}

/// The result of a check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verified: bool,
    /// Entries read.
    pub size: u64,
    /// The first bad entry, if any.
    pub first_bad: Option<u64>,
    /// Up to [`MAX_PROBLEMS`] problems, earliest first.
    pub problems: Vec<Problem>,
    /// Signed checkpoints that were checked against the recomputed tree.
    pub checkpoints_checked: usize,
}

pub const MAX_PROBLEMS: usize = 20;

/// Checks rows against each other, the recorded size and the checkpoints.
pub struct Verifier<'a> {
    tree: Tree,
    expected: u64,
    problems: Vec<Problem>,
    checkpoints: Vec<&'a Checkpoint>,
    checked: usize,
    last_good: u64,
    /// Entries before this position were appended before the log had an
    /// `organizations` column: theirs must be empty.
    organizations_from: u64,
}

impl<'a> Verifier<'a> {
    /// A check against `checkpoints`, whose signatures the caller checked.
    pub fn new(checkpoints: &'a [Checkpoint]) -> Verifier<'a> {
        let mut cps: Vec<&Checkpoint> = checkpoints.iter().collect();
        cps.sort_by_key(|c| c.size);
        Verifier {
            tree: Tree::new(),
            expected: 0,
            problems: Vec::new(),
            checkpoints: cps,
            checked: 0,
            last_good: 0,
            organizations_from: 0,
        }
    }

    /// The first entry appended with an `organizations` column
    /// (`audit_head.organizations_from`).
    pub fn organizations_from(&mut self, seq: u64) {
        self.organizations_from = seq;
    }

    /// Reports a checkpoint whose signature does not verify.
    pub fn unsigned(&mut self, c: &Checkpoint) {
        self.problem(
            c.size,
            format!(
                "the checkpoint of size {} is not signed by the audit key",
                c.size
            ),
        );
    }

    fn problem(&mut self, entry: u64, what: String) {
        self.problems.push(Problem { entry, what });
    }

    /// The next row, in position order.
    pub fn row(&mut self, row: &Row) {
        let seq = row.seq.max(0) as u64;
        if seq > self.expected {
            let n = seq - self.expected;
            self.problem(
                self.expected,
                format!(
                    "entry {} removed ({n} position(s) missing before entry {seq})",
                    self.expected
                ),
            );
            // Go on from here so later problems are found too; the tree
            // is no longer comparable with the checkpoints.
            self.expected = seq;
        }
        let digest: Option<[u8; 32]> = hex::decode(&row.digest)
            .ok()
            .and_then(|d| d.try_into().ok());
        match &row.body {
            Some(body) => {
                let actual = tree::digest(body.as_bytes());
                if digest != Some(actual) {
                    self.problem(
                        seq,
                        format!("entry {seq} changed: its body does not match its digest"),
                    );
                }
                match serde_json::from_str::<serde_json::Value>(body) {
                    Ok(v) => {
                        let id = v["id"].as_str().and_then(|s| s.parse::<u64>().ok());
                        match id {
                            Some(id) if id != seq => {
                                self.problem(
                                    id.min(seq),
                                    format!(
                                        "position {seq} holds entry {id}: entries were moved, \
                                         inserted or removed"
                                    ),
                                );
                            }
                            None => self.problem(
                                seq,
                                format!("entry {seq} changed: its id is not its position"),
                            ),
                            _ => {}
                        }
                        let mut derived = Columns::of(&v);
                        if seq < self.organizations_from {
                            derived.organizations = None;
                        }
                        for ((name, stored), (_, expect)) in
                            row.columns.named().iter().zip(derived.named().iter())
                        {
                            if stored != expect {
                                self.problem(
                                    seq,
                                    format!(
                                        "entry {seq} changed: column {name} disagrees with the entry"
                                    ),
                                );
                                break;
                            }
                        }
                    }
                    Err(_) => {
                        self.problem(seq, format!("entry {seq} changed: its body is not JSON"))
                    }
                }
            }
            None => {
                if row.columns != Columns::default() {
                    self.problem(
                        seq,
                        format!("entry {seq} changed: a pruned entry has column values"),
                    );
                }
            }
        }
        let leaf = digest.unwrap_or_else(|| {
            self.problem(seq, format!("entry {seq} changed: its digest is malformed"));
            [0u8; 32]
        });
        self.tree.push(leaf);
        self.expected = seq + 1;
        self.check_checkpoints();
    }

    fn check_checkpoints(&mut self) {
        let len = self.tree.len();
        while let Some(c) = self.checkpoints.first().copied() {
            if c.size > len {
                break;
            }
            self.checkpoints.remove(0);
            if c.size < len {
                continue;
            }
            self.checked += 1;
            if c.root_bytes() == Some(self.tree.root()) {
                self.last_good = c.size;
            } else if self.problems.is_empty() {
                // (An entry already found bad explains a different root.)
                self.problem(
                    self.last_good,
                    format!(
                        "an entry between {} and {} was changed since the checkpoint of size {} \
                         (the recomputed root differs from the signed one)",
                        self.last_good,
                        c.size - 1,
                        c.size
                    ),
                );
            }
        }
    }

    /// The report, given the log's recorded size.
    pub fn finish(mut self, head_size: u64) -> Report {
        let len = self.expected;
        if len < head_size {
            self.problem(
                len,
                format!("entry {len} removed: the log records {head_size} entries, {len} are left"),
            );
        } else if len > head_size {
            self.problem(
                head_size,
                format!("entry {head_size} inserted: the log records {head_size} entries, {len} are present"),
            );
        }
        for c in std::mem::take(&mut self.checkpoints) {
            self.problem(
                len,
                format!(
                    "entry {len} removed: a signed checkpoint covers {} entries, {len} are left",
                    c.size
                ),
            );
        }
        self.problems.sort_by_key(|p| p.entry);
        self.problems.truncate(MAX_PROBLEMS);
        Report {
            verified: self.problems.is_empty(),
            size: len,
            first_bad: self.problems.first().map(|p| p.entry),
            problems: self.problems,
            checkpoints_checked: self.checked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{Action, Event, EventType};

    fn rows(n: u64) -> Vec<Row> {
        (0..n)
            .map(|i| {
                let mut v = Event::new(EventType::rest("read"), Action::Read)
                    .patient(Some(format!("p{i}")))
                    .to_json();
                v["id"] = serde_json::json!(i.to_string());
                let body = serde_json::to_string(&v).unwrap();
                Row {
                    seq: i as i64,
                    digest: hex::encode(tree::digest(body.as_bytes())),
                    columns: Columns::of(&v),
                    body: Some(body),
                }
            })
            .collect()
    }

    fn check(rows: &[Row], head: u64) -> Report {
        let mut v = Verifier::new(&[]);
        for r in rows {
            v.row(r);
        }
        v.finish(head)
    }

    #[test]
    fn each_kind_of_tampering_names_its_entry() {
        let good = rows(6);
        assert!(check(&good, 6).verified);
        let mut changed = good.clone();
        changed[3].columns.outcome = Some("4".into());
        assert_eq!(check(&changed, 6).first_bad, Some(3));
        let mut removed = good.clone();
        removed.remove(2);
        assert_eq!(check(&removed, 6).first_bad, Some(2));
        let mut swapped = good.clone();
        swapped.swap(1, 4);
        swapped[1].seq = 1;
        swapped[4].seq = 4;
        assert_eq!(check(&swapped, 6).first_bad, Some(1));
        let mut truncated = good.clone();
        truncated.pop();
        assert_eq!(check(&truncated, 6).first_bad, Some(5));
        assert_eq!(check(&good, 5).first_bad, Some(5));
    }
}
