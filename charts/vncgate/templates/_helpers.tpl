{{/* Names, labels and values computed once for every template. */}}

{{- define "vncgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-vncgate", or the release name alone when it already contains the chart name.
Truncated to 52 so that "-operator" and "-relay-headless" suffixes stay within 63. */}}
{{- define "vncgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vncgate.relay.fullname" -}}
{{- printf "%s-relay" (include "vncgate.fullname" .) }}
{{- end }}

{{/* The headless Service the operator discovers relay pods through (EndpointSlices). */}}
{{- define "vncgate.relay.headlessName" -}}
{{- printf "%s-relay-headless" (include "vncgate.fullname" .) }}
{{- end }}

{{- define "vncgate.operator.fullname" -}}
{{- printf "%s-operator" (include "vncgate.fullname" .) }}
{{- end }}

{{- define "vncgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vncgate.labels" -}}
helm.sh/chart: {{ include "vncgate.chart" . }}
app.kubernetes.io/name: {{ include "vncgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vncgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the pods: the selector labels, commonLabels and the component's podLabels. */}}
{{- define "vncgate.podLabels" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $labels := merge (dict) (include (printf "vncgate.%s.selectorLabels" $component) $root | fromYaml) (index $root.Values $component).podLabels $root.Values.commonLabels }}
{{- toYaml $labels }}
{{- end }}

{{- define "vncgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vncgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vncgate.relay.selectorLabels" -}}
{{ include "vncgate.selectorLabels" . }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "vncgate.operator.selectorLabels" -}}
{{ include "vncgate.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vncgate.relay.labels" -}}
{{ include "vncgate.labels" . }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "vncgate.operator.labels" -}}
{{ include "vncgate.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vncgate.relay.serviceAccountName" -}}
{{- if .Values.relay.serviceAccount.create }}
{{- default (include "vncgate.relay.fullname" .) .Values.relay.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.relay.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vncgate.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "vncgate.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: image.registry (else global.imageRegistry), when set, replaces the registry
part of image.repository (its first component when that has a "." or ":" or is "localhost", as
Docker reads references) or is put before it. */}}
{{- define "vncgate.image" -}}
{{- $repository := .Values.image.repository }}
{{- $registry := .Values.image.registry | default ((.Values.global | default dict).imageRegistry) }}
{{- if $registry }}
{{- $parts := splitList "/" $repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repository = rest $parts | join "/" }}
{{- end }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The names of the cluster-scoped ClusterRoles people bind: rbac.<role>ClusterRole.name, or
"<fullname>-<suffix>", so that two releases never collide. Called with (list $ "viewer"). */}}
{{- define "vncgate.clusterRoleName" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $suffixes := dict "viewer" "viewer" "editor" "editor" "admin" "admin" "recordingsViewer" "recordings-viewer" }}
{{- $value := index $root.Values.rbac (printf "%sClusterRole" $role) }}
{{- $value.name | default (printf "%s-%s" (include "vncgate.fullname" $root) (index $suffixes $role)) }}
{{- end }}

{{/* The ClusterRoleBinding of the initial user to the viewer role. roleRef cannot change: a
binding to another role (renamed by the values, or by the chart as in 0.3) gets another name, so
an upgrade replaces it instead of failing. */}}
{{- define "vncgate.initialUserBinding" -}}
{{- printf "%s-initial-user-%s" (include "vncgate.fullname" .) (include "vncgate.clusterRoleName" (list . "viewer") | sha256sum | trunc 8) }}
{{- end }}

{{/* The ClusterRole the relay may be bound to, per namespace, to read credentials Secrets. */}}
{{- define "vncgate.relay.credentialsRole" -}}
{{- printf "%s-credentials" (include "vncgate.relay.fullname" .) }}
{{- end }}

{{/* "true" when the chart renders an Ingress: ingress.enabled, or unset with a host. */}}
{{- define "vncgate.ingress.enabled" -}}
{{- $enabled := .Values.ingress.enabled }}
{{- if or (eq (toString $enabled) "true") (and (kindIs "invalid" $enabled) .Values.ingress.host) -}}
true
{{- end }}
{{- end }}

{{/* The host users open: the Ingress's, else the HTTPRoute's first host name; empty when
neither names one. */}}
{{- define "vncgate.publicHost" -}}
{{- if and (include "vncgate.ingress.enabled" .) .Values.ingress.host }}
{{- .Values.ingress.host }}
{{- else if and .Values.httpRoute.enabled .Values.httpRoute.hostnames }}
{{- first .Values.httpRoute.hostnames }}
{{- end }}
{{- end }}

{{/* The base URL users open (no trailing slash). */}}
{{- define "vncgate.publicUrl" -}}
{{- if .Values.publicUrl }}
{{- .Values.publicUrl | trimSuffix "/" }}
{{- else if include "vncgate.publicHost" . }}
{{- printf "https://%s" (include "vncgate.publicHost" .) }}
{{- else }}
{{- print "http://127.0.0.1:8080" }}
{{- end }}
{{- end }}

{{/* Origins, besides the page's own, that may open WebSockets: the public URL and extras. */}}
{{- define "vncgate.relay.allowedOrigins" -}}
{{- $origins := list }}
{{- if or .Values.publicUrl (include "vncgate.publicHost" .) }}
{{- $origins = append $origins (include "vncgate.publicUrl" .) }}
{{- end }}
{{- if include "vncgate.ingress.enabled" . }}
{{- range .Values.ingress.extraHosts }}
{{- $origins = append $origins (printf "https://%s" .) }}
{{- end }}
{{- end }}
{{- range .Values.relay.allowedOrigins }}
{{- $origins = append $origins (trimSuffix "/" .) }}
{{- end }}
{{- $origins | uniq | toJson }}
{{- end }}

{{- define "vncgate.tokenSecretName" -}}
{{- default (printf "%s-registration-token" (include "vncgate.fullname" .)) .Values.registrationToken.existingSecret }}
{{- end }}

{{/* The generated registration token, base64-encoded: the one in the cluster if the Secret
exists (lookup; empty under `helm template`), else 48 new random characters. Computed once per
render and kept on the root context, so that the Secret and the pods' checksum agree. */}}
{{- define "vncgate.generatedToken" -}}
{{- if not (hasKey $ "vncgateGeneratedToken") }}
{{- $token := "" }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "vncgate.tokenSecretName" .) }}
{{- if and $secret $secret.data }}
{{- $token = index $secret.data .Values.registrationToken.secretKey | default "" }}
{{- end }}
{{- if not $token }}
{{- $token = randAlphaNum 48 | b64enc }}
{{- end }}
{{- $_ := set $ "vncgateGeneratedToken" $token }}
{{- end }}
{{- get $ "vncgateGeneratedToken" }}
{{- end }}

{{/* Pod annotation that restarts the pods when a generated token changes: both components read
the token once at start. Not rendered for an existing Secret, whose content the chart can't see. */}}
{{- define "vncgate.tokenChecksum" -}}
{{- if not .Values.registrationToken.existingSecret }}
checksum/registration-token: {{ include "vncgate.generatedToken" . | sha256sum }}
{{- end }}
{{- end }}

{{/* The registration token as a volume, its key always mounted as the file "token". */}}
{{- define "vncgate.tokenVolume" -}}
- name: registration-token
  secret:
    secretName: {{ include "vncgate.tokenSecretName" . }}
    defaultMode: 288  # 0440: owner and group (fsGroup 10001) read
    items:
      - key: {{ .Values.registrationToken.secretKey }}
        path: token
{{- end }}

{{- define "vncgate.tokenPath" -}}
/etc/vncgate/registration-token/token
{{- end }}

{{- define "vncgate.tokenVolumeMount" -}}
- name: registration-token
  mountPath: /etc/vncgate/registration-token
  readOnly: true
{{- end }}

{{/* --- the relay's sign-in: users file, session secret, share-link keys ------------------- */}}

{{/* The Secret with users.yaml: the user's own, or the generated "<fullname>-users". */}}
{{- define "vncgate.usersSecretName" -}}
{{- default (printf "%s-users" (include "vncgate.fullname" .)) .Values.relay.auth.token.existingSecret }}
{{- end }}

{{/* "true" when the chart generates the users Secret (token mode, no existing Secret). Fails
with what to set when token mode has no users at all. */}}
{{- define "vncgate.usersGenerated" -}}
{{- $token := .Values.relay.auth.token }}
{{- if and (eq .Values.relay.auth.mode "token") (not $token.existingSecret) }}
{{- if not $token.initialUser }}
{{- fail "relay.auth.mode=token needs users: set relay.auth.token.initialUser (e.g. admin) to generate one, or relay.auth.token.existingSecret to the name of a Secret with the key users.yaml" }}
{{- end -}}
true
{{- end }}
{{- end }}

{{/* The generated users.yaml, base64-encoded: the one in the cluster when the Secret exists
(lookup; users added to it stay), else the initial user with a token of 32 random characters
(a token entry: a password for the sign-in page and a bearer token for scripts). Computed once
per render, like the registration token. */}}
{{- define "vncgate.generatedUsers" -}}
{{- if not (hasKey $ "vncgateGeneratedUsers") }}
{{- $users := "" }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "vncgate.usersSecretName" .) }}
{{- if and $secret $secret.data }}
{{- $users = index $secret.data "users.yaml" | default "" }}
{{- end }}
{{- if not $users }}
{{- $entry := dict "token" (randAlphaNum 32) "groups" (list) }}
{{- $users = dict .Values.relay.auth.token.initialUser $entry | toYaml | b64enc }}
{{- end }}
{{- $_ := set $ "vncgateGeneratedUsers" $users }}
{{- end }}
{{- get $ "vncgateGeneratedUsers" }}
{{- end }}

{{- define "vncgate.keysSecretName" -}}
{{- default (printf "%s-keys" (include "vncgate.fullname" .)) .Values.relay.auth.keys.existingSecret }}
{{- end }}

{{/* The generated keys as a dict of base64 values ("session-secret", "link-key"), as JSON:
each kept from the cluster when present, else 48 new random characters. */}}
{{- define "vncgate.generatedKeys" -}}
{{- if not (hasKey $ "vncgateGeneratedKeys") }}
{{- $keys := dict }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "vncgate.keysSecretName" .) }}
{{- range $name := list "session-secret" "link-key" }}
{{- $value := "" }}
{{- if and $secret $secret.data }}
{{- $value = index $secret.data $name | default "" }}
{{- end }}
{{- $_ := set $keys $name (default (randAlphaNum 48 | b64enc) $value) }}
{{- end }}
{{- $_ := set $ "vncgateGeneratedKeys" ($keys | toJson) }}
{{- end }}
{{- get $ "vncgateGeneratedKeys" }}
{{- end }}

{{/* Pod annotations that restart the relay pods when a generated users file or key changes:
the relay reads them once at start. */}}
{{- define "vncgate.relay.checksums" -}}
{{- if include "vncgate.usersGenerated" . }}
checksum/users: {{ include "vncgate.generatedUsers" . | sha256sum }}
{{- end }}
{{- if not .Values.relay.auth.keys.existingSecret }}
checksum/keys: {{ include "vncgate.generatedKeys" . | sha256sum }}
{{- end }}
{{- end }}

{{/* "true" when the relay asks the API server (SubjectAccessReviews) who may open what. With
--auth none every console is open to everyone and there is nothing to ask. */}}
{{- define "vncgate.relay.usesSubjectAccessReviews" -}}
{{- if and (eq .Values.relay.authorization "kubernetes") (ne .Values.relay.auth.mode "none") -}}
true
{{- end }}
{{- end }}

{{/* "true" when the relay checks Kubernetes bearer tokens with TokenReviews (kubectl vnc). */}}
{{- define "vncgate.relay.usesTokenReviews" -}}
{{- if and (include "vncgate.relay.usesSubjectAccessReviews" .) .Values.relay.auth.kubernetesTokens.enabled -}}
true
{{- end }}
{{- end }}

{{/* The audiences the relay accepts Kubernetes tokens for, as a JSON list: relay.auth.
kubernetesTokens.audiences, else one of this release's own; [] (tokens for the API server
itself) only with apiServerTokens. */}}
{{- define "vncgate.relay.tokenAudiences" -}}
{{- $tokens := .Values.relay.auth.kubernetesTokens }}
{{- if $tokens.apiServerTokens }}
{{- if $tokens.audiences }}
{{- fail "relay.auth.kubernetesTokens: apiServerTokens=true accepts tokens for the API server itself, audiences names others; set one of them" }}
{{- end }}
{{- list | toJson }}
{{- else if $tokens.audiences }}
{{- $tokens.audiences | toJson }}
{{- else }}
{{- list (printf "vncgate:%s:%s" .Release.Namespace .Release.Name) | toJson }}
{{- end }}
{{- end }}

{{/* "true" when the relay pod needs its ServiceAccount token: SubjectAccessReviews, Leases,
or the Secrets of VncTargets' spec.credentials, or KubeVirt consoles. */}}
{{- define "vncgate.relay.usesKubernetesApi" -}}
{{- if or (include "vncgate.relay.usesSubjectAccessReviews" .) .Values.relay.leases.enabled .Values.relay.credentials.enabled .Values.kubevirt.enabled -}}
true
{{- end }}
{{- end }}

{{- define "vncgate.usersDir" -}}
/etc/vncgate/users
{{- end }}

{{- define "vncgate.keysDir" -}}
/etc/vncgate/keys
{{- end }}

{{- define "vncgate.oidcDir" -}}
/etc/vncgate/oidc
{{- end }}

{{- define "vncgate.oidcCaDir" -}}
/etc/vncgate/oidc-ca
{{- end }}

{{/* relay.auth.oidc, checked: what --auth oidc cannot start without, said in the values' words. */}}
{{- define "vncgate.relay.oidc" -}}
{{- $oidc := .Values.relay.auth.oidc }}
{{- if not $oidc.issuer }}
{{- fail "relay.auth.mode=oidc needs relay.auth.oidc.issuer: the provider's https issuer URL" }}
{{- end }}
{{- if not $oidc.clientID }}
{{- fail "relay.auth.mode=oidc needs relay.auth.oidc.clientID: the relay's client at the provider" }}
{{- end }}
{{- if not $oidc.clientSecret.existingSecret }}
{{- fail "relay.auth.mode=oidc needs relay.auth.oidc.clientSecret.existingSecret: a Secret holding the client secret (kubectl create secret generic vncgate-oidc --from-literal=client-secret=...)" }}
{{- end }}
{{- if not (or .Values.publicUrl (include "vncgate.publicHost" .)) }}
{{- fail "relay.auth.mode=oidc needs a public URL (ingress.host, httpRoute.hostnames or publicUrl): the provider sends browsers back to <public URL>/login/oidc/callback" }}
{{- end }}
{{- toJson $oidc }}
{{- end }}

{{/* --- the validating admission webhook and the network-reach grants ---------------------- */}}
{{- define "vncgate.webhookCertDir" -}}
/etc/vncgate/webhook
{{- end }}

{{- define "vncgate.reachConfigMap" -}}
{{- printf "%s-network-reach" (include "vncgate.fullname" .) }}
{{- end }}

{{- define "vncgate.reachPath" -}}
/etc/vncgate/network-reach/grants.yaml
{{- end }}

{{/* The grants as the operator and the relay read them (their file format: vncgate.common.reach). */}}
{{- define "vncgate.reachGrants" -}}
{{- dict "grants" (.Values.networkReach.grants | default list) | toYaml }}
{{- end }}

{{/* Both components read the grants at start: a change restarts them. */}}
{{- define "vncgate.reachChecksum" -}}
{{- if .Values.networkReach.enforced }}
checksum/network-reach: {{ include "vncgate.reachGrants" . | sha256sum }}
{{- end }}
{{- end }}

{{/* The relay's --trusted-proxy CIDRs as a JSON list: relay.trustedProxies (the Ingress or
Gateway in front, in every auth mode), and in proxy mode the authenticating proxy's too. */}}
{{- define "vncgate.relay.trustedProxies" -}}
{{- $proxies := list }}
{{- range .Values.relay.trustedProxies }}
{{- $proxies = append $proxies . }}
{{- end }}
{{- if eq .Values.relay.auth.mode "proxy" }}
{{- range .Values.relay.auth.trustedProxies }}
{{- $proxies = append $proxies . }}
{{- end }}
{{- end }}
{{- $proxies | uniq | toJson }}
{{- end }}
