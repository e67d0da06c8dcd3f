{{/*
Names and the sidecar container. "auth-sidecar.container" and "auth-sidecar.volumes" take a
context with `.Values` (this chart's values) and `.Release`, so an app chart that lists this
chart as a dependency (with `auth-sidecar.deployment.enabled: false` and
`auth-sidecar.image.tag` set) can add the sidecar to its own pods:

  {{- $sidecar := dict "Values" (index .Values "auth-sidecar") "Release" .Release }}
  containers:
    - name: my-app
      ...
    {{- include "auth-sidecar.container" $sidecar | nindent 4 }}
  volumes:
    {{- include "auth-sidecar.volumes" $sidecar | nindent 4 }}

tests/chart/parent is such a chart.
*/}}

{{- define "auth-sidecar.fullname" -}}
{{- printf "%s-auth-sidecar" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ServiceAccount the pods run as; empty: the namespace's default. */}}
{{- define "auth-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name -}}
{{- else if .Values.serviceAccount.create -}}
{{- include "auth-sidecar.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "auth-sidecar.labels" -}}
app.kubernetes.io/name: auth-sidecar
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "auth-sidecar.selectorLabels" -}}
app.kubernetes.io/name: auth-sidecar
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Secret the settings come from: the existing one, or the one this chart makes. */}}
{{- define "auth-sidecar.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "auth-sidecar.fullname" .) -}}
{{- end -}}

{{/* The image; its tag defaults to this chart's appVersion when rendered by this chart. */}}
{{- define "auth-sidecar.image" -}}
{{- $tag := .Values.image.tag -}}
{{- if and (not $tag) .Chart -}}{{- $tag = .Chart.AppVersion -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository (required "auth-sidecar: set image.tag" $tag) -}}
{{- end -}}

{{/* Whether a setting is available from a Secret (the existing one is trusted to hold it). */}}
{{- define "auth-sidecar.hasSecret" -}}
{{- $ctx := index . 0 -}}{{- $value := index . 1 -}}
{{- if or $ctx.Values.secrets.existingSecret $value -}}true{{- end -}}
{{- end -}}

{{/* Render-time checks of the multi-node rules. */}}
{{- define "auth-sidecar.validate" -}}
{{- $s := .Values.sidecar -}}
{{- if and (gt (int .Values.replicas) 1) (eq $s.storage "memory") .Values.deployment.enabled -}}
{{- fail (printf "replicas: %d with sidecar.storage: memory cannot work: each pod would keep its own revocations, sessions and rate-limit counters, so a token revoked on one pod stays valid on the others. Use storage redis, postgres or tiered, or replicas: 1." (int .Values.replicas)) -}}
{{- end -}}
{{- if and (ne $s.storage "memory") (not $s.keysSecret) (not (include "auth-sidecar.hasSecret" (list . .Values.secrets.jwtSecret))) -}}
{{- fail "shared storage needs the same signing key on every pod: set secrets.jwtSecret, secrets.existingSecret or sidecar.keysSecret" -}}
{{- end -}}
{{- if and .Values.mfa.enabled (not (include "auth-sidecar.hasSecret" (list . .Values.secrets.mfaKey))) -}}
{{- fail "mfa.enabled needs the same MFA key on every pod: set secrets.mfaKey or secrets.existingSecret (holding AUTH_MFA_KEY)" -}}
{{- end -}}
{{- if and (has $s.storage (list "redis" "tiered")) (not (include "auth-sidecar.hasSecret" (list . .Values.secrets.redisUrl))) -}}
{{- fail (printf "sidecar.storage: %s needs a Redis URL: set secrets.redisUrl or secrets.existingSecret" $s.storage) -}}
{{- end -}}
{{- if and (has $s.storage (list "postgres" "tiered")) (not (include "auth-sidecar.hasSecret" (list . .Values.secrets.databaseUrl))) -}}
{{- fail (printf "sidecar.storage: %s needs a PostgreSQL URL: set secrets.databaseUrl or secrets.existingSecret" $s.storage) -}}
{{- end -}}
{{- end -}}

{{/* One probe of the given service name, native gRPC or exec. */}}
{{- define "auth-sidecar.probe" -}}
{{- $ctx := index . 0 -}}{{- $service := index . 1 -}}
{{- if eq $ctx.Values.sidecar.probes.mode "grpc" }}
grpc:
  port: {{ $ctx.Values.sidecar.healthPort }}
  service: {{ $service }}
{{- else }}
exec:
  command:
    - /usr/local/bin/auth-sidecar
    - health
    - --addr
    - {{ printf "127.0.0.1:%v" $ctx.Values.sidecar.healthPort }}
    - --service
    - {{ $service }}
{{- end }}
{{- end -}}

{{/* A setting from the Secret. */}}
{{- define "auth-sidecar.secretEnv" -}}
{{- $ctx := index . 0 -}}{{- $name := index . 1 -}}{{- $key := index . 2 -}}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "auth-sidecar.secretName" $ctx }}
      key: {{ $key }}
{{- end -}}

{{/* The sidecar container, for this chart's Deployment and for any app chart's pod spec. */}}
{{- define "auth-sidecar.container" -}}
{{- include "auth-sidecar.validate" . -}}
{{- $s := .Values.sidecar -}}
- name: auth-sidecar
  image: {{ include "auth-sidecar.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve"]
  ports:
    - name: health
      containerPort: {{ $s.healthPort }}
      protocol: TCP
  env:
    - name: AUTH_LISTEN
      value: {{ $s.listen | quote }}
    - name: AUTH_OPS_LISTEN
      value: {{ printf "0.0.0.0:%v" $s.healthPort | quote }}
    - name: AUTH_STORAGE
      value: {{ $s.storage | quote }}
    - name: AUTH_NODE_ID
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: AUTH_STRICT_CLUSTER
      value: {{ $s.strictCluster | quote }}
    - name: AUTH_CLUSTER_HEARTBEAT
      value: {{ $s.clusterHeartbeat | quote }}
    {{- if .Values.admin.enabled }}
    - name: AUTH_ADMIN_LISTEN
      value: {{ printf "127.0.0.1:%v" .Values.admin.port | quote }}
    - name: ADMIN_GUI_USERNAME
      value: {{ .Values.admin.username | quote }}
    - name: AUTH_ADMIN_SECURE_COOKIE
      value: {{ .Values.admin.secureCookie | quote }}
    {{- include "auth-sidecar.secretEnv" (list . "ADMIN_GUI_PASSWORD_HASH" .Values.secrets.keys.adminPasswordHash) | nindent 4 }}
    {{- else }}
    - name: AUTH_ADMIN_LISTEN
      value: "off"
    {{- end }}
    {{- if .Values.mfa.enabled }}
    - name: AUTH_MFA
      value: "on"
    {{- include "auth-sidecar.secretEnv" (list . "AUTH_MFA_KEY" .Values.secrets.keys.mfaKey) | nindent 4 }}
    {{- with .Values.mfa.issuer }}
    - name: AUTH_MFA_ISSUER
      value: {{ . | quote }}
    {{- end }}
    - name: AUTH_MFA_ENROLLMENT_TTL
      value: {{ .Values.mfa.enrollmentTtl | quote }}
    - name: AUTH_MFA_VERIFY_LIMIT
      value: {{ .Values.mfa.verifyLimit | quote }}
    {{- else }}
    - name: AUTH_MFA
      value: "off"
    {{- end }}
    - name: AUTH_ISSUER
      value: {{ $s.issuer | quote }}
    {{- with $s.audience }}
    - name: AUTH_AUDIENCE
      value: {{ . | quote }}
    {{- end }}
    - name: AUTH_ACCESS_TTL
      value: {{ $s.accessTtl | quote }}
    - name: AUTH_MAX_TTL
      value: {{ $s.maxTtl | quote }}
    - name: AUTH_SESSION_TTL
      value: {{ $s.sessionTtl | quote }}
    - name: AUTH_REFRESH_MAX_LIFETIME
      value: {{ $s.refreshMaxLifetime | quote }}
    - name: AUTH_SHUTDOWN_DELAY
      value: {{ $s.shutdownDelay | quote }}
    - name: AUTH_SHUTDOWN_GRACE
      value: {{ $s.shutdownGrace | quote }}
    {{- with $s.rateLimits }}
    - name: AUTH_RATE_LIMITS
      value: {{ join "," . | quote }}
    {{- end }}
    - name: RUST_LOG
      value: {{ $s.logLevel | quote }}
    - name: AUTH_LOG_FORMAT
      value: {{ $s.logFormat | quote }}
    {{- with $s.otlpEndpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ . | quote }}
    - name: OTEL_SERVICE_NAME
      value: {{ $.Release.Name | printf "%s-auth-sidecar" | quote }}
    {{- end }}
    {{- if has $s.storage (list "redis" "tiered") }}
    - name: AUTH_REDIS_CLUSTER
      value: {{ $s.redis.cluster | quote }}
    - name: AUTH_REDIS_PREFIX
      value: {{ $s.redis.prefix | quote }}
    {{- include "auth-sidecar.secretEnv" (list . "REDIS_URL" .Values.secrets.keys.redisUrl) | nindent 4 }}
    {{- if $s.redis.tlsSecret }}
    - name: AUTH_REDIS_CA_FILE
      value: /etc/auth-sidecar/redis-tls/ca.crt
    {{- if $s.redis.clientCertificate }}
    - name: AUTH_REDIS_CLIENT_CERT
      value: /etc/auth-sidecar/redis-tls/tls.crt
    - name: AUTH_REDIS_CLIENT_KEY
      value: /etc/auth-sidecar/redis-tls/tls.key
    {{- end }}
    {{- end }}
    {{- end }}
    {{- if has $s.storage (list "postgres" "tiered") }}
    - name: AUTH_DB_MAX_CONNECTIONS
      value: {{ $s.postgres.maxConnections | quote }}
    - name: AUTH_MIGRATE
      value: {{ $s.postgres.migrate | quote }}
    {{- include "auth-sidecar.secretEnv" (list . "DATABASE_URL" .Values.secrets.keys.databaseUrl) | nindent 4 }}
    {{- end }}
    {{- if $s.keysSecret }}
    - name: AUTH_KEYS_DIR
      value: /etc/auth-sidecar/keys
    {{- else if include "auth-sidecar.hasSecret" (list . .Values.secrets.jwtSecret) }}
    {{- include "auth-sidecar.secretEnv" (list . "AUTH_JWT_SECRET" .Values.secrets.keys.jwtSecret) | nindent 4 }}
    {{- end }}
    {{- with $s.pkcs11.module }}
    - name: CRYPTOKI_LIB
      value: {{ . | quote }}
    {{- end }}
    {{- if $s.pkcs11.pinSecret }}
    - name: PKCS11_PIN_FILE
      value: /etc/auth-sidecar/pkcs11/pin
    {{- end }}
    {{- if ($s.resources.limits).cpu }}
    - name: TOKIO_WORKER_THREADS
      valueFrom:
        resourceFieldRef:
          containerName: auth-sidecar
          resource: limits.cpu
          divisor: "1"
    {{- end }}
    {{- with $s.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $redisTls := and (has $s.storage (list "redis" "tiered")) $s.redis.tlsSecret }}
  {{- $postgresTls := and (has $s.storage (list "postgres" "tiered")) $s.postgres.tlsSecret }}
  {{- if or $s.keysSecret $redisTls $postgresTls $s.pkcs11.pinSecret }}
  volumeMounts:
    {{- if $s.keysSecret }}
    - name: auth-sidecar-keys
      mountPath: /etc/auth-sidecar/keys
      readOnly: true
    {{- end }}
    {{- if $redisTls }}
    - name: auth-sidecar-redis-tls
      mountPath: /etc/auth-sidecar/redis-tls
      readOnly: true
    {{- end }}
    {{- if $postgresTls }}
    - name: auth-sidecar-postgres-tls
      mountPath: /etc/auth-sidecar/postgres-tls
      readOnly: true
    {{- end }}
    {{- if $s.pkcs11.pinSecret }}
    - name: auth-sidecar-pkcs11-pin
      mountPath: /etc/auth-sidecar/pkcs11
      readOnly: true
    {{- end }}
  {{- end }}
  startupProbe:
    {{- include "auth-sidecar.probe" (list . "liveness") | trim | nindent 4 }}
    periodSeconds: 1
    failureThreshold: {{ $s.probes.startupFailureThreshold }}
  livenessProbe:
    {{- include "auth-sidecar.probe" (list . "liveness") | trim | nindent 4 }}
    periodSeconds: {{ $s.probes.periodSeconds }}
    failureThreshold: {{ $s.probes.failureThreshold }}
    timeoutSeconds: 2
  readinessProbe:
    {{- include "auth-sidecar.probe" (list . "readiness") | trim | nindent 4 }}
    periodSeconds: {{ $s.probes.periodSeconds }}
    failureThreshold: {{ $s.probes.failureThreshold }}
    timeoutSeconds: 2
  resources:
    {{- toYaml $s.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end -}}

{{/* The pod volumes the sidecar needs (none unless a keys or TLS Secret is mounted). */}}
{{- define "auth-sidecar.volumes" -}}
{{- $s := .Values.sidecar -}}
{{- if $s.keysSecret }}
- name: auth-sidecar-keys
  secret:
    secretName: {{ $s.keysSecret }}
    defaultMode: 0400
{{- end }}
{{- if and (has $s.storage (list "redis" "tiered")) $s.redis.tlsSecret }}
- name: auth-sidecar-redis-tls
  secret:
    secretName: {{ $s.redis.tlsSecret }}
    defaultMode: 0400
{{- end }}
{{- if and (has $s.storage (list "postgres" "tiered")) $s.postgres.tlsSecret }}
- name: auth-sidecar-postgres-tls
  secret:
    secretName: {{ $s.postgres.tlsSecret }}
    defaultMode: 0400
{{- end }}
{{- if $s.pkcs11.pinSecret }}
- name: auth-sidecar-pkcs11-pin
  secret:
    secretName: {{ $s.pkcs11.pinSecret }}
    defaultMode: 0400
    items:
      - key: pin
        path: pin
{{- end }}
{{- end -}}
