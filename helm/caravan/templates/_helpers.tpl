{{/* Names, labels and the pieces every Ray pod shares. */}}

{{/* The chart's name, or nameOverride. */}}
{{- define "caravan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name of the release's objects, and the RayService's name. 47 characters at most: KubeRay
names the RayCluster `<name>-<5 characters>` and its Services `<cluster>-serve-svc`, which must stay
within 63.
*/}}
{{- define "caravan.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "caravan.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "caravan.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What selects the release's pods; it never changes across upgrades. */}}
{{- define "caravan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "caravan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "caravan.labels" -}}
helm.sh/chart: {{ include "caravan.chart" . }}
{{ include "caravan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "caravan.image" -}}
{{- printf "%s:%s" (required "image.repository is required: the Caravan image built from helm/Dockerfile" .Values.image.repository) (required "image.tag is required: the Caravan image's tag" .Values.image.tag) -}}
{{- end -}}

{{- define "caravan.rayAuthSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "caravan.fullname" .)) -}}
{{- end -}}

{{- define "caravan.routerAuthSecret" -}}
{{- .Values.routerAuth.existingSecret | default (printf "%s-router-auth" (include "caravan.fullname" .)) -}}
{{- end -}}

{{- define "caravan.grpcServiceName" -}}
{{- printf "%s-grpc" (include "caravan.fullname" .) -}}
{{- end -}}

{{/* KubeRay names a RayService's head Service `<rayservice>-head-svc` (utils.GenerateHeadServiceName). */}}
{{- define "caravan.headServiceName" -}}
{{- printf "%s-head-svc" (include "caravan.fullname" .) -}}
{{- end -}}

{{/* Where the pieces live inside the containers. */}}
{{- define "caravan.configPath" -}}/etc/caravan/config.yaml{{- end -}}
{{- define "caravan.routerTokenPath" -}}/var/run/secrets/caravan/token{{- end -}}
{{- define "caravan.grpcPort" -}}50051{{- end -}}

{{/*
Ray's token auth in a container: the mode and the token, from the Secret KubeRay also reads (the key
`auth_token` is KubeRay's), so that the operator's calls to the dashboard carry the same token.
*/}}
{{- define "caravan.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "caravan.rayAuthSecret" . }}
      key: auth_token
{{- end -}}

{{/* Volumes of every Ray pod: the config, the weights (read-only), and a memory-backed /dev/shm. */}}
{{- define "caravan.rayVolumes" -}}
- name: config
  configMap:
    name: {{ include "caravan.fullname" . }}-config
{{- if .Values.modelVolume.claimName }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.modelVolume.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "caravan.rayVolumeMounts" -}}
- name: config
  mountPath: {{ include "caravan.configPath" . | dir }}
  readOnly: true
{{- if .Values.modelVolume.claimName }}
- name: models
  mountPath: {{ .Values.modelVolume.mountPath }}
  readOnly: true
{{- end }}
- name: dshm
  mountPath: /dev/shm
{{- end -}}

{{- define "caravan.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}
