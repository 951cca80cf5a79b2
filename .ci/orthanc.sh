#!/usr/bin/env bash
# Start a throw-away Orthanc PACS (Debian's orthanc + orthanc-dicomweb) on 127.0.0.1 for the DICOMweb tests
# and print `export DERMLENS_ORTHANC_URL=...`. Usage: eval "$(bash .ci/orthanc.sh)".
# Installs the Debian packages (and dicom3tools) only if they are missing. HTTP only (no DICOM port);
# Orthanc 1.10 cannot bind to one address, so RemoteAccessAllowed=false refuses every client but loopback;
# no authentication (loopback only); storage in a temporary folder; DICOMweb at /dicom-web/.
set -euo pipefail
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
# dicom3tools: dciodvfy, the validator the DICOM tests run on every SR they write.
if ! command -v Orthanc >/dev/null || [ ! -f "$PLUGIN" ] || ! command -v dciodvfy >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    orthanc orthanc-dicomweb dicom3tools >/dev/null) >&2
fi
PORT="${DERMLENS_ORTHANC_PORT:-8042}"
ROOT="${DERMLENS_ORTHANC_DIR:-${TMPDIR:-/tmp}/dermlens-orthanc-$PORT}"
URL="http://127.0.0.1:$PORT"
mkdir -p "$ROOT/storage"
cat >"$ROOT/orthanc.json" <<JSON
{
  "Name": "dermlens-test",
  "StorageDirectory": "$ROOT/storage",
  "IndexDirectory": "$ROOT/storage",
  "HttpPort": $PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "OrthancExplorerEnabled": false,
  "WebDavEnabled": false,
  "Plugins": ["$PLUGIN"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": false, "Host": "127.0.0.1:$PORT"}
}
JSON
if ! curl -fsS "$URL/system" >/dev/null 2>&1; then
  nohup Orthanc "$ROOT/orthanc.json" >"$ROOT/orthanc.log" 2>&1 &
  echo $! >"$ROOT/orthanc.pid"
  for _ in $(seq 1 100); do
    curl -fsS "$URL/dicom-web/studies" >/dev/null 2>&1 && break
    sleep 0.2
  done
  if ! curl -fsS "$URL/dicom-web/studies" >/dev/null 2>&1; then
    echo "Orthanc did not answer on $URL (log: $ROOT/orthanc.log)" >&2
    tail -5 "$ROOT/orthanc.log" >&2
    exit 1
  fi
fi
echo "export DERMLENS_ORTHANC_URL=$URL"
