{{/* Names, labels and shared snippets (helm create conventions: names cut to 63 characters). */}}

{{/* Chart name. */}}
{{- define "faceops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already holds the chart name. */}}
{{- define "faceops.fullname" -}}
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

{{/* Name of a component: the full name cut to leave room for "-<component>" (63 in all).
Usage: include "faceops.componentName" (dict "root" . "component" "triton") */}}
{{- define "faceops.componentName" -}}
{{- $suffix := printf "-%s" .component }}
{{- printf "%s%s" (include "faceops.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/* chart label value */}}
{{- define "faceops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. Usage: include "faceops.labels" (dict "root" . "component" "triton") */}}
{{- define "faceops.labels" -}}
helm.sh/chart: {{ include "faceops.chart" .root }}
{{ include "faceops.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: faceops
{{- end }}

{{/* Selector labels. Usage: include "faceops.selectorLabels" (dict "root" . "component" "triton") */}}
{{- define "faceops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "faceops.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the chart's pods. */}}
{{- define "faceops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "faceops.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A faceops image by role (images.py naming): <registry>/<images.role>:<tag or appVersion>.
Usage: include "faceops.image" (dict "root" . "role" "triton") */}}
{{- define "faceops.image" -}}
{{- $name := required (printf "images.%s must name the %s image" .role .role) (index .root.Values.images .role) }}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) $name (default .root.Chart.AppVersion .root.Values.image.tag) }}
{{- end }}

{{/* A third-party image: <repository>:<tag>. Usage: include "faceops.thirdPartyImage" .Values.minio.image */}}
{{- define "faceops.thirdPartyImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* Namespace of the KFP pipelines. */}}
{{- define "faceops.kfpNamespace" -}}
{{- default .Release.Namespace .Values.kfp.namespace }}
{{- end }}

{{/* Name of the S3 Secret the chart's pods read. */}}
{{- define "faceops.s3SecretName" -}}
{{- default (include "faceops.componentName" (dict "root" . "component" "s3")) .Values.s3.existingSecret }}
{{- end }}

{{/* host:port of the object store: the bundled MinIO Service or s3.endpoint. */}}
{{- define "faceops.s3Endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "%s.%s.svc:%d" (include "faceops.componentName" (dict "root" . "component" "minio")) .Release.Namespace (int .Values.minio.port) }}
{{- else }}
{{- required "s3.endpoint (host:port) is required when minio.enabled is false" .Values.s3.endpoint }}
{{- end }}
{{- end }}

{{/* TLS to the object store: the bundled MinIO speaks plain HTTP inside the cluster. */}}
{{- define "faceops.s3Secure" -}}
{{- if .Values.minio.enabled }}false{{ else }}{{ .Values.s3.secure }}{{ end }}
{{- end }}

{{/* Triton's model repository URI: s3://[https://]host:port/bucket/path (custom-endpoint form). */}}
{{- define "faceops.tritonModelRepository" -}}
{{- $scheme := ternary "https://" "" (eq (include "faceops.s3Secure" .) "true") }}
{{- $path := trimAll "/" .Values.triton.modelRepository.path }}
{{- printf "s3://%s%s/%s" $scheme (include "faceops.s3Endpoint" .) .Values.triton.modelRepository.bucket }}
{{- if $path }}/{{ $path }}{{ end }}
{{- end }}

{{/* Object the bucket job writes under a non-empty triton.modelRepository.path: Triton's S3 file system
sees a prefix only once an object lies under it, and refuses to start on a repository it cannot see. */}}
{{- define "faceops.repositoryMarker" -}}
.faceops-repository
{{- end }}

{{/* "true" when the Prometheus Operator's CRDs can be used: the cluster serves monitoring.coreos.com/v1
(helm template: --api-versions monitoring.coreos.com/v1), or monitoring.skipCRDCheck. */}}
{{- define "faceops.prometheusOperator" -}}
{{- or .Values.monitoring.skipCRDCheck (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
{{- end }}

{{/* In-cluster address of the Pushgateway (host:port), for FACEOPS_PUSHGATEWAY. */}}
{{- define "faceops.pushgatewayAddress" -}}
{{- printf "%s.%s.svc:%d" (include "faceops.componentName" (dict "root" . "component" "pushgateway")) .Release.Namespace (int .Values.pushgateway.port) }}
{{- end }}

{{/* Pod-level settings every pod of the chart shares. */}}
{{- define "faceops.podCommon" -}}
serviceAccountName: {{ include "faceops.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* S3 credentials from the Secret, under the given env names.
Usage: include "faceops.s3CredentialsEnv" (dict "root" . "accessKey" "AWS_ACCESS_KEY_ID" "secretKey" "AWS_SECRET_ACCESS_KEY") */}}
{{- define "faceops.s3CredentialsEnv" -}}
- name: {{ .accessKey }}
  valueFrom:
    secretKeyRef:
      name: {{ include "faceops.s3SecretName" .root }}
      key: FACEOPS_S3_ACCESS_KEY
- name: {{ .secretKey }}
  valueFrom:
    secretKeyRef:
      name: {{ include "faceops.s3SecretName" .root }}
      key: FACEOPS_S3_SECRET_KEY
{{- end }}
