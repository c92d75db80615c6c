"""SMART Backend Services with PyJWT (a JOSE library from PyPI) and
`requests`, driven by tests/smart.rs: discovers the token endpoint, signs a
client assertion with the given private key, obtains a token and reads
data with it; prints what it got as one JSON line.

    python3 backend_services.py BASE CLIENT_ID KEY_PEM KID ALG SCOPE
"""
import json
import sys
import time
import uuid

import jwt
import requests

base, client_id, key_path, kid, alg, scope = sys.argv[1:7]
config = requests.get(f"{base}/.well-known/smart-configuration", timeout=30).json()
token_url = config["token_endpoint"]
with open(key_path, "rb") as f:
    key = f.read()
assertion = jwt.encode(
    {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": int(time.time()) + 240,
        "jti": str(uuid.uuid4()),
    },
    key,
    algorithm=alg,
    headers={"kid": kid},
)
r = requests.post(
    token_url,
    data={
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    },
    timeout=30,
)
token = r.json()
patients = requests.get(
    f"{base}/Patient",
    headers={
        "Authorization": f"Bearer {token.get('access_token', '')}",
        "Accept": "application/fhir+json",
    },
    timeout=30,
)
print(
    json.dumps(
        {
            "token_status": r.status_code,
            "scope": token.get("scope"),
            "read_status": patients.status_code,
            "total": patients.json().get("total"),
        }
    ),
    flush=True,
)
