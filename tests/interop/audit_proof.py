"""Checks ehrx's audit log with code independent of ehrx: the signed
checkpoint's ECDSA signature (Python `cryptography`), one entry's inclusion
proof and a consistency proof, hashed here as RFC 6962 / RFC 9162 define.

Usage: audit_proof.py BASE_URL TOKEN INDEX
Prints "ok" and exits 0 when everything verifies."""

import base64
import hashlib
import sys

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def sha256(b):
    return hashlib.sha256(b).digest()


def leaf_hash(data):
    return sha256(b"\x00" + data)


def node_hash(left, right):
    return sha256(b"\x01" + left + right)


def root_from_inclusion(index, size, leaf, proof):
    """RFC 9162 section 2.1.3.2: the root an inclusion proof leads to."""
    if index >= size:
        raise ValueError("index out of range")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ValueError("proof too long")
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("proof too short")
    return r


def consistent(first, second, first_root, second_root, proof):
    """RFC 9162 section 2.1.4.2."""
    if first == second:
        return not proof and first_root == second_root
    if first & (first - 1) == 0:
        proof = [first_root] + proof
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


def main():
    base, token, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    key = requests.get(f"{base}/audit/key").json()
    cp = requests.get(f"{base}/audit/checkpoint").json()
    public = serialization.load_pem_public_key(key["public_key"].encode())
    note = f"{cp['origin']}\n{cp['size']}\n{cp['root']}\n"
    assert note == cp["note"], "the signed text is not the checkpoint's fields"
    public.verify(base64.b64decode(cp["signature"]), note.encode(), ec.ECDSA(hashes.SHA256()))
    root = base64.b64decode(cp["root"])

    # The entry exactly as stored: its bytes are the leaf data's preimage.
    r = requests.get(
        f"{base}/AuditEvent/{index}", headers={"Authorization": f"Bearer {token}"}
    )
    r.raise_for_status()
    leaf = leaf_hash(sha256(r.content))
    p = requests.get(
        f"{base}/audit/proof/inclusion", params={"index": index, "size": cp["size"]}
    ).json()
    proof = [base64.b64decode(h) for h in p["proof"]]
    assert root_from_inclusion(index, cp["size"], leaf, proof) == root, "inclusion proof fails"

    # A consistency proof from the first entry to the checkpoint.
    c = requests.get(
        f"{base}/audit/proof/consistency", params={"from": 1, "to": cp["size"]}
    ).json()
    first_root = base64.b64decode(c["from_root"])
    cproof = [base64.b64decode(h) for h in c["proof"]]
    assert base64.b64decode(c["to_root"]) == root
    assert consistent(1, cp["size"], first_root, root, cproof), "consistency proof fails"
    print("ok")


if __name__ == "__main__":
    main()
