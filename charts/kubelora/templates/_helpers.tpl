{{/* Chart name (nameOverride wins). */}}
{{- define "kubelora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: fullnameOverride, else <release>-<name> (or <release> when it already contains the name). */}}
{{- define "kubelora.fullname" -}}
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

{{- define "kubelora.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pods (stable across upgrades). */}}
{{- define "kubelora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubelora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubelora.labels" -}}
helm.sh/chart: {{ include "kubelora.chart" . }}
{{ include "kubelora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubelora
{{- end -}}

{{- define "kubelora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubelora.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubelora.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* "true" when kopf peering is on: replicaCount > 1 or peering.enabled. */}}
{{- define "kubelora.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{- define "kubelora.peeringName" -}}
{{- default (include "kubelora.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* The operator's settings file (camelCase keys of kubelora_operator.settings.OperatorSettings). */}}
{{- define "kubelora.settings" -}}
{{ toYaml .Values.settings }}
{{- end -}}

{{/* Rules on namespaced resources the operator uses (derived from kube.py and handlers/, plus kopf). */}}
{{- define "kubelora.namespacedRules" -}}
# LoRAFineTunes: kopf lists/watches them and patches its finalizer and annotations (progress storage);
# the reconcile reads one (get), stores annotations (patch) and deletes it after ttlSecondsAfterFinished.
- apiGroups: ["kubelora.dev"]
  resources: ["lorafinetunes"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# Conditions, progress, artifact: merge patches of the status subresource.
- apiGroups: ["kubelora.dev"]
  resources: ["lorafinetunes/status"]
  verbs: ["patch"]
# Children carry an owner reference with blockOwnerDeletion: true, which clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) allow only with this.
- apiGroups: ["kubelora.dev"]
  resources: ["lorafinetunes/finalizers"]
  verbs: ["update"]
# Worker pods: created per attempt, listed by label, read for progress, watched (kopf on.event),
# deleted on restart/suspend/deadline. No pods/exec, pods/log or updates.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The headless Service of the workers (create only; owner references garbage-collect it).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# The trainer-config ConfigMap (create); dataVolume.configMap references are checked (get).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
# Referenced Secrets are checked for existence and keys (get); the `<name>-ssh` key pair for
# launcher mpirun is created. No list/watch: the operator never browses Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# Referenced PVCs are checked for existence and access modes.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Events about LoRAFineTunes (Validated, NoMatchingNodes, WorkerFailed, ...).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
