{{/* Names and labels. */}}
{{- define "epsignal-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "epsignal-bridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "epsignal-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "epsignal-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epsignal-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "epsignal-bridge.labels" -}}
helm.sh/chart: {{ include "epsignal-bridge.chart" . }}
{{ include "epsignal-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: epsignal-bridge
{{- end -}}

{{- define "epsignal-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "epsignal-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "epsignal-bridge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "epsignal-bridge.secretName" -}}
{{- default (include "epsignal-bridge.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* A config value as an environment string: whole numbers without a fraction or exponent
     (YAML numbers arrive as float64: 1000000 would print as 1e+06), booleans as true/false. */}}
{{- define "epsignal-bridge.envString" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The container port of the PBX's inbound WebSocket (server mode): the port of EPSIGNAL_PBX_LISTEN. */}}
{{- define "epsignal-bridge.pbxListenPort" -}}
{{- $port := splitList ":" (toString .Values.config.EPSIGNAL_PBX_LISTEN) | last -}}
{{- if not (regexMatch "^[0-9]+$" $port) -}}
{{- fail (printf "config.EPSIGNAL_PBX_LISTEN must be host:port, got %q" .Values.config.EPSIGNAL_PBX_LISTEN) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{- define "epsignal-bridge.serverMode" -}}
{{- if eq (toString .Values.config.EPSIGNAL_PBX_MODE) "server" -}}true{{- end -}}
{{- end -}}

{{/* Pods the release runs at least: the PDB is only worth having with more than one. */}}
{{- define "epsignal-bridge.minReplicas" -}}
{{- if .Values.autoscaling.enabled -}}
{{- .Values.autoscaling.minReplicas | int -}}
{{- else -}}
{{- .Values.replicas | int -}}
{{- end -}}
{{- end -}}

{{/* Checks that span several values (the schema checks each one). */}}
{{- define "epsignal-bridge.validate" -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (float64 .Values.shutdownGraceSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than shutdownGraceSeconds (%v): the bridge needs that time to drain commands and flush events" .Values.terminationGracePeriodSeconds .Values.shutdownGraceSeconds) -}}
{{- end -}}
{{- if eq .Values.secrets.pbxPasswordKey .Values.secrets.amqpUrlKey -}}
{{- fail "secrets.pbxPasswordKey and secrets.amqpUrlKey must differ" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not be larger than autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- fail "autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- end -}}
