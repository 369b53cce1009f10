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

{{/* The image by tag, or by digest too when image.digest is set (the tag then only names it for a reader). */}}
{{- define "caravan.image" -}}
{{- $image := printf "%s:%s" (required "image.repository is required: the Caravan image built from helm/Dockerfile" .Values.image.repository) (required "image.tag is required: the Caravan image's tag" .Values.image.tag) -}}
{{- with .Values.image.digest -}}
{{- $image = printf "%s@%s" $image . -}}
{{- end -}}
{{- $image -}}
{{- end -}}

{{- define "caravan.rayAuthSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "caravan.fullname" .)) -}}
{{- end -}}

{{- define "caravan.routerAuthSecret" -}}
{{- .Values.routerAuth.existingSecret | default (printf "%s-router-auth" (include "caravan.fullname" .)) -}}
{{- end -}}

{{- define "caravan.adminAuthSecret" -}}
{{- .Values.adminAuth.existingSecret | default (printf "%s-admin-auth" (include "caravan.fullname" .)) -}}
{{- end -}}

{{/* The router's certificate Secret (kubernetes.io/tls): the given one, or the one cert-manager writes; "" without TLS. */}}
{{- define "caravan.routerTLSSecret" -}}
{{- if .Values.routerTLS.existingSecret -}}
{{- .Values.routerTLS.existingSecret -}}
{{- else if .Values.routerTLS.certManager.enabled -}}
{{- printf "%s-router-tls" (include "caravan.fullname" .) -}}
{{- end -}}
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
{{- define "caravan.adminTokenPath" -}}/var/run/secrets/caravan-admin/token{{- end -}}
{{- define "caravan.rayTokenPath" -}}/var/run/secrets/ray/auth_token{{- end -}}
{{- define "caravan.tlsDir" -}}/var/run/secrets/caravan-tls{{- end -}}
{{- define "caravan.grpcPort" -}}50051{{- end -}}
{{- /* The router's OpenAI-compatible HTTP API in the head pod: 8001, because Serve's proxy holds 8000 there. */}}
{{- define "caravan.httpPort" -}}8001{{- end -}}

{{/*
Ray's token auth in a container: the mode, and the token as a file (RAY_AUTH_TOKEN_PATH, which Ray reads
since 2.52) from the Secret KubeRay also reads (the key `auth_token` is KubeRay's), so that the operator's
calls to the dashboard carry the same token and the token is in no container's environment.
*/}}
{{- define "caravan.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: {{ include "caravan.rayTokenPath" . }}
{{- end -}}

{{- define "caravan.rayAuthVolume" -}}
- name: ray-auth
  secret:
    secretName: {{ include "caravan.rayAuthSecret" . }}
    defaultMode: 0440
    items:
      - key: auth_token
        path: {{ include "caravan.rayTokenPath" . | base }}
{{- end -}}

{{- define "caravan.rayAuthMount" -}}
- name: ray-auth
  mountPath: {{ include "caravan.rayTokenPath" . | dir }}
  readOnly: true
{{- end -}}

{{/*
The pod's and the container's security contexts (podSecurityContext, securityContext), for every pod of
the chart. With a read-only root, what Ray and Caravan write goes to the emptyDirs of caravan.scratchVolumes.
*/}}
{{- define "caravan.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "caravan.securityContext" -}}
{{- toYaml .Values.securityContext -}}
{{- end -}}

{{/*
Writable folders of a Ray container whose root file system is read-only: /tmp (Ray's session: logs,
sockets, spilled objects; compilers' scratch files) and the caches Caravan's CPU kernels and Triton's
GPU kernels are compiled into. Home's other content (the Python environment, the demo model) stays the image's.
*/}}
{{- define "caravan.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: kernel-cache
  emptyDir: {}
{{- end -}}

{{- define "caravan.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: kernel-cache
  mountPath: /home/ray/.cache/caravan/kernels
  subPath: caravan
- name: kernel-cache
  mountPath: /home/ray/.triton
  subPath: triton
{{- end -}}

{{/*
Volumes of every Ray pod: the config, the weights (read-only), Ray's token, the writable scratch folders; the
memory-backed /dev/shm is caravan.shmVolume.
*/}}
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
{{ include "caravan.rayAuthVolume" . }}
{{ include "caravan.scratchVolumes" . }}
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
{{ include "caravan.rayAuthMount" . }}
{{ include "caravan.scratchMounts" . }}
{{- end -}}

{{- define "caravan.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}

{{/*
A resource quantity of a Ray container, as a string in the form the API server writes it back (1Gi,
not 1024Mi; 1536Mi, not 1.5Gi; 1, not 1000m; "8", not 8). KubeRay writes the RayService back through
its Go types, which print quantities that way: a quantity the chart wrote otherwise would change, and
the operator would become the owner of that field (of the whole worker group, an atomic list), and
the next `helm upgrade` (server-side apply) would conflict with it. Takes (list <values key> <quantity>).
*/}}
{{- define "caravan.quantity" -}}
{{- $key := index . 0 -}}
{{- $q := index . 1 -}}
{{- if and (kindIs "float64" $q) (eq $q (floor $q)) -}}
{{- $q = int64 $q -}}
{{- end -}}
{{- $q = toString $q -}}
{{- $fix := printf "%s=%s: write it as Kubernetes does (an integer and a suffix, the largest suffix that keeps it an integer: 1Gi not 1024Mi, 1536Mi not 1.5Gi, 1 not 1000m, 500m not 0.5), or KubeRay writes it back changed and the next helm upgrade conflicts with the operator" $key $q -}}
{{- if not (regexMatch "^(0|[1-9][0-9]*)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$" $q) -}}
{{- fail $fix -}}
{{- end -}}
{{- $mantissa := regexFind "^[0-9]+" $q | int64 -}}
{{- $suffix := trimPrefix (toString $mantissa) $q -}}
{{- $base := ternary 1024 1000 (hasSuffix "i" $suffix) -}}
{{- if and (eq $mantissa 0) (ne $suffix "") -}}
{{- fail $fix -}}
{{- end -}}
{{- if and (gt $mantissa 0) (eq (mod $mantissa $base) 0) (not (has $suffix (list "E" "Ei"))) -}}
{{- fail $fix -}}
{{- end -}}
{{- $q -}}
{{- end -}}

{{/*
A Ray container's requests and limits (a dict), every quantity through caravan.quantity, an empty
part left out (KubeRay would drop it). Takes (list <values key> <resources>).
*/}}
{{- define "caravan.resources" -}}
{{- $key := index . 0 -}}
{{- $resources := index . 1 | default dict -}}
{{- $out := dict -}}
{{- range $part := list "requests" "limits" -}}
{{- $quantities := dict -}}
{{- range $name, $q := get $resources $part | default dict -}}
{{- $_ := set $quantities $name (include "caravan.quantity" (list (printf "%s.%s.%s" $key $part $name) $q)) -}}
{{- end -}}
{{- if $quantities -}}
{{- $_ := set $out $part $quantities -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
