{{- define "modelium.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modelium.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "modelium.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "modelium.modelsClaim" -}}
{{- default (printf "%s-models" (include "modelium.fullname" .)) .Values.models.existingClaim -}}
{{- end -}}

{{/* The environment every Modelium container gets: where its configuration is, and secrets. */}}
{{- define "modelium.env" -}}
- name: MODELIUM_CONFIG
  value: /etc/modelium/modelium.yaml
{{- if .Values.temporal.apiKeySecretName }}
- name: MODELIUM_TEMPORAL__API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.temporal.apiKeySecretName }}
      key: {{ .Values.temporal.apiKeySecretKey }}
{{- end }}
{{- if .Values.apiKeys }}
- name: MODELIUM_GATEWAY__API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "modelium.fullname" . }}-api-keys
      key: api-keys.json
{{- end }}
{{- end -}}

{{- define "modelium.configVolume" -}}
- name: config
  configMap:
    name: {{ include "modelium.fullname" . }}-config
{{- if and .Values.temporal.tls.enabled .Values.temporal.tls.secretName }}
- name: temporal-tls
  secret:
    secretName: {{ .Values.temporal.tls.secretName }}
{{- end }}
{{- end -}}

{{- define "modelium.configMounts" -}}
- name: config
  mountPath: /etc/modelium
  readOnly: true
{{- if and .Values.temporal.tls.enabled .Values.temporal.tls.secretName }}
- name: temporal-tls
  mountPath: /etc/modelium/temporal-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "modelium.modelsVolume" -}}
- name: models
{{- if eq .Values.models.storage "shared" }}
  persistentVolumeClaim:
    claimName: {{ include "modelium.modelsClaim" . }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.models.hostPath }}
    type: Directory
{{- end }}
{{- end -}}

{{/* Probes on the metrics port, which every role serves (/health: alive; /ready: reaches Temporal). */}}
{{- define "modelium.probes" -}}
livenessProbe:
  httpGet: {path: /health, port: {{ .port }}}
  initialDelaySeconds: 10
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
readinessProbe:
  httpGet: {path: /ready, port: {{ .port }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
startupProbe:
  httpGet: {path: /health, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 60
{{- end -}}

{{- define "modelium.pod" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "modelium.container" -}}
image: "{{ .root.Values.image.repository }}:{{ .root.Values.image.tag }}"
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
{{- end -}}
