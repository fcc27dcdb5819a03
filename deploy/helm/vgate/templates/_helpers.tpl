{{/* The chart's name, and the release's prefix for every object (63 characters at most). */}}
{{- define "vgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vgate.fullname" -}}
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

{{/* A worker's Deployment and Service name: (list $ "w1"). The gateway config's backend
URLs use it, so they follow the release's name. */}}
{{- define "vgate.workerName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "vgate.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vgate.redisName" -}}
{{- printf "%s-redis" (include "vgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vgate.keysSecretName" -}}
{{- if .Values.keys.existingSecret -}}
{{- .Values.keys.existingSecret -}}
{{- else -}}
{{- printf "%s-keys" (include "vgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vgate.modelsClaimName" -}}
{{- if .Values.workers.vllm.modelVolume.pvc.existingClaim -}}
{{- .Values.workers.vllm.modelVolume.pvc.existingClaim -}}
{{- else -}}
{{- printf "%s-models" (include "vgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: the common ones, then the selector ones for a component: (list $ "gateway"). */}}
{{- define "vgate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vgate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "vgate.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "vgate.chart" $root }}
{{ include "vgate.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: vgate
{{- end -}}

{{- define "vgate.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{/* Where the chart mounts the config and the keys file (the Dockerfile's gateway image
reads nothing else from disk). */}}
{{- define "vgate.configDir" -}}/etc/vgate/config{{- end -}}
{{- define "vgate.configPath" -}}/etc/vgate/config/gateway.yaml{{- end -}}
{{- define "vgate.keysDir" -}}/etc/vgate/keys{{- end -}}
{{- define "vgate.keysPath" -}}{{ include "vgate.keysDir" . }}/{{ .Values.keys.secretKey }}{{- end -}}
{{/* keys.file as the config says it: relative to the config's folder (how vgate resolves
it), /etc/vgate/config/../keys/<secretKey>, so the same config checks in a scratch copy of
the mounts (deploy/helm/check_rendered.py) as it loads in the pod. */}}
{{- define "vgate.keysFileInConfig" -}}../keys/{{ .Values.keys.secretKey }}{{- end -}}

{{/* terminationGracePeriodSeconds: every phase of the gateway's shutdown, in whole seconds,
from gateway.shutdown alone. */}}
{{- define "vgate.terminationGracePeriodSeconds" -}}
{{- $s := .Values.gateway.shutdown -}}
{{- addf $s.preStopSleepSeconds $s.drainDelaySeconds $s.gracefulShutdownSeconds $s.marginSeconds | ceil | int -}}
{{- end -}}

{{/* A value the chart owns in the gateway config: set it, failing when the values' config
already says something else. (list $map "key" value "where it comes from" "config path") */}}
{{- define "vgate.own" -}}
{{- $map := index . 0 -}}
{{- $key := index . 1 -}}
{{- $value := index . 2 -}}
{{- if and (hasKey $map $key) (ne (toString (index $map $key)) (toString $value)) -}}
{{- fail (printf "values gateway.config.%s: %v, but the chart sets it to %v from %s: remove it from gateway.config (or change %s)" (index . 4) (index $map $key) $value (index . 3) (index . 3)) -}}
{{- end -}}
{{- $_ := set $map $key $value -}}
{{- end -}}

{{/* The gateway's config as mounted: the values' config with the chart's own settings. */}}
{{- define "vgate.gatewayConfig" -}}
{{- $config := deepCopy (.Values.gateway.config | default dict) -}}
{{- $shutdown := .Values.gateway.shutdown -}}
{{- $server := get $config "server" | default dict -}}
{{- include "vgate.own" (list $server "host" "0.0.0.0" "the pod's network (every interface)" "server.host") -}}
{{- include "vgate.own" (list $server "port" .Values.gateway.port "gateway.port" "server.port") -}}
{{- include "vgate.own" (list $server "drain_delay_s" $shutdown.drainDelaySeconds "gateway.shutdown.drainDelaySeconds" "server.drain_delay_s") -}}
{{- include "vgate.own" (list $server "graceful_shutdown_s" $shutdown.gracefulShutdownSeconds "gateway.shutdown.gracefulShutdownSeconds" "server.graceful_shutdown_s") -}}
{{- $_ := set $config "server" $server -}}
{{- $keys := get $config "keys" | default dict -}}
{{- include "vgate.own" (list $keys "file" (include "vgate.keysFileInConfig" .) "the keys Secret's mount (keys.*)" "keys.file") -}}
{{- $_ := set $config "keys" $keys -}}
{{- $redis := get $config "redis" | default dict -}}
{{- if or (hasKey $redis "url") (hasKey $redis "sentinel") -}}
{{- fail "values gateway.config.redis: the Redis connection comes from the values' redis: (mode bundled, external or none), set as VGATE_REDIS__URL: remove url/sentinel from gateway.config.redis" -}}
{{- end -}}
{{- tpl (toYaml $config) . -}}
{{- end -}}

{{/* The Redis URL the gateway gets as VGATE_REDIS__URL, as an env entry (none: nothing). */}}
{{- define "vgate.redisEnv" -}}
{{- $redis := .Values.redis -}}
{{- if eq $redis.mode "bundled" }}
- name: VGATE_REDIS__URL
  value: {{ printf "redis://%s:6379/0" (include "vgate.redisName" .) | quote }}
{{- else if eq $redis.mode "external" }}
{{- if $redis.external.existingSecret }}
- name: VGATE_REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.external.existingSecret }}
      key: {{ $redis.external.secretKey }}
{{- else if $redis.external.url }}
- name: VGATE_REDIS__URL
  value: {{ $redis.external.url | quote }}
{{- else }}
{{- fail "values redis.mode is external: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- end }}
{{- end -}}
