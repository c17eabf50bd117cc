{{/* Names, labels and the values every natron service shares. */}}

{{- define "natron.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natron.fullname" -}}
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

{{- define "natron.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "natron.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "natron.selectorLabels" -}}
app.kubernetes.io/name: {{ include "natron.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "natron.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "natron.cudaImage" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.cudaTag }}
{{- end }}

{{/* The bundled NATS chart names its resources <release>-nats unless the release name has "nats" in it. */}}
{{- define "natron.natsHost" -}}
{{- if contains "nats" .Release.Name }}{{ .Release.Name }}{{ else }}{{ printf "%s-nats" .Release.Name }}{{ end }}
{{- end }}

{{- define "natron.natsUrl" -}}
{{- default (printf "nats://%s:4222" (include "natron.natsHost" .)) .Values.natsUrl }}
{{- end }}

{{- define "natron.natsMonitoringEndpoint" -}}
{{- default (printf "%s-headless.%s.svc.cluster.local:8222" (include "natron.natsHost" .) .Release.Namespace) .Values.natsMonitoringEndpoint }}
{{- end }}

{{/* broker/subjects.py: the stream <PREFIX>_INFER, the consumer <model>-v<version>. */}}
{{- define "natron.stream" -}}
{{- printf "%s_INFER" (upper .Values.prefix) }}
{{- end }}

{{- define "natron.consumer" -}}
{{- printf "%s-v%s" .model (toString .version) }}
{{- end }}

{{- define "natron.modelsConfigMapName" -}}
{{- default (printf "%s-models" (include "natron.fullname" .)) .Values.modelRepository.configMap.name }}
{{- end }}

{{/* The volumes of the model repository and the uploads folder (possibly none). */}}
{{- define "natron.volumes" -}}
{{- $m := .Values.modelRepository }}
{{- if eq $m.source "persistentVolumeClaim" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "modelRepository.persistentVolumeClaim.claimName is required" $m.persistentVolumeClaim.claimName }}
    readOnly: true
{{- else if eq $m.source "configMap" }}
- name: models
  configMap:
    name: {{ include "natron.modelsConfigMapName" . }}
    {{- if and (not $m.configMap.name) $m.configMap.files }}
    items:
      {{- range $path, $_ := $m.configMap.files }}
      - key: {{ $path | replace "/" "__" | quote }}
        path: {{ $path | quote }}
      {{- end }}
    {{- end }}
{{- end }}
{{- if .Values.uploads.persistentVolumeClaim.claimName }}
- name: uploads
  persistentVolumeClaim:
    claimName: {{ .Values.uploads.persistentVolumeClaim.claimName }}
{{- end }}
{{- end }}

{{- define "natron.volumeMounts" -}}
{{- if ne .Values.modelRepository.source "image" }}
- name: models
  mountPath: {{ .Values.modelRepository.path }}
  readOnly: true
{{- end }}
{{- if .Values.uploads.persistentVolumeClaim.claimName }}
- name: uploads
  mountPath: /uploads
{{- end }}
{{- end }}

{{- define "natron.metricsAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{- define "natron.checkValues" -}}
{{- if not (has .Values.autoscaling.mode (list "none" "keda" "hpa")) }}
{{- fail (printf "autoscaling.mode must be none, keda or hpa, not %q" .Values.autoscaling.mode) }}
{{- end }}
{{- if not (has .Values.modelRepository.source (list "image" "persistentVolumeClaim" "configMap")) }}
{{- fail (printf "modelRepository.source must be image, persistentVolumeClaim or configMap, not %q" .Values.modelRepository.source) }}
{{- end }}
{{- if gt (addf .Values.worker.drainTimeoutS 5) (float64 .Values.shutdownTimeoutS) }}
{{- fail (printf "worker.drainTimeoutS (%v) must leave 5 s of shutdownTimeoutS (%v) for closing" .Values.worker.drainTimeoutS .Values.shutdownTimeoutS) }}
{{- end }}
{{- end }}

{{/* NATS credentials (docs/security.md): the pod mounts its role's seed alone from the Secret
`natsAuth.secretName` (made by `natron creds`), readable by the pod's fsGroup only. */}}
{{- define "natron.credsArgs" -}}
- --nats-creds
- {{ printf "/creds/%s.nk" .role | quote }}
{{- end }}

{{- define "natron.credsMount" -}}
- name: nats-creds
  mountPath: /creds
  readOnly: true
{{- end }}

{{- define "natron.credsVolume" -}}
- name: nats-creds
  secret:
    secretName: {{ required "natsAuth.secretName is required: every NATS connection is authenticated" .ctx.Values.natsAuth.secretName }}
    defaultMode: 0440
    items:
      - key: {{ printf "%s.nk" .role | quote }}
        path: {{ printf "%s.nk" .role | quote }}
{{- end }}
