{{/*
Names, labels and small shared snippets. Object names are "<fullname>-<component>", truncated to
63 characters (the DNS-label limit of names and label values).
*/}}

{{- define "captchatask.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "captchatask.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", truncated so the whole name fits 63 characters. */}}
{{- define "captchatask.componentName" -}}
{{- $root := index . 0 }}{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "captchatask.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "captchatask.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. helm.sh/chart changes with each chart version: never in selectors. */}}
{{- define "captchatask.labels" -}}
helm.sh/chart: {{ include "captchatask.chart" . }}
app.kubernetes.io/name: {{ include "captchatask.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: captchatask
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable for the life of a release (Deployment selectors are immutable). */}}
{{- define "captchatask.selectorLabels" -}}
{{- $root := index . 0 }}{{- $component := index . 1 -}}
app.kubernetes.io/name: {{ include "captchatask.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{/* Labels of one component's objects: common labels plus the component. */}}
{{- define "captchatask.componentLabels" -}}
{{- $root := index . 0 }}{{- $component := index . 1 -}}
{{ include "captchatask.labels" $root }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{- define "captchatask.operator.fullname" -}}
{{- include "captchatask.componentName" (list . "operator") }}
{{- end }}

{{- define "captchatask.receiver.fullname" -}}
{{- include "captchatask.componentName" (list . "receiver") }}
{{- end }}

{{- define "captchatask.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "captchatask.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "captchatask.receiver.serviceAccountName" -}}
{{- if .Values.receiver.serviceAccount.create }}
{{- default (include "captchatask.receiver.fullname" .) .Values.receiver.serviceAccount.name }}
{{- else }}
{{- required "receiver.serviceAccount.name is required when receiver.serviceAccount.create is false" .Values.receiver.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion. */}}
{{- define "captchatask.image" -}}
{{- $image := index . 0 }}{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The namespaces the operator serves when not cluster-wide (default: the release namespace). */}}
{{- define "captchatask.operator.namespaces" -}}
{{- $namespaces := .Values.operator.watch.namespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{/* The namespaces the standalone receiver writes into (default: the release namespace). */}}
{{- define "captchatask.receiver.namespaces" -}}
{{- $namespaces := .Values.receiver.namespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{/* Name of the Secret holding the pingback key (created, or the user's existing one). */}}
{{- define "captchatask.pingbackKey.secretName" -}}
{{- if .Values.pingbackKey.existingSecret }}
{{- .Values.pingbackKey.existingSecret }}
{{- else }}
{{- include "captchatask.componentName" (list . "pingback-key") }}
{{- end }}
{{- end }}

{{/*
The pingback key, computed once per render and shared by every Secret that carries it (the
release namespace's and the sidecar namespaces' copies): the value already in the cluster if the
Secret exists (so upgrades keep it), otherwise 48 fresh random alphanumerics. Memoised in a
private map because every `include` would otherwise draw a new random value.
*/}}
{{- define "captchatask.pingbackKey.value" -}}
{{- $memo := .Values.pingbackKey }}
{{- if not (hasKey $memo "_generated") }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "captchatask.pingbackKey.secretName" .) }}
{{- $key := "" }}
{{- if and $existing $existing.data (hasKey $existing.data .Values.pingbackKey.secretKey) }}
{{- $key = index $existing.data .Values.pingbackKey.secretKey | b64dec }}
{{- else }}
{{- $key = randAlphaNum 48 }}
{{- end }}
{{- $_ := set $memo "_generated" $key }}
{{- end }}
{{- index $memo "_generated" }}
{{- end }}

{{/* Pod security and scheduling fields shared by the operator and the receiver. */}}
{{- define "captchatask.podScheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Bytes of a Kubernetes quantity ("256Mi", "1.5Gi", "500M", "1048576"); fails on anything else.
*/}}
{{- define "captchatask.quantityBytes" -}}
{{- $q := toString . -}}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $number $q -}}
{{- if or (not $number) (not (hasKey $units $suffix)) -}}
{{- fail (printf "cannot read %q as a quantity of bytes" $q) -}}
{{- end -}}
{{- mulf (float64 $number) (float64 (get $units $suffix)) | floor | int64 -}}
{{- end }}

{{/*
The receiver's spool bound in bytes: receiver.spool.maxBytes, else maxBytesPercent of the volume
(the emptyDir's sizeLimit, or the claim's size): the receiver refuses with 503 before the kubelet
would evict the pod and delete the volume with the results in it.
*/}}
{{- define "captchatask.receiver.spoolMaxBytes" -}}
{{- $spool := .Values.receiver.spool -}}
{{- if $spool.maxBytes -}}
{{- include "captchatask.quantityBytes" $spool.maxBytes -}}
{{- else -}}
{{- $volume := ternary $spool.persistence.size $spool.sizeLimit $spool.persistence.enabled -}}
{{- $bytes := include "captchatask.quantityBytes" $volume | int64 -}}
{{- div (mul $bytes (int64 $spool.maxBytesPercent)) 100 -}}
{{- end -}}
{{- end }}
