"""XML Encryption 1.1 of one element, made with the `cryptography` package
(independent of ehrx and of libxmlsec1): AES-256-GCM content encryption, the
content key transported with RSA-OAEP using SHA-256 for both the digest and
MGF1 (http://www.w3.org/2009/xmlenc11#rsa-oaep with mgf1sha256).

    python3 xenc_oaep_sha256.py CERT.pem ELEMENT.xml > ENCRYPTED_DATA.xml

ELEMENT.xml holds one serialized element with its namespaces declared; the
xenc:EncryptedData element is written to standard output.
"""
import base64
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def main() -> None:
    cert = x509.load_pem_x509_certificate(open(sys.argv[1], "rb").read())
    element = open(sys.argv[2], "rb").read()
    key = AESGCM.generate_key(bit_length=256)
    iv = os.urandom(12)
    # XML-Enc 1.1 AES-GCM: the IV, then the ciphertext with its 128-bit tag.
    content = iv + AESGCM(key).encrypt(iv, element, None)
    wrapped = cert.public_key().encrypt(
        key,
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()),
            algorithm=hashes.SHA256(),
            label=None,
        ),
    )
    b64 = lambda b: base64.b64encode(b).decode()
    sys.stdout.write(
        '<xenc:EncryptedData xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" '
        'Type="http://www.w3.org/2001/04/xmlenc#Element">'
        '<xenc:EncryptionMethod Algorithm="http://www.w3.org/2009/xmlenc11#aes256-gcm"/>'
        '<ds:KeyInfo xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><xenc:EncryptedKey>'
        '<xenc:EncryptionMethod Algorithm="http://www.w3.org/2009/xmlenc11#rsa-oaep">'
        '<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
        '<xenc11:MGF xmlns:xenc11="http://www.w3.org/2009/xmlenc11#" '
        'Algorithm="http://www.w3.org/2009/xmlenc11#mgf1sha256"/>'
        "</xenc:EncryptionMethod>"
        f"<xenc:CipherData><xenc:CipherValue>{b64(wrapped)}</xenc:CipherValue></xenc:CipherData>"
        "</xenc:EncryptedKey></ds:KeyInfo>"
        f"<xenc:CipherData><xenc:CipherValue>{b64(content)}</xenc:CipherValue></xenc:CipherData>"
        "</xenc:EncryptedData>"
    )


if __name__ == "__main__":
    main()
