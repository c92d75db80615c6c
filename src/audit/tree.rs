//! The log as an RFC 6962 Merkle tree, through `ct-merkle`.
//!
//! Each entry's leaf data is its digest: SHA-256 of the AuditEvent's stored
//! bytes. The leaf hash is then SHA-256(0x00 || digest) and an inner node
//! SHA-256(0x01 || left || right), as RFC 6962 §2.1 defines; keeping the
//! 32-byte digests (not the events) in memory bounds the tree's size per
//! entry.

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use sha2::Digest as _;

/// The hash of the tree.
pub type Hash = sha2_rfc6962::Sha256;

/// An entry's leaf data.
pub type Leaf = [u8; 32];

/// The digest (leaf data) of an entry's stored bytes.
pub fn digest(body: &[u8]) -> Leaf {
    sha2::Sha256::digest(body).into()
}

/// The log's tree, from its leaves in order.
#[derive(Default)]
pub struct Tree {
    inner: MemoryBackedTree<Hash, Leaf>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn len(&self) -> u64 {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    pub fn push(&mut self, leaf: Leaf) {
        self.inner.push(leaf);
    }

    /// The first `size` leaves as a tree of their own.
    pub fn prefix(&self, size: u64) -> Tree {
        let mut t = Tree::new();
        for l in self.inner.items().iter().take(size as usize) {
            t.push(*l);
        }
        t
    }

    /// The root hash (RFC 6962 MTH) of the whole tree.
    pub fn root(&self) -> [u8; 32] {
        let r = self.inner.root();
        let mut out = [0u8; 32];
        out.copy_from_slice(r.as_bytes());
        out
    }

    /// The root of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Option<[u8; 32]> {
        if size > self.len() {
            return None;
        }
        Some(if size == self.len() {
            self.root()
        } else {
            self.prefix(size).root()
        })
    }

    pub fn leaf(&self, index: u64) -> Option<Leaf> {
        self.inner.get(index as usize).copied()
    }

    /// The audit path of leaf `index` in the tree of the first `size`
    /// leaves, as hashes from the leaf up.
    pub fn inclusion(&self, index: u64, size: u64) -> Option<Vec<[u8; 32]>> {
        if index >= size || size > self.len() {
            return None;
        }
        let proof = if size == self.len() {
            self.inner.prove_inclusion(index as usize)
        } else {
            self.prefix(size).inner.prove_inclusion(index as usize)
        };
        Some(chunks(proof.as_bytes()))
    }

    /// The consistency proof between the trees of the first `old` and the
    /// first `new` leaves.
    pub fn consistency(&self, old: u64, new: u64) -> Option<Vec<[u8; 32]>> {
        if old == 0 || old > new || new > self.len() {
            return None;
        }
        let proof = if new == self.len() {
            self.inner.prove_consistency((new - old) as usize)
        } else {
            self.prefix(new)
                .inner
                .prove_consistency((new - old) as usize)
        };
        Some(chunks(proof.as_bytes()))
    }
}

fn chunks(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes
        .chunks(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

fn root_hash(root: &[u8; 32], size: u64) -> RootHash<Hash> {
    RootHash::new((*root).into(), size)
}

/// Checks an inclusion proof of `leaf` at `index` against `root` of a tree
/// of `size` leaves.
pub fn verify_inclusion(
    root: &[u8; 32],
    size: u64,
    leaf: &Leaf,
    index: u64,
    proof: &[[u8; 32]],
) -> bool {
    let bytes: Vec<u8> = proof.iter().flatten().copied().collect();
    root_hash(root, size)
        .verify_inclusion(leaf, index, &InclusionProof::from_bytes(bytes))
        .is_ok()
}

/// Checks that the tree `(old_root, old)` is a prefix of `(new_root, new)`.
pub fn verify_consistency(
    old_root: &[u8; 32],
    old: u64,
    new_root: &[u8; 32],
    new: u64,
    proof: &[[u8; 32]],
) -> bool {
    let bytes: Vec<u8> = proof.iter().flatten().copied().collect();
    match ConsistencyProof::<Hash>::try_from_bytes(bytes) {
        Ok(p) => root_hash(new_root, new)
            .verify_consistency(&root_hash(old_root, old), &p)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(parts: &[&[u8]]) -> [u8; 32] {
        let mut d = sha2::Sha256::new();
        for p in parts {
            d.update(p);
        }
        d.finalize().into()
    }

    #[test]
    fn the_root_follows_rfc_6962() {
        let leaves: Vec<Leaf> = (0..3u8).map(|i| digest(&[i])).collect();
        let mut t = Tree::new();
        for l in &leaves {
            t.push(*l);
        }
        let lh: Vec<[u8; 32]> = leaves.iter().map(|l| h(&[&[0], l])).collect();
        let left = h(&[&[1], &lh[0], &lh[1]]);
        assert_eq!(t.root(), h(&[&[1], &left, &lh[2]]));
        assert_eq!(t.root_at(2), Some(left));
    }

    #[test]
    fn proofs_verify() {
        let mut t = Tree::new();
        for i in 0..11u8 {
            t.push(digest(&[i]));
        }
        for size in 1..=11 {
            let root = t.root_at(size).unwrap();
            for i in 0..size {
                let p = t.inclusion(i, size).unwrap();
                assert!(verify_inclusion(&root, size, &t.leaf(i).unwrap(), i, &p));
            }
            for old in 1..=size {
                let p = t.consistency(old, size).unwrap();
                let old_root = t.root_at(old).unwrap();
                assert!(verify_consistency(&old_root, old, &root, size, &p));
            }
        }
    }
}
