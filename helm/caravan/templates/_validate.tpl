{{/*
The checks values.schema.json cannot make, because they relate values to one another: the layout
against the worker group, the device against the GPUs, the model path against its volume, the
liveness window against the setup timeout, the router certificate's two sources. Each failure names
the values keys and the fix.
*/}}
{{- define "caravan.validate" -}}
{{- $c := .Values.caravan -}}
{{- $w := .Values.workers -}}
{{- $gpus := int $w.gpusPerNode -}}

{{- if and (gt $gpus 0) (eq $c.shard.device "cpu") -}}
{{- fail (printf "caravan.shard.device is cpu but workers.gpusPerNode is %d: set caravan.shard.device to cuda to compute on the GPUs, or workers.gpusPerNode to 0 for CPU workers" $gpus) -}}
{{- end -}}
{{- if and (eq $gpus 0) (eq $c.shard.device "cuda") -}}
{{- fail "caravan.shard.device is cuda but workers.gpusPerNode is 0: give the workers GPUs (workers.gpusPerNode, workers.gpuMemory), or set caravan.shard.device to cpu" -}}
{{- end -}}

{{- with $c.model.path -}}
{{- $mount := trimSuffix "/" $.Values.modelVolume.mountPath -}}
{{- if not (hasPrefix (printf "%s/" $mount) .) -}}
{{- fail (printf "caravan.model.path=%s is not inside modelVolume.mountPath=%s, where modelVolume.claimName is mounted: set caravan.model.path to the checkpoint's folder under %s" . $mount $mount) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (toString $c.speculative.method) "draft") (not $c.speculative.draft_model) -}}
{{- fail "caravan.speculative.method is draft but caravan.speculative.draft_model is not set: set it to a draft checkpoint's folder under modelVolume.mountPath that shares the model's tokenizer (for 405B: Llama 3.2 1B), or use method ngram" -}}
{{- end -}}
{{- with $c.speculative.draft_model -}}
{{- $mount := trimSuffix "/" $.Values.modelVolume.mountPath -}}
{{- if not (hasPrefix (printf "%s/" $mount) .) -}}
{{- fail (printf "caravan.speculative.draft_model=%s is not inside modelVolume.mountPath=%s, where modelVolume.claimName is mounted: put the draft checkpoint on that volume and set caravan.speculative.draft_model to its folder under %s" . $mount $mount) -}}
{{- end -}}
{{- end -}}

{{- /* Shards per node: one per GPU, or on CPU workers one per Ray CPU. */ -}}
{{- $slots := ternary $gpus (int $w.cpuShardsPerNode) (gt $gpus 0) -}}
{{- $slotsKey := ternary "workers.gpusPerNode" "workers.cpuShardsPerNode" (gt $gpus 0) -}}
{{- $what := ternary "GPUs" "CPU shards" (gt $gpus 0) -}}
{{- $tp := int $c.layout.tp -}}
{{- $pp := int $c.layout.pp -}}
{{- $replicas := int .Values.replicas -}}
{{- if ne (mod $slots $tp) 0 -}}
{{- fail (printf "caravan.layout.tp=%d does not divide %s=%d: a stage's TP group all-reduces on every layer, so it sits on one node, and a node holds whole TP groups only; use a caravan.layout.tp that divides %d, or set %s to a multiple of %d" $tp $slotsKey $slots $slots $slotsKey $tp) -}}
{{- end -}}
{{- $stagesPerNode := div $slots $tp -}}
{{- $stages := mul $replicas $pp -}}
{{- $nodes := div (add $stages $stagesPerNode -1) $stagesPerNode -}}
{{- if ne (int $w.nodes) $nodes -}}
{{- fail (printf "workers.nodes=%d does not match the layout: replicas=%d x caravan.layout.pp=%d = %d stages of caravan.layout.tp=%d, and a node with %s=%d %s holds %d stage(s), so the stages fill %d node(s); set workers.nodes to %d (or change replicas, caravan.layout.pp or caravan.layout.tp)" (int $w.nodes) $replicas $pp $stages $tp $slotsKey $slots $what $stagesPerNode $nodes $nodes) -}}
{{- end -}}

{{- if and .Values.routerTLS.existingSecret .Values.routerTLS.certManager.enabled -}}
{{- fail (printf "routerTLS.existingSecret=%s and routerTLS.certManager.enabled are both set: the router's certificate comes from one of them; unset routerTLS.existingSecret to let cert-manager issue it, or turn routerTLS.certManager.enabled off to use that Secret" .Values.routerTLS.existingSecret) -}}
{{- end -}}
{{- if and .Values.routerTLS.certManager.enabled (not .Values.routerTLS.certManager.issuerRef.name) -}}
{{- fail "routerTLS.certManager.enabled needs routerTLS.certManager.issuerRef.name: the cert-manager Issuer (or ClusterIssuer, with issuerRef.kind) that signs the router's certificate" -}}
{{- end -}}

{{- with .Values.head.livenessProbe -}}
{{- if .enabled -}}
{{- $window := add (int .initialDelaySeconds) (mul (int .failureThreshold) (int .periodSeconds)) -}}
{{- if lt (float64 $window) (float64 $c.timeouts.setup_s) -}}
{{- fail (printf "head.livenessProbe gives the router %d s (initialDelaySeconds + failureThreshold x periodSeconds) to become healthy, less than caravan.timeouts.setup_s=%v that a replica may take to load its weights; raise head.livenessProbe.initialDelaySeconds or failureThreshold" $window $c.timeouts.setup_s) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
