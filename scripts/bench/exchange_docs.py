#!/usr/bin/env python3
"""Makes N distinct signed C-CDA documents for the exchange load benchmark,
with xmlsec1 (an implementation independent of ehrx): each is the CCD sample
with its own title, its first section encrypted for ehrx (AES-128-GCM content
key, RSA-OAEP key transport to ehrx's exchange certificate), then signed with
an enveloped RSA-SHA256 signature (exclusive c14n, SHA-256 digest, the
certificate in KeyInfo).

    exchange_docs.py CCD EHRX_CERT SENDER_KEY SENDER_CERT OUT_DIR N
"""
import concurrent.futures
import os
import subprocess
import sys
import tempfile

EXC = "http://www.w3.org/2001/10/xml-exc-c14n#"
SIGNATURE = (
    '<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:SignedInfo>'
    f'<ds:CanonicalizationMethod Algorithm="{EXC}"/>'
    '<ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>'
    '<ds:Reference URI=""><ds:Transforms>'
    '<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>'
    f'<ds:Transform Algorithm="{EXC}"/></ds:Transforms>'
    '<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
    "<ds:DigestValue/></ds:Reference></ds:SignedInfo><ds:SignatureValue/>"
    "<ds:KeyInfo><ds:X509Data/></ds:KeyInfo></ds:Signature>"
)
ENCRYPTED = (
    '<xenc:EncryptedData xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" '
    'Type="http://www.w3.org/2001/04/xmlenc#Element">'
    '<xenc:EncryptionMethod Algorithm="http://www.w3.org/2009/xmlenc11#aes128-gcm"/>'
    '<ds:KeyInfo xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><xenc:EncryptedKey>'
    '<xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p"/>'
    "<xenc:CipherData><xenc:CipherValue/></xenc:CipherData></xenc:EncryptedKey></ds:KeyInfo>"
    "<xenc:CipherData><xenc:CipherValue/></xenc:CipherData></xenc:EncryptedData>"
)


def make(i, source, ehrx_cert, key, cert, out_dir, scratch):
    d = os.path.join(scratch, str(i))
    os.mkdir(d)
    data, tmpl, enc, unsigned = (os.path.join(d, n) for n in ("data", "tmpl", "enc", "unsigned"))
    with open(data, "w") as f:
        f.write(source.replace("<title>", f"<title>{i} ", 1))
    with open(tmpl, "w") as f:
        f.write(ENCRYPTED)
    subprocess.run(
        ["xmlsec1", "--encrypt", "--pubkey-cert-pem", ehrx_cert, "--session-key", "aes-128",
         "--xml-data", data, "--node-xpath", "(//*[local-name()='section'])[1]",
         "--output", enc, tmpl],
        check=True, capture_output=True)
    text = open(enc).read()
    close = text.rfind("</")
    with open(unsigned, "w") as f:
        f.write(text[:close] + SIGNATURE + text[close:])
    out = os.path.join(out_dir, f"doc-{i:05}.xml")
    subprocess.run(
        ["xmlsec1", "--sign", "--privkey-pem", f"{key},{cert}", "--output", out, unsigned],
        check=True, capture_output=True)
    return out


def main():
    ccd, ehrx_cert, key, cert, out_dir, n = sys.argv[1:7]
    source = open(ccd).read()
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, \
            concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        jobs = [pool.submit(make, i, source, ehrx_cert, key, cert, out_dir, scratch)
                for i in range(int(n))]
        for j in jobs:
            j.result()


if __name__ == "__main__":
    main()
