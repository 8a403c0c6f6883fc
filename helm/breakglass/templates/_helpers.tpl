{{/* Name of every object: the release name, unless it already says "breakglass". */}}
{{- define "breakglass.fullname" -}}
{{- if contains "breakglass" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-breakglass" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "breakglass.selectorLabels" -}}
app.kubernetes.io/name: breakglass
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "breakglass.labels" -}}
{{ include "breakglass.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: breakglass-tui
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The namespace guard: isolation from claude-agent is the point of this deployment (ADR 0001). */}}
{{- define "breakglass.namespace" -}}
{{- if ne .Release.Namespace .Values.namespace.name -}}
{{- fail (printf "this chart installs only into namespace %q (values namespace.name), not %q: run helm with -n %s" .Values.namespace.name .Release.Namespace .Values.namespace.name) -}}
{{- end -}}
{{- .Release.Namespace -}}
{{- end -}}

{{- define "breakglass.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "breakglass.publicUrl" -}}
{{- .Values.server.publicUrl | default (printf "https://%s" .Values.ingress.host) -}}
{{- end -}}

{{/* A target address as a NetworkPolicy block: /32 for IPv4, /128 for IPv6. */}}
{{- define "breakglass.hostCidr" -}}
{{- if contains ":" . -}}{{ printf "%s/128" . }}{{- else -}}{{ printf "%s/32" . }}{{- end -}}
{{- end -}}

{{/* ingress-nginx annotations both routes share: long websocket timeouts, TLS only, rate limit. */}}
{{- define "breakglass.nginxCommon" -}}
nginx.ingress.kubernetes.io/ssl-redirect: "true"
nginx.ingress.kubernetes.io/proxy-read-timeout: {{ .Values.ingress.websocketTimeoutSeconds | quote }}
nginx.ingress.kubernetes.io/proxy-send-timeout: {{ .Values.ingress.websocketTimeoutSeconds | quote }}
nginx.ingress.kubernetes.io/proxy-buffering: "off"
{{- if .Values.ingress.nginx.limitRps }}
nginx.ingress.kubernetes.io/limit-rps: {{ .Values.ingress.nginx.limitRps | quote }}
{{- end }}
{{- end -}}
