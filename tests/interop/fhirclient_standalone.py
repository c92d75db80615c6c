"""SMART standalone launch done by the `fhirclient` library (SMART on FHIR's
Python client, from PyPI), driven by tests/smart.rs.

Protocol on stdin/stdout: prints the authorize URL fhirclient built, reads
back the redirect URL the server sent the browser to, lets fhirclient
exchange the code, then reads the patient and their observations through
fhirclient and prints what it got as one JSON line.

    python3 fhirclient_standalone.py BASE CLIENT_ID REDIRECT_URI SCOPE
"""
import json
import sys

from fhirclient import client
from fhirclient.models.observation import Observation

base, client_id, redirect_uri, scope = sys.argv[1:5]
smart = client.FHIRClient(
    settings={
        "app_id": client_id,
        "api_base": base,
        "redirect_uri": redirect_uri,
        "scope": scope,
    }
)
print(smart.authorize_url, flush=True)
callback = sys.stdin.readline().strip()
smart.handle_callback(callback)
patient = smart.patient
bundle = Observation.where(struct={"patient": smart.patient_id}).perform(smart.server)
print(
    json.dumps(
        {
            "ready": smart.ready,
            "patient_id": smart.patient_id,
            "family": patient.name[0].family,
            "observations": sorted(e.resource.id for e in (bundle.entry or [])),
        }
    ),
    flush=True,
)
