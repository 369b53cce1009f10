{{/*
The Caravan config as the Serve application's args: the `caravan` values plus the router keys the
chart owns. Never `replicas` (the `replica` deployment's num_replicas: a change of args restarts
every replica, a change of num_replicas scales in place), nor `address` and `local_cluster`, which
only tell the CLI where to run (cluster/deploy/controller.py, NOT_ARGS).
*/}}
{{- define "caravan.args" -}}
{{- $router := deepCopy .Values.caravan.router -}}
{{- $_ := set $router "host" "0.0.0.0" -}}
{{- $_ := set $router "port" (include "caravan.grpcPort" . | int) -}}
{{- $_ := set $router "http_port" (include "caravan.httpPort" . | int) -}}
{{- $_ := set $router "metrics_port" (int .Values.metrics.port) -}}
{{- if .Values.routerAuth.enabled -}}
{{- $_ := set $router "auth_token_file" (include "caravan.routerTokenPath" .) -}}
{{- end -}}
{{- $_ := set $router "admin_token_file" (include "caravan.adminTokenPath" .) -}}
{{- if include "caravan.routerTLSSecret" . -}}
{{- $_ := set $router "tls_cert_file" (printf "%s/tls.crt" (include "caravan.tlsDir" .)) -}}
{{- $_ := set $router "tls_key_file" (printf "%s/tls.key" (include "caravan.tlsDir" .)) -}}
{{- end -}}
{{- $args := deepCopy .Values.caravan -}}
{{- $_ := set $args "router" $router -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The whole Caravan config, for /etc/caravan/config.yaml (`caravan doctor` reads it). */}}
{{- define "caravan.config" -}}
{{- $config := include "caravan.args" . | fromYaml -}}
{{- $_ := set $config "replicas" (int .Values.replicas) -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
The RayService's Serve config. proxy_location is HeadOnly, not Disabled, although nothing is served
over HTTP: KubeRay marks the head pod `ray.io/serve=true` only while Serve's HTTP proxy answers
/-/healthz on it (rayservice_controller.go, updateHeadPodServeLabel), the gRPC Service selects only
pods with that label, and the RayService is Ready only when that Service has an endpoint. With
Disabled the gRPC Service would stay empty and the RayService never Ready. The proxy's port 8000 is
in no Service of the chart.
*/}}
{{- define "caravan.serveConfig" -}}
proxy_location: HeadOnly
applications:
  - name: {{ .Values.caravan.name }}
    import_path: cluster.deploy.app:build
    args:
      {{- include "caravan.args" . | nindent 6 }}
    deployments:
      - name: replica
        num_replicas: {{ int .Values.replicas }}
{{- end -}}
