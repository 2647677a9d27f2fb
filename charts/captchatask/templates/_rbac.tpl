{{/*
RBAC rules, grouped by who needs them: "# Framework (kopf)" for what kopf itself does,
"# Operator" / "# Sidecar" for what captchatask's code does. tests/chart/test_chart_cluster.py
proves each grant (and each denial) with `kubectl auth can-i` against a real API server.
*/}}

{{/* Cluster-scoped needs of kopf, in every mode. */}}
{{- define "captchatask.rbac.operatorClusterFramework" -}}
# Framework (kopf): discover the CRDs it serves and notice when they change (resource scanning).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if not .Values.operator.watch.allNamespaces }}
# Framework (kopf): list the served namespaces to learn which of them exist (namespaced mode).
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- if and .Values.operator.ha.enabled .Values.operator.watch.allNamespaces }}
# Framework (kopf): peering keep-alives in the ClusterKopfPeering (HA, cluster-wide).
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{/* What the operator needs where it serves tasks (cluster-wide or per namespace). */}}
{{- define "captchatask.rbac.operatorServing" -}}
{{- if and .Values.operator.ha.enabled (not .Values.operator.watch.allNamespaces) }}
# Framework (kopf): peering keep-alives in the KopfPeering of each served namespace (HA).
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
# Framework (kopf) and Operator: Events on handler outcomes and on every task transition.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# Operator: tasks are the ledger. Watch them, patch finalizers/annotations (kopf's progress
# storage) and spec-side fields, delete finished ones after ttlSecondsAfterFinished.
- apiGroups: [captchatask.dev]
  resources: [captchatasks]
  verbs: [get, list, watch, patch, delete]
# Operator: task status, only through compare-and-set JSON patches (captchatask.ledger).
- apiGroups: [captchatask.dev]
  resources: [captchatasks/status]
  verbs: [get, patch]
# Operator: providers are reconciled (Ready condition, threads, balance).
- apiGroups: [captchatask.dev]
  resources: [captchaproviders]
  verbs: [get, list, watch, patch]
- apiGroups: [captchatask.dev]
  resources: [captchaproviders/status]
  verbs: [get, patch]
# Operator: dead letters are requeued, expired, deleted after their TTL, and written for poll
# results that cannot be applied.
- apiGroups: [captchatask.dev]
  resources: [captchadeadletters]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [captchatask.dev]
  resources: [captchadeadletters/status]
  verbs: [get, patch]
# Operator: read a provider's API key from the Secret its spec names. `get` only: never list or
# watch, so the operator cannot enumerate Secrets; optionally pinned to named Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
  {{- with .Values.operator.apiKeySecretNames }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Everything a sidecar or standalone receiver may do, in one namespace. Nothing else.
Takes a dict with "localApi": the local task API (create, adopt, long-poll) is what needs
list/watch/create/patch on tasks; without it (the standalone receiver) a pingback only reads
the task it names.
*/}}
{{- define "captchatask.rbac.sidecar" -}}
{{- if .localApi -}}
# Sidecar: find the task a pingback is for; create, adopt (label) and long-poll tasks for the
# app (local task API: one shared watch of the namespace's tasks).
- apiGroups: [captchatask.dev]
  resources: [captchatasks]
  verbs: [get, list, watch, create, patch]
{{- else -}}
# Receiver: read the task a pingback names (no local task API, so no list, watch or create).
- apiGroups: [captchatask.dev]
  resources: [captchatasks]
  verbs: [get]
{{- end }}
# Sidecar: record results in the ledger (compare-and-set status patches, captchatask.ledger).
- apiGroups: [captchatask.dev]
  resources: [captchatasks/status]
  verbs: [patch]
# Sidecar: read the provider a task names (dialect, for classifying error codes).
- apiGroups: [captchatask.dev]
  resources: [captchaproviders]
  verbs: [get]
# Sidecar: an authentic result that cannot be applied becomes a dead letter, not a log line.
- apiGroups: [captchatask.dev]
  resources: [captchadeadletters]
  verbs: [create]
# Sidecar: Events on recorded, late and dead-lettered pingbacks.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* People with the standard `view` role (and so edit and admin): read everything we define. */}}
{{- define "captchatask.rbac.userView" -}}
- apiGroups: [captchatask.dev]
  resources: [captchatasks, captchaproviders, captchadeadletters]
  verbs: [get, list, watch]
{{- end }}

{{/*
People with `edit` (and so admin): create and manage tasks and providers, redrive and purge
dead letters (`captchatask dlq`). Not task status: that is the ledger, written only by the
operator and the receivers with compare-and-set patches. Providers name a Secret of their own
namespace, which `edit` can read anyway, so managing them grants nothing new.
*/}}
{{- define "captchatask.rbac.userEdit" -}}
- apiGroups: [captchatask.dev]
  resources: [captchatasks, captchaproviders]
  verbs: [create, update, patch, delete, deletecollection]
# `captchatask dlq redrive` resets a letter's status; `dlq purge` deletes letters.
- apiGroups: [captchatask.dev]
  resources: [captchadeadletters]
  verbs: [delete, deletecollection]
- apiGroups: [captchatask.dev]
  resources: [captchadeadletters/status]
  verbs: [patch]
{{- end }}
