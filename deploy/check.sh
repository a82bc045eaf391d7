#!/usr/bin/env bash
# Offline checks of deploy/: the dashboard's and the rules' metric names against the code,
# the PrometheusRule's groups through promtool, and the manifests through kubernetes-validate
# (strict: unknown fields fail). Installs promtool (Debian's `prometheus`) and the Python
# packages it needs when they are missing. No cluster and no network beyond the package
# registries are needed. Run from anywhere: deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_python() { # module, package
  python3 -c "import $1" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check "$2"
}
need_python yaml pyyaml
need_python kubernetes_validate kubernetes-validate
if ! command -v promtool >/dev/null; then
  echo "installing promtool (Debian package prometheus)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq prometheus >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq prometheus >/dev/null; fi
fi

echo "== metric names and labels used by the dashboard and the rules"
python3 deploy/grafana/check_metrics.py

echo "== PrometheusRule groups (promtool check rules)"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
python3 - "$WORK/rules.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open("deploy/kubernetes/prometheusrule.yaml"))
assert doc["kind"] == "PrometheusRule", doc["kind"]
yaml.safe_dump({"groups": doc["spec"]["groups"]}, open(sys.argv[1], "w"), sort_keys=False)
PY
promtool check rules "$WORK/rules.yaml"

echo "== Kubernetes manifests (kubernetes-validate --strict; custom resources need their CRDs and are only parsed)"
python3 - <<'PY'
import glob, sys, yaml
# Every file kustomization.yaml lists must exist and parse.
k = yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))
missing = [r for r in k.get("resources", []) if not glob.glob("deploy/kubernetes/" + r)]
if missing:
    sys.exit(f"kustomization.yaml lists missing files: {missing}")
PY
kubernetes-validate --strict --quiet --no-warn deploy/kubernetes/*.yaml
echo "deploy checks passed"
