{{/*
=====================================================================================================
THE COMPONENT CONTRACT: every flag, environment variable, port and path the chart hands to the
`captchatask operator` and `captchatask sidecar` processes is spelled here and nowhere else.
When a component renames a flag or variable, change this file (and the table in the chart README).

  operator  captchatask operator (operator/captchatask_operator/settings.py)
              --all-namespaces | --namespace=NS (repeated)     <- operator.watch.*
              --peering=NAME | --standalone                    <- operator.ha.* (the peering
                                                                  priority is random per process)
              env CAPTCHATASK_PINGBACK_KEY_FILE                <- the pingback key Secret, mounted
              env CAPTCHATASK_ADMIN_PORT=9090                  /metrics /healthz /readyz
              env CAPTCHATASK_NAMESPACE, CAPTCHATASK_POD_NAME  <- downward API
              env CAPTCHATASK_PROVIDER_UNREACHABLE_AFTER       <- operator.tuning.*
                  CAPTCHATASK_POLL_BATCH_WINDOW_SECONDS
              env CAPTCHATASK_DEAD_LETTER_MAX_ATTEMPTS         <- operator.deadLetters.*
                  CAPTCHATASK_DEAD_LETTER_MAX_AGE_SECONDS
                  CAPTCHATASK_DEAD_LETTER_RETRY_BASE_SECONDS
                  CAPTCHATASK_DEAD_LETTER_RETRY_MAX_SECONDS
                  CAPTCHATASK_DEAD_LETTER_REQUEUED_TTL_SECONDS
              env CAPTCHATASK_ROUTINE_EVENTS                   <- operator.writes.*
                  CAPTCHATASK_STRIP_MANAGED_FIELDS
              env MALLOC_ARENA_MAX                             <- operator.mallocArenaMax
  receiver  captchatask sidecar (sidecar/captchatask_sidecar/settings.py, ENV)
              env CAPTCHATASK_PINGBACK_ADDR=0.0.0.0:8080       pingbacks (the Service targets it)
              env CAPTCHATASK_ADMIN_ADDR=0.0.0.0:9090          /metrics /healthz /readyz
              env CAPTCHATASK_LOCAL_ADDR=""                    no local task API (no app here)
              env CAPTCHATASK_PINGBACK_NAMESPACES=a,b          <- receiver.namespaces
              env CAPTCHATASK_SPOOL_DIR                        <- receiver.spool.path (a volume)
              env CAPTCHATASK_SPOOL_MAX_BYTES                  <- receiver.spool.maxBytes (default:
                                                                  maxBytesPercent of the volume)
                  CAPTCHATASK_SPOOL_MAX_RECORDS                <- receiver.spool.maxRecords
                  CAPTCHATASK_SPOOL_READY_FRACTION             <- receiver.spool.readyFraction
              env CAPTCHATASK_LEDGER_WRITES_PER_SECOND         <- receiver.ledgerWritesPerSecond
                  CAPTCHATASK_LEDGER_WRITES_BURST              <- receiver.ledgerWritesBurst
              env CAPTCHATASK_PINGBACK_KEY_FILE, CAPTCHATASK_NAMESPACE, CAPTCHATASK_POD_NAME
  sidecar   the same, inside an app pod (files/sidecar-pod.yaml): local task API on
              127.0.0.1:8081, CAPTCHATASK_PUBLIC_URL and CAPTCHATASK_PROVIDER for adopted tasks
=====================================================================================================
*/}}

{{- define "captchatask.contract.adminPort" -}}9090{{- end }}
{{- define "captchatask.contract.pingbackPort" -}}8080{{- end }}
{{- define "captchatask.contract.localApiPort" -}}8081{{- end }}
{{- define "captchatask.contract.keyDir" -}}/etc/captchatask/pingback-key{{- end }}

{{/* Arguments of the operator container (the image's entrypoint is `captchatask`). */}}
{{- define "captchatask.contract.operatorArgs" -}}
- operator
{{- if .Values.operator.watch.allNamespaces }}
- --all-namespaces
{{- else }}
{{- range (include "captchatask.operator.namespaces" . | fromJsonArray) }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- if .Values.operator.ha.enabled }}
- --peering={{ .Values.operator.ha.peeringName }}
{{- else }}
- --standalone
{{- end }}
{{- with .Values.operator.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Arguments of the receiver / sidecar container. */}}
{{- define "captchatask.contract.sidecarArgs" -}}
- sidecar
{{- with .extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment shared by both components: who am I, where is the pingback key. */}}
{{- define "captchatask.contract.commonEnv" -}}
- name: CAPTCHATASK_PINGBACK_KEY_FILE
  value: {{ include "captchatask.contract.keyDir" . }}/{{ .Values.pingbackKey.secretKey }}
- name: CAPTCHATASK_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CAPTCHATASK_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{/* Environment of the operator container. */}}
{{- define "captchatask.contract.operatorEnv" -}}
{{ include "captchatask.contract.commonEnv" . }}
- name: CAPTCHATASK_ADMIN_PORT
  value: {{ include "captchatask.contract.adminPort" . | quote }}
{{- with .Values.operator.tuning }}
- name: CAPTCHATASK_PROVIDER_UNREACHABLE_AFTER
  value: {{ .providerUnreachableAfter | quote }}
- name: CAPTCHATASK_POLL_BATCH_WINDOW_SECONDS
  value: {{ .pollBatchWindowSeconds | quote }}
{{- end }}
{{- with .Values.operator.deadLetters }}
- name: CAPTCHATASK_DEAD_LETTER_MAX_ATTEMPTS
  value: {{ .maxAttempts | quote }}
- name: CAPTCHATASK_DEAD_LETTER_MAX_AGE_SECONDS
  value: {{ .maxAgeSeconds | quote }}
- name: CAPTCHATASK_DEAD_LETTER_RETRY_BASE_SECONDS
  value: {{ .retryBaseSeconds | quote }}
- name: CAPTCHATASK_DEAD_LETTER_RETRY_MAX_SECONDS
  value: {{ .retryMaxSeconds | quote }}
- name: CAPTCHATASK_DEAD_LETTER_REQUEUED_TTL_SECONDS
  value: {{ .requeuedTtlSeconds | quote }}
{{- end }}
{{- with .Values.operator.writes }}
- name: CAPTCHATASK_ROUTINE_EVENTS
  value: {{ .routineEvents | quote }}
- name: CAPTCHATASK_STRIP_MANAGED_FIELDS
  value: {{ .stripManagedFields | quote }}
{{- end }}
{{- with .Values.operator.mallocArenaMax }}
- name: MALLOC_ARENA_MAX
  value: {{ . | quote }}
{{- end }}
{{- with .Values.operator.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment of the receiver container. */}}
{{- define "captchatask.contract.receiverEnv" -}}
{{ include "captchatask.contract.commonEnv" . }}
- name: CAPTCHATASK_PINGBACK_ADDR
  value: "0.0.0.0:{{ include "captchatask.contract.pingbackPort" . }}"
- name: CAPTCHATASK_ADMIN_ADDR
  value: "0.0.0.0:{{ include "captchatask.contract.adminPort" . }}"
- name: CAPTCHATASK_LOCAL_ADDR
  value: ""
- name: CAPTCHATASK_PINGBACK_NAMESPACES
  value: {{ include "captchatask.receiver.namespaces" . | fromJsonArray | join "," | quote }}
- name: CAPTCHATASK_SPOOL_DIR
  value: {{ .Values.receiver.spool.path | quote }}
- name: CAPTCHATASK_SPOOL_MAX_BYTES
  value: {{ include "captchatask.receiver.spoolMaxBytes" . | quote }}
- name: CAPTCHATASK_SPOOL_MAX_RECORDS
  value: {{ .Values.receiver.spool.maxRecords | int64 | quote }}
- name: CAPTCHATASK_SPOOL_READY_FRACTION
  value: {{ .Values.receiver.spool.readyFraction | quote }}
- name: CAPTCHATASK_LEDGER_WRITES_PER_SECOND
  value: {{ .Values.receiver.ledgerWritesPerSecond | quote }}
- name: CAPTCHATASK_LEDGER_WRITES_BURST
  value: {{ .Values.receiver.ledgerWritesBurst | int64 | quote }}
{{- with .Values.receiver.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pingback key volume (a Secret, read-only, only the key file, owner-readable). */}}
{{- define "captchatask.contract.keyVolume" -}}
- name: pingback-key
  secret:
    secretName: {{ include "captchatask.pingbackKey.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.pingbackKey.secretKey }}
        path: {{ .Values.pingbackKey.secretKey }}
{{- end }}

{{- define "captchatask.contract.keyVolumeMount" -}}
- name: pingback-key
  mountPath: {{ include "captchatask.contract.keyDir" . }}
  readOnly: true
{{- end }}
