"""Obtains a real SMART access token from a running ehrx for a benchmark,
the way an app does, and prints it.

    python3 smart_token.py patient BASE EHRX_BIN PATIENT_ID SCOPE
        The patient themself (an account whose fhirUser is Patient/ID),
        launched with PATIENT_ID as context: `ehrx launch`, authorize with
        PKCE, sign in, allow, redeem the code.
    python3 smart_token.py user BASE EHRX_BIN FHIR_USER SCOPE
        A person's standalone sign-in (e.g. FHIR_USER Practitioner/bench
        with `openid fhirUser user/*.rs`).
    python3 smart_token.py system BASE EHRX_BIN SCOPE
        Backend services: a client registered with an EC P-384 key, a signed
        client assertion, client_credentials.

EHRX_DATABASE_URL must name the server's database (the `ehrx` commands
register the client and the user there). Needs PyJWT, cryptography and
requests (tests/interop/requirements.txt).
"""
import base64
import hashlib
import html
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REDIRECT = "http://127.0.0.1:9/callback"


def ehrx(binary, *args, stdin=None):
    out = subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def b64(n, size):
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def system_token(base, binary, scope):
    key = ec.generate_private_key(ec.SECP384R1())
    nums = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-384", "kid": "bench", "x": b64(nums.x, 48), "y": b64(nums.y, 48)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"keys": [jwk]}, f)
    client = ehrx(binary, "client", "add", "--name", "bench", "--type", "confidential-asymmetric",
                  "--jwks-file", f.name, "--scope", scope)["client_id"]
    os.unlink(f.name)
    token_url = f"{base}/auth/token"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    assertion = jwt.encode({"iss": client, "sub": client, "aud": token_url,
                            "exp": int(time.time()) + 240, "jti": str(uuid.uuid4())},
                           pem, algorithm="ES384", headers={"kid": "bench"})
    r = requests.post(token_url, data={
        "grant_type": "client_credentials", "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion}, timeout=30)
    r.raise_for_status()
    return r.json()["access_token"]


def hidden(page, name):
    m = re.search(r'name="%s" value="([^"]*)"' % re.escape(name), page)
    return html.unescape(m.group(1)) if m else None


def patient_token(base, binary, patient, scope, fhir_user=None):
    launch = ehrx(binary, "launch", "--patient", patient)["launch"] if patient else None
    user = f"bench.{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(18)
    ehrx(binary, "user", "add", "--username", user, "--password-stdin",
         "--fhir-user", fhir_user or f"Patient/{patient}", stdin=password + "\n")
    if launch:
        scope = f"launch {scope}"
    client = ehrx(binary, "client", "add", "--name", "bench app", "--type", "public",
                  "--redirect-uri", REDIRECT, "--scope", scope)["client_id"]
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params = [("response_type", "code"), ("client_id", client), ("redirect_uri", REDIRECT),
              ("scope", scope), ("state", "bench"), ("aud", base),
              ("code_challenge", challenge), ("code_challenge_method", "S256")]
    if launch:
        params.append(("launch", launch))
    s = requests.Session()
    s.get(f"{base}/auth/authorize", params=params, timeout=30).raise_for_status()
    r = s.post(f"{base}/auth/login", data=params + [("username", user), ("password", password)],
               allow_redirects=False, timeout=30)
    page = s.get(base + "/" + r.headers["location"].lstrip("/"), timeout=30).text
    grants = [html.unescape(g) for g in re.findall(r'name="grant" value="([^"]*)"', page)]
    form = params + [("csrf", hidden(page, "csrf")), ("decision", "allow")] + [("grant", g) for g in grants]
    r = s.post(f"{base}/auth/consent", data=form, allow_redirects=False, timeout=30)
    back = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.headers["location"]).query))
    r = requests.post(f"{base}/auth/token", data={
        "grant_type": "authorization_code", "code": back["code"], "redirect_uri": REDIRECT,
        "code_verifier": verifier, "client_id": client}, timeout=30)
    r.raise_for_status()
    t = r.json()
    assert patient is None or t.get("patient") == patient, t
    return t["access_token"]


if __name__ == "__main__":
    kind, base, binary = sys.argv[1:4]
    if kind == "patient":
        print(patient_token(base, binary, sys.argv[4], sys.argv[5]))
    elif kind == "user":
        print(patient_token(base, binary, None, sys.argv[5], fhir_user=sys.argv[4]))
    else:
        print(system_token(base, binary, sys.argv[4]))
