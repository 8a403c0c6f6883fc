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

{{/* The namespace guard: isolation from claude-agent is the point of this deployment (ADR 0001).
The operator owns the namespace (docs/install.md): on a real install (lookup sees the cluster; helm
template and lint see nothing) it must carry the Pod Security "restricted" label. */}}
{{- define "breakglass.namespace" -}}
{{- if ne .Release.Namespace .Values.namespace.name -}}
{{- fail (printf "this chart installs only into namespace %q (values namespace.name), not %q: run helm with -n %s" .Values.namespace.name .Release.Namespace .Values.namespace.name) -}}
{{- end -}}
{{- $ns := lookup "v1" "Namespace" "" .Release.Namespace -}}
{{- if $ns -}}
{{- $labels := $ns.metadata.labels | default dict -}}
{{- if ne (get $labels "pod-security.kubernetes.io/enforce") "restricted" -}}
{{- fail (printf "namespace %s lacks the label pod-security.kubernetes.io/enforce=restricted: label it as docs/install.md step 6 shows (kubectl label namespace %s pod-security.kubernetes.io/enforce=restricted ...), then install again" .Release.Namespace .Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- .Release.Namespace -}}
{{- end -}}

{{/* The image, by digest when one is given. The production example's all-zero digest is a
placeholder: refuse to render it rather than deploy an image that does not exist. */}}
{{- define "breakglass.image" -}}
{{- if eq .Values.image.digest (printf "sha256:%s" (repeat 64 "0")) -}}
{{- fail "image.digest is still the placeholder of values-production.yaml (sha256:000…): fill in the digest your build printed (docs/install.md step 1: buildah push --digestfile)" -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Labels of the `helm test` pod: the NetworkPolicy admits exactly these besides the ingress. */}}
{{- define "breakglass.testLabels" -}}
app.kubernetes.io/name: breakglass-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
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
