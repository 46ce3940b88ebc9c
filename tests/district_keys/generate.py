"""Generate the development key pairs of the reference district systems.

The public halves go into the package (`likvard/reference/district-keys/<system>.json`, a
JWKS each); the private halves stay here, in the tests (`<system>.private.json`), for the
tests, the benchmark and the demo's district producer. A real deployment never uses these:
it sets LIKVARD_DISTRICT_KEYS_DIR to a folder of the city's JWKS files.

Run: .venv/bin/python -m tests.district_keys.generate (overwrites every key).
"""

from __future__ import annotations

import json
from pathlib import Path

from joserfc.jwk import ECKey, KeyParameters, RSAKey

from likvard.district_keys import DEFAULT_KEYS_DIR, DEFAULT_SYSTEMS

HERE = Path(__file__).resolve().parent
ALGORITHM = {"angered-procapita": "RS256"}
"""Every system signs with ES256 but one, so both allowed algorithms are exercised."""


def main() -> None:
    systems = json.loads(DEFAULT_SYSTEMS.read_text(encoding="utf-8"))["systems"]
    for system in systems:
        sid = system["id"]
        alg = ALGORITHM.get(sid, "ES256")
        params: KeyParameters = {"kid": f"{sid}-dev-1", "alg": alg, "use": "sig"}
        key = (
            ECKey.generate_key("P-256", params, private=True)
            if alg == "ES256"
            else RSAKey.generate_key(2048, params, private=True)
        )
        private = key.as_dict(private=True)
        public = key.as_dict(private=False)
        (HERE / f"{sid}.private.json").write_text(json.dumps(private, indent=2) + "\n")
        jwks = {"keys": [public]}
        (DEFAULT_KEYS_DIR / system["jwks"]).write_text(json.dumps(jwks, indent=2) + "\n")
        print(f"{sid}: {params['kid']} ({alg})")


if __name__ == "__main__":
    main()
