#!/usr/bin/env bash
# The reviewer's path on one machine: a throwaway PACS (Orthanc) holds a source series, `klip-med run`
# pulls it over DICOMweb (--input) and pushes its DICOM outputs back (--push), and the OHIF viewer
# (npm @ohif/app 3.13, prebuilt, installed into .viewer/) shows the study with the SEG and the
# Parametric Map on the source images.
#
#   examples/review_in_ohif.sh                      # pydicom's 5-slice CT; prints the viewer URL, Ctrl-C stops
#   examples/review_in_ohif.sh --case mri           # the bundled FLAIR slice with a glioma (MRI demo case)
#   examples/review_in_ohif.sh --screenshots DIR    # headless Chromium: DIR/ohif_{source,seg,pm}.png, then stop
#   SAMPLES=4 STEPS=50 NULL=auto examples/review_in_ohif.sh   # sampling settings and null model
#                                                   (default 1 sample, 3 steps, no null model: seconds;
#                                                   without a null the SEG is the uncalibrated p95 mask,
#                                                   THRESHOLD=... sets any --threshold rule)
#
# Needs: apt-get install -y orthanc orthanc-dicomweb (and chromium for --screenshots); node + npm (the
# npm registry once, for .viewer/). Everything listens on 127.0.0.1; every process started is stopped
# on exit and the temporary folder removed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
KLIP=${KLIP_MED:-$(dirname "$PY")/klip-med}
VIEWER=$ROOT/.viewer
CASE=ct
SHOTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --case) CASE=$2; shift 2 ;;
    --screenshots) SHOTS=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "review_in_ohif.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$CASE" = ct ] || [ "$CASE" = mri ] || { echo "review_in_ohif.sh: --case ct|mri, found $CASE" >&2; exit 2; }
ORTHANC=$(command -v Orthanc || echo /usr/sbin/Orthanc)
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
[ -x "$ORTHANC" ] && [ -e "$PLUGIN" ] || { echo "needs: apt-get install -y orthanc orthanc-dicomweb" >&2; exit 2; }

# the viewer (and, for screenshots, the browser driver) in the git-ignored .viewer/
mkdir -p "$VIEWER"
if [ ! -f "$VIEWER/package/dist/index.html" ]; then
  (cd "$VIEWER" && npm pack --silent @ohif/app@3.13.2 >/dev/null && tar xzf ohif-app-3.13.2.tgz && rm ohif-app-3.13.2.tgz)
fi
if [ -n "$SHOTS" ] && [ ! -f "$VIEWER/node_modules/playwright-core/index.mjs" ]; then
  (cd "$VIEWER" && npm install --silent --no-save --no-audit --no-fund playwright-core@1.65.1)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/klip-review.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
cat > "$WORK/orthanc.json" <<EOF
{"Name": "klip_med_review", "StorageDirectory": "$WORK/db", "IndexDirectory": "$WORK/db",
 "HttpPort": $PORT, "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
 "DicomServerEnabled": false, "DicomPort": $(free_port), "SaveJobs": false, "Plugins": ["$PLUGIN"],
 "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": false}}
EOF
"$ORTHANC" "$WORK/orthanc.json" > "$WORK/orthanc.log" 2>&1 &
PIDS+=($!)
BASE=http://127.0.0.1:$PORT
for _ in $(seq 100); do
  "$PY" -c "import urllib.request as u; u.urlopen('$BASE/system', timeout=1)" 2>/dev/null && break
  sleep 0.2
done

# the source series into the PACS (as a hospital's would already be); its study / series UIDs
if [ "$CASE" = mri ]; then  # the demo writes the bundled FLAIR slice as DICOM (dicom/source/)
  OMP_NUM_THREADS=1 "$KLIP" demo --case mri --out "$WORK/demo" --samples 1 --steps 2 --null none --no-progress >/dev/null
  SOURCE=$WORK/demo/dicom/source
  ARGS=(--physics mri:accel=4,center=0.08,noise=0.01 --prior mri-brain-flair-128)
else
  SOURCE=$("$PY" -c 'import pydicom, pathlib; print(pathlib.Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N")')
  ARGS=(--physics ct-sparse:views=60 --prior ct-abdomen-128)
fi
read -r STUDY SERIES < <("$PY" - "$BASE" "$SOURCE" <<'EOF'
import pathlib, sys, urllib.request, pydicom
base, folder = sys.argv[1], pathlib.Path(sys.argv[2])
for f in sorted(p for p in folder.iterdir() if p.is_file()):
    urllib.request.urlopen(urllib.request.Request(f"{base}/instances", f.read_bytes(), method="POST"), timeout=30)
ds = pydicom.dcmread(f, stop_before_pixels=True)
print(ds.StudyInstanceUID, ds.SeriesInstanceUID)
EOF
)

# pull, reconstruct + score, push
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$KLIP" run --input "$BASE/dicom-web/studies/$STUDY/series/$SERIES" \
  --push "$BASE/dicom-web" "${ARGS[@]}" --samples "${SAMPLES:-1}" --steps "${STEPS:-3}" --null "${NULL:-none}" \
  --threshold "${THRESHOLD:-$([ "${NULL:-none}" = none ] && echo p95 || echo auto)}" \
  --out "$WORK/out" --no-progress

# the viewer, same origin as the PACS's DICOMweb (examples/serve_ohif.py forwards /dicom-web)
"$PY" "$ROOT/examples/serve_ohif.py" --dist "$VIEWER/package/dist" --dicomweb "$BASE/dicom-web" \
  --port-file "$WORK/ohif.port" > "$WORK/ohif.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$WORK/ohif.port" ] && break; sleep 0.1; done
URL="http://127.0.0.1:$(cat "$WORK/ohif.port")/viewer?StudyInstanceUIDs=$STUDY"

if [ -z "$SHOTS" ]; then
  echo "OHIF: $URL"
  echo "(double-click 'KLIP OOD segmentation' or 'KLIP map (nats per pixel)' in the study panel; Ctrl-C stops)"
  wait "${PIDS[0]}"
  exit 0
fi

mkdir -p "$SHOTS"
"$PY" - "$WORK" "$SOURCE" "$STUDY" "$SERIES" "$(cat "$WORK/ohif.port")" "$VIEWER" <<'EOF'
import json, pathlib, sys
import numpy as np, pydicom
from klip_med.io import read_dicom_series, read_seg
work, source, study, series, port, viewer = sys.argv[1:]
work = pathlib.Path(work)
vol = read_dicom_series(source)
mask, _ = read_seg(work / "out/dicom/klip_seg.dcm", vol)
k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))  # the slice with the most SEG voxels
_, H, W = vol.shape
points = vol.voxel_to_patient(np.array([[k, 0, 0], [k, 0, W - 1], [k, H - 1, 0]], float)).tolist()
uid = lambda name: pydicom.dcmread(work / "out/dicom" / name, stop_before_pixels=True).SeriesInstanceUID
job = {"viewer": f"http://127.0.0.1:{port}", "study": study, "source": series, "seg": uid("klip_seg.dcm"),
       "pm": uid("klip_pm.dcm"), "points": points, "out": str(work), "user_data_dir": str(work / "chromium"),
       "playwright": f"{viewer}/node_modules/playwright-core/index.mjs"}
(work / "job.json").write_text(json.dumps(job))
EOF
node "$ROOT/examples/ohif_screenshots.mjs" "$WORK/job.json"
for name in source seg pm; do cp "$WORK/$name.png" "$SHOTS/ohif_$name.png"; done
echo "screenshots: $SHOTS/ohif_source.png $SHOTS/ohif_seg.png $SHOTS/ohif_pm.png"
