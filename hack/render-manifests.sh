#!/usr/bin/env bash
# Render deploy/ from charts/captchatask (`make manifests`). The chart is the single source of
# truth; deploy/ is for people who install with `kubectl apply` instead of Helm.
#
#   hack/render-manifests.sh            regenerate files/grafana-alerting.yaml and deploy/
#   hack/render-manifests.sh OUTDIR     render the deploy/ files into OUTDIR only (the drift test
#                                       renders into a temp dir and compares with deploy/)
#
# Rendered as release "captchatask" in namespace "captchatask", with the pingback key in a Secret
# the user creates (a key rendered into a public manifest would be no secret): see deploy/README.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="${root}/charts/captchatask"
out="${1:-${root}/deploy}"
helm="${HELM:-${TESTBIN_DIR:-${root}/.testbin}/bin/helm}"
python="${PYTHON:-${root}/.venv/bin/python}"
# shellcheck source=versions.env
source "${root}/hack/versions.env"

release=captchatask
namespace=captchatask
header="# GENERATED from charts/captchatask by \`make manifests\` (hack/render-manifests.sh); do not edit."

if [[ ! -x "${helm}" ]]; then
  echo "render-manifests: helm not found at ${helm} (run `make testtools`, or set HELM)" >&2
  exit 1
fi

if [[ $# -eq 0 ]]; then
  "${python}" "${root}/hack/grafana_alerting.py"
fi
mkdir -p "${out}"

# helm template with the deploy/ settings; extra arguments select what to show.
render() {
  "${helm}" template "${release}" "${chart}" \
    --namespace "${namespace}" \
    --kube-version "${KUBERNETES_VERSION}" \
    --set pingbackKey.create=false \
    --set pingbackKey.existingSecret=captchatask-pingback-key \
    "$@"
}

# One output file: the header, a description line, then the documents.
emit() {
  local file="$1" description="$2"
  {
    echo "${header}"
    echo "# ${description}"
    cat
  } >"${out}/${file}"
}

{
  for crd in "${chart}"/crds/*.yaml; do
    echo "---"
    cat "${crd}"
  done
} | emit crds.yaml "The captchatask CRDs. kubectl apply --server-side -f deploy/crds.yaml (again after every upgrade)."

{
  for crd in "${chart}"/charts/kopf-peering/crds/*.yaml; do
    echo "---"
    cat "${crd}"
  done
} | emit kopf-peering-crds.yaml "kopf's peering CRDs: only for the HA operator (deploy/operator-ha.yaml)."

cat <<'README' >"${out}/README.md"
<!-- GENERATED from charts/captchatask by `make manifests` (hack/render-manifests.sh); do not edit. -->
# deploy/: plain manifests for `kubectl apply`

Generated from `charts/captchatask` by `make manifests`; do not edit (a test fails on drift).
Release name `captchatask`, namespace `captchatask`, default values. Prefer the Helm chart: it
generates the pingback key for you and lets you change every value.

```sh
kubectl apply --server-side -f deploy/crds.yaml      # again after every upgrade
kubectl apply -f deploy/namespace.yaml
# The pingback HMAC key: 48 random alphanumerics, created once and never rotated by accident.
kubectl -n captchatask create secret generic captchatask-pingback-key \
  --from-literal=hmacKey="$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 48)"
kubectl apply -f deploy/rbac.yaml -f deploy/operator.yaml -f deploy/receiver.yaml
# Optional: Prometheus Operator objects, Grafana dashboard and alert rules.
kubectl apply -f deploy/monitoring.yaml
```

| File | What |
|---|---|
| `crds.yaml` | CaptchaTask, CaptchaProvider, CaptchaDeadLetter |
| `namespace.yaml` | the `captchatask` namespace |
| `rbac.yaml` | ServiceAccounts, ClusterRole/Binding (operator), Role/Binding (receiver), and the `captchatask-view`/`-edit` ClusterRoles that Kubernetes aggregates into the standard `view`, `edit` and `admin` roles |
| `operator.yaml` | one standalone operator (`Recreate`) and its metrics Service |
| `operator-ha.yaml` | instead of `operator.yaml`: two replicas with kopf peering; apply `kopf-peering-crds.yaml` first; its ClusterRole replaces the one in `rbac.yaml` |
| `kopf-peering-crds.yaml` | kopf's KopfPeering and ClusterKopfPeering CRDs (HA only) |
| `receiver.yaml` | the standalone pingback receiver (two replicas), its Services and PDB |
| `monitoring.yaml` | ServiceMonitor, PrometheusRule, dashboard ConfigMap, Grafana alert rules ConfigMap |
README

cat <<NS | emit namespace.yaml "The namespace everything else in deploy/ lives in."
---
apiVersion: v1
kind: Namespace
metadata:
  name: ${namespace}
  labels:
    app.kubernetes.io/part-of: captchatask
NS

render \
  --show-only templates/operator-serviceaccount.yaml \
  --show-only templates/operator-clusterrole.yaml \
  --show-only templates/operator-clusterrolebinding.yaml \
  --show-only templates/receiver-serviceaccount.yaml \
  --show-only templates/receiver-role.yaml \
  --show-only templates/receiver-rolebinding.yaml \
  --show-only templates/user-clusterroles.yaml \
  | emit rbac.yaml "ServiceAccounts and least-privilege RBAC for the operator and the receiver; view/edit roles for people."

render \
  --show-only templates/operator-deployment.yaml \
  --show-only templates/operator-service.yaml \
  | emit operator.yaml "The operator: one standalone replica (Recreate) serving all namespaces."

render --set operator.ha.enabled=true \
  --show-only templates/operator-deployment.yaml \
  --show-only templates/operator-peering.yaml \
  --show-only templates/operator-pdb.yaml \
  --show-only templates/operator-clusterrole.yaml \
  | emit operator-ha.yaml "Instead of operator.yaml: two replicas, active/standby (apply kopf-peering-crds.yaml first)."

render \
  --show-only templates/receiver-deployment.yaml \
  --show-only templates/receiver-service.yaml \
  --show-only templates/receiver-service-metrics.yaml \
  --show-only templates/receiver-pdb.yaml \
  | emit receiver.yaml "The standalone pingback receiver: two replicas behind a Service."

render \
  --set metrics.serviceMonitor.enabled=true \
  --set metrics.prometheusRule.enabled=true \
  --set metrics.dashboards.enabled=true \
  --set metrics.grafanaAlerting.enabled=true \
  --show-only templates/servicemonitor.yaml \
  --show-only templates/prometheusrule.yaml \
  --show-only templates/dashboards-configmap.yaml \
  --show-only templates/grafana-alerting-configmap.yaml \
  | emit monitoring.yaml "ServiceMonitor and PrometheusRule (Prometheus Operator), Grafana dashboard and alert rules."
